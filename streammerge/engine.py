"""The scheduler: walk the plan tensor by tensor, chunk by chunk, inside the memory budget.

:func:`run_merge` reads top to bottom: options, output folder, inputs, plan, claim, TADrop,
then :class:`Scheduler` does the work and the folder is finalized. For each chunk the scheduler
takes zero-copy views of the base and every model (:func:`streammerge.model.read_chunks`),
has the reader thread pull the next chunk into the page cache, calls the method's pure
``merge``, and hands the output bytes and masks to the writer thread, which makes them durable
and journals them (:mod:`streammerge.journal`). SIGINT and SIGTERM finish the current chunk,
flush, and exit; rerunning the same command resumes (:mod:`streammerge.output` decides how).
"""

from __future__ import annotations

import errno
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from . import lora, tokenizer
from .card import model_card
from .checksum import crc32c
from .device import CudaStager, DeviceStager, default_max_vram, resolve_device
from .errors import InputError, Interrupted, StreamMergeError
from .input_check import InputCheck
from .journal import Journal, Progress, fsync_dir
from .mask_store import STORE_NAME, MaskStore, ZarrMaskStore, merge_attrs
from .memory import RssSampler, default_max_memory, peak_rss
from .methods import Method, TensorId
from .methods.replay import Replay as ReplayMethod
from .model import ModelFolder, read_chunks
from .options import MergeOptions
from .output import (
    Claim,
    OutputFolder,
    check_model_files,
    file_sha256,
    marker,
    plan_digest,
    store_digest,
    verify_resume,
)
from .plan import MergePlan, TensorTask, build_plan, with_densities
from .recipe import Recipe, load_recipe
from .results import RunSummary, TensorReport
from .runtime import Lane, StopOnSignals, precompile_kernels, trim_heap, with_rss
from .safetensors_io import FLOAT_DTYPES, ShardPlan, ShardWriter, tensor_bytes
from .sampling import stored_densities, tadrop_densities
from .slices import input_paths, open_inputs, real_folders

if TYPE_CHECKING:
    from .methods import ModelParams
    from .ray_executor import RayExecutor

JOURNAL_INTERVAL_S = 0.5
"""How often finished chunks are made durable and journaled (at most)."""
PRELOAD_BUFFER = 4 * 2**20
"""Scratch bytes for reading ahead with ``pread`` (reused; the pages land in the page cache)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """Merge from a finished merge's occupancy store instead of selecting masks.

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


