"""The scheduler: walk the plan tensor by tensor, chunk by chunk, inside the memory budget.

For each chunk: take zero-copy views of the base and every model, hint the kernel to read the
next chunk, call the method's pure ``merge``, write the output bytes at their planned offset,
store the masks, then release the consumed input pages so mapped input never piles up in RSS.

Crash safety (see :mod:`streammerge.journal`): finished chunks are journaled in small batches
after their bytes are durable; a rerun of the same command resumes from the journal; SIGINT
and SIGTERM finish the current chunk, flush, and exit; the index and ``streammerge.json`` are
written last, so an output folder without the marker is never mistaken for a finished one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .errors import InputError, Interrupted, StreamMergeError
from .journal import (
    INCOMPLETE,
    STATE_DIR,
    FolderLock,
    Journal,
    Progress,
    digest,
    explain_mismatch,
    fsync_dir,
)
from .mask_store import STORE_NAME, MaskStore, ZarrMaskStore
from .memory import RssSampler, default_max_memory, format_size, peak_rss
from .methods import METHODS, MergeResult, TensorId
from .methods.replay import add_next, apply_masks
from .model import ModelFolder
from .plan import MergePlan, TensorTask, build_plan, check_out_dir
from .recipe import Recipe, load_recipe
from .safetensors_io import FLOAT_DTYPES, ShardWriter, atomic_write_text, tensor_bytes, write_index
from .tadrop import TadropConfig, allocate, chunk_sample_slice, kurtosis

DEFAULT_SHARD_SIZE = 5_000_000_000
JOURNAL_INTERVAL_S = 0.5
"""How often finished chunks are made durable and journaled (at most)."""
COMPLETE_MARKER = "streammerge.json"
"""Written last: its presence means the output folder is complete."""
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True, slots=True)
class Replay:
    """Merge from a finished CABS merge's occupancy store instead of selecting masks.

    ``remix``: every model's mask is stored; inputs are the base and the recipe's models.
    ``add``: the recipe's last model is new; inputs are the base, that model and the finished
    output (``source``), whose masks give the earlier models' claims (``strict`` only).
    """

    source: Path
    """The finished output folder (holding ``occupancy.zarr``)."""
    add: bool = False

    def inputs(self, recipe: Recipe) -> list[Path]:
        """The folders this run reads besides the base."""
        if self.add:
            return [recipe.models[-1].path, self.source]
        return [m.path for m in recipe.models]


@dataclass
class RunSummary:
    """What a finished merge reports."""

    out_dir: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    """Peak RSS of the process (kernel high-water mark), bytes; includes mapped input pages."""
    peak_anon_rss: int
    """Peak anonymous RSS (sampled every 50 ms), bytes."""
    chunk_elems: int
    warnings: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    """Model names in processing order."""
    kept: dict[str, list[int]] = field(default_factory=dict)
    """Kept element counts per tensor, per model (sparsifying methods only)."""
    merged_elems: int = 0
    """Elements of the merged (floating-point) tensors, per model."""
    resumed_chunks: int = 0
    """Chunks an interrupted run had finished and this run skipped."""
    total_chunks: int = 0
    """Chunks in the plan (merge pass only)."""


def run_merge(
    recipe: Recipe | Path | str,
    out_dir: Path | str,
    *,
    max_memory: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    chunk_elems: int | None = None,
    progress: bool = False,
    mask_store: MaskStore | None = None,
    restart: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    replay: Replay | None = None,
) -> RunSummary:
    """Merge the recipe's models into ``out_dir``; the library entry point behind ``run``.

    Rerunning with the same recipe and inputs resumes an interrupted merge.

    Args:
        recipe: a validated :class:`Recipe` or the path of a YAML recipe.
        out_dir: output folder: new, empty, or holding an interrupted run of the same plan.
        max_memory: peak RSS budget in bytes (default: half the available RAM).
        shard_size: maximum bytes per output shard.
        chunk_elems: force a chunk length (elements) instead of deriving it from the budget.
        progress: draw a progress bar on stderr.
        mask_store: where masks go (default: ``out_dir/occupancy.zarr``; no resume otherwise).
        restart: discard an interrupted run in ``out_dir`` and start over.
        force: replace a finished merge in ``out_dir``.
        allow_nonfinite: let NaN/Inf input values through instead of failing.
        replay: take the masks from a finished merge (``remix``/``add``, see :class:`Replay`).
    """
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    out_dir = Path(out_dir)
    inputs = [recipe.base, *(m.path for m in recipe.models)]
    check_out_dir(out_dir, inputs + ([replay.source] if replay else []))
    base = ModelFolder(recipe.base)
    models: list[ModelFolder] = []
    old_store = None
    try:
        # appended one by one, so a failure still closes those opened
        models.extend(ModelFolder(p) for p in (replay.inputs(recipe) if replay else inputs[1:]))
        if replay is not None:
            old_store = ZarrMaskStore(replay.source / STORE_NAME)
        budget = max_memory or default_max_memory()
        plan = build_plan(recipe, base, models, budget, shard_size, chunk_elems)
        _refuse_foreign(out_dir)  # before we create anything in it
        _make_dir(out_dir)
        with FolderLock(out_dir):
            journal = Journal(out_dir)
            # the digest excludes TADrop's densities: they follow from the inputs and recipe
            plan_digest = _plan_digest(plan, base, models, old_store)
            header, done = _claim_out_dir(out_dir, journal, plan_digest, restart, force)
            if header.get("chunk_elems") and chunk_elems is None:
                chunk_elems = header["chunk_elems"]  # resume with the interrupted run's chunks
                plan = build_plan(recipe, base, models, budget, shard_size, chunk_elems)
            tadrop: dict[str, object] = {}
            if recipe.tadrop:  # a sampling pass decides every tensor's density, then re-plan
                if old_store is not None:  # replaying: the densities the masks were made with
                    densities, tadrop = _stored_densities(old_store)
                else:
                    densities, tadrop = tadrop_densities(plan, base, models, allow_nonfinite)
                plan = build_plan(recipe, base, models, budget, shard_size, chunk_elems, densities)
                # the densities used (n/m for CABS), per tensor and model, as on the mask arrays
                tadrop["densities"] = {
                    t.name: [p.density for p in t.params] for t in plan.tensors if t.merged
                }
            _check_disk(out_dir, plan)
            if not journal.exists():
                chunk = chunk_elems or plan.budget.chunk_elems
                journal.create({**plan_digest, "chunk_elems": chunk})
                atomic_write_text(out_dir / INCOMPLETE, INCOMPLETE_TEXT)
            store = mask_store or ZarrMaskStore(
                out_dir / STORE_NAME, mode="w" if done.empty else "r+"
            )
            if done.empty:
                store.set_attrs(_store_attrs(plan, tadrop))
            run = _Run(plan, base, models, out_dir, store, journal, done, allow_nonfinite,
                       replay, old_store)  # fmt: skip
            with RssSampler() as sampler, _StopOnSignals() as stop:
                run.execute(progress, stop)
            _finalize(plan, out_dir, journal)
            summary = RunSummary(
                out_dir=out_dir,
                tensors=len(plan.tensors),
                bytes_read=plan.bytes_read,
                bytes_written=plan.bytes_written,
                seconds=time.perf_counter() - t0,
                peak_rss=peak_rss(),
                peak_anon_rss=sampler.peak_anon,
                chunk_elems=plan.budget.chunk_elems,
                warnings=recipe.warnings,
                models=tuple(m.name for m in recipe.models),
                kept=run.kept,
                merged_elems=sum(t.numel for t in plan.tensors if t.merged),
                resumed_chunks=run.skipped,
                total_chunks=sum(len(t.chunks()) for t in plan.tensors),
            )
            marker = {**_marker(recipe, summary), **({"tadrop": tadrop} if tadrop else {})}
            atomic_write_text(out_dir / COMPLETE_MARKER, json.dumps(marker, indent=2))
            (out_dir / INCOMPLETE).unlink(missing_ok=True)
            shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
            return summary
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StreamMergeError(
                f"disk full while writing {e.filename or out_dir}; free space and run the same "
                "command again to resume"
            ) from e
        raise StreamMergeError(f"{e.filename or out_dir}: {e.strerror}") from e
    finally:
        base.close()
        for m in models:
            m.close()


INCOMPLETE_TEXT = (
    "This merge is not finished. Run the same `streammerge` command (run, remix or add) again\n"
    "to resume it; streammerge.json appears when the output is complete.\n"
)


def _make_dir(out_dir: Path) -> None:
    try:
        (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        probe = out_dir / STATE_DIR / "write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StreamMergeError(f"output folder {out_dir} is not writable: {e.strerror}") from e


OUR_FILES = ("model.safetensors.index.json", COMPLETE_MARKER, INCOMPLETE, *COPIED_FILES)


def _wipe(out_dir: Path) -> None:
    """Remove what a streammerge run writes (and nothing else)."""
    for p in out_dir.glob("model-*-of-*.safetensors*"):
        p.unlink()
    for name in OUR_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / STORE_NAME, ignore_errors=True)
    journal = out_dir / STATE_DIR
    for p in journal.glob("journal*"):
        p.unlink()


def _claim_out_dir(
    out_dir: Path, journal: Journal, now: Mapping[str, object], restart: bool, force: bool
) -> tuple[dict[str, object], Progress]:
    """Decide between a fresh start and a resume; refuse anything that could lose data."""
    if (out_dir / COMPLETE_MARKER).exists():
        if not force:
            raise StreamMergeError(
                f"{out_dir} already holds a finished merge ({COMPLETE_MARKER}); use --force to "
                "replace it"
            )
        _wipe(out_dir)
    if journal.exists():
        if restart:
            _wipe(out_dir)
            return {}, Progress()
        header, done = journal.read()
        if any(header.get(k) != v for k, v in now.items()):
            raise StreamMergeError(
                f"{out_dir} holds an interrupted merge of a different plan ("
                f"{explain_mismatch(header, now)} changed); use --restart to discard it"
            )
        return header, done
    return {}, Progress()  # run_merge refused a foreign non-empty folder before locking it


def _refuse_foreign(out_dir: Path) -> None:
    """A non-empty folder that is not a streammerge output is not ours to write into."""
    if not out_dir.is_dir() or (out_dir / COMPLETE_MARKER).exists():
        return
    if Journal(out_dir).exists():
        return
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in (STATE_DIR, INCOMPLETE))
    if others:
        raise StreamMergeError(
            f"output folder {out_dir} is not empty ({others[0]}, ...) and holds no "
            "streammerge run; choose a new folder"
        )


def _plan_digest(
    plan: MergePlan,
    base: ModelFolder,
    models: list[ModelFolder],
    old_store: MaskStore | None = None,
) -> dict[str, object]:
    recipe = plan.recipe
    layout = [s.header.hex() for s in plan.shards]
    layout += [repr((t.params, t.options)) for t in plan.tensors]
    out: dict[str, object] = {
        "version": __version__,
        "recipe": digest(recipe.source),
        "layout": digest(layout),
        "inputs": {str(f.path): digest(f.fingerprint()) for f in (base, *models)},
    }
    if old_store is not None:
        out["masks"] = digest(json.loads(json.dumps(old_store.attrs(), default=str)))
    return out


def _stored_densities(
    store: MaskStore,
) -> tuple[dict[tuple[int, str], float], dict[str, object]]:
    """TADrop's densities as a finished merge recorded them (a replay does not resample)."""
    report = dict(store.attrs().get("tadrop") or {})
    stored = report.pop("densities", {})
    densities = {(k, name): d for name, ds in stored.items() for k, d in enumerate(ds)}
    return densities, report


