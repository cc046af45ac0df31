"""``passthrough``: the single input model's tensor, optionally times its ``scale`` (mergekit).

The recipe's one model is carried as the only task model with ``weight`` = its ``scale`` (1.0
when unset, then the values are copied unchanged). The product is taken in the compute dtype.
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
from .spec import CardColumn, MethodSpec, Param, Values, number

SPEC = MethodSpec(
    name="passthrough",
    summary="one model's tensors, optionally scaled",
    params=(Param("scale", default=1.0, doc="factor applied to the model's values"),),
    needs_base=False,
    max_models=1,
    card=(CardColumn("scale", lambda p, o: number(p.weight)),),
    example={"scale": 0.5},
)


def scaled(ft: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``ft`` in ``dtype``, times ``scale`` unless it is exactly 1."""
    out = ft.to(dtype, copy=True)
    return out if scale == 1.0 else out.mul_(scalar(scale, dtype))


class Passthrough(ChunkLocalMethod):
    spec = SPEC

    def model_params(self, values: Values) -> ModelParams:
        scale = values.get("scale")
        return ModelParams(1.0 if scale is None else float(scale))

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        return itemsize

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return itemsize

    def merge(
        self, state: ChunkLocal, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        (p,) = state.params
        return MergeResult(scaled(fts[0], p.weight, state.dtype), None)

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
            raise ValueError(f"passthrough takes exactly one model, got {len(fts)}")
        x = fts[0].flatten().to(dtype)
        return MergeResult(x if params[0].weight == 1.0 else x * params[0].weight, None)
