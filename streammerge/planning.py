"""``streammerge plan``: what a merge would do and cost, without writing anything.

:func:`describe_plan` runs the checks ``run_merge`` runs before any heavy work (the recipe,
every input header, compatibility, the output folder, free disk), builds the same plan, and
predicts the cost: peak RSS from the method's live bytes per chunk element plus a baseline
measured in this process after it has run the method once, and wall time from a short
calibration (the method on chunks of the largest tensor's own inputs, a sequential read of one
input shard for the copied tensors).
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import lora, platform, tokenizer
from .device import default_max_vram, resolve_device
from .errors import StreamMergeError
from .memory import (
    VRAM_RESERVE,
    current_rss,
    default_max_memory,
    predict_peak_rss,
    resident_per_element,
    vram_bytes_per_element,
)
from .methods import TensorId
from .model import ModelFolder, read_chunks
from .options import MergeOptions
from .output import OutputFolder, check_model_files
from .plan import MergePlan, TensorTask, build_plan, dtype_summary
from .recipe import Recipe, load_recipe
from .runtime import precompile_kernels
from .safetensors_io import FLOAT_DTYPES, ITEMSIZE
from .slices import input_paths, open_inputs

CALIBRATION_ELEMS = 2**20
"""Elements per timed chunk (fewer if the plan's chunks are smaller)."""
WARM_UP_ELEMS = 4096
CALIBRATION_S = 1.0
"""Time spent merging chunks of real input to measure the speed (one chunk always completes)."""
READ_PROBE_BYTES = 64 * 2**20
READ_PROBE_S = 0.5


@dataclass(frozen=True, slots=True)
class TensorLine:
    """One tensor of the plan."""

    name: str
    shape: tuple[int, ...]
    merged: bool
    """False: copied from the base."""
    chunk_elems: int
    """Elements per chunk (the last chunk may be shorter)."""
    chunks: int
    passes: int
    """Reads of the tensor: statistics passes plus the merge pass (1 when copied)."""
    bytes_read: int
    """Input bytes read over all passes and models."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """What the timing probes measured on this machine."""

    merge_elems_per_s: float
    """Tensor elements per second through the method on real input chunks: mapped pages
    faulted in, statistics passes, merge, cast to the output dtype."""
    read_bytes_per_s: float
    """Sequential read speed of one input shard (for copied tensors; the page cache may hold
    it: then optimistic)."""
    seconds: float
    """Wall time the probes took."""


@dataclass(frozen=True, slots=True)
class PlanReport:
    """A merge plan and its predicted cost; nothing has been written."""

    out_dir: Path
    method: str
    base: str
    models: tuple[str, ...]
    """Task models in processing (pruning) order."""
    max_memory: int
    """The RSS budget the chunks were sized for, bytes."""
    chunk_elems: int
    """Budget-derived chunk length in elements (each tensor rounds it to its alignment)."""
    tensors: tuple[TensorLine, ...]
    shards: int
    bytes_read: int
    bytes_written: int
    predicted_peak_rss: int
    """Bytes; the baseline measured in this process plus the largest chunk's live bytes."""
    baseline_rss: int
    """RSS of this process after running the method once, bytes (the prediction's base)."""
    disk_needed: int
    """Output shards plus occupancy store still to be written, bytes."""
    disk_free: int
    """Free bytes in the filesystem that holds (or will hold) OUT_DIR."""
    estimated_seconds: float | None
    """Wall-time estimate from the calibration (None when calibration was skipped)."""
    calibration: Calibration | None
    device: str = "cpu"
    """Where the math would run (``--device`` resolved: ``auto`` picks ``cuda`` or ``cpu``)."""
    predicted_peak_vram: int | None = None
    """Accelerator memory, bytes: the largest chunk's VRAM bound; None on the CPU."""
    stats: tuple[str, ...] = ()
    """What the method's statistics passes reduce (empty: chunk-local)."""
    dtypes: str = ""
    """Output and compute dtypes (``output bfloat16 (dtype), compute float32``)."""
    warnings: tuple[str, ...] = ()
    vocabulary: str | None = None
    """The output vocabulary and remapped tensors, when the recipe builds a tokenizer, sets a
    chat template or the inputs' vocabularies differ (None: the base's, unchanged)."""
    slices: tuple[str, ...] = ()
    """A ``slices:`` recipe's layout, one line per slice (empty for ``models:``)."""

    @property
    def merged(self) -> int:
        return sum(t.merged for t in self.tensors)

    @property
    def copied(self) -> int:
        return len(self.tensors) - self.merged

    @property
    def chunks(self) -> int:
        return sum(t.chunks for t in self.tensors)

    @property
    def disk_ok(self) -> bool:
        return self.disk_needed <= self.disk_free

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: sizes in bytes, times in seconds, paths as strings."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d.update(merged=self.merged, copied=self.copied, chunks=self.chunks, disk_ok=self.disk_ok)
        return d


def describe_plan(
    recipe: Recipe | Path | str,
    out_dir: Path | str,
    options: MergeOptions | None = None,
    *,
    calibrate: bool = True,
    **overrides: object,
) -> PlanReport:
    """Validate a merge like ``run_merge`` and describe its plan and cost; writes nothing.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML recipe.
        out_dir: the output folder the merge would write (it need not exist).
        options: as for ``run_merge`` (``max_memory``, ``shard_size``, ``chunk_elems``,
            ``device``, ``max_vram`` shape the plan); keyword ``overrides`` of its fields.
        calibrate: time the method and the disk (about 2 s) to estimate the wall time.
    """
    opts = MergeOptions.build(options, overrides)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    out = OutputFolder(Path(out_dir))
    out.check_inputs(input_paths(recipe))
    check_model_files(recipe)
    dev = resolve_device(opts.device, recipe.impl.spec)
    max_vram = opts.max_vram
    if dev.type == "cuda" and max_vram is None:
        max_vram = default_max_vram(dev)
    state = out.inspect()
    warnings = list(recipe.warnings)
    chunk_elems = opts.chunk_elems
    if state.kind == "finished":
        warnings.append(f"{out_dir} holds a finished merge: `run` needs --force to replace it")
    elif state.kind == "interrupted":
        warnings.append(f"{out_dir} holds an interrupted run: `run` resumes it with its chunks")
        if chunk_elems is None and not opts.restart:  # as run_merge does
            chunk_elems = state.chunk_elems
    elif state.kind == "orphaned":
        warnings.append(f"{out_dir} holds shards without a journal: `run` needs --restart")
    if recipe.tadrop:
        warnings.append("TADrop densities are decided by a sampling pass when the merge runs")
    with ExitStack() as opened:
        if recipe.slices is not None:  # read by output tensor name, see slices.py
            base, models = open_inputs(recipe, opened)  # type: ignore[assignment]
        else:
            base, *models = [opened.enter_context(closing(f)) for f in lora.open_inputs(recipe)]
        base, models, tok_out = tokenizer.prepare(recipe, base, models)  # as run_merge does
        if tok_out is not None:
            warnings += tok_out.warnings
        budget = opts.max_memory or default_max_memory()
        plan = build_plan(recipe, base, models, budget, opts.shard_size, chunk_elems, max_vram)
        need = out.disk_needed(plan)
        free = shutil.disk_usage(_existing_ancestor(out.path)).free
        precompile_kernels(plan, base, models)  # so the baseline holds no compiler memory
        t0 = time.perf_counter()
        _warm_up(plan, base, models)
        baseline = current_rss()[0]
        merge_rate = _merge_speed(plan, base, models) if calibrate else None
        read_rate = _read_speed(base) if calibrate else None
        calibration = estimate = None
        if merge_rate is not None and read_rate is not None:
            calibration = Calibration(merge_rate, read_rate, time.perf_counter() - t0)
            # merging includes reading (the timed chunks faulted in their mapped pages)
            merged = sum(t.numel for t in plan.tensors if t.merged)
            copied = sum(t.bytes_read for t in plan.tensors if not t.merged)
            estimate = merged / merge_rate + copied / read_rate
        lines = tuple(_line(t, plan) for t in plan.tensors)
        return PlanReport(
            out_dir=out.path,
            method=recipe.method,
            base=str(recipe.base),
            models=tuple(m.name for m in recipe.models),
            max_memory=budget,
            chunk_elems=plan.budget.chunk_elems,
            tensors=lines,
            shards=len(plan.shards),
            bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written,
            predicted_peak_rss=_predict(plan, base, models, baseline),
            baseline_rss=baseline,
            disk_needed=need,
            disk_free=free,
            estimated_seconds=estimate,
            calibration=calibration,
            device=dev.type,
            predicted_peak_vram=_predict_vram(plan) if dev.type == "cuda" else None,
            stats=recipe.impl.spec.stats,
            dtypes=dtype_summary(plan),
            warnings=tuple(warnings),
            vocabulary=tok_out.describe() if tok_out is not None else None,
            slices=tuple(recipe.slices.describe()) if recipe.slices is not None else (),
        )


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _predict_vram(plan: MergePlan) -> int:
    """The VRAM bound the chunks were sized for, at the largest merged chunk."""
    k = len(plan.recipe.models)
    itemsize = torch.empty(0, dtype=plan.recipe.dtype).element_size()
    work = max(plan.recipe.impl.work_bytes(k, itemsize), 3 * itemsize + 16)
    elems = max((min(t.chunk_elems, t.numel) for t in plan.tensors if t.merged), default=0)
    return VRAM_RESERVE + int(elems * vram_bytes_per_element(k, work))


def _line(t: TensorTask, plan: MergePlan) -> TensorLine:
    method = plan.recipe.impl
    passes = (
        1 + method.stats_passes(t.params, t.options, plan.recipe.dtype, t.shape) if t.merged else 1
    )
    return TensorLine(
        t.name, t.shape, t.merged, min(t.chunk_elems, t.numel), len(t.chunks()), passes,
        t.bytes_read,
    )  # fmt: skip


def _predict(plan: MergePlan, base: ModelFolder, models: list[ModelFolder], baseline: int) -> int:
    """Peak RSS: the baseline plus the live bytes of the tensor whose chunks cost most."""
    method = plan.recipe.impl
    k = len(models)
    itemsize = torch.empty(0, dtype=plan.recipe.dtype).element_size()
    work = method.resident_bytes(k, itemsize)
    worst = 0.0
    for t in plan.tensors:
        elems = min(t.chunk_elems, t.numel)
        if t.merged:
            inputs = sum(src.info(t.name).itemsize for src in (base, *models))
            masks = k if method.spec.writes_masks else 0
            cost = elems * resident_per_element(inputs, work, ITEMSIZE[t.out_dtype], masks)
        else:  # the mapped base range and its copy
            cost = elems * 2 * base.info(t.name).itemsize
        worst = max(worst, cost)
    return predict_peak_rss(baseline, 1, worst)


def _largest_merged(plan: MergePlan) -> TensorTask | None:
    return max((t for t in plan.tensors if t.merged), key=lambda t: t.numel, default=None)


def _warm_up(plan: MergePlan, base: ModelFolder, models: list[ModelFolder]) -> None:
    """Run the method once on a tiny synthetic chunk shaped like the plan's largest tensor:
    this loads its compiled kernels and torch ops, so the RSS measured next is a merger's.
    (Synthetic, not the inputs: mapped input pages would inflate that baseline.)"""
    task = _largest_merged(plan)
    if task is None:
        return
    recipe = plan.recipe
    method = recipe.impl
    align = method.alignment(task.params)
    n = max(align, WARM_UP_ELEMS // align * align)
    dtype = FLOAT_DTYPES[base.info(task.name).dtype]
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(n, generator=g) * 0.02).to(dtype)
    fts = [(b.float() + torch.randn(n, generator=g) * 1e-3).to(dtype) for _ in models]
    _merge_chunk(task, recipe, b, fts)


def _merge_chunk(
    task: TensorTask,
    recipe: Recipe,
    b: torch.Tensor,
    fts: list[torch.Tensor],
    row: int | None = None,
) -> None:
    """What the engine does to one chunk, as a tensor of its own (of rows of ``row`` elements
    when given, else 1-D): statistics passes, merge, cast to the output dtype, kept counts."""
    method = recipe.impl
    n = b.numel()
    shape = (n // row, row) if row else (n,)  # a chunk standing in for the tensor
    tid = TensorId(task.name, n, shape)
    state = method.new_state(tid, task.params, task.options, recipe.dtype)
    for p in range(method.stats_passes(task.params, task.options, recipe.dtype, shape)):
        method.accumulate(state, p, 0, b, fts)
        method.end_pass(state, p)
    result = method.merge(state, 0, b, fts)
    result.out.to(FLOAT_DTYPES[task.out_dtype])
    for mask in result.masks or []:
        torch.count_nonzero(mask)


def _merge_speed(plan: MergePlan, base: ModelFolder, models: list[ModelFolder]) -> float | None:
    """Elements per second through the method on the largest merged tensor's own data, chunk
    after chunk as the engine goes (mapped pages faulted in, then released), for about 1 s."""
    task = _largest_merged(plan)
    if task is None:
        return None
    align = plan.recipe.impl.alignment(task.params, task.shape)
    n = max(align, min(CALIBRATION_ELEMS, task.chunk_elems) // align * align)
    row = task.shape[-1] if len(task.shape) > 1 and n % task.shape[-1] == 0 else None
    ranges = ((s, min(s + n, task.numel)) for s in range(0, task.numel, n))
    done, spent = 0, 0.0
    t0 = time.perf_counter()
    for s, e, views in read_chunks([base, *models], task.name, ranges):
        _merge_chunk(task, plan.recipe, views[0], views[1:], row)
        del views
        spent = time.perf_counter() - t0
        done += e - s
        if spent >= CALIBRATION_S:
            break
    return done / max(spent, 1e-9)


def _read_speed(base: ModelFolder) -> float:
    """Bytes per second of a sequential read of the base's largest shard (up to 64 MiB)."""
    f = max(base.files.values(), key=lambda f: f.path.stat().st_size)
    size = f.path.stat().st_size
    block, done = 4 * 2**20, 0
    t0 = time.perf_counter()
    plat = platform.current()
    try:
        fd = os.open(f.path, os.O_RDONLY | platform.BINARY)
    except OSError as e:
        raise StreamMergeError(f"{f.path}: cannot read: {e.strerror}") from e
    try:
        while done < min(size, READ_PROBE_BYTES) and time.perf_counter() - t0 < READ_PROBE_S:
            n = len(plat.pread(fd, block, done))
            if not n:
                break
            done += n
    finally:
        os.close(fd)
    return done / max(time.perf_counter() - t0, 1e-9)
