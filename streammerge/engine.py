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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .card import CARD_NAME, model_card
from .defaults import DEFAULT_SHARD_SIZE
from .device import CudaStager, default_max_vram, resolve_device
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
from .memory import RssSampler, current_rss, default_max_memory, format_size, peak_rss
from .methods import METHODS, MergeResult, TensorId, kernels
from .methods.replay import add_next, apply_masks
from .model import ModelFolder
from .plan import MergePlan, TensorTask, build_plan, check_out_dir
from .recipe import Recipe, load_recipe
from .safetensors_io import FLOAT_DTYPES, ShardWriter, atomic_write_text, tensor_bytes, write_index
from .tadrop import TadropConfig, allocate, chunk_sample_slice, kurtosis

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


@dataclass(frozen=True, slots=True)
class TensorReport:
    """One finished tensor, as passed to ``run_merge``'s ``on_tensor`` hook."""

    name: str
    merged: bool
    """False: copied byte for byte from the base."""
    chunks: int
    bytes_read: int
    """Input bytes its passes read (all models, all passes)."""
    bytes_written: int
    """Output bytes of the tensor."""
    seconds: float
    """Wall time spent on it in this run."""
    kept: tuple[int, ...] | None
    """Kept elements per model in processing order (sparsifying methods), else None."""
    skipped: bool = False
    """Done by an interrupted run; this run only skipped it."""


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
    device: str = "cpu",
    max_vram: int | None = None,
    on_tensor: Callable[[TensorReport], None] | None = None,
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
        device: ``cpu``, ``cuda`` or ``auto`` (``cuda`` when available and the method runs
            there); the bytes are the same either way.
        max_vram: peak GPU memory budget in bytes (default: 90% of the free VRAM).
        on_tensor: called with a :class:`TensorReport` as each tensor finishes (or is skipped
            on resume), in plan order.
        replay: take the masks from a finished merge (``remix``/``add``, see :class:`Replay`).
    """
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    out_dir = Path(out_dir)
    dev = resolve_device(device, recipe.method)
    if replay is not None and dev.type == "cuda":
        raise StreamMergeError("remix and add run on the CPU; use --device cpu")
    if dev.type == "cuda" and max_vram is None:
        max_vram = default_max_vram(dev)
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
        plan = build_plan(recipe, base, models, budget, shard_size, chunk_elems, vram=max_vram)
        if replay is None and dev.type == "cpu":
            precompile_kernels(plan, base, models, verbose=progress)
        _refuse_foreign(out_dir)  # before we create anything in it
        _make_dir(out_dir)
        with FolderLock(out_dir):
            journal = Journal(out_dir)
            # the digest excludes TADrop's densities: they follow from the inputs and recipe
            plan_digest = _plan_digest(plan, base, models, old_store)
            header, done = _claim_out_dir(out_dir, journal, plan_digest, restart, force)
            if header.get("chunk_elems") and chunk_elems is None:
                chunk_elems = header["chunk_elems"]  # resume with the interrupted run's chunks
                plan = build_plan(
                    recipe, base, models, budget, shard_size, chunk_elems, vram=max_vram
                )
            tadrop: dict[str, object] = {}
            if recipe.tadrop:  # a sampling pass decides every tensor's density, then re-plan
                if old_store is not None:  # replaying: the densities the masks were made with
                    densities, tadrop = _stored_densities(old_store)
                else:
                    densities, tadrop = tadrop_densities(plan, base, models, allow_nonfinite)
                plan = build_plan(
                    recipe, base, models, budget, shard_size, chunk_elems, densities, max_vram
                )
                # the densities used (n/m for CABS), per tensor and model, as on the mask arrays
                tadrop["densities"] = {
                    t.name: [p.density for p in t.params] for t in plan.tensors if t.merged
                }
            _check_disk(out_dir, plan)
            # the model card's date: the day the run started, so a resume writes the same card
            started = str(header.get("started") or time.strftime("%Y-%m-%d", time.gmtime()))
            if not journal.exists():
                chunk = chunk_elems or plan.budget.chunk_elems
                journal.create({**plan_digest, "chunk_elems": chunk, "started": started})
                atomic_write_text(out_dir / INCOMPLETE, INCOMPLETE_TEXT)
            store = mask_store or ZarrMaskStore(
                out_dir / STORE_NAME, mode="w" if done.empty else "r+"
            )
            if done.empty:
                store.set_attrs(_store_attrs(plan, tadrop))
            run = _Run(plan, base, models, out_dir, store, journal, done, allow_nonfinite, dev,
                       replay, old_store)  # fmt: skip
            run.on_tensor = on_tensor
            with RssSampler() as sampler, _StopOnSignals() as stop:
                run.execute(progress, stop)
            _finalize(plan, out_dir, journal)
            atomic_write_text(out_dir / CARD_NAME, model_card(recipe, plan, tadrop, started))
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


def precompile_kernels(
    plan: MergePlan, base: ModelFolder, models: list[ModelFolder], verbose: bool = False
) -> None:
    """Have the plan's compiled kernels built outside this process (see ``precompile``)."""
    raw = {
        "uint16" if src.info(t.name).dtype == "BF16" else "float32"
        for t in plan.tensors
        if t.merged
        for src in (base, *models)
    }
    if raw and plan.recipe.dtype == torch.float32:
        kernels.precompile(
            plan.recipe.method, len(models), sorted(raw), _announce_compiling if verbose else None
        )


