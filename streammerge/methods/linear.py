"""``linear``: the weighted average of the models, ``sum_k w_k x_k / sum_k w_k`` (mergekit).

The base takes no part in the arithmetic; list it under ``models:`` to average it in. With
``normalize: false`` the weighted sum is not divided.
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
from .spec import WEIGHT_COLUMN, MethodSpec, Param

SPEC = MethodSpec(
    name="linear",
    summary="weighted average of the models (no base)",
    params=(
        Param("weight", required=True),
        Param("normalize", "bool", per_model=False, doc="divide by the sum of the weights"),
    ),
    needs_base=False,
    cuda=True,
    mps=True,
    card=(WEIGHT_COLUMN,),
    example={"weight": 0.5},
)


class Linear(ChunkLocalMethod):
    spec = SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        return 2 * itemsize

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return 2 * itemsize

    def merge(
        self, state: ChunkLocal, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        return MergeResult(_average(fts, state.params, state.options, state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        out = scalar(params[0].weight, dtype) * fts[0].to(dtype).flatten()
        for ft, p in zip(fts[1:], params[1:], strict=True):
            out = out + scalar(p.weight, dtype) * ft.to(dtype).flatten()
        return MergeResult(_normalized(out, params, options, dtype), None)


def _average(
    fts: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: MethodOptions,
    dtype: torch.dtype,
) -> torch.Tensor:
    acc = fts[0].to(dtype, copy=True).mul_(scalar(params[0].weight, dtype))
    for ft, p in zip(fts[1:], params[1:], strict=True):
        acc.add_(ft.to(dtype, copy=True).mul_(scalar(p.weight, dtype)))
    return _normalized(acc, params, options, dtype)


def _normalized(
    acc: torch.Tensor, params: Sequence[ModelParams], options: MethodOptions, dtype: torch.dtype
) -> torch.Tensor:
    if options.normalize is False:
        return acc
    total = scalar(params[0].weight, dtype)
    for p in params[1:]:
        total = total + scalar(p.weight, dtype)
    return acc / total if abs(float(total)) >= 1e-8 else acc