def _check_disk(out_dir: Path, plan: MergePlan) -> None:
    """The output and the mask store must fit on the free disk; say how much is missing."""
    need = 0
    for s in plan.shards:
        if (out_dir / s.filename).exists():
            continue
        partial = out_dir / (s.filename + ".partial")
        have = partial.stat().st_blocks * 512 if partial.exists() else 0
        need += max(0, s.size - have)
    if METHODS[plan.recipe.method].sparsifies:
        need += sum(t.numel for t in plan.tensors if t.merged) * len(plan.recipe.models) // 8
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise StreamMergeError(
            f"not enough disk space in {out_dir}: the output and occupancy store need "
            f"{format_size(need)}, {format_size(free)} is free"
        )


class _StopOnSignals:
    """SIGINT/SIGTERM set a flag the scheduler checks between chunks (main thread only)."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:  # a second Ctrl-C: stop now (the journal still allows a resume)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


class _Run:
    """One execution of a plan, skipping what the journal says is done."""

    def __init__(
        self,
        plan: MergePlan,
        base: ModelFolder,
        models: list[ModelFolder],
        out_dir: Path,
        store: MaskStore,
        journal: Journal,
        done: Progress,
        allow_nonfinite: bool,
        replay: Replay | None = None,
        old_store: MaskStore | None = None,
    ) -> None:
        """``models``: the folders read besides the base (for ``add``: the new model and the
        finished output); ``old_store``: the finished merge's masks when replaying."""
        self.plan, self.base, self.models, self.out_dir = plan, base, models, out_dir
        self.store, self.journal, self.done = store, journal, done
        self.allow_nonfinite = allow_nonfinite
        self.method = METHODS[plan.recipe.method]
        self.replay, self.old_store = replay, old_store
        self.kept: dict[str, list[int]] = {}
        self.skipped = 0
        self.writer: ShardWriter | None = None
        self._pending: list[dict[str, object]] = []
        self._pending_masks: list[tuple[int, str, int]] = []
        self._last_flush = time.monotonic()

    def execute(self, progress: bool, stop: _StopOnSignals) -> None:
        plan = self.plan
        last_of_shard = {t.shard: i for i, t in enumerate(plan.tensors)}
        bar = tqdm(
            total=plan.bytes_read,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
            file=sys.stderr,
            desc="merging",
            dynamic_ncols=True,
        )
        self.advance = bar.update
        self.stop = stop
        try:
            for ti, task in enumerate(plan.tensors):
                self._tensor(ti, task)
                if last_of_shard[task.shard] == ti and task.shard not in self.done.shards:
                    self._finish_shard(task.shard)
            self._flush()
        finally:
            bar.close()
            if self.writer is not None:
                self._flush()
                self.writer.abort()
            self.journal.close()

    def _tensor(self, ti: int, task: TensorTask) -> None:
        if task.shard in self.done.shards or ti in self.done.tensors:
            self.advance(task.bytes_read)
            self.skipped += len(task.chunks())
            if task.merged and self.method.sparsifies:
                self.kept[task.name] = [
                    self.store.kept(k, task.name) or 0 for k in range(len(self.plan.recipe.models))
                ]
            return
        if self.writer is None or self.writer.plan is not self.plan.shards[task.shard]:
            self.writer = ShardWriter(self.out_dir, self.plan.shards[task.shard], resume=True)
        if task.merged:
            self._merge_tensor(ti, task)
        else:
            self._copy_tensor(ti, task)
        self._pending.append({"tensor": ti})
        self._flush(force=True)

    def _chunk_done(self, ti: int, ci: int) -> None:
        """Record a finished chunk; flush in batches, and stop here if a signal came."""
        self._pending.append({"chunk": [ti, ci]})
        if self.stop.signum:
            self._flush(force=True)
            name = signal.Signals(self.stop.signum).name
            raise Interrupted(
                f"stopped by {name}; progress is saved in {self.out_dir}. Run the same command "
                "again to resume.",
                self.stop.signum,
            )
        self._flush()

    def _flush(self, force: bool = False) -> None:
        """Make written chunks durable, then journal them (never the other way round)."""
        if not self._pending or (
            not force and time.monotonic() - self._last_flush < JOURNAL_INTERVAL_S
        ):
            return
        if self.writer is not None:
            self.writer.sync()
        for k, name, start in self._pending_masks:
            self.store.sync(k, name, start)
        for entry in self._pending:
            self.journal.append(entry)
        self._pending.clear()
        self._pending_masks.clear()
        self._last_flush = time.monotonic()

    def _finish_shard(self, shard: int) -> None:
        plan = self.plan.shards[shard]
        if self.writer is not None and self.writer.plan is plan:
            self._flush(force=True)
            self.writer.finish()
            self.writer = None
        elif not (self.out_dir / plan.filename).exists():  # journaled tensors, never renamed
            if not (self.out_dir / (plan.filename + ".partial")).exists():
                raise StreamMergeError(
                    f"{self.out_dir / plan.filename}: missing although the journal lists its "
                    "tensors as done; rerun with --restart"
                )
            ShardWriter(self.out_dir, plan, resume=True).finish()
        fsync_dir(self.out_dir)
        self.journal.append({"shard": shard})

    def _walk(
        self, task: TensorTask, skip: set[int]
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """Zero-copy views of every model's chunk; pages are released once consumed."""
        sources = [self.base, *self.models]
        chunks = task.chunks()
        item_bytes = sum(src.info(task.name).itemsize for src in sources)
        for i, (s, e) in enumerate(chunks):
            if i in skip:
                self.advance(item_bytes * (e - s))
                self.skipped += 1
                continue
            if i + 1 < len(chunks):
                for src in sources:  # let the kernel read the next chunk while we compute
                    src.where[task.name].prefetch(task.name, *chunks[i + 1])
            yield i, s, [src.read(task.name, s, e) for src in sources]
            for src in sources:
                src.where[task.name].release(task.name, s, e)
            self.advance(item_bytes * (e - s))

    def _merge_tensor(self, ti: int, task: TensorTask) -> None:
        method, recipe = self.method, self.plan.recipe
        models = recipe.models
        out_dtype = FLOAT_DTYPES[task.out_dtype]
        state = method.new_state(
            TensorId(task.name, task.numel), task.params, task.options, recipe.dtype
        )
        for p in range(method.stats_passes(task.params, task.options, recipe.dtype)):
            for _, s, views in self._walk(task, set()):
                method.accumulate(state, p, s, views[0], views[1:])
            method.end_pass(state, p)
        # chunks of an interrupted run are skipped unless the merge pass carries state
        # from chunk to chunk (magnitude ties); then the tensor is redone from its start
        skip = (
            self.done.chunks.get(ti, set())
            if method.chunk_local(task.params, task.options)
            else set()
        )
        kept = [0] * len(models)
        if method.sparsifies:
            for k in range(len(models)):
                self.store.create(k, task.name, task.shape, task.chunk_elems)
                for ci in skip:
                    s, e = task.chunks()[ci]
                    kept[k] += int(torch.count_nonzero(self.store.read_range(k, task.name, s, e)))
        for ci, s, views in self._walk(task, skip):
            if self.replay is None:
                result = method.merge(state, s, views[0], views[1:])
            else:
                result = self._replay(task, s, views)
            self._check_finite(task, result.out, views)
            assert self.writer is not None
            self.writer.write(task.name, s, tensor_bytes(result.out.to(out_dtype)))
            for k, mask in enumerate(result.masks or []):
                self.store.write(k, task.name, s, mask)
                self._pending_masks.append((k, task.name, s))
                kept[k] += int(torch.count_nonzero(mask))  # ~30x faster than bool sum
            del views, result
            if self.replay is not None:
                _trim_heap()
            self._chunk_done(ti, ci)
        if method.sparsifies:
            for k, n in enumerate(kept):
                p = task.params[k]
                info = {"weight": p.weight, "density": p.density, "n": p.n, "m": p.m}
                self.store.finish(k, task.name, n, info)
            self.kept[task.name] = kept

    def _replay(self, task: TensorTask, start: int, views: list[torch.Tensor]) -> MergeResult:
        """One chunk from the stored masks (remix) or from the old output plus one model (add)."""
        assert self.replay is not None and self.old_store is not None
        end = start + views[0].numel()
        dtype, params = self.plan.recipe.dtype, task.params
        stored = len(params) - 1 if self.replay.add else len(params)
        masks = [self.old_store.read_range(k, task.name, start, end) for k in range(stored)]
        if self.replay.add:
            base, ft, old = views
            out_dtype = FLOAT_DTYPES[task.out_dtype]
            return add_next(base, ft, old, masks, params, task.options, dtype, out_dtype)
        out = apply_masks(views[0], views[1:], masks, [p.weight for p in params], dtype)
        return MergeResult(out, masks)

    def _check_finite(self, task: TensorTask, out: torch.Tensor, views: list[torch.Tensor]) -> None:
        """Fail on NaN/Inf reaching the output, naming the input file that holds them.

        The sum of the (compute dtype) output is NaN/Inf iff some element is, barring an
        overflow that real weights never reach, and costs ~5% of ``isfinite``; only when it
        trips are the inputs scanned to name the culprit.
        """
        if self.allow_nonfinite or math.isfinite(float(out.sum())):
            return
        if bool(torch.isfinite(out).all()):
            return
        for src, v in zip([self.base, *self.models], views, strict=True):
            if not bool(torch.isfinite(v).all()):
                raise InputError(
                    f"{src.where[task.name].path}: tensor {task.name!r} contains NaN or Inf "
                    "values; pass --allow-nonfinite to merge it anyway"
                )
        raise InputError(
            f"tensor {task.name!r}: the merge produced NaN or Inf values from finite inputs "
            "(overflow in the compute dtype?); pass --allow-nonfinite to keep them"
        )

    def _copy_tensor(self, ti: int, task: TensorTask) -> None:
        f = self.base.where[task.name]
        item = f.tensors[task.name].itemsize
        skip = self.done.chunks.get(ti, set())
        assert self.writer is not None
        for ci, (s, e) in enumerate(task.chunks()):
            if ci in skip:
                self.skipped += 1
            else:
                self.writer.write(task.name, s, f.read_bytes(task.name, s, e))
                f.release(task.name, s, e)
            self.advance(item * (e - s))
            self._chunk_done(ti, ci)


def _trim_heap() -> None:
    """Hand freed heap pages back to the kernel (glibc only; a no-op elsewhere).

    The replay path's chunk temporaries are torch tensors of varying sizes below glibc's
    dynamic mmap threshold; without this the heap fragments and RSS creeps up by hundreds of
    MiB over a 1B-parameter replay (measured), past the budget the chunks were sized for.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def _finalize(plan: MergePlan, out_dir: Path, journal: Journal) -> None:
    """Config files, then the index; the caller writes the completion marker last."""
    _copy_model_files(plan.recipe, out_dir)
    write_index(out_dir, plan.shards, {"streammerge_version": __version__})
    fsync_dir(out_dir)


def _store_attrs(plan: MergePlan, tadrop: Mapping[str, object]) -> dict[str, object]:
    recipe = plan.recipe
    first = next((t for t in plan.tensors if t.merged), None)
    models = []
    for k, m in enumerate(recipe.models):
        entry: dict[str, object] = {"name": m.name, "path": str(m.path)}
        if first is not None:  # per-tensor values are on each mask array
            p = first.params[k]
            entry.update(weight=p.weight, density=p.density, n=p.n, m=p.m)
        models.append(entry)
    return {
        "streammerge_version": __version__,
        "method": recipe.method,
        "recipe": json.loads(json.dumps(recipe.source, default=str)),
        "base": str(recipe.base),
        "models": models,
        "order": [m.name for m in recipe.models],
        "tadrop": dict(tadrop),
    }


def _marker(recipe: Recipe, s: RunSummary) -> dict[str, object]:
    return {
        "streammerge_version": __version__,
        "complete": True,
        "method": recipe.method,
        "tensors": s.tensors,
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "seconds": round(s.seconds, 3),
    }


def tadrop_densities(
    plan: MergePlan, base: ModelFolder, models: list[ModelFolder], allow_nonfinite: bool = False
) -> tuple[dict[tuple[int, str], float], dict[str, object]]:
    """streammerge's TADrop (see :mod:`streammerge.tadrop`): per-(model, tensor) densities.

    Reads each merged tensor's deterministic strided sample of every task vector, chunk by
    chunk (pages released as it goes), then allocates densities per model so that its
    parameter-weighted mean density (the recipe's) is preserved.
    """
    recipe = plan.recipe
    tasks = [t for t in plan.tensors if t.merged]
    cfg_args = {
        "alpha": recipe.settings.get("tadrop_alpha", 0.5),
        "d_min": recipe.settings.get("tadrop_d_min"),
        "d_max": recipe.settings.get("tadrop_d_max"),
    }
    kappas: list[list[float | None]] = [[] for _ in models]
    for task in tasks:
        samples: list[list[torch.Tensor]] = [[] for _ in models]
        for s, e in task.chunks():
            b = base.read(task.name, s, e).to(recipe.dtype)
            cut = chunk_sample_slice(s, e - s, task.numel, TadropConfig(0.5).max_sample)
            for k, m in enumerate(models):
                x = (m.read(task.name, s, e).to(recipe.dtype) - b)[cut].double()
                if not bool(torch.isfinite(x).all()):
                    if not allow_nonfinite:
                        bad = m if bool(torch.isfinite(b[cut]).all()) else base
                        raise InputError(
                            f"{bad.where[task.name].path}: tensor {task.name!r} contains NaN "
                            "or Inf values; pass --allow-nonfinite to merge it anyway"
                        )
                    x = x[torch.isfinite(x)]  # TADrop's statistics skip them
                samples[k].append(x)
                m.where[task.name].release(task.name, s, e)
            base.where[task.name].release(task.name, s, e)
        for k in range(len(models)):
            kappas[k].append(kurtosis(torch.cat(samples[k])))
    densities: dict[tuple[int, str], float] = {}
    report: dict[str, object] = {"rule": "streammerge TADrop formulation (cabs_spec.md 10.3)",
                                 **cfg_args, "achieved": []}  # fmt: skip
    numels = [t.numel for t in tasks]
    for k in range(len(models)):
        d_bar = sum(t.numel * t.params[k].density for t in tasks) / max(1, sum(numels))
        if d_bar <= 0:
            continue
        try:
            cfg = TadropConfig(d_bar, **cfg_args)  # type: ignore[arg-type]
        except ValueError as e:
            raise StreamMergeError(f"tadrop: {e}") from e
        alloc = allocate(numels, kappas[k], cfg)
        densities.update({(k, t.name): d for t, d in zip(tasks, alloc.densities, strict=True)})
        report["achieved"].append(alloc.achieved)  # type: ignore[union-attr]
    return densities, report


def _copy_model_files(recipe: Recipe, out_dir: Path) -> None:
    """Copy config, generation config and tokenizer files from the base."""
    for name in COPIED_FILES:
        src = recipe.base / name
        if not src.is_file():
            continue
        if name == "config.json" and recipe.out_dtype is not None:
            cfg = json.loads(src.read_text())
            dtype_name = str(recipe.out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = dtype_name
            atomic_write_text(out_dir / name, json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copyfile(src, out_dir / name)
