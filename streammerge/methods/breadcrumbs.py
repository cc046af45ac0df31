"""Model Breadcrumbs (mergekit's ``breadcrumbs`` and ``breadcrumbs_ties``, mergekit.md §2.2).

Per tensor of ``N`` elements, for every model k: ``delta_k = ft_k - base`` (compute dtype), then
mergekit's ``magnitude_outliers`` sparsifier with that model's ``density`` and ``gamma``::

    target = int(density * N)            elements kept
    n_top  = int(gamma * N)              largest |delta| dropped as outliers
    skip   = min(n_top, N - target)      the outlier drop shrinks so that target can be kept
    mask_k = ranks [skip, skip + target) of |delta_k| in descending order

(mergekit sorts ascending and keeps ``[n_bot, n_bot + target)`` with
``n_bot = max(0, N - target - n_top)``: the same positions.) ``density >= 1`` keeps every
element (no outlier drop), as mergekit returns the delta untouched. The rest is the task
arithmetic family's (:mod:`.gta`): optional L1 rescale, weights, sign election for
``breadcrumbs_ties``, normalize, lambda.

Deterministic choices where mergekit is not: mergekit's ``torch.sort`` of equal magnitudes has
no defined order; here ranks break ties toward the lower index, so the mask is
``top(skip + target) & ~top(skip)`` of two exact whole-tensor radix selections
(:class:`.select.RadixTopK`) found in the same statistics passes. As elsewhere in the family a
mask never includes a position whose delta is zero (the output is unaffected). The rescale
factor is 1 when either L1 norm is below 1e-7, as mergekit's ``rescaled_masked_tensor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import kernels
from .base import MergeResult, MethodOptions, ModelParams, TensorId
from .gta import GLOBALS, SIGNS, Gta, _spec, _State
from .kernels import kernel_input
from .nm import magnitude_key
from .select import ExactL1, RadixTopK, fsum_abs, key_bits, l1_ratio, select
from .spec import TADROP_PARAMS, CardColumn, MethodSpec, Param, number

RESCALE_EPS = 1e-7


def breadcrumbs_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(skip, target)``: mergekit keeps descending magnitude ranks ``[skip, skip + target)``."""
    if density >= 1:
        return 0, numel
    target = max(0, int(density * numel))
    n_top = max(0, int(gamma * numel))
    return min(n_top, numel - target), target


@dataclass
class _BState(_State):
    outer: list[RadixTopK] = field(default_factory=list)
    """Per model: the ``skip`` largest (the dropped outliers)."""
    taken_outer: list[list[int]] = field(default_factory=list)


