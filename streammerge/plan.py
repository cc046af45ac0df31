"""The merge plan: a deterministic function of the inputs' headers, the recipe and the budget.

Everything the scheduler will do is decided here before any tensor data is read: which
tensors are merged or copied, each one's output dtype and chunk length, and the exact byte
layout of every output shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StreamMergeError
from .memory import Budget, plan_budget
from .methods import METHODS, ModelParams
from .model import ModelFolder, check_compatible
from .recipe import Recipe
from .safetensors_io import TORCH_TO_ST, ShardPlan, plan_shards


@dataclass(frozen=True, slots=True)
class TensorTask:
    """What to do with one tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    out_dtype: str
    """safetensors dtype string of the output."""
    merged: bool
    """False: copied byte for byte from the base (non-float tensors)."""
    params: tuple[ModelParams, ...]
    """Per-model parameters in processing order (empty when copied)."""
    chunk_elems: int
    """Elements per chunk; a multiple of the method's alignment (for merged tensors)."""
    shard: int
    """Index of the output shard holding this tensor."""

    def chunks(self) -> list[tuple[int, int]]:
        """Element ranges ``[start, end)`` covering the flattened tensor, in order."""
        step = max(1, self.chunk_elems)
        return [(s, min(s + step, self.numel)) for s in range(0, self.numel, step)]


@dataclass(frozen=True, slots=True)
class MergePlan:
    recipe: Recipe
    tensors: tuple[TensorTask, ...]
    """In base on-disk order, grouped by output shard."""
    shards: tuple[ShardPlan, ...]
    budget: Budget
    bytes_read: int
    bytes_written: int


def build_plan(
    recipe: Recipe,
    base: ModelFolder,
    models: list[ModelFolder],
    max_memory: int,
    shard_size: int,
    chunk_elems: int | None = None,
) -> MergePlan:
    """Validate the inputs together and lay out the whole merge.

    ``chunk_elems`` overrides the budget-derived chunk length (tests use it to split tensors
    at awkward places); it is still rounded to each tensor's alignment.
    """
    check_compatible(base, models)
    method = METHODS[recipe.method]
    compute_size = torch.empty(0, dtype=recipe.dtype).element_size()
    budget = plan_budget(max_memory, len(models), compute_size)
    target = chunk_elems or budget.chunk_elems
    specs, tasks_wo_shard = [], []
    for name in base.names():
        info = base.info(name)
        if info.is_float:
            params = tuple(e.params for e in recipe.models)
            align = method.alignment(params)
            chunk = max(align, target // align * align)
            out = TORCH_TO_ST[recipe.out_dtype] if recipe.out_dtype else info.dtype
        else:
            params, chunk, out = (), max(1, target), info.dtype
        specs.append((name, out, info.shape))
        tasks_wo_shard.append((name, info.shape, info.numel, out, info.is_float, params, chunk))
    shards = plan_shards(specs, shard_size)
    shard_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}
    tasks = tuple(TensorTask(*t, shard=shard_of[t[0]]) for t in tasks_wo_shard)
    k = len(models) + 1
    bytes_read = sum(base.info(t.name).nbytes * (k if t.merged else 1) for t in tasks)
    bytes_written = sum(t.end - t.begin for s in shards for t in s.tensors)
    return MergePlan(recipe, tasks, shards, budget, bytes_read, bytes_written)


def check_out_dir(out_dir: Path, inputs: list[Path]) -> None:
    """OUT_DIR must not be, or be inside, an input folder (we would shadow our own inputs)."""
    out = out_dir.resolve()
    for p in inputs:
        p = p.resolve()
        if out == p or p in out.parents:
            raise StreamMergeError(f"output folder {out_dir} is inside input model folder {p}")
    if out_dir.exists() and not out_dir.is_dir():
        raise StreamMergeError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise StreamMergeError(f"output folder {out_dir} is not empty; choose a new folder")
