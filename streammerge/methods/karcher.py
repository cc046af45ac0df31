"""``karcher``: the Riemannian (Karcher / Frechet) mean of the models on the sphere (mergekit).

With the models x_1..x_N (a ``base_model`` not listed under ``models:`` is the last of them,
as in mergekit 0.1.5, which adds the base to the inputs),
equal weights ``a = 1/N``, norms ``n_k`` and unit vectors ``u_k = x_k / n_k``:

1. the models with ``n_k > tol`` are the valid ones (none: the result is 0); their weights are
   renormalized to sum to 1;
2. start from the normalized weighted mean of their unit vectors (the first valid unit vector
   if that mean's norm is below ``tol``);
3. up to ``max_iter`` times: ``T = sum_k a_k theta_k / sin(theta_k) (u_k - cos(theta_k) mu)``
   over the valid k with ``theta_k = arccos(<mu, u_k>) >= tol``; stop when ``|T| < tol``,
   else ``mu <- cos|T| mu + sin|T| T/|T|``, renormalized;
4. the result is ``mu * sum_k a_k n_k`` (over all models). One model is returned as it is.

Every iterate is a linear combination of the x_k, so the iteration runs on their N x N Gram
matrix alone (float64, from one statistics pass over fixed 4096-element blocks added in block
order), never on the data; the merge pass is elementwise ``sum_k c_k x_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .base import MergeResult, MethodOptions, ModelParams, TensorId, scalar
from .multislerp import quad
from .nuslerp import (
    BlockGram,
    GramMethod,
    combine,
    inputs,
    plain_gram,
)
from .spec import CardColumn, MethodSpec, Param, number


def coefficients(g: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Coefficients c (float64) of the Karcher mean ``sum_k c_k x_k`` from the Gram matrix."""
    k = len(g)
    alphas = np.full(k, 1.0 / k)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return np.zeros(k)
    total = float(sum(alphas[i] for i in valid))
    weight = {i: float(alphas[i]) / total for i in valid}

    def unit(i: int) -> np.ndarray:
        e = np.zeros(k)
        e[i] = 1.0 / norms[i]
        return e

    mu = sum((weight[i] * unit(i) for i in valid), np.zeros(k))
    mean_norm = math.sqrt(quad(g, mu))
    mu = unit(valid[0]) if mean_norm < tol else mu / mean_norm
    for _ in range(max_iter):
        tangent = np.zeros(k)
        for i in valid:
            dot = min(max(quad(g, mu, unit(i)), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent = tangent + weight[i] * (theta / math.sin(theta)) * (unit(i) - dot * mu)
        tangent_norm = math.sqrt(quad(g, tangent))
        if tangent_norm < tol:
            break
        mu = math.cos(tangent_norm) * mu + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = math.sqrt(quad(g, mu))
        if unit_norm > tol:
            mu = mu / unit_norm
    return float(alphas @ norms) * mu


@dataclass(slots=True)
class KarcherState:
    k: int
    max_iter: int
    tol: float
    dtype: torch.dtype
    gram: BlockGram | None
    coef: tuple[float, ...] | None = None


def _settings(options: MethodOptions) -> tuple[int, float]:
    it, tol = options.get("max_iter"), options.get("tol")
    return (10 if it is None else int(float(it))), (1e-5 if tol is None else float(tol))


SPEC = MethodSpec(
    name="karcher",
    summary="Riemannian (Karcher) mean of the models on the sphere, equal weights",
    params=(
        Param("max_iter", "int", per_model=False, low=0, doc="iterations (10)"),
        Param("tol", per_model=False, low=0.0, doc="convergence tolerance (1e-5)"),
    ),
    needs_base=False,
    base_as_model=True,
    min_models=1,
    stats=("float64 Gram matrix of the models per 4096-element block",),
    cuda=True,
    card=(
        CardColumn("max_iter", lambda p, o: str(_settings(o)[0])),
        CardColumn("tol", lambda p, o: number(_settings(o)[1])),
    ),
    example={"max_iter": 10},
)


class Karcher(GramMethod):
    spec = SPEC

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return 1 if len(params) > 1 else 0

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> KarcherState:
        if not params:
            raise ValueError("karcher needs at least one model")
        max_iter, tol = _settings(options)
        k = len(params)
        return KarcherState(k, max_iter, tol, dtype, BlockGram(k) if k > 1 else None)

    def accumulate(
        self,
        state: KarcherState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        assert state.gram is not None
        xs, _ = inputs(base, fts, state.dtype, False)
        state.gram.add(start, xs)

    def end_pass(self, state: KarcherState, pass_index: int) -> None:
        assert state.gram is not None
        c = coefficients(state.gram.matrix(), state.max_iter, state.tol)
        state.coef = tuple(float(x) for x in c)
        state.gram = None

    def merge(
        self, state: KarcherState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        if state.k == 1:  # mergekit returns the one model as it is
            return MergeResult(fts[0].to(state.dtype, copy=True), None)
        assert state.coef is not None, "merge before the statistics pass"
        xs, _ = inputs(base, fts, state.dtype, False)
        return MergeResult(combine(state.coef, xs, None, state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        if len(fts) == 1:
            return MergeResult(fts[0].flatten().to(dtype, copy=True), None)
        max_iter, tol = _settings(options)
        xs = [x.flatten().to(dtype) for x in fts]
        coef = coefficients(plain_gram(xs, None), max_iter, tol)
        out = sum(
            (scalar(float(c), dtype) * x for c, x in zip(coef[1:], xs[1:], strict=True)),
            scalar(float(coef[0]), dtype) * xs[0],
        )
        return MergeResult(out, None)
