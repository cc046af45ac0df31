"""``nuslerp``: spherical interpolation of two models, or of their task vectors (mergekit).

With weights w1, w2, ``t = w2 / (w1 + w2)`` (0.5 when the sum is within 1e-6 of 0). For two
vectors v0, v1 (the models, or with a base their task vectors ``x - base``), normalised by
``max(|v|, 1e-7)``: ``cos`` is their dot product clamped to [-1, 1]; when ``1 - cos^2 <= 1e-16``
the result is the lerp ``(1 - t) v0 + t v1``, otherwise with theta = arccos(cos)
``(sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)``. With a base the result is added
back to it.

``nuslerp_flatten`` (default true) interpolates the whole tensor as one vector. Otherwise each
row of the tensor's last dimension is one vector (mergekit's dim -1), or with
``nuslerp_row_wise`` each vector runs along the first dimension (mergekit's dim 0); a 1-D
tensor is one vector either way. The method sees chunks of the flat row-major order and a
:class:`TensorId` without a shape, so it takes the row length from ``tensor.shape`` when the
caller provides one (:class:`ShapedTensorId`) and otherwise from the ``row_length`` parameter
(elements per row of the flat order; a tensor of at most ``row_length`` elements is one
vector, as a 1-D tensor is in mergekit, and a last partial row is a vector of its own; use a
filter list when tensors differ). ``ignore_base`` interpolates the models themselves
(mergekit's nuslerp without a ``base_model``; the recipe still names a base for the layout).

Statistics (Gram entries v_i . v_j, float64, products exact for float32 inputs):

* flattened: partial sums over fixed :data:`BLOCK`-element blocks of the flat index (pairwise,
  within a block), added in block order;
* per vector: every element is added to its vector's float64 accumulator in ascending flat
  order (a sequential fold), whatever the chunking.

Either way the coefficients, hence the output bytes, do not depend on the chunk length. The
interpolation itself is elementwise in the compute dtype, with the coefficients rounded to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId, scalar
from .spec import WEIGHT_COLUMN, MethodSpec, Param

BLOCK = 4096
"""Elements per partial sum of the flattened statistics (chunk starts are multiples of it)."""
NORM_EPS = 1e-7
"""Norms are clamped to at least this before dividing (mergekit's ``_normalize``)."""
COLINEAR_EPS = 1e-8
"""``1 - cos^2 <= COLINEAR_EPS**2`` counts as colinear: linear interpolation."""


ShapedTensorId = TensorId
"""Kept for the tests: :class:`TensorId` carries the shape itself now."""


# -- statistics shared by the Gram-based methods ---------------------------------------------


def pairs(k: int) -> list[tuple[int, int]]:
    """Index pairs (i, j), i <= j, of a k x k symmetric Gram matrix, in a fixed order."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def products(xs: Sequence[torch.Tensor]) -> np.ndarray:
    """float64 products x_i * x_j for every pair, shape (pairs, n)."""
    v = [as_numpy(x) for x in xs]
    idx = pairs(len(v))
    out = np.empty((len(idx), v[0].shape[0] if v else 0), dtype=np.float64)
    for p, (i, j) in enumerate(idx):  # cast to float64, then multiply (exact for float32)
        np.multiply(v[i], v[j], out=out[p], dtype=np.float64)
    return out


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """``x`` on the host as float32 or float64 numpy (a view where possible; exact)."""
    x = x.cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32 if x.element_size() <= 4 else torch.float64)
    return x.numpy()


def unpack(flat: np.ndarray, k: int) -> np.ndarray:
    """The k x k Gram matrix (float64) from its packed pairs."""
    g = np.zeros((k, k, *flat.shape[1:]), dtype=np.float64)
    for p, (i, j) in enumerate(pairs(k)):
        g[i, j] = g[j, i] = flat[p]
    return g


def fold(acc: np.ndarray, parts: np.ndarray, axis: int) -> np.ndarray:
    """``acc`` plus each slice of ``parts`` along ``axis``, one after the other (sequentially)."""
    both = np.concatenate([np.expand_dims(acc, axis), parts], axis=axis)
    return np.take(np.add.accumulate(both, axis=axis), -1, axis=axis)


class BlockGram:
    """Whole-tensor Gram entries: float64 pairwise sums over fixed BLOCK-element blocks of the
    flat index, folded in block order (chunk starts must be multiples of BLOCK)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.acc = np.zeros(len(pairs(k)), dtype=np.float64)

    def add(self, start: int, xs: Sequence[torch.Tensor]) -> None:
        assert start % BLOCK == 0, "chunk starts must be aligned to BLOCK"
        prod = products(xs)
        n = prod.shape[1]
        full = n // BLOCK * BLOCK
        cells = [prod[:, :full].reshape(len(prod), -1, BLOCK).sum(axis=-1)]
        if full < n:  # the tensor's last, short block
            cells.append(prod[:, full:].sum(axis=-1, keepdims=True))
        self.acc = fold(self.acc, np.concatenate(cells, axis=1), axis=1)

    def matrix(self) -> np.ndarray:
        return unpack(self.acc, self.k)


def gram_work_bytes(k: int, itemsize: int) -> int:
    """Temporaries per chunk element of a Gram statistics pass over k vectors (their
    compute-dtype copies and the base's, float64 copies, the pair products, and the two
    copies a per-row fold makes) or of the merge (per-element coefficients, int64 keys)."""
    p = len(pairs(k))
    return itemsize * (k + 1) + 8 * k + 8 * p + 16 * p + 24


def merge_bytes(k: int, itemsize: int) -> int:
    """Temporaries per chunk element live in an elementwise merge of k inputs."""
    return itemsize * (k + 3)


@dataclass(frozen=True, slots=True)
class Layout:
    """Which vector each flat element belongs to: ``rows`` (contiguous runs of ``length``) or
    columns (element i in vector ``i % length``); ``count`` vectors in all."""

    rows: bool
    length: int
    count: int

    def keys(self, start: int, n: int) -> torch.Tensor:
        i = torch.arange(start, start + n, dtype=torch.int64)
        return i // self.length if self.rows else i % self.length


def row_layout(numel: int, length: int) -> Layout:
    """Rows of ``length`` contiguous elements, the last one shorter if ``length`` does not
    divide ``numel`` (one vector if ``length >= numel``)."""
    if length < 1:
        raise ValueError(f"a row length must be at least 1, got {length}")
    return Layout(True, length, max(1, -(-numel // length)))


class KeyedGram:
    """Gram entries per vector: each element is added to its vector's float64 accumulator in
    ascending flat order (a sequential fold), so chunking cannot change the sums."""

    def __init__(self, k: int, layout: Layout) -> None:
        self.k, self.layout = k, layout
        self.acc = np.zeros((len(pairs(k)), layout.count), dtype=np.float64)

    def add(self, start: int, xs: Sequence[torch.Tensor]) -> None:
        prod = products(xs)
        n, length, acc = prod.shape[1], self.layout.length, self.acc
        i = 0
        while i < n:
            pos = start + i
            off = pos % length
            if off == 0 and n - i >= length:  # whole rows at once
                r = (n - i) // length
                block = prod[:, i : i + r * length].reshape(len(prod), r, length)
                if self.layout.rows:
                    row = pos // length
                    acc[:, row : row + r] = fold(acc[:, row : row + r], block, axis=2)
                else:
                    acc[:] = fold(acc, block, axis=1)
                i += r * length
                continue
            m = min(length - off, n - i)  # part of one row
            part = prod[:, i : i + m]
            if self.layout.rows:
                row = pos // length
                acc[:, row] = fold(acc[:, row], part, axis=1)
            else:
                acc[:, off : off + m] = acc[:, off : off + m] + part
            i += m

    def matrix(self) -> np.ndarray:
        """Shape (k, k, count)."""
        return unpack(self.acc, self.k)


def plain_gram(xs: Sequence[torch.Tensor], layout: Layout | None) -> np.ndarray:
    """The statistics of :class:`BlockGram` / :class:`KeyedGram` for a whole tensor in memory,
    written from their definitions: shape (k, k) flattened, (k, k, count) per vector."""
    v = [x.to(torch.float64).cpu().numpy() for x in xs]
    k, n = len(v), v[0].shape[0]
    g = np.zeros((k, k) if layout is None else (k, k, layout.count), dtype=np.float64)
    for i, j in pairs(k):
        prod = v[i] * v[j]
        if layout is None:  # blocks of BLOCK elements, each summed alone, added in order
            total = 0.0
            for s in range(0, n, BLOCK):
                total = total + float(prod[s : s + BLOCK].sum())
            g[i, j] = g[j, i] = total
            continue
        length, full = layout.length, n // layout.length * layout.length
        rows = prod[:full].reshape(-1, length)
        tail = prod[full:]
        if layout.rows:  # each row: 0.0 + its elements, one at a time
            sums = np.zeros(layout.count)
            sums[: len(rows)] = np.add.accumulate(
                np.concatenate([np.zeros((len(rows), 1)), rows], axis=1), axis=1
            )[:, -1]
            if len(tail):
                sums[-1] = np.add.accumulate(np.concatenate([[0.0], tail]))[-1]
        else:  # each column: 0.0 + its elements, row after row
            sums = np.add.accumulate(np.concatenate([np.zeros((1, length)), rows]), axis=0)[-1]
            sums[: len(tail)] = sums[: len(tail)] + tail
        g[i, j] = g[j, i] = sums
    return g


def combine(
    coef: Sequence[torch.Tensor | float],
    xs: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``base + sum_k coef_k * x_k`` in ``dtype`` (in order; scalars rounded to dtype first)."""
    out: torch.Tensor | None = None
    for c, x in zip(coef, xs, strict=True):
        term = x.to(dtype, copy=True).mul_(c if isinstance(c, torch.Tensor) else scalar(c, dtype))
        out = term if out is None else out.add_(term)
    assert out is not None
    return out if base is None else base.to(dtype, copy=True).add_(out)


def inputs(
    base: torch.Tensor, fts: Sequence[torch.Tensor], dtype: torch.dtype, use_base: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The vectors the method interpolates (task vectors in ``dtype`` with a base) and the base
    (in ``dtype``) to add back, or None."""
    if not use_base:
        return [f.to(dtype) for f in fts], None
    b = base.to(dtype)
    return [f.to(dtype) - b for f in fts], b


def flag(options: MethodOptions, name: str, default: bool) -> bool:
    x = options.get(name)
    return default if x is None else bool(x)


# -- nuslerp ---------------------------------------------------------------------------------


def interpolation_t(params: Sequence[ModelParams]) -> float:
    """mergekit's ``t = w2 / (w1 + w2)``, 0.5 when the sum is about 0."""
    if len(params) != 2:
        raise ValueError(f"nuslerp takes exactly two models besides the base, got {len(params)}")
    total = params[0].weight + params[1].weight
    return 0.5 if abs(total) < 1e-6 else params[1].weight / total


def coefficients(t: float, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s0, s1), float64, per vector, from Gram entries ``g`` of shape (2, 2, ...)."""
    n0 = np.maximum(np.sqrt(g[0, 0]), NORM_EPS)
    n1 = np.maximum(np.sqrt(g[1, 1]), NORM_EPS)
    cos = np.clip(g[0, 1] / (n0 * n1), -1.0, 1.0)
    colinear = 1.0 - cos * cos <= COLINEAR_EPS**2
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin = np.where(colinear, 1.0, np.sin(theta))
    s0 = np.where(colinear, 1.0 - t, np.sin((1.0 - t) * theta) / sin)
    s1 = np.where(colinear, t, np.sin(t * theta) / sin)
    return np.asarray(s0, dtype=np.float64), np.asarray(s1, dtype=np.float64)


def layout_of(tensor: TensorId, options: MethodOptions) -> Layout | None:
    """None: flattened; else which vector each element belongs to."""
    if flag(options, "nuslerp_flatten", True):
        return None
    row_wise = flag(options, "nuslerp_row_wise", False)
    shape = (
        tensor.shape if tensor.shape or tensor.numel <= 1 else None
    )  # () with numel > 1: unknown
    if shape is not None:
        if len(shape) <= 1:
            return row_layout(tensor.numel, max(tensor.numel, 1))
        if row_wise:
            return Layout(False, tensor.numel // shape[0], tensor.numel // shape[0])
        return row_layout(tensor.numel, shape[-1])
    length = options.get("row_length")
    if length is None:
        raise ValueError(
            "nuslerp with nuslerp_flatten: false needs each tensor's 'row_length' (its last "
            "dimension) under parameters: streamed tensors arrive without a shape"
        )
    layout = row_layout(tensor.numel, int(float(length)))
    if row_wise and layout.count > 1:
        return Layout(False, layout.length, layout.length)
    return layout


@dataclass(slots=True)
class NuslerpState:
    t: float
    use_base: bool
    dtype: torch.dtype
    layout: Layout | None
    stats: Any
    coef: tuple[Any, Any] | None = None


SPEC = MethodSpec(
    name="nuslerp",
    summary="spherical interpolation of two models (or their task vectors), t = w2/(w1+w2)",
    params=(
        Param("weight", required=True, doc="t = w2 / (w1 + w2)"),
        Param("nuslerp_flatten", "bool", per_model=False, doc="one vector per tensor (true)"),
        Param(
            "nuslerp_row_wise",
            "bool",
            per_model=False,
            doc="without flatten: vectors along the first dimension",
        ),
        Param(
            "row_length",
            "int",
            per_model=False,
            low=1,
            doc="without flatten: elements per row (the last dimension)",
        ),
        Param(
            "ignore_base",
            "bool",
            per_model=False,
            doc="interpolate the models, not their task vectors (mergekit without a base)",
        ),
    ),
    min_models=2,
    max_models=2,
    stats=(
        "float64 Gram entries of the two task vectors: per 4096-element block (flattened) "
        "or per row/column, folded in flat order",
    ),
    cuda=True,
    card=(WEIGHT_COLUMN,),
    example={"weight": 0.5},
)


class GramMethod(MethodBase):
    """What the Gram-statistics methods share: chunks aligned to the statistics blocks, their
    memory per element, and an elementwise merge pass after the statistics."""

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return BLOCK

    def work_bytes(self, k: int, itemsize: int) -> int:
        return gram_work_bytes(k, itemsize)

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return merge_bytes(k, itemsize)

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return True  # the statistics pass is redone on resume; merging is elementwise


class Nuslerp(GramMethod):
    spec = SPEC

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
    ) -> NuslerpState:
        t = interpolation_t(params)
        layout = layout_of(tensor, options)
        stats = BlockGram(2) if layout is None else KeyedGram(2, layout)
        return NuslerpState(t, not flag(options, "ignore_base", False), dtype, layout, stats)

    def accumulate(
        self,
        state: NuslerpState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        xs, _ = inputs(base, fts, state.dtype, state.use_base)
        state.stats.add(start, xs)

    def end_pass(self, state: NuslerpState, pass_index: int) -> None:
        s0, s1 = coefficients(state.t, state.stats.matrix())
        if state.layout is None:
            state.coef = (float(s0), float(s1))
        else:
            state.coef = (
                torch.from_numpy(s0).to(state.dtype),
                torch.from_numpy(s1).to(state.dtype),
            )
        state.stats = None

    def merge(
        self, state: NuslerpState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        assert state.coef is not None, "merge before the statistics pass"
        xs, b = inputs(base, fts, state.dtype, state.use_base)
        c0, c1 = state.coef
        if state.layout is not None:
            keys = state.layout.keys(start, base.numel()).to(base.device)
            c0, c1 = c0.to(base.device)[keys], c1.to(base.device)[keys]
        return MergeResult(combine((c0, c1), xs, b, state.dtype), None)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        t = interpolation_t(params)
        layout = layout_of(tensor, options)
        xs, b = inputs(
            base.flatten(),
            [x.flatten() for x in fts],
            dtype,
            not flag(options, "ignore_base", False),
        )
        s0, s1 = coefficients(t, plain_gram(xs, layout))
        if layout is None:
            c0, c1 = scalar(float(s0), dtype), scalar(float(s1), dtype)
        else:
            keys = layout.keys(0, tensor.numel)
            c0, c1 = torch.from_numpy(s0).to(dtype)[keys], torch.from_numpy(s1).to(dtype)[keys]
        out = c0 * xs[0] + c1 * xs[1]
        return MergeResult(out if b is None else b + out, None)
