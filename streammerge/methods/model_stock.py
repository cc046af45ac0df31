"""``model_stock``: interpolate between the base and the fine-tunes' average by their task
vectors' mean pairwise cosine (Model Stock, mergekit).

With N >= 2 fine-tunes f_k and offsets ``d_k = f_k - base``: ``cos`` is the mean over pairs
a < b of ``<d_a, d_b> / max(|d_a| |d_b|, 1e-6)`` (each clamped to [-1, 1]);
``t = N cos / (1 + (N - 1) cos)``, or 0 where ``|1 + (N - 1) cos| < 1e-6`` (mergekit keeps the
base there); the result is ``t * mean(f) + (1 - t) * base``.

``filter_wise`` takes one ``t`` per row of the tensor's last dimension (a 1-D tensor is one
row). Streamed tensors arrive without a shape: the row length comes from ``tensor.shape`` when
the caller provides one, otherwise from the ``row_length`` parameter (as in ``nuslerp``).

The Gram entries of the offsets come from one statistics pass in float64: per fixed
4096-element block added in block order for the whole tensor, or folded element by element in
flat order per row with ``filter_wise``; either way chunking cannot change them. The merge
pass is elementwise in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import MergeResult, MethodOptions, ModelParams, TensorId, scalar
from .nuslerp import (
    BlockGram,
    GramMethod,
    KeyedGram,
    Layout,
    flag,
    inputs,
    plain_gram,
    row_layout,
)
from .spec import CardColumn, MethodSpec, Param

NORM_PRODUCT_EPS = 1e-6
"""Products of norms are clamped to at least this before dividing."""
SINGULAR = 1e-6
"""``|1 + (N - 1) cos|`` below this keeps the base (t = 0)."""


def interpolation_t(g: np.ndarray) -> np.ndarray:
    """Model Stock's t (float64), per vector, from Gram entries ``g`` of shape (N, N, ...)."""
    count = len(g)
    norms = np.sqrt(np.maximum(np.stack([g[i, i] for i in range(count)]), 0.0))
    cos = [
        np.clip(g[a, b] / np.maximum(norms[a] * norms[b], NORM_PRODUCT_EPS), -1.0, 1.0)
        for a in range(count)
        for b in range(a + 1, count)
    ]
    mean = sum(cos[1:], cos[0]) / len(cos)
    den = 1.0 + (count - 1) * mean
    singular = np.abs(den) < SINGULAR
    t = np.where(singular, 0.0, count * mean / np.where(singular, 1.0, den))
    return np.asarray(t, dtype=np.float64)


def layout_of(tensor: TensorId, options: MethodOptions) -> Layout | None:
    """None: one t for the tensor; else its rows."""
    if not flag(options, "filter_wise", False):
        return None
    # a shape of () with more than one element means "unknown"
    shape = tensor.shape if tensor.shape or tensor.numel <= 1 else None
    if shape is not None:
        return row_layout(tensor.numel, shape[-1] if len(shape) > 1 else max(tensor.numel, 1))
    length = options.get("row_length")
    if length is None:
        raise ValueError(
            "model_stock with filter_wise needs each tensor's 'row_length' (its last "
            "dimension) under parameters: streamed tensors arrive without a shape"
        )
    return row_layout(tensor.numel, int(float(length)))


def average_step(
    t: torch.Tensor | float, base: torch.Tensor, fts: Sequence[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """``t * mean(fts) + (1 - t) * base`` in ``dtype``; ``t`` a float or per-element tensor."""
    avg = fts[0].to(dtype, copy=True)
    for f in fts[1:]:
        avg.add_(f.to(dtype))
    avg.div_(len(fts))
    if isinstance(t, torch.Tensor):
        one_minus = (1.0 - t.to(torch.float64)).to(dtype)
        return avg.mul_(t.to(dtype)).add_(base.to(dtype) * one_minus)
    return avg.mul_(scalar(t, dtype)).add_(base.to(dtype) * scalar(1.0 - t, dtype))


@dataclass(slots=True)
class ModelStockState:
    dtype: torch.dtype
    layout: Layout | None
    stats: Any
    t: Any = None


SPEC = MethodSpec(
    name="model_stock",
    summary="base-to-average interpolation by the task vectors' mean pairwise cosine",
    params=(
        Param("filter_wise", "bool", per_model=False, doc="one t per row"),
        Param(
            "row_length",
            "int",
            per_model=False,
            low=1,
            doc="with filter_wise: elements per row (the last dimension)",
        ),
    ),
    min_models=2,
    stats=("float64 Gram matrix of the task vectors, per 4096-element block or per row",),
    cuda=True,
    card=(CardColumn("filter_wise", lambda p, o: str(flag(o, "filter_wise", False)).lower()),),
    example={"filter_wise": False},
)


class ModelStock(GramMethod):
    spec = SPEC

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return 1

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> ModelStockState:
        k = len(params)
        if k < 2:
            raise ValueError(f"model_stock needs at least two models besides the base, got {k}")
        layout = layout_of(tensor, options)
        stats = BlockGram(k) if layout is None else KeyedGram(k, layout)
        return ModelStockState(dtype, layout, stats)

    def accumulate(
        self,
        state: ModelStockState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        xs, _ = inputs(base, fts, state.dtype, True)
        state.stats.add(start, xs)

    def end_pass(self, state: ModelStockState, pass_index: int) -> None:
        t = interpolation_t(state.stats.matrix())
        state.t = float(t) if state.layout is None else torch.from_numpy(t)
        state.stats = None

    def merge(
        self, state: ModelStockState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        assert state.t is not None, "merge before the statistics pass"
        t = state.t
        if state.layout is not None:
            t = t.to(base.device)[state.layout.keys(start, base.numel()).to(base.device)]
        return MergeResult(average_step(t, base, fts, state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        if len(fts) < 2:
            raise ValueError("model_stock needs at least two models besides the base")
        layout = layout_of(tensor, options)
        b, f = base.flatten().to(dtype), [x.flatten().to(dtype) for x in fts]
        t = interpolation_t(plain_gram([x - b for x in f], layout))
        if layout is None:
            tt, one_minus = scalar(float(t), dtype), scalar(1.0 - float(t), dtype)
        else:
            keys = layout.keys(0, tensor.numel)
            tt = torch.from_numpy(t).to(dtype)[keys]
            one_minus = torch.from_numpy(1.0 - t).to(dtype)[keys]
        average = sum(f[1:], f[0]) / len(f)
        return MergeResult(average * tt + b * one_minus, None)