def run_merge(
    recipe: Recipe | Path | str,
    out_dir: Path | str,
    options: MergeOptions | None = None,
    *,
    mask_store: MaskStore | None = None,
    on_tensor: Callable[[TensorReport], None] | None = None,
    replay: Replay | None = None,
    **overrides: object,
) -> RunSummary:
    """Merge the recipe's models into ``out_dir``; the library entry point behind ``run``.

    Rerunning with the same recipe and inputs resumes an interrupted merge.

    Args:
        recipe: a validated :class:`Recipe` or the path of a YAML recipe.
        out_dir: output folder: new, empty, or holding an interrupted run of the same plan.
        options: how to run (:class:`MergeOptions`); keyword ``overrides`` of its fields
            (``max_memory=2**30``) are applied on top.
        mask_store: where masks go (default: ``out_dir/occupancy.zarr``; no resume otherwise).
        on_tensor: called with a :class:`TensorReport` as each tensor finishes (or is skipped
            on resume), in plan order.
        replay: take the masks from a finished merge (``remix``/``add``, see :class:`Replay`).
    """
    t0 = time.perf_counter()
    opts = MergeOptions.build(options, overrides)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    out = OutputFolder(Path(out_dir))
    dev = resolve_device(opts.device, recipe.impl.spec)
    if replay is not None and dev.type != "cpu":
        raise StreamMergeError("remix and add run on the CPU; use --device cpu")
    if replay is not None and recipe.slices is not None:
        raise StreamMergeError("remix and add do not support 'slices:' merges")
    max_vram = opts.max_vram
    if dev.type == "cuda" and max_vram is None:
        max_vram = default_max_vram(dev)
    if opts.executor == "ray" and (replay is not None or mask_store is not None
                                   or dev.type != "cpu"):  # fmt: skip
        raise StreamMergeError(
            "--executor ray runs `run` on the CPU, with masks in OUT_DIR's occupancy store"
        )
    if opts.executor == "ray" and (recipe.slices is not None or recipe.tokenizer is not None):
        # workers open the input folders themselves, without the sliced or remapped views
        raise StreamMergeError(
            "--executor ray does not run 'slices:' or tokenizer recipes yet; run them locally"
        )
    adapters = lora.adapter_paths(recipe) if recipe.slices is None else []
    if adapters and (replay is not None or opts.executor == "ray"):
        raise StreamMergeError(
            f"LoRA inputs ({adapters[0]}) are merged by a local `run` only: remix, add and "
            "--executor ray do not apply adapters yet"
        )
    inputs = input_paths(recipe)
    out.check_inputs(inputs + adapters + ([replay.source] if replay else []))
    files = check_model_files(recipe, opts.copy_tokenizer)
    state = out.inspect()
    # a resume must cut the tensors into the interrupted run's chunks
    resumed = state.chunk_elems if state.kind == "interrupted" and not opts.restart else None
    try:
        with ExitStack() as opened:  # input folders are closed whatever happens
            if recipe.slices is not None:  # read by output tensor name, see slices.py
                base, models = open_inputs(recipe, opened)  # type: ignore[assignment]
            else:
                base = opened.enter_context(
                    closing(lora.open_model(recipe.base, recipe.base_adapter))
                )
                sources = replay.inputs(recipe) if replay else inputs[1:]
                tuned = [None] * len(sources) if replay else [m.adapter for m in recipe.models]
                models = [opened.enter_context(closing(lora.open_model(p, a)))
                          for p, a in zip(sources, tuned, strict=True)]  # fmt: skip
            method: Method = recipe.impl
            old_attrs = None
            if replay is not None:
                old_store = ZarrMaskStore(replay.source / STORE_NAME)
                old_attrs = old_store.attrs()
                method = ReplayMethod(recipe.impl, old_store.read_range, replay.add)
            tok_out = None
            if replay is None:  # token-indexed tensors remapped onto the output vocabulary
                base, models, tok_out = tokenizer.prepare(recipe, base, models)
            elif recipe.tokenizer is not None:
                raise StreamMergeError("remix and add do not take tokenizer keys")
            if tok_out is not None:
                recipe = replace(recipe, warnings=recipe.warnings + tok_out.warnings)
            plan = build_plan(recipe, base, models, opts.max_memory or default_max_memory(),
                              opts.shard_size, opts.chunk_elems or resumed, max_vram)  # fmt: skip
            compiling = time.perf_counter()
            if replay is None and dev.type == "cpu":
                precompile_kernels(plan, base, models, verbose=not opts.quiet)
            compiling = time.perf_counter() - compiling  # not merge time: once per kernel set
            cluster = None
            if opts.executor == "ray" and tok_out is not None:
                raise StreamMergeError(
                    "--executor ray does not remap vocabularies yet (the inputs' vocabularies "
                    "differ); run this merge locally"
                )
            if opts.executor == "ray":  # reach the cluster (and check it fits) before claiming
                from .ray_executor import RayCluster

                cluster = opened.enter_context(RayCluster(opts.ray_address, plan))
            # the digest excludes TADrop's densities: they follow from the inputs and recipe
            digest = plan_digest(plan, real_folders([base, *models]), old_attrs)
            if (vocab := tokenizer.vocab_digest(tok_out)) is not None:
                digest["vocab"] = vocab  # the row mapping follows the inputs' tokenizers
            if state.kind == "finished" and not opts.force:
                done = out.already_done(digest)
                if done is not None:  # the same merge of the same inputs: nothing to do
                    return RunSummary(**done, warnings=recipe.warnings, up_to_date=True)
            claim_ = out.claim(digest, plan.budget.chunk_elems, restart=opts.restart,
                               force=opts.force)  # fmt: skip
            with claim_ as claim:
                tadrop: dict[str, object] = {}
                if recipe.tadrop:  # a sampling pass decides every tensor's density
                    if old_attrs is not None:  # replaying: the densities the masks were made with
                        densities, tadrop = stored_densities(old_attrs)
                    else:
                        densities, tadrop = tadrop_densities(plan, base, models,
                                                             opts.allow_nonfinite)  # fmt: skip
                    plan = with_densities(plan, densities)
                    # the densities used (n/m for CABS), per tensor and model, as on the masks
                    tadrop["densities"] = {
                        t.name: [p.density for p in t.params] for t in plan.tensors if t.merged
                    }
                out.check_disk(plan)
                claim.begin()
                store = mask_store or ZarrMaskStore(
                    out.path / STORE_NAME, mode="w" if claim.fresh else "r+"
                )
                repaired: list[str] = []
                if claim.fresh:
                    store.set_attrs(merge_attrs(plan, tadrop))
                else:  # trust nothing an interrupted run left that does not check out
                    repaired = verify_resume(plan, claim.done, out.path, store)
                if not claim.fresh:  # before any work: are the inputs what was merged?
                    InputCheck(plan, claim.done, [base, *models]).sample()
                scheduler: Scheduler | RayExecutor
                if cluster is not None:
                    from .ray_executor import RayExecutor

                    scheduler = RayExecutor(cluster, plan, method, [base.path, *sources], claim,
                                            store, opts.allow_nonfinite, on_tensor)  # fmt: skip
                else:
                    scheduler = Scheduler(plan, method, base, models, claim, store,
                                          opts.allow_nonfinite, dev, on_tensor)  # fmt: skip
                with RssSampler() as sampler, StopOnSignals() as stop:
                    scheduler.execute(opts.progress, stop)
                store.seal()  # the layout log folded into the store's attributes, once
                summary = RunSummary(
                    out_dir=out.path,
                    tensors=len(plan.tensors),
                    bytes_read=plan.bytes_read,
                    bytes_written=plan.bytes_written,
                    seconds=time.perf_counter() - t0 - compiling,
                    peak_rss=peak_rss(),
                    peak_anon_rss=sampler.peak_anon,
                    chunk_elems=plan.budget.chunk_elems,
                    warnings=recipe.warnings,
                    models=tuple(m.name for m in recipe.models),
                    kept=scheduler.kept,
                    merged_elems=sum(t.numel for t in plan.tensors if t.merged),
                    resumed_chunks=scheduler.skipped,
                    total_chunks=sum(len(t.chunks()) for t in plan.tensors),
                    repaired=tuple(repaired),
                    files=tuple(files),
                    compile_seconds=compiling,
                )
                card = model_card(recipe, plan, tadrop, claim.started)
                shards = {sp.filename: claim.done.shard_sha256[i]
                          for i, sp in enumerate(plan.shards)}  # fmt: skip
                record = marker(recipe, summary, tadrop, digest, shards, store_digest(out.path))
                claim.finalize(recipe, plan, card, record, opts.copy_tokenizer,
                               tok_out.write if tok_out is not None else None)  # fmt: skip
                return summary
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StreamMergeError(
                f"disk full while writing {e.filename or out.path}; free space and run the same "
                "command again to resume"
            ) from e
        raise StreamMergeError(f"{e.filename or out.path}: {e.strerror}") from e


