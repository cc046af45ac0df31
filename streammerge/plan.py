"""The merge plan: a deterministic function of the inputs' headers, the recipe and the budget.

Everything the scheduler will do is decided here before any tensor data is read: which
tensors are merged or copied, each one's parameters (mergekit's per-tensor forms resolved at
the tensor's layer position), output dtype and chunk length, and the exact byte layout of
every output shard. (TADrop densities, when enabled, come from a sampling pass over the
inputs and are passed in.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .device import host_bytes_per_element, vram_chunk_elems
from .errors import RecipeError, StreamMergeError
from .memory import Budget, bytes_per_element, plan_budget
from .methods import METHODS, MethodOptions, ModelParams
from .model import ModelFolder, check_compatible
from .params import layer_t, num_layers
from .recipe import Recipe
from .safetensors_io import TORCH_TO_ST, ShardPlan, plan_shards
from .tadrop import nm_from_density

Densities = Mapping[tuple[int, str], float]
"""TADrop's per-(model index, tensor name) densities."""


@dataclass(frozen=True, slots=True)
class TensorTask:
    """What to do with one tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    out_dtype: str
    """safetensors dtype string of the output."""
    merged: bool
    """False: copied byte for byte from the base (non-float or excluded tensors)."""
    params: tuple[ModelParams, ...]
    """Per-model parameters in processing order (empty when copied)."""
    options: MethodOptions
    chunk_elems: int
    """Elements per chunk; a multiple of the method's alignment (for merged tensors)."""
    shard: int
    """Index of the output shard holding this tensor."""
    bytes_read: int
    """Input bytes its passes read: every model's bytes per pass (the base's alone if copied)."""

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
    """Input bytes read by all passes (statistics passes re-read their tensors)."""
    bytes_written: int


def tensor_params(
    recipe: Recipe, name: str, t: float, densities: Densities | None = None
) -> tuple[tuple[ModelParams, ...], MethodOptions]:
    """Every model's parameters and the method options for tensor ``name`` at position ``t``."""
    params = []
    for k in range(len(recipe.models)):
        p = recipe.model_params(k, name, t)
        if densities is not None and (k, name) in densities:
            d = densities[(k, name)]
            if recipe.method == "cabs":
                n = nm_from_density(d, p.m)
                p = ModelParams(p.weight, n, p.m, density=n / p.m)
            else:
                p = ModelParams(p.weight, density=d)
        params.append(p)
    return tuple(params), recipe.options(name, t)


def layer_positions(names: list[str]) -> dict[str, float]:
    """mergekit's gradient position t of every tensor (0 for non-layer tensors)."""
    n = num_layers(names)
    return {name: layer_t(name, n) for name in names}


def build_plan(
    recipe: Recipe,
    base: ModelFolder,
    models: list[ModelFolder],
    max_memory: int,
    shard_size: int,
    chunk_elems: int | None = None,
    densities: Densities | None = None,
    vram: int | None = None,
) -> MergePlan:
    """Validate the inputs together and lay out the whole merge.

    ``chunk_elems`` overrides the budget-derived chunk length (tests use it to split tensors
    at awkward places); it is still rounded to each tensor's alignment. ``vram`` (bytes) plans
    for the GPU: host buffers are sized for pinned staging and chunks also fit the VRAM.
    """
    check_compatible(base, models)
    method = METHODS[recipe.method]
    itemsize = torch.empty(0, dtype=recipe.dtype).element_size()
    k = len(models)
    if chunk_elems is None and vram is not None:
        budget = plan_budget(max_memory, host_bytes_per_element(k))
        # on the GPU the methods run their torch code, whose temporaries are the larger ones
        work = max(method.work_bytes(k, itemsize), 3 * itemsize + 16)
        budget = replace(
            budget, chunk_elems=min(budget.chunk_elems, vram_chunk_elems(vram, k, work))
        )
    elif chunk_elems is None:
        budget = plan_budget(max_memory, bytes_per_element(k, method.work_bytes(k, itemsize)))
    else:  # an explicit chunk length (tests) bypasses the budget
        budget = Budget(max_memory, 0, chunk_elems)
    target = budget.chunk_elems
    names = base.names()
    positions = layer_positions(names)
    rows: list[TensorTask] = []
    for name in names:
        info = base.info(name)
        merged = info.is_float and not recipe.excluded(name)
        params: tuple[ModelParams, ...] = ()
        options = MethodOptions()
        chunk, out = max(1, target), info.dtype
        if merged:
            try:
                params, options = tensor_params(recipe, name, positions[name], densities)
            except ValueError as e:  # a resolved value out of range (e.g. n > m under a filter)
                raise RecipeError(f"tensor {name}: {e}") from e
            align = method.alignment(params)
            chunk = max(align, target // align * align)
            if recipe.out_dtype is not None:
                out = TORCH_TO_ST[recipe.out_dtype]
            passes = 1 + method.stats_passes(params, options, recipe.dtype)
            read = info.nbytes * (k + 1) * passes
        else:
            read = info.nbytes
        rows.append(
            TensorTask(name, info.shape, info.numel, out, merged, params, options, chunk, -1, read)
        )
    shards = plan_shards([(r.name, r.out_dtype, r.shape) for r in rows], shard_size)
    shard_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}
    tasks = tuple(replace(r, shard=shard_of[r.name]) for r in rows)
    bytes_written = sum(t.end - t.begin for s in shards for t in s.tensors)
    bytes_read = sum(t.bytes_read for t in tasks)
    return MergePlan(recipe, tasks, shards, budget, bytes_read, bytes_written)


def check_out_dir(out_dir: Path, inputs: list[Path]) -> None:
    """OUT_DIR must not be, or be inside, an input folder (we would shadow our own inputs).

    What OUT_DIR may already contain (nothing, an interrupted run, a finished merge) is decided
    under its lock by the engine.
    """
    out = out_dir.resolve()
    for p in inputs:
        p = p.resolve()
        if out == p or p in out.parents:
            raise StreamMergeError(f"output folder {out_dir} is inside input model folder {p}")
    if out_dir.exists() and not out_dir.is_dir():
        raise StreamMergeError(f"output path {out_dir} exists and is not a folder")
