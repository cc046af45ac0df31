"""``slerp``: spherical interpolation from the base to the one other model (mergekit).

With v0 = base, v1 = model and dot = <v0/|v0|, v1/|v1|> (a norm <= 1e-8 is not divided by):
``|dot| > 0.9995`` gives the lerp ``(1 - t) v0 + t v1``; otherwise, with theta = arccos(dot),
``sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1``.

The dot product and the norms are whole-tensor quantities, taken in one statistics pass as
float64 partial sums over fixed blocks of :data:`BLOCK` elements of the flat index (chunk starts
are aligned to it), added in block order: the coefficients, hence the output bytes, do not
depend on the chunk length. The coefficients are float64; the interpolation itself runs in the
compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId, scalar
from .spec import CardColumn, MethodSpec, Param, number

BLOCK = 4096
"""Elements per partial sum of the statistics pass (chunk starts are multiples of it)."""
DOT_THRESHOLD = 0.9995
"""Above this |cos| the two tensors count as colinear and are interpolated linearly."""
EPS = 1e-8
"""Norms at or below this are not divided by (mergekit's ``normalize``)."""


def block_sums(base: torch.Tensor, ft: torch.Tensor) -> list[tuple[float, float, float]]:
    """(sum b*f, sum b*b, sum f*f) in float64 for each BLOCK-element block of a 1-D range
    starting at a multiple of BLOCK (the last block may be short)."""
    out = []
    for s in range(0, base.numel(), BLOCK):
        b = base[s : s + BLOCK].to(torch.float64)
        f = ft[s : s + BLOCK].to(torch.float64)
        out.append((float(torch.dot(b, f)), float(torch.dot(b, b)), float(torch.dot(f, f))))
    return out


def coefficients(t: float, sums: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """(s0, s1) such that the result is s0 * base + s1 * model, from the per-block sums."""
    bf = bb = ff = 0.0
    for x, y, z in sums:  # in block order: float addition is not associative
        bf, bb, ff = bf + x, bb + y, ff + z
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
    sums: list[tuple[float, float, float]] = field(default_factory=list)
    coef: tuple[float, float] | None = None


SPEC = MethodSpec(
    name="slerp",
    summary="spherical interpolation between the base and one model",
    params=(Param("t", per_model=False, required=True, doc="0 = the base, 1 = the model"),),
    min_models=1,
    max_models=1,
    stats=("float64 sums of b*f, b*b and f*f per 4096-element block (dot product and norms)",),
    card=(CardColumn("t", lambda p, o: "-" if o.t is None else number(o.t)),),
    example={"t": 0.3},
)


class Slerp(MethodBase):
    spec = SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return BLOCK

    def work_bytes(self, k: int, itemsize: int) -> int:
        return 2 * itemsize + 8

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
        assert start % BLOCK == 0, "chunk starts must be aligned to BLOCK"
        state.sums.extend(block_sums(base, fts[0]))

    def end_pass(self, state: SlerpState, pass_index: int) -> None:
        state.coef = coefficients(state.t, state.sums)

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
        s0, s1 = coefficients(_t(options), block_sums(b, f))
        return MergeResult(interpolate(s0, s1, b, f, dtype), None)