@dataclass
class UnitLog:
    """A work unit's journal (see :meth:`Scheduler.execute_unit`): the entries a worker made
    durable, in order, for the driver to append to the real journal."""

    entries: list[dict[str, object]] = field(default_factory=list)

    def append(self, entry: Mapping[str, object]) -> None:
        self.entries.append(dict(entry))

    def extend(self, entries: Iterable[Mapping[str, object]]) -> None:
        self.entries.extend(dict(e) for e in entries)


@dataclass(frozen=True)
class UnitClaim:
    """What a worker's :class:`Scheduler` needs of a claim: the folder (locked by the driver),
    a :class:`UnitLog`, and what counts as done (the journal's progress, plus every chunk
    outside the unit)."""

    path: Path
    journal: UnitLog
    done: Progress


def mask_info(p: ModelParams) -> dict[str, object]:
    """The parameters recorded on a finished mask array, besides its kept count."""
    return {"weight": p.weight, "density": p.density, "n": p.n, "m": p.m}


def seal_shard(out_dir: Path, plan: ShardPlan, shard: int, done: Progress,
               journal: Journal) -> None:  # fmt: skip
    """Rename a shard whose tensors are all journaled (unless a kill came after the rename),
    then journal the SHA-256 of what is on disk."""
    if not (out_dir / plan.filename).exists():  # journaled tensors, never renamed
        if not (out_dir / (plan.filename + ".partial")).exists():
            raise StreamMergeError(
                f"{out_dir / plan.filename}: missing although the journal lists its "
                "tensors as done; rerun with --restart"
            )
        ShardWriter(out_dir, plan, resume=True).finish()
    fsync_dir(out_dir)
    digest = file_sha256(out_dir / plan.filename)  # read back: what is on disk
    done.shard_sha256[shard] = digest
    journal.append({"shard": shard, "sha256": digest})


def tensor_report(
    plan: MergePlan,
    task: TensorTask,
    seconds: float,
    kept: Mapping[str, list[int]],
    skipped: bool,
) -> TensorReport:
    """What ``on_tensor`` hears of a finished (or, on resume, skipped) tensor."""
    out = next(t for t in plan.shards[task.shard].tensors if t.name == task.name)
    counts = kept.get(task.name)
    return TensorReport(
        name=task.name,
        merged=task.merged,
        chunks=len(task.chunks()),
        bytes_read=task.bytes_read,
        bytes_written=out.end - out.begin,
        seconds=seconds,
        kept=tuple(counts) if counts is not None else None,
        skipped=skipped,
    )


