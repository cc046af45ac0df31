"""SCE: select, calculate, erase (mergekit's ``sce``, mergekit.md §2.3).

Per tensor of ``N`` elements with task vectors ``tau_k = ft_k - base`` (compute dtype)::

    select:    if select_topk < 1: var = population variance of tau_1..tau_K per element;
               keep the int(count_nonzero(var) * select_topk) largest var (one mask S shared
               by all models; none when select_topk <= 0); tau_k <- tau_k * S
    calculate: m_k = mean(tau_k ** 2) over the tensor; w_k = m_k / sum_j m_j
               (w_k = 1 / K when |sum_j m_j| < 1e-6)
    erase:     elected = sign(sum_k tau_k) (>= 0 is +); e_k = sign(tau_k) == elected
    out = base + sum_k w_k e_k tau_k / max(sum_k w_k e_k, 1e-6)

There is no per-model weight or density; ``select_topk`` is global (gradients and filters
allowed). The method keeps no masks and takes no TADrop densities: its only selection is shared
by all models and depends on all of them.

Deterministic choices where mergekit is not: ``torch.topk`` of equal variances has no defined
order; here ties go to the lower index, through an exact whole-tensor radix selection
(:class:`.select.RadixTopK`, zero variances ineligible). The variance is written out as
``sum_k (tau_k - mean)^2 / K`` with ``mean = sum_k tau_k / K`` in the compute dtype, models in
order (torch.var's own reduction order is an implementation detail). ``m_k`` is the exact sum
of the float32 squares (:class:`.select.ExactL1` over their exact float64 images) divided by
``N`` in float64, so it does not depend on the chunking; mergekit's float32 mean may differ in
the last bits. ``k`` is ``int(float32(count) * float32(select_topk))`` as mergekit's tensor
arithmetic computes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId, scalar
from .nm import magnitude_key
from .select import ExactL1, RadixTopK, key_bits, select
from .spec import CardColumn, MethodSpec, Param, number

WEIGHT_EPS = 1e-6
"""mergekit: uniform weights when the sum of the mean squares is below this."""
DIVISOR_MIN = 1e-6
"""mergekit: the divisor is clamped to at least this."""


def topk_fraction(options: MethodOptions) -> float:
    x = options.get("select_topk", 1.0)
    return 1.0 if x is None else float(x)


def select_count(nonzero: int, fraction: float) -> int:
    """mergekit's ``int(count_nonzero(var) * select_topk)``: a float32 tensor product."""
    return int(torch.tensor(nonzero, dtype=torch.int64) * fraction)


