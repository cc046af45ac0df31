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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .mask_store import STORE_NAME, MaskStore, ZarrMaskStore
from .memory import RssSampler, default_max_memory, peak_rss
from .methods import METHODS, Method
from .model import ModelFolder
from .plan import MergePlan, TensorTask, build_plan, check_out_dir
from .recipe import Recipe, load_recipe
from .safetensors_io import FLOAT_DTYPES, ShardWriter, atomic_write_text, tensor_bytes, write_index

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
        plan = build_plan(
            recipe, base, models, max_memory or default_max_memory(), shard_size, chunk_elems
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        store = mask_store or ZarrMaskStore(out_dir / STORE_NAME, mode="w")
        store.set_attrs(_store_attrs(recipe))
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
    if method.sparsifies:
        for k in range(len(models)):
            store.create(k, task.name, task.shape, task.chunk_elems)
    kept = [0] * len(models) if method.sparsifies else []
    chunks = task.chunks()
    for i, (s, e) in enumerate(chunks):
        if i + 1 < len(chunks):
            for src in sources:  # let the kernel read the next chunk while we compute
                src.where[task.name].prefetch(task.name, *chunks[i + 1])
        views = [src.read(task.name, s, e) for src in sources]
        result = method.merge(views[0], views[1:], task.params, recipe.options, recipe.dtype)
        writer.write(task.name, s, tensor_bytes(result.out.to(out_dtype)))
        if result.masks is not None:
            for k, mask in enumerate(result.masks):
                store.write(k, task.name, s, mask)
                kept[k] += int(mask.sum())
        del views, result
        for src in sources:
            src.where[task.name].release(task.name, s, e)
        advance(sum(src.info(task.name).itemsize for src in sources) * (e - s))
    for k, n in enumerate(kept):
        store.finish(k, task.name, n)
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


def _store_attrs(recipe: Recipe) -> dict[str, object]:
    return {
        "streammerge_version": __version__,
        "method": recipe.method,
        "recipe": json.loads(json.dumps(recipe.source, default=str)),
        "options": {
            "tail_policy": recipe.options.tail_policy,
            "overlap_policy": recipe.options.overlap_policy,
        },
        "base": str(recipe.base),
        "models": [
            {
                "name": m.name,
                "path": str(m.path),
                "weight": m.params.weight,
                "n": m.params.n,
                "m": m.params.m,
            }
            for m in recipe.models
        ],
        "order": [m.name for m in recipe.models],
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
