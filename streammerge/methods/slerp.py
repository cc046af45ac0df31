"""``slerp``: spherical interpolation from the base to the one other model (mergekit).

With v0 = base, v1 = model and dot = <v0/|v0|, v1/|v1|> (a norm <= 1e-8 is not divided by):
``|dot| > 0.9995`` gives the lerp ``(1 - t) v0 + t v1``; otherwise, with theta = arccos(dot),
``sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1``.

The dot product and the norms are whole-tensor quantities, taken in one statistics pass as
the Gram matrix of (base, model): float64 numpy sums over fixed blocks of :data:`BLOCK` elements
of the flat index (chunk starts are aligned to it), added in block order (nuslerp's
:class:`~.nuslerp.BlockGram`). So the coefficients, hence the output bytes, depend neither on
the chunk length nor on the thread count: numpy sums on one thread, where a BLAS ``dot`` splits
its work by threads and rounds differently with 1 or 2 of them. The coefficients are float64;
the interpolation itself runs in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId, scalar
from .nuslerp import BLOCK, BlockGram, gram_work_bytes
from .spec import CardColumn, MethodSpec, Param, number

DOT_THRESHOLD = 0.9995
"""Above this |cos| the two tensors count as colinear and are interpolated linearly."""
EPS = 1e-8
"""Norms at or below this are not divided by (mergekit's ``normalize``)."""


def coefficients(t: float, gram: np.ndarray) -> tuple[float, float]:
    """(s0, s1) such that the result is s0 * base + s1 * model, from the 2 x 2 Gram matrix of
    (base, model)."""
    bb, bf, ff = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    nb, nf = math.sqrt(bb), math.sqrt(ff)
    dot = bf / ((nb if nb > EPS else 1.0) * (nf if nf > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)


def interpolate(
    s0: float, s1: float, base: torch.Tensor, ft: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """s0 * base + s1 * ft in ``dtype`` (the coefficients rounded to dtype first)."""
    out = base.to(dtype, copy=True).mul_(scalar(s0, dtype))
    return out.add_(ft.to(dtype, copy=True).mul_(scalar(s1, dtype)))


def _t(options: MethodOptions) -> float:
    if options.t is None:
        raise ValueError("slerp needs a 't'")
    return options.t


@dataclass(slots=True)
class SlerpState:
    t: float
    dtype: torch.dtype
    gram: BlockGram = field(default_factory=lambda: BlockGram(2))
    coef: tuple[float, float] | None = None


SPEC = MethodSpec(
    name="slerp",
    summary="spherical interpolation between the base and one model",
    params=(Param("t", per_model=False, required=True, doc="0 = the base, 1 = the model"),),
    min_models=1,
    max_models=1,
    stats=("float64 Gram matrix of (base, model) over 4096-element blocks (dot and norms)",),
    card=(CardColumn("t", lambda p, o: "-" if o.t is None else number(o.t)),),
    example={"t": 0.3},
)


class Slerp(MethodBase):
    spec = SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return BLOCK

    def work_bytes(self, k: int, itemsize: int) -> int:
        return gram_work_bytes(2, itemsize)

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return 2 * itemsize

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
    ) -> SlerpState:
        if len(params) != 1:
            raise ValueError(f"slerp takes exactly one model besides the base, got {len(params)}")
        return SlerpState(_t(options), dtype)

    def accumulate(
        self,
        state: SlerpState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        state.gram.add(start, [base, fts[0]])

    def end_pass(self, state: SlerpState, pass_index: int) -> None:
        state.coef = coefficients(state.t, state.gram.matrix())

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return True  # the statistics pass is redone on resume; merging is elementwise

    def merge(
        self, state: SlerpState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        assert state.coef is not None, "merge before the statistics pass"
        s0, s1 = state.coef
        return MergeResult(interpolate(s0, s1, base, fts[0], state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        b, f = base.flatten(), fts[0].flatten()
        gram = BlockGram(2)
        gram.add(0, [b, f])
        s0, s1 = coefficients(_t(options), gram.matrix())
        return MergeResult(interpolate(s0, s1, b, f, dtype), None)
