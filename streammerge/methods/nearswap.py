"""``nearswap``: move the base toward the other model where the two are already close (mergekit).

For the base ``a`` and the one other model ``b``, per element::

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w * b + (1 - w) * a

so elements that differ by at most ``t`` take ``b``'s value and farther ones move toward ``b``
by ``t / |a - b|``. Everything is elementwise (no statistics pass); the arithmetic runs in the
compute dtype, ``t`` rounded to it first, in mergekit's order of operations. That includes the
division: torch evaluates mergekit's ``t / tensor`` as ``reciprocal(tensor) * t`` (two roundings),
and so do we, so float32 models give mergekit's bytes exactly. bf16 models differ where
mergekit's bf16 arithmetic rounds every step and ours (float32) rounds once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    ChunkLocal,
    ChunkLocalMethod,
    MergeResult,
    MethodOptions,
    ModelParams,
    TensorId,
    scalar,
)
from .spec import CardColumn, MethodSpec, Param, number

MIN_DIFF = 1e-6
"""Differences below this are divided as if they were this (mergekit's clamp)."""


def nearswap(t: float, base: torch.Tensor, ft: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The merged values of one range of elements (1-D inputs, any float dtype)."""
    a, b = base.to(dtype), ft.to(dtype)
    w = ((a - b).abs().clamp(min=MIN_DIFF).reciprocal() * scalar(t, dtype)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


def _t(options: MethodOptions) -> float:
    if options.t is None:
        raise ValueError("nearswap needs a 't'")
    return options.t


SPEC = MethodSpec(
    name="nearswap",
    summary="take the other model's value where it is within t of the base",
    params=(Param("t", per_model=False, required=True, doc="distance below which b replaces a"),),
    min_models=1,
    max_models=1,
    cuda=True,
    card=(CardColumn("t", lambda p, o: "-" if o.t is None else number(o.t)),),
    example={"t": 0.001},
)


class Nearswap(ChunkLocalMethod):
    spec = SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        return 6 * itemsize

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return 3 * itemsize

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> ChunkLocal:
        if len(params) != 1:
            raise ValueError(
                f"nearswap takes exactly one model besides the base, got {len(params)}"
            )
        _t(options)
        return ChunkLocal(tensor, params, options, dtype)

    def merge(
        self, state: ChunkLocal, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        return MergeResult(nearswap(_t(state.options), base, fts[0], state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        if len(fts) != 1:
            raise ValueError(f"nearswap takes exactly one model besides the base, got {len(fts)}")
        a, b = base.flatten().to(dtype), fts[0].flatten().to(dtype)
        t = scalar(_t(options), dtype)
        diff = torch.abs(a - b)
        diff = torch.where(diff < MIN_DIFF, torch.tensor(MIN_DIFF, dtype=dtype), diff)
        w = torch.clamp(torch.reciprocal(diff) * t, 0, 1)
        return MergeResult(w * b + (1 - w) * a, None)
