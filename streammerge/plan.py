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

import torch

from .errors import RecipeError
from .memory import Budget, decide_chunk
from .methods import MethodOptions, ModelParams
from .model import ModelFolder, check_compatible
from .params import layer_t, num_layers
from .recipe import Recipe
from .safetensors_io import ITEMSIZE, TORCH_TO_ST, ShardPlan, plan_shards
from .slices import SlicedFolder
from .slices import tensor_params as sliced_params

Densities = Mapping[tuple[int, str], float]
"""TADrop's per-(model index, tensor name) densities."""


@dataclass(frozen=True, slots=True)
class TensorTask:
    """What to do with one tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    in_dtype: str
    """safetensors dtype string of the base's tensor."""
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
    recipe: Recipe, name: str, t: float
) -> tuple[tuple[ModelParams, ...], MethodOptions]:
    """Every model's parameters and the method options for tensor ``name`` at position ``t``."""
    params = tuple(recipe.model_params(k, name, t) for k in range(len(recipe.models)))
    return params, recipe.options(name, t)


def layer_positions(names: list[str]) -> dict[str, float]:
    """mergekit's gradient position t of every tensor (0 for non-layer tensors)."""
    n = num_layers(names)
    return {name: layer_t(name, n) for name in names}


def build_plan(
    recipe: Recipe,
    base: ModelFolder | SlicedFolder,
    models: list[ModelFolder] | list[SlicedFolder],
    max_memory: int,
    shard_size: int,
    chunk_elems: int | None = None,
    vram: int | None = None,
) -> MergePlan:
    """Validate the inputs together and lay out the whole merge.

    ``chunk_elems`` overrides the budget-derived chunk length (tests use it to split tensors
    at awkward places; a resume uses the interrupted run's); it is still rounded to each
    tensor's alignment. ``vram`` (bytes) plans for the GPU (see :func:`decide_chunk`).
    A ``slices:`` recipe passes the roles of :func:`streammerge.slices.open_inputs`: tensors
    are then the output's, and parameters follow each tensor's slice.
    """
    check_compatible(base, models)  # type: ignore[arg-type]  # sliced roles duck-type folders
    method = recipe.impl
    itemsize = torch.empty(0, dtype=recipe.dtype).element_size()
    k = len(models)
    budget = decide_chunk(max_memory, method, k, itemsize, max_vram=vram, chunk_elems=chunk_elems)
    names = base.names()
    positions = layer_positions(names)
    rows: list[TensorTask] = []
    for name in names:
        info = base.info(name)
        task = TensorTask(name, info.shape, info.numel, info.dtype, info.dtype, False, (),
                          MethodOptions(),
                          max(1, budget.chunk_elems), -1, info.nbytes)  # fmt: skip
        if info.is_float and not recipe.excluded(name):
            try:
                if isinstance(base, SlicedFolder):
                    params, options = sliced_params(recipe, base.routes[name], name)
                else:
                    params, options = tensor_params(recipe, name, positions[name])
            except ValueError as e:  # a resolved value out of range (e.g. n > m under a filter)
                raise RecipeError(f"tensor {name}: {e}") from e
            task = _merged(task, recipe, budget.chunk_elems, params, options, k)
            if chunk_elems is None and min(task.chunk_elems, task.numel) > budget.chunk_elems:
                raise RecipeError(
                    f"tensor {name}: {recipe.method} needs chunks of at least "
                    f"{task.chunk_elems:,} elements here (its block alignment), more than "
                    f"--max-memory allows ({budget.chunk_elems:,}); use smaller blocks "
                    "(m_val) or a larger budget"
                )
        rows.append(task)
    shards = plan_shards([(r.name, r.out_dtype, r.shape) for r in rows], shard_size)
    shard_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}
    tasks = tuple(replace(r, shard=shard_of[r.name]) for r in rows)
    bytes_written = sum(t.end - t.begin for s in shards for t in s.tensors)
    return MergePlan(recipe, tasks, shards, budget, sum(t.bytes_read for t in tasks), bytes_written)


def _merged(
    task: TensorTask,
    recipe: Recipe,
    target: int,
    params: tuple[ModelParams, ...],
    options: MethodOptions,
    k: int,
) -> TensorTask:
    """``task`` as a merged tensor with these parameters: chunk length rounded to the method's
    alignment, output dtype, and the bytes its statistics and merge passes read."""
    method = recipe.impl
    align = method.alignment(params, task.shape)
    out = task.out_dtype if recipe.out_dtype is None else TORCH_TO_ST[recipe.out_dtype]
    passes = 1 + method.stats_passes(params, options, recipe.dtype, task.shape)
    nbytes = task.numel * ITEMSIZE[task.in_dtype]  # the base's bytes, times each source
    return replace(task, out_dtype=out, merged=True, params=params, options=options,
                   chunk_elems=max(align, target // align * align),
                   bytes_read=nbytes * (k + 1) * passes)  # fmt: skip


def dtype_summary(plan: MergePlan) -> str:
    """``output <dtype(s)> (<where from>), compute <dtype>`` for ``plan`` and the card."""
    recipe = plan.recipe
    names = sorted({FLOAT_NAMES[t.out_dtype] for t in plan.tensors if t.merged})
    source = (
        "as in the base"
        if recipe.out_dtype is None
        else ("out_dtype" if recipe.source.get("out_dtype") is not None else "dtype")
    )
    compute = str(recipe.dtype).removeprefix("torch.")
    return f"output {', '.join(names) or '-'} ({source}), compute {compute}"


FLOAT_NAMES = {st: str(dt).removeprefix("torch.") for dt, st in TORCH_TO_ST.items()}
"""safetensors dtype string -> torch's name (``BF16`` -> ``bfloat16``)."""


def with_densities(plan: MergePlan, densities: Densities) -> MergePlan:
    """The plan with TADrop's per-(model, tensor) densities applied to the merged tensors'
    parameters (the layout does not change)."""
    recipe, k = plan.recipe, len(plan.recipe.models)
    tasks = []
    for t in plan.tensors:
        if t.merged:
            params = tuple(
                recipe.impl.with_density(p, densities[(i, t.name)])
                if (i, t.name) in densities else p
                for i, p in enumerate(t.params)
            )  # fmt: skip
            t = _merged(t, recipe, plan.budget.chunk_elems, params, t.options, k)
        tasks.append(t)
    return replace(plan, tensors=tuple(tasks), bytes_read=sum(t.bytes_read for t in tasks))