def variance(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Population variance across models per element, in the deltas' dtype, models in order."""
    k = len(deltas)
    mean = deltas[0].clone()
    for d in deltas[1:]:
        mean.add_(d)
    mean.div_(k)
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_((d - mean).square_())
    return var.div_(k)


def variance_key(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Radix keys of the variance; zero variances are ineligible (-1)."""
    var = variance(deltas)
    key = magnitude_key(var)
    return key.masked_fill_(var == 0, -1)


def sce_weights(mean_squares: Sequence[float]) -> list[float]:
    """mergekit's ``sce_weight`` from the per-model mean squares (float64)."""
    total = sum(mean_squares)
    if abs(total) < WEIGHT_EPS:
        return [1.0 / len(mean_squares)] * len(mean_squares)
    return [m / total for m in mean_squares]


def sce_combine(
    b: torch.Tensor, deltas: list[torch.Tensor], weights: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """Erase and merge the (selected) task vectors elementwise; consumes ``deltas``."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    positive = total >= 0
    del total
    div = torch.zeros_like(b)
    mixed = torch.zeros_like(b)
    for d, w in zip(deltas, weights, strict=True):
        ew = torch.where(positive, d > 0, d < 0).to(dtype).mul_(scalar(w, dtype))
        mixed.add_(d.mul_(ew))
        div.add_(ew)
    return mixed.div_(div.clamp_(min=DIVISOR_MIN)).add_(b)


class _FractionTopK(RadixTopK):
    """Top ``fraction`` of the eligible keys: ``k`` is fixed when the first pass has counted
    them."""

    fraction: float = 1.0

    def end_pass(self) -> None:
        if self.digit == 0 and not self.done:
            self.k = self.remaining = select_count(int(self.hist.sum()), self.fraction)
            if self.k == 0:  # keep nothing
                self.threshold, self.need, self.done = (1 << (self.key_bits - 1)) - 1, 0, True
                return
        super().end_pass()


@dataclass
class _State:
    tensor: TensorId
    params: Sequence[ModelParams]
    options: MethodOptions
    dtype: torch.dtype
    topk: _FractionTopK | None
    """The variance selection (None: select_topk >= 1, everything selected)."""
    taken: list[int] = field(default_factory=lambda: [0])
    squares: list[ExactL1] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class Sce(MethodBase):
    spec: MethodSpec

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8

    def work_bytes(self, k: int, itemsize: int) -> int:
        # base and K deltas, the variance / sum / divisor / mixed, keys and bool temporaries;
        # doubled for heap fragmentation as gta.py measured
        return 2 * (k + 4) * itemsize + 16 + 4 * k

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return self.work_bytes(k, itemsize)

    def _select_passes(self, options: MethodOptions, dtype: torch.dtype) -> int:
        fraction = topk_fraction(options)
        if fraction >= 1 or fraction <= 0:
            return 0
        return RadixTopK(1, key_bits(dtype)).passes

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return self._select_passes(options, dtype) + 1  # the mean squares

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return self._select_passes(options, torch.float32) == 0  # ties counted across chunks

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> _State:
        topk = None
        if self._select_passes(options, dtype):
            topk = _FractionTopK(1, key_bits(dtype))
            topk.fraction = topk_fraction(options)
        return _State(tensor, params, options, dtype, topk, squares=[ExactL1() for _ in params])

    def _selected(
        self, st: _State, deltas: list[torch.Tensor], taken: list[int]
    ) -> list[torch.Tensor]:
        """The deltas times the shared selection (in place)."""
        fraction = topk_fraction(st.options)
        if fraction >= 1:
            return deltas
        if fraction <= 0 or st.topk is None:
            return [d.zero_() for d in deltas]
        sel = select(variance_key(deltas), st.topk.threshold, st.topk.need, taken)
        return [d.mul_(sel) for d in deltas]

    def accumulate(
        self,
        state: _State,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        st = state
        b = base.to(st.dtype)
        deltas = [ft.to(st.dtype) - b for ft in fts]
        if pass_index < self._select_passes(st.options, st.dtype):
            assert st.topk is not None
            st.topk.add(variance_key(deltas))
            return
        for acc, d in zip(st.squares, self._selected(st, deltas, st.taken), strict=True):
            acc.add(d.double().square_())

    def end_pass(self, state: _State, pass_index: int) -> None:
        st = state
        st.taken = [0]
        if st.topk is not None and pass_index < self._select_passes(st.options, st.dtype):
            st.topk.end_pass()
            return
        n = max(1, st.tensor.numel)
        st.weights = sce_weights([float(acc.value() / n) for acc in st.squares])

    def merge(
        self, state: _State, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        st = state
        b = base.to(st.dtype)
        deltas = self._selected(st, [ft.to(st.dtype) - b for ft in fts], st.taken)
        return MergeResult(sce_combine(b, deltas, st.weights, st.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        b = base.to(dtype).flatten()
        deltas = [ft.to(dtype).flatten() - b for ft in fts]
        fraction = topk_fraction(options)
        if fraction < 1:
            var = variance(deltas)
            k = select_count(int(torch.count_nonzero(var)), fraction) if fraction > 0 else 0
            # stable descending sort: equal variances in index order
            order = torch.sort(var.double(), descending=True, stable=True).indices
            sel = torch.zeros(b.numel(), dtype=torch.bool)
            sel[order[:k]] = True
            deltas = [d * sel for d in deltas]
        n = max(1, b.numel())
        mean_squares = [exact_square_sum(d) / n for d in deltas]
        return MergeResult(sce_combine(b, deltas, sce_weights(mean_squares), dtype), None)


def exact_square_sum(d: torch.Tensor) -> float:
    """``sum(d**2)`` over the float64 squares, correctly rounded (the reference's sum)."""
    return math.fsum(d.double().square().tolist())


SPEC = MethodSpec(
    name="sce",
    summary="select by variance, weights from mean squares, erase minority signs (SCE)",
    params=(
        Param(
            "select_topk",
            low=0.0,
            high=1.0,
            default=1.0,
            per_model=False,
            doc="fraction of positions kept, by variance across models",
        ),
        Param("int8_mask", "bool", per_model=False, doc="accepted for mergekit; no effect"),
    ),
    min_models=1,
    stats=(
        "radix-select histograms of the variance across models (select_topk < 1)",
        "exact sums of the selected task vectors' squares per model",
    ),
    card=(CardColumn("select_topk", lambda p, o: number(topk_fraction(o))),),
    example={"select_topk": 0.5},
)
SCE = Sce(SPEC)
