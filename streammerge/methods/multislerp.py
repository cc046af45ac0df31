"""``multislerp``: barycentric spherical interpolation of N models or task vectors (mergekit).

For vectors x_k (the task vectors ``f_k - base``, or with ``ignore_base`` the models), weights
w_k (divided by their sum with ``normalize_weights``, the default) and ``eps`` (1e-8):

1. unit vectors ``u_k = x_k / (|x_k| + eps)``; their weighted mean ``m = sum w_k u_k``;
2. ``|m| < eps``: with two inputs the lerp ``w_0 x_0 + w_1 x_1``, otherwise an error;
3. ``mh = m / |m|``; tangent ``T = sum w_k (u_k - <u_k, mh> mh)``; ``tn = |T| + eps``;
4. result ``(mh cos(tn) + T sin(tn) / tn) * sum w_k |x_k|``, plus the base.

A single model is returned as it is. Every quantity above is a linear combination of the x_k,
so the method needs only their Gram matrix: one statistics pass takes it as float64 partial
sums over fixed 4096-element blocks added in block order (the same bytes for any chunking),
the coefficients of the x_k are computed in float64, and the merge pass is elementwise
``base + sum_k c_k x_k`` in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .base import MergeResult, MethodOptions, ModelParams, TensorId, scalar
from .nuslerp import (
    BlockGram,
    GramMethod,
    combine,
    flag,
    inputs,
    plain_gram,
)
from .spec import WEIGHT_COLUMN, MethodSpec, Param


def quad(g: np.ndarray, a: np.ndarray, b: np.ndarray | None = None) -> float:
    """``a^T G b`` (``a^T G a`` clamped at 0 when ``b`` is None)."""
    if b is None:
        return max(float(a @ g @ a), 0.0)
    return float(a @ g @ b)


def coefficients(
    weights: Sequence[float], g: np.ndarray, normalize: bool, eps: float
) -> np.ndarray:
    """Coefficients c (float64) of the result ``sum_k c_k x_k`` from the Gram matrix ``g``."""
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        total = float(w.sum())
        if total == 0.0:
            raise ValueError("multislerp: the weights sum to 0 and cannot be normalized")
        w = w / total
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = w / (norms + eps)  # m = sum_k a_k x_k
    mean_norm = math.sqrt(quad(g, a))
    if mean_norm < eps:
        if len(w) == 2:
            return w  # mergekit's linear fallback
        raise ValueError(
            "multislerp: the weighted sum of the unit vectors is zero (antipodal inputs whose "
            "weights cancel); use different weights"
        )
    mu = a / mean_norm  # mh
    dots = (g @ mu) / (norms + eps)  # <u_k, mh>
    tau = a - float(w @ dots) * mu  # T
    tn = math.sqrt(quad(g, tau)) + eps
    avg_norm = float(norms @ w)
    return avg_norm * (mu * math.cos(tn) + tau * (math.sin(tn) / tn))


@dataclass(slots=True)
class MultislerpState:
    weights: tuple[float, ...]
    normalize: bool
    eps: float
    use_base: bool
    dtype: torch.dtype
    gram: BlockGram | None
    coef: tuple[float, ...] | None = None


SPEC = MethodSpec(
    name="multislerp",
    summary="barycentric spherical interpolation of N models (or their task vectors)",
    params=(
        Param("weight", required=True),
        Param("normalize_weights", "bool", per_model=False, doc="divide weights by their sum"),
        Param("eps", per_model=False, low=0.0, doc="added to norms (1e-8)"),
        Param(
            "ignore_base",
            "bool",
            per_model=False,
            doc="interpolate the models, not their task vectors (mergekit without a base)",
        ),
    ),
    min_models=1,
    stats=("float64 Gram matrix of the task vectors per 4096-element block",),
    cuda=True,
    card=(WEIGHT_COLUMN,),
    example={"weight": 0.5},
)


class Multislerp(GramMethod):
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
    ) -> MultislerpState:
        if not params:
            raise ValueError("multislerp needs at least one model")
        eps = options.get("eps")
        return MultislerpState(
            tuple(p.weight for p in params),
            flag(options, "normalize_weights", True),
            1e-8 if eps is None else float(eps),
            not flag(options, "ignore_base", False),
            dtype,
            BlockGram(len(params)) if len(params) > 1 else None,
        )

    def accumulate(
        self,
        state: MultislerpState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        assert state.gram is not None
        xs, _ = inputs(base, fts, state.dtype, state.use_base)
        state.gram.add(start, xs)

    def end_pass(self, state: MultislerpState, pass_index: int) -> None:
        assert state.gram is not None
        c = coefficients(state.weights, state.gram.matrix(), state.normalize, state.eps)
        state.coef = tuple(float(x) for x in c)
        state.gram = None

    def merge(
        self, state: MultislerpState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        if len(state.weights) == 1:  # mergekit returns the one model as it is
            return MergeResult(fts[0].to(state.dtype, copy=True), None)
        assert state.coef is not None, "merge before the statistics pass"
        xs, b = inputs(base, fts, state.dtype, state.use_base)
        return MergeResult(combine(state.coef, xs, b, state.dtype), None)

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
        eps = options.get("eps")
        use_base = not flag(options, "ignore_base", False)
        xs, b = inputs(base.flatten(), [x.flatten() for x in fts], dtype, use_base)
        coef = coefficients(
            [p.weight for p in params],
            plain_gram(xs, None),
            flag(options, "normalize_weights", True),
            1e-8 if eps is None else float(eps),
        )
        out = sum(
            (scalar(float(c), dtype) * x for c, x in zip(coef[1:], xs[1:], strict=True)),
            scalar(float(coef[0]), dtype) * xs[0],
        )
        return MergeResult(out if b is None else b + out, None)
