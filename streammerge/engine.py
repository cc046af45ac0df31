"""The scheduler: walk the plan tensor by tensor, chunk by chunk, inside the memory budget.

For each chunk: take zero-copy views of the base and every model, hint the kernel to read the
next chunk, call the method's pure ``merge``, write the output bytes at their planned offset,
store the masks, then release the consumed input pages so mapped input never piles up in RSS.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .errors import StreamMergeError
from .mask_store import STORE_NAME, MaskStore, ZarrMaskStore
from .memory import RssSampler, default_max_memory, peak_rss
from .methods import METHODS, Method, TensorId
from .model import ModelFolder
from .plan import MergePlan, TensorTask, build_plan, check_out_dir
from .recipe import Recipe, load_recipe
from .safetensors_io import FLOAT_DTYPES, ShardWriter, atomic_write_text, tensor_bytes, write_index
from .tadrop import TadropConfig, allocate, chunk_sample_slice, kurtosis

DEFAULT_SHARD_SIZE = 5_000_000_000
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


def run_merge(
    recipe: Recipe | Path | str,
    out_dir: Path | str,
    *,
    max_memory: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    chunk_elems: int | None = None,
    progress: bool = False,
    mask_store: MaskStore | None = None,
) -> RunSummary:
    """Merge the recipe's models into ``out_dir``; the library entry point behind ``run``.

    Args:
        recipe: a validated :class:`Recipe` or the path of a YAML recipe.
        out_dir: output folder; must not exist yet or be empty.
        max_memory: peak RSS budget in bytes (default: half the available RAM).
        shard_size: maximum bytes per output shard.
        chunk_elems: force a chunk length (elements) instead of deriving it from the budget.
        progress: draw a progress bar on stderr.
        mask_store: where masks go (default: ``out_dir/occupancy.zarr``).
    """
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    out_dir = Path(out_dir)
    check_out_dir(out_dir, [recipe.base, *(m.path for m in recipe.models)])
    base = ModelFolder(recipe.base)
    models = [ModelFolder(m.path) for m in recipe.models]
    try:
        budget = max_memory or default_max_memory()
        plan = build_plan(recipe, base, models, budget, shard_size, chunk_elems)
        tadrop: dict[str, object] = {}
        if recipe.tadrop:  # a sampling pass decides every tensor's density, then re-plan
            densities, tadrop = tadrop_densities(plan, base, models)
            plan = build_plan(recipe, base, models, budget, shard_size, chunk_elems, densities)
        out_dir.mkdir(parents=True, exist_ok=True)
        store = mask_store or ZarrMaskStore(out_dir / STORE_NAME, mode="w")
        store.set_attrs(_store_attrs(plan, tadrop))
        with RssSampler() as sampler:
            kept = _execute(plan, base, models, out_dir, store, progress)
        _copy_model_files(recipe, out_dir)
        write_index(out_dir, plan.shards, {"streammerge_version": __version__})
        summary = RunSummary(
            out_dir=out_dir,
            tensors=len(plan.tensors),
            bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written,
            seconds=time.perf_counter() - t0,
            peak_rss=peak_rss(),
            peak_anon_rss=sampler.peak_anon,
            chunk_elems=plan.budget.chunk_elems if chunk_elems is None else chunk_elems,
            warnings=recipe.warnings,
            models=tuple(m.name for m in recipe.models),
            kept=kept,
            merged_elems=sum(t.numel for t in plan.tensors if t.merged),
        )
        atomic_write_text(out_dir / COMPLETE_MARKER, json.dumps(_marker(recipe, summary), indent=2))
        return summary
    finally:
        base.close()
        for m in models:
            m.close()


def _execute(
    plan: MergePlan,
    base: ModelFolder,
    models: list[ModelFolder],
    out_dir: Path,
    store: MaskStore,
    progress: bool,
) -> dict[str, list[int]]:
    method = METHODS[plan.recipe.method]
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
    kept: dict[str, list[int]] = {}
    writer: ShardWriter | None = None
    try:
        for task in plan.tensors:
            if writer is None or writer.plan is not plan.shards[task.shard]:
                if writer is not None:
                    writer.finish()
                writer = ShardWriter(out_dir, plan.shards[task.shard])
            if task.merged:
                kept[task.name] = _merge_tensor(
                    task, plan, method, base, models, writer, store, bar.update
                )
            else:
                _copy_tensor(task, base, writer, bar.update)
        if writer is not None:
            writer.finish()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        bar.close()
    return {k: v for k, v in kept.items() if v}


def _merge_tensor(
    task: TensorTask,
    plan: MergePlan,
    method: Method,
    base: ModelFolder,
    models: list[ModelFolder],
    writer: ShardWriter,
    store: MaskStore,
    advance: Callable[[int], object],
) -> list[int]:
    recipe = plan.recipe
    out_dtype = FLOAT_DTYPES[task.out_dtype]
    sources = [base, *models]
    chunks = task.chunks()
    item_bytes = sum(src.info(task.name).itemsize for src in sources)

    def walk() -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Zero-copy views of every model's chunk; pages are released once consumed."""
        for i, (s, e) in enumerate(chunks):
            if i + 1 < len(chunks):
                for src in sources:  # let the kernel read the next chunk while we compute
                    src.where[task.name].prefetch(task.name, *chunks[i + 1])
            yield s, [src.read(task.name, s, e) for src in sources]
            for src in sources:
                src.where[task.name].release(task.name, s, e)
            advance(item_bytes * (e - s))

    state = method.new_state(
        TensorId(task.name, task.numel), task.params, task.options, recipe.dtype
    )
    for p in range(method.stats_passes(task.params, task.options, recipe.dtype)):
        for s, views in walk():
            method.accumulate(state, p, s, views[0], views[1:])
        method.end_pass(state, p)

    if method.sparsifies:
        for k in range(len(models)):
            store.create(k, task.name, task.shape, task.chunk_elems)
    kept = [0] * len(models) if method.sparsifies else []
    for s, views in walk():
        result = method.merge(state, s, views[0], views[1:])
        writer.write(task.name, s, tensor_bytes(result.out.to(out_dtype)))
        if result.masks is not None:
            for k, mask in enumerate(result.masks):
                store.write(k, task.name, s, mask)
                kept[k] += int(mask.sum())
        del views, result
    for k, n in enumerate(kept):
        p = task.params[k]
        store.finish(
            k, task.name, n, {"weight": p.weight, "density": p.density, "n": p.n, "m": p.m}
        )
    return kept


def _copy_tensor(
    task: TensorTask, base: ModelFolder, writer: ShardWriter, advance: Callable[[int], object]
) -> None:
    f = base.where[task.name]
    item = f.tensors[task.name].itemsize
    for s, e in task.chunks():
        writer.write(task.name, s, f.read_bytes(task.name, s, e))
        f.release(task.name, s, e)
        advance(item * (e - s))


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
    plan: MergePlan, base: ModelFolder, models: list[ModelFolder]
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
                samples[k].append((m.read(task.name, s, e).to(recipe.dtype) - b)[cut].double())
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
