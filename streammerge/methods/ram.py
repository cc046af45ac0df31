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
bf16); we compute in the compute dtype (float32 by default), the same formula otherwise. On
float32 models (three models, random data) both methods gave mergekit 0.1.5's bytes exactly;
on bf16 models the differing elements are almost all ones where ours is nearer a float64
evaluation (mergekit rounds each bf16 step, we round once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .base import (
    ChunkLocal,
    ChunkLocalMethod,
    MergeResult,
    MethodBase,
    MethodOptions,
    ModelParams,
    TensorId,
    scalar,
)
from .spec import MethodSpec, Param

EPSILON = 1e-5
"""mergekit's default activity threshold."""
R = 0.1
"""mergekit's default RAM+ boost strength ``r``."""
ALPHA = 0.2
"""mergekit's default cap ``alpha`` of the shared/unique ratio."""


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

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
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


def lambdas(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float, eps: float
            ) -> list[float]:  # fmt: skip
    """RAM+'s per-model boost ``1 + r * clip(shared / max(unique, eps), 0, alpha)``, in float32
    operations as mergekit does them."""
    s = torch.tensor(list(shared), dtype=torch.int64)
    u = torch.tensor(list(unique), dtype=torch.int64)
    rho = s / u.clamp(min=eps).to(torch.float32)
    return (1 + r * rho.clamp(min=0, max=alpha)).tolist()


def count_shared_unique(
    base: torch.Tensor, fts: Sequence[torch.Tensor], eps: float, dtype: torch.dtype
) -> tuple[list[int], list[int]]:
    """Per model: elements where it is active together with another model, and alone."""
    _, active, count = active_masks(base, fts, eps, dtype)
    unique, overlap = count == 1, count > 1
    shared = [int(torch.count_nonzero(a & overlap)) for a in active]
    alone = [int(torch.count_nonzero(a & unique)) for a in active]
    return shared, alone


def _r_alpha(options: MethodOptions) -> tuple[float, float]:
    r, alpha = options.get("r"), options.get("alpha")
    return (R if r is None else float(r)), (ALPHA if alpha is None else float(alpha))


@dataclass(slots=True)
class RamPlusState:
    tensor: TensorId
    dtype: torch.dtype
    eps: float
    r: float
    alpha: float
    shared: list[int] = field(default_factory=list)
    unique: list[int] = field(default_factory=list)
    lambdas: list[float] | None = None


RAMPLUS_SPEC = MethodSpec(
    name="ramplus_tl",
    summary="RAM with each model's unique changes boosted by its shared/unique ratio",
    params=(
        Param("r", per_model=False, default=R, doc="boost strength"),
        Param("alpha", per_model=False, default=ALPHA, doc="largest shared/unique ratio used"),
        Param("epsilon", per_model=False, default=EPSILON, doc="smallest |change| that counts"),
    ),
    stats=("per model: elements active with others and alone (integer counts)",),
    cuda=True,
    card=(),
    order_note="In processing order (changes are summed in this order):",
    example={"r": 0.5, "alpha": 0.8, "epsilon": 1e-3},
)


class RamPlus(MethodBase):
    spec = RAMPLUS_SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        return 2 * (k + 4) * itemsize + 8 + 3 * k

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return (k + 3) * itemsize + 8 + k

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return 1

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return True  # the counting pass is redone on resume; the merge is elementwise

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> RamPlusState:
        r, alpha = _r_alpha(options)
        k = len(params)
        return RamPlusState(tensor, dtype, _eps(options), r, alpha, [0] * k, [0] * k)

    def accumulate(
        self,
        state: RamPlusState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        shared, alone = count_shared_unique(base, fts, state.eps, state.dtype)
        state.shared = [x + y for x, y in zip(state.shared, shared, strict=True)]
        state.unique = [x + y for x, y in zip(state.unique, alone, strict=True)]

    def end_pass(self, state: RamPlusState, pass_index: int) -> None:
        state.lambdas = lambdas(state.shared, state.unique, state.r, state.alpha, state.eps)

    def merge(
        self, state: RamPlusState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        assert state.lambdas is not None, "merge before the statistics pass"
        return MergeResult(ram_merge(base, fts, state.eps, state.dtype, state.lambdas), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        eps, (r, alpha) = _eps(options), _r_alpha(options)
        b = base.flatten().to(dtype)
        taus = torch.stack([ft.flatten().to(dtype) - b for ft in fts])
        active = taus.abs() > eps
        count = active.sum(dim=0)
        unique, overlap = count == 1, count > 1
        lam = lambdas(
            (active & overlap).sum(dim=1).tolist(), (active & unique).sum(dim=1).tolist(),
            r, alpha, eps,
        )  # fmt: skip
        z = taus * active
        merged: torch.Tensor | None = None
        for k in range(len(fts)):
            own = z[k] * unique * scalar(lam[k], dtype)
            term = own + (z[k] * overlap / count.clamp(min=1)).to(dtype)
            merged = term if merged is None else merged + term
        assert merged is not None
        return MergeResult(b + merged, None)
