"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (mergekit, arXiv:2601.13572).

With task vectors ``tau_k = model_k - base`` (compute dtype), an element is *active* in model k
when ``|tau_k| > epsilon``; ``c`` counts the models active at an element. Per element::

    term_k = tau_k * active_k * [c == 1] * lambda_k  +  tau_k * active_k * [c > 1] / max(c, 1)
    out    = base + sum_k term_k                         (summed in processing order)

so an element changed by one model alone takes that model's change, and one changed by several
takes the mean of their changes. ``ram`` has ``lambda_k = 1`` and is elementwise. ``ramplus_tl``
(tensor-local RAM+) boosts each model's unique changes by
``lambda_k = 1 + r * clip(shared_k / max(unique_k, epsilon), 0, alpha)``, where ``shared_k`` and
``unique_k`` count the tensor's elements where model k is active together with others or alone:
whole-tensor integer counts taken in one statistics pass (exact under any chunking), then
``lambda_k`` computed in float32 as mergekit does and rounded to the compute dtype.

mergekit computes in the input dtype (bf16 models: bf16 task vectors and an epsilon rounded to
bf16); we compute in the compute dtype (float32 by default), the same formula otherwise.
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
from .spec import MethodSpec, Param

EPSILON = 1e-5
"""mergekit's default activity threshold."""


def _eps(options: MethodOptions) -> float:
    x = options.get("epsilon")
    return EPSILON if x is None else float(x)


def active_masks(
    base: torch.Tensor, fts: Sequence[torch.Tensor], eps: float, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors, their active masks and the number of active models per element."""
    b = base.to(dtype)
    taus = [ft.to(dtype) - b for ft in fts]
    active = [tau.abs() > eps for tau in taus]
    count = torch.zeros(b.shape, dtype=torch.int64, device=b.device)
    for m in active:
        count += m
    return taus, active, count


def ram_merge(
    base: torch.Tensor,
    fts: Sequence[torch.Tensor],
    eps: float,
    dtype: torch.dtype,
    lambdas: Sequence[float] | None = None,
) -> torch.Tensor:
    """The merged values of one flat range (``lambdas`` None: plain RAM)."""
    taus, active, count = active_masks(base, fts, eps, dtype)
    unique, overlap, divisor = count == 1, count > 1, count.clamp(min=1)
    merged: torch.Tensor | None = None
    for k, (tau, act) in enumerate(zip(taus, active, strict=True)):
        z = tau * act
        own = z * unique
        if lambdas is not None:
            own = own * scalar(lambdas[k], dtype)
        term = own + (z * overlap / divisor).to(dtype)
        merged = term if merged is None else merged + term
    b = base.to(dtype)
    return b if merged is None else b + merged


RAM_SPEC = MethodSpec(
    name="ram",
    summary="elements changed by one model take its change, by several the mean of theirs",
    params=(
        Param("epsilon", per_model=False, default=EPSILON, doc="smallest |change| that counts"),
    ),
    cuda=True,
    card=(),
    order_note="In processing order (changes are summed in this order):",
    example={"epsilon": 1e-3},
)


class Ram(ChunkLocalMethod):
    spec = RAM_SPEC

    def alignment(self, params: Sequence[ModelParams]) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        return 2 * (k + 4) * itemsize + 8 + 3 * k

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return (k + 3) * itemsize + 8 + k

    def merge(
        self, state: ChunkLocal, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        return MergeResult(ram_merge(base, fts, _eps(state.options), state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        eps = _eps(options)
        b = base.flatten().to(dtype)
        taus = torch.stack([ft.flatten().to(dtype) - b for ft in fts])
        active = taus.abs() > eps
        count = active.sum(dim=0)
        z = taus * active
        terms = z * (count == 1) + (z * (count > 1) / count.clamp(min=1)).to(dtype)
        merged = terms[0]
        for term in terms[1:]:
            merged = merged + term
        return MergeResult(b + merged, None)