class Breadcrumbs(Gta):
    """``breadcrumbs`` (no consensus) or ``breadcrumbs_ties`` (sign election)."""

    def __init__(self, spec: MethodSpec, consensus: bool) -> None:
        super().__init__(spec, "magnitude", consensus=consensus, normalize=False, rescale=False)

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return False  # threshold ties are counted across chunks

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return RadixTopK(1, key_bits(dtype)).passes + (1 if self._rescale(options) else 0)

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> _BState:
        bits = key_bits(dtype)
        windows = [
            breadcrumbs_window(tensor.numel, p.density, float(p.get("gamma", 0.01) or 0.0))
            for p in params
        ]
        st = _BState(
            tensor,
            params,
            options,
            dtype,
            normalize=bool(options.normalize),
            rescale=self._rescale(options),
            factors=[1.0] * len(params),
            mag_passes=RadixTopK(1, bits).passes,
            topk=[RadixTopK(skip + target, bits) for skip, target in windows],
            outer=[RadixTopK(skip, bits) for skip, _ in windows],
        )
        st.taken = [[0] for _ in params]
        st.taken_outer = [[0] for _ in params]
        if st.rescale:
            st.l1 = [(ExactL1(), ExactL1()) for _ in params]
        return st

    def _masks(
        self, st: _State, start: int, deltas: Sequence[torch.Tensor], upto: int
    ) -> list[torch.Tensor]:
        assert isinstance(st, _BState)
        masks = []
        for k in range(upto):
            d = deltas[k]
            key = magnitude_key(d)
            inner, outer = st.topk[k], st.outer[k]
            sel = select(key, inner.threshold, inner.need, st.taken[k])
            sel &= ~select(key, outer.threshold, outer.need, st.taken_outer[k])
            masks.append(sel & (d != 0))
        return masks

    def accumulate(
        self,
        state: _State,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        st = state
        assert isinstance(st, _BState)
        if pass_index < st.mag_passes:
            pairs = list(zip(st.topk, st.outer, fts, strict=True))
            if st.dtype == torch.float32 and kernels.enabled():  # compiled histograms
                raw = kernel_input(base)
                for inner, outer, ft in pairs:
                    f = kernel_input(ft)
                    seen: dict[tuple[int, int | None], torch.Tensor] = {}
                    for t in (inner, outer):
                        if not t.done:  # both thresholds often share this pass's digit
                            args = t.digit_args()
                            if args not in seen:
                                seen[args] = torch.from_numpy(kernels.magnitude_hist(raw, f, *args))
                            t.add_counts(seen[args])
                return
            b = base.to(st.dtype)
            for inner, outer, ft in pairs:
                key = magnitude_key(ft.to(st.dtype) - b)
                inner.add(key)
                outer.add(key)
            return
        b = base.to(st.dtype)
        deltas = [ft.to(st.dtype) - b for ft in fts]
        for (full, kept), d, m in zip(
            st.l1, deltas, self._masks(st, start, deltas, len(fts)), strict=True
        ):
            full.add(d)
            kept.add(d[m])

    def end_pass(self, state: _State, pass_index: int) -> None:
        st = state
        assert isinstance(st, _BState)
        st.taken = [[0] for _ in st.params]
        st.taken_outer = [[0] for _ in st.params]
        if pass_index < st.mag_passes:
            for t in (*st.topk, *st.outer):
                t.end_pass()
        else:
            st.factors = [
                l1_ratio(float(f.value()), float(k.value()), RESCALE_EPS) for f, k in st.l1
            ]

    def _kernel_inputs(
        self, st: _State, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        return None  # the compiled merge knows one threshold per model, not a window

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        st = self.new_state(tensor, params, options, dtype)
        b = base.to(dtype).flatten()
        deltas = [ft.to(dtype).flatten() - b for ft in fts]
        masks = []
        for d, p in zip(deltas, params, strict=True):
            skip, target = breadcrumbs_window(
                d.numel(), p.density, float(p.get("gamma", 0.01) or 0)
            )
            # stable sort by |delta| descending: equal magnitudes keep index order
            order = torch.sort(d.abs().double(), descending=True, stable=True).indices
            sel = torch.zeros(d.numel(), dtype=torch.bool)
            sel[order[skip : skip + target]] = True
            masks.append(sel & (d != 0))
        if st.rescale:
            st.factors = [
                l1_ratio(fsum_abs(d), fsum_abs(d[m]), RESCALE_EPS)
                for d, m in zip(deltas, masks, strict=True)
            ]
        return MergeResult(self._combine(st, b, deltas, masks), masks)


GAMMA = Param("gamma", low=0.0, high=1.0, default=0.01, doc="fraction of largest |delta| dropped")
DENSITY = Param("density", low=0.0, high=1.0, default=1.0)
STATS = (
    "radix-select histograms of |delta| per model, two thresholds (top skip + target and the "
    "top skip outliers), 8-11 bits a pass",
    "exact L1 norms of each delta and its kept part (rescale only)",
)
CARD = (
    CardColumn("weight", lambda p, o: number(p.weight)),
    CardColumn("density", lambda p, o: number(p.density)),
    CardColumn("gamma", lambda p, o: number(float(p.get("gamma", 0.01) or 0.0))),
)
EXAMPLE = {"weight": 1.0, "density": 0.5, "gamma": 0.05}

BREADCRUMBS = Breadcrumbs(
    _spec("breadcrumbs", "drop the largest gamma and smallest |delta| (Model Breadcrumbs), sum",
          (DENSITY, GAMMA, *GLOBALS, *TADROP_PARAMS), stats=STATS, writes_masks=True,
          tadrop=True, card=CARD, remix="remixing breadcrumbs merges is not implemented yet",
          example=EXAMPLE),
    consensus=False,
)  # fmt: skip
BREADCRUMBS_TIES = Breadcrumbs(
    _spec("breadcrumbs_ties", "Model Breadcrumbs trim, sign election (TIES)",
          (DENSITY, GAMMA, *GLOBALS, *TADROP_PARAMS), stats=STATS, writes_masks=True,
          tadrop=True, card=CARD, remix=f"breadcrumbs_ties {SIGNS}", example=EXAMPLE),
    consensus=True,
)  # fmt: skip

__all__ = ["BREADCRUMBS", "BREADCRUMBS_TIES", "Breadcrumbs", "breadcrumbs_window"]