class Scheduler:
    """One execution of a plan, skipping what the journal says is done.

    Three things overlap: the main thread computes chunk i, the ``read`` lane pulls chunk
    i + 1 into the page cache, and the ``write`` lane writes chunk i - 1 (output bytes,
    masks, journal). Everything that touches the shard writer, the mask store or the journal
    runs on the write lane, in order, or on the main thread after draining it.
    """

    def __init__(
        self,
        plan: MergePlan,
        method: Method,
        base: ModelFolder,
        models: list[ModelFolder],
        claim: Claim | UnitClaim,
        store: MaskStore,
        allow_nonfinite: bool,
        device: torch.device,
        on_tensor: Callable[[TensorReport], None] | None = None,
    ) -> None:
        """``models``: the folders read besides the base (for ``add``: the new model and the
        finished output); ``claim``: the locked output folder and what is already done (a
        :class:`UnitClaim` in a worker)."""
        self.plan, self.method, self.base, self.models = plan, method, base, models
        self.out_dir, self.journal, self.done = claim.path, claim.journal, claim.done
        self.store = store
        self.allow_nonfinite = allow_nonfinite
        self.on_tensor = on_tensor
        self.writes_masks = method.spec.writes_masks
        self.finish_tensors = True
        """False in a work unit: the driver finishes tensors (mask counts, journal line)."""
        self.kept: dict[str, list[int]] = {}
        self.skipped = 0
        self.writer: ShardWriter | None = None
        self._pending: list[dict[str, object]] = []
        self._pending_masks: list[tuple[int, str, int]] = []
        self._last_flush = time.monotonic()
        self._reads = Lane("streammerge-read")
        self._writes = Lane("streammerge-write")
        self._buf = bytearray(PRELOAD_BUFFER)
        self.input_check = InputCheck(plan, self.done, [base, *models])
        self.stager: CudaStager | DeviceStager | None = None
        if device.type == "cuda":
            chunk = max((t.chunk_elems for t in plan.tensors if t.merged), default=1)
            self.stager = CudaStager(device, chunk, len(models) + 1, len(models))
        elif device.type != "cpu":  # mps
            self.stager = DeviceStager(device)

    def execute(self, progress: bool, stop: StopOnSignals) -> None:
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
        self.advance = with_rss(bar) if progress else bar.update
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

    def execute_unit(self, tensors: Sequence[int]) -> None:
        """Write every chunk of ``tensors`` (plan indices, one shard) that ``done`` does not
        list, durably, journaling chunks only: the driver of a distributed run finishes the
        tensors and shards (see :mod:`streammerge.ray_executor`)."""
        self.finish_tensors = False
        self.advance = lambda n: None
        self.stop = StopOnSignals()  # never entered: a worker is stopped by its driver
        try:
            for ti in tensors:
                self._tensor(ti, self.plan.tensors[ti])
            self._writes.drain()
            self._flush(force=True)
        finally:
            for lane in (self._reads, self._writes):
                lane.close()
            if self.writer is not None:
                self.writer.abort()  # synced by the last flush; the driver renames it

    def _tensor(self, ti: int, task: TensorTask) -> None:
        t0 = time.perf_counter()
        if task.shard in self.done.shards or ti in self.done.tensors:
            self._writes.drain()  # the store and the log are the write lane's (resume only)
            self.advance(task.bytes_read)
            self.skipped += len(task.chunks())
            if task.merged and self.writes_masks:
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
        if self.finish_tensors:
            self._pending.append({"tensor": ti})
        # batched like chunks (a sync per tensor cost ~8 ms each: an hour on a 90,000-tensor
        # MoE); the line still follows its chunks' data sync, in order. With an ``on_tensor``
        # listener (--log-json) a reported tensor is durable first, as the log promises.
        self._flush(force=self.on_tensor is not None)
        self._report(task, t0)

    def _report(self, task: TensorTask, t0: float, skipped: bool = False) -> None:
        if self.on_tensor is not None:
            seconds = time.perf_counter() - t0
            self.on_tensor(tensor_report(self.plan, task, seconds, self.kept, skipped))

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
        self.store.sync(self._pending_masks)
        self.journal.extend(self._pending)  # one sync for the batch
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
        seal_shard(self.out_dir, plan, shard, self.done, self.journal)

    def _preload(self, task: TensorTask, start: int, end: int) -> None:
        for src in (self.base, *self.models) if task.merged else (self.base,):
            src.preload(task.name, start, end, self._buf)

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
        """Zero-copy views of every source's chunks not in ``skip``, each read ahead while the
        previous one is merged; pages are released once consumed."""
        sources = [self.base, *self.models]
        chunks = task.chunks()
        item_bytes = sum(src.info(task.name).itemsize for src in sources)
        todo = [ci for ci in range(len(chunks)) if ci not in skip]
        for ci in sorted(skip):
            s, e = chunks[ci]
            self.advance(item_bytes * (e - s))
            self.skipped += 1
        ranges = [chunks[ci] for ci in todo]
        walk = read_chunks(sources, task.name, ranges, lambda i: self._read_ahead(ti, todo[i]))
        for i, (s, e, views) in enumerate(walk):
            self.input_check.chunk(ti, todo[i], views)
            yield todo[i], s, views
            self.advance(item_bytes * (e - s))

    def _merge_tensor(self, ti: int, task: TensorTask) -> None:
        method, recipe = self.method, self.plan.recipe
        models = recipe.models
        out_dtype = FLOAT_DTYPES[task.out_dtype]
        state = method.new_state(
            TensorId(task.name, task.numel, task.shape), task.params, task.options, recipe.dtype
        )
        for p in range(method.stats_passes(task.params, task.options, recipe.dtype, task.shape)):
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
        if self.writes_masks:
            self._writes.drain()
            for k in range(len(models)):
                self.store.create(k, task.name, task.shape, task.chunk_elems)
            for ci in skip:  # verified against the store before the run (output.verify_resume)
                for k, n in enumerate(self.done.kept[(ti, ci)]):
                    kept[k] += n
        for ci, s, views in self._walk(ti, task, skip):
            read = [crc32c(v) for v in views]  # journaled: a resume checks its inputs by them
            if self.stager is not None:
                views = self.stager.to_device(views)
            result = method.merge(state, s, views[0], views[1:])
            out, masks = result.out.to(out_dtype), result.masks or []
            total, ready = result.out.sum(), None  # the sum is NaN/Inf iff an element is
            if self.stager is not None:
                out, masks, total, ready = self.stager.to_host(out, masks, total)
            del views, result
            self._writes.submit(
                self._write_chunk, ti, ci, task, s, out, masks, total, ready, kept, read
            )
            del out, masks
            if method.releases_heap:
                trim_heap()
            self._check_stop()
        if self.writes_masks:
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
        read: list[int],
    ) -> None:
        """Write lane: a merged chunk's bytes and masks; journal it once durable."""
        if ready is not None:
            ready.synchronize()  # the GPU's copies into the pinned buffers have landed
        if not (self.allow_nonfinite or math.isfinite(float(total))):
            self._check_finite(task, start, out)
        assert self.writer is not None
        data = tensor_bytes(out)
        self.writer.write(task.name, start, data)
        entry: dict[str, object] = {"chunk": [ti, ci], "crc": crc32c(data), "in": read}
        if masks:
            counts = []
            for k, mask in enumerate(masks):
                self.store.write(k, task.name, start, mask)
                self._pending_masks.append((k, task.name, start))
                counts.append(int(torch.count_nonzero(mask)))  # ~30x faster than bool sum
                kept[k] += counts[-1]
            entry["kept"] = counts
        self._pending.append(entry)
        self._flush()

    def _masks_done(self, task: TensorTask, kept: list[int]) -> None:
        """Write lane: every chunk of the tensor's masks is stored; record the counts."""
        if self.finish_tensors:
            for k, n in enumerate(kept):
                self.store.finish(k, task.name, n, mask_info(task.params[k]))
        self.kept[task.name] = kept

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
                    f"{src.file_of(task.name)}: tensor {task.name!r} contains NaN or Inf "
                    "values; pass --allow-nonfinite to merge it anyway"
                )
        raise InputError(
            f"tensor {task.name!r}: the merge produced NaN or Inf values from finite inputs "
            "(overflow in the compute dtype?); pass --allow-nonfinite to keep them"
        )

    def _copy_tensor(self, ti: int, task: TensorTask) -> None:
        item = self.base.info(task.name).itemsize
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
        data = self.base.read_bytes(task.name, start, end)
        self.writer.write(task.name, start, data)
        self.base.release(task.name, start, end)
        crc = crc32c(data)  # a copy: what it read is what it wrote
        self._pending.append({"chunk": [ti, ci], "crc": crc, "in": [crc]})
        self._flush()