def _announce_compiling() -> None:
    print("compiling the merge kernels (once per install, up to a minute)...", file=sys.stderr)


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


OUR_FILES = ("model.safetensors.index.json", COMPLETE_MARKER, INCOMPLETE, CARD_NAME, *COPIED_FILES)


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
    need = disk_needed(out_dir, plan)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise StreamMergeError(
            f"not enough disk space in {out_dir}: the output and occupancy store need "
            f"{format_size(need)}, {format_size(free)} is free"
        )


def disk_needed(out_dir: Path, plan: MergePlan) -> int:
    """Bytes still to be written to ``out_dir``: output shards not yet on disk and the
    occupancy store (one bit per merged element and model; compression only shrinks it)."""
    need = 0
    for s in plan.shards:
        if (out_dir / s.filename).exists():
            continue
        partial = out_dir / (s.filename + ".partial")
        have = partial.stat().st_blocks * 512 if partial.exists() else 0
        need += max(0, s.size - have)
    if METHODS[plan.recipe.method].sparsifies:
        need += sum(t.numel for t in plan.tensors if t.merged) * len(plan.recipe.models) // 8
    return need


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


class _Lane:
    """A background thread running jobs in submission order, at most one at a time.

    ``submit`` first waits for the previous job, so one job runs while the caller prepares
    the next (and at most one job's buffers are alive besides the caller's); a job's
    exception surfaces in the caller at the next ``submit`` or ``drain``.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._job: Future[None] | None = None

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self.drain()
        self._job = self._pool.submit(fn, *args)

    def drain(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        """Wait for the job in flight (its result is the caller's to check first)."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


PRELOAD_BUFFER = 4 * 2**20
"""Scratch bytes for reading ahead with ``pread`` (reused; the pages land in the page cache)."""


class _Run:
    """One execution of a plan, skipping what the journal says is done.

    Three things overlap: the main thread computes chunk i, the ``read`` lane pulls chunk
    i + 1 into the page cache, and the ``write`` lane writes chunk i - 1 (output bytes,
    masks, journal). Everything that touches the shard writer, the mask store or the journal
    runs on the write lane, in order, or on the main thread after draining it.
    """

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
        device: torch.device,
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
        self._reads = _Lane("streammerge-read")
        self._writes = _Lane("streammerge-write")
        self._buf = bytearray(PRELOAD_BUFFER)
        self.stager = None
        if device.type == "cuda":
            chunk = max((t.chunk_elems for t in plan.tensors if t.merged), default=1)
            self.stager = CudaStager(device, chunk, len(models) + 1, len(models))
        self.on_tensor: Callable[[TensorReport], None] | None = None

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
        self.advance = _with_rss(bar) if progress else bar.update
        self.stop = stop
        ok = False
        try:
            for ti, task in enumerate(plan.tensors):
                self._tensor(ti, task)
                if last_of_shard[task.shard] == ti and task.shard not in self.done.shards:
                    self._finish_shard(task.shard)
            self._writes.drain()
            self._flush()
            ok = True
        finally:
            bar.close()
            for lane in (self._reads, self._writes):
                try:
                    lane.close()
                except Exception:
                    if ok:
                        raise  # otherwise the main thread's error is the one to report
            if self.writer is not None:
                self._flush()
                self.writer.abort()
            self.journal.close()

    def _tensor(self, ti: int, task: TensorTask) -> None:
        t0 = time.perf_counter()
        if task.shard in self.done.shards or ti in self.done.tensors:
            self._writes.drain()  # the store and the log are the write lane's (resume only)
            self.advance(task.bytes_read)
            self.skipped += len(task.chunks())
            if task.merged and self.method.sparsifies:
                self.kept[task.name] = [
                    self.store.kept(k, task.name) or 0 for k in range(len(self.plan.recipe.models))
                ]
            self._report(task, t0, skipped=True)
            return
        if self.writer is None or self.writer.plan is not self.plan.shards[task.shard]:
            self._writes.drain()
            self.writer = ShardWriter(self.out_dir, self.plan.shards[task.shard], resume=True)
        if task.merged:
            self._merge_tensor(ti, task)
        else:
            self._copy_tensor(ti, task)
        self._writes.submit(self._tensor_done, ti, task, t0)

    def _tensor_done(self, ti: int, task: TensorTask, t0: float) -> None:
        """Write lane: every chunk of the tensor is written; journal it and report it."""
        self._pending.append({"tensor": ti})
        self._flush(force=True)
        self._report(task, t0)

    def _report(self, task: TensorTask, t0: float, skipped: bool = False) -> None:
        if self.on_tensor is None:
            return
        kept = self.kept.get(task.name)
        out = next(t for t in self.plan.shards[task.shard].tensors if t.name == task.name)
        self.on_tensor(
            TensorReport(
                name=task.name,
                merged=task.merged,
                chunks=len(task.chunks()),
                bytes_read=task.bytes_read,
                bytes_written=out.end - out.begin,
                seconds=time.perf_counter() - t0,
                kept=tuple(kept) if kept is not None else None,
                skipped=skipped,
            )
        )

    def _check_stop(self) -> None:
        """On SIGINT/SIGTERM: let the chunk in flight land, journal it, and stop here."""
        if not self.stop.signum:
            return
        self._writes.drain()
        self._flush(force=True)
        name = signal.Signals(self.stop.signum).name
        raise Interrupted(
            f"stopped by {name}; progress is saved in {self.out_dir}. Run the same command "
            "again to resume.",
            self.stop.signum,
        )

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
        self._writes.drain()
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

    def _preload(self, task: TensorTask, start: int, end: int) -> None:
        for src in (self.base, *self.models) if task.merged else (self.base,):
            src.where[task.name].preload(task.name, start, end, self._buf)

    def _next_read(self, ti: int, ci: int) -> tuple[TensorTask, int, int] | None:
        """The chunk read after chunk ``ci`` of tensor ``ti`` (the next tensor's first)."""
        task = self.plan.tensors[ti]
        chunks = task.chunks()
        if ci + 1 < len(chunks):
            return task, *chunks[ci + 1]
        for nxt in self.plan.tensors[ti + 1 :]:
            if nxt.shard not in self.done.shards and nxt.numel:
                return nxt, *nxt.chunks()[0]
        return None

    def _read_ahead(self, ti: int, ci: int) -> None:
        """Wait until chunk ``ci`` is in the page cache, then start reading the next one."""
        self._reads.drain()
        nxt = self._next_read(ti, ci)
        if nxt is not None:
            self._reads.submit(self._preload, *nxt)

    def _walk(
        self, ti: int, task: TensorTask, skip: set[int]
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
            self._read_ahead(ti, i)
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
            for _, s, views in self._walk(ti, task, set()):
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
            self._writes.drain()
            for k in range(len(models)):
                self.store.create(k, task.name, task.shape, task.chunk_elems)
                for ci in skip:
                    s, e = task.chunks()[ci]
                    kept[k] += int(torch.count_nonzero(self.store.read_range(k, task.name, s, e)))
        for ci, s, views in self._walk(ti, task, skip):
            if self.replay is not None:
                result = self._replay(task, s, views)
            else:
                if self.stager is not None:
                    views = self.stager.to_device(views)
                result = method.merge(state, s, views[0], views[1:])
            out, masks = result.out.to(out_dtype), result.masks or []
            total, ready = result.out.sum(), None  # the sum is NaN/Inf iff an element is
            if self.stager is not None:
                out, masks, total, ready = self.stager.to_host(out, masks, total)
            del views, result
            self._writes.submit(self._write_chunk, ti, ci, task, s, out, masks, total, ready, kept)
            del out, masks
            if self.replay is not None:
                _trim_heap()
            self._check_stop()
        if method.sparsifies:
            self._writes.submit(self._masks_done, task, kept)

    def _write_chunk(
        self,
        ti: int,
        ci: int,
        task: TensorTask,
        start: int,
        out: torch.Tensor,
        masks: list[torch.Tensor],
        total: torch.Tensor,
        ready: torch.cuda.Event | None,
        kept: list[int],
    ) -> None:
        """Write lane: a merged chunk's bytes and masks; journal it once durable."""
        if ready is not None:
            ready.synchronize()  # the GPU's copies into the pinned buffers have landed
        if not (self.allow_nonfinite or math.isfinite(float(total))):
            self._check_finite(task, start, out)
        assert self.writer is not None
        self.writer.write(task.name, start, tensor_bytes(out))
        for k, mask in enumerate(masks):
            self.store.write(k, task.name, start, mask)
            self._pending_masks.append((k, task.name, start))
            kept[k] += int(torch.count_nonzero(mask))  # ~30x faster than bool sum
        self._pending.append({"chunk": [ti, ci]})
        self._flush()

    def _masks_done(self, task: TensorTask, kept: list[int]) -> None:
        """Write lane: every chunk of the tensor's masks is stored; record the counts."""
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

    def _check_finite(self, task: TensorTask, start: int, out: torch.Tensor) -> None:
        """Fail on NaN/Inf reaching the output, naming the input file that holds them.

        Called when the chunk's sum is not finite (``isfinite`` on every element costs 20x
        more than the sum, which only a sum overflow could trip falsely); the inputs are read
        again to name the culprit.
        """
        if bool(torch.isfinite(out).all()):
            return
        end = start + out.numel()
        for src in (self.base, *self.models):
            if not bool(torch.isfinite(src.read(task.name, start, end)).all()):
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
        for ci, (s, e) in enumerate(task.chunks()):
            if ci in skip:
                self.skipped += 1
            else:
                self._read_ahead(ti, ci)
                self._writes.submit(self._copy_chunk, ti, ci, task, s, e)
                self._check_stop()
            self.advance(item * (e - s))

    def _copy_chunk(self, ti: int, ci: int, task: TensorTask, start: int, end: int) -> None:
        """Write lane: copy a chunk of a tensor the merge leaves as it is in the base."""
        assert self.writer is not None
        f = self.base.where[task.name]
        self.writer.write(task.name, start, f.read_bytes(task.name, start, end))
        f.release(task.name, start, end)
        self._pending.append({"chunk": [ti, ci]})
        self._flush()


RSS_REFRESH_S = 0.5
"""How often the progress bar's RSS figure is refreshed (reading it costs ~20 us)."""


def _with_rss(bar: tqdm) -> Callable[[int], None]:
    """``bar.update`` that also shows this process's current RSS, at most every 0.5 s."""
    last = 0.0

    def advance(n: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= RSS_REFRESH_S:
            last = now
            bar.set_postfix_str(f"RSS {format_size(current_rss()[0])}", refresh=False)
        bar.update(n)

    return advance


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
