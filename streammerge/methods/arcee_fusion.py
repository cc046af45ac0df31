"""``arcee_fusion``: take the other model's values where they matter most (mergekit).

For the base ``a`` and the one other model ``b``, rows being the last dimension::

    p, q        = softmax(b_row) + 1e-8, softmax(a_row) + 1e-8
    KL_row      = sum_row p * log(p / q)
    importance  = |b - a| * KL_row                      (per element)
    threshold   = median + 1.5 * (q3 - q1)              (of the importance, whole tensor)
    out         = a + (b - a) * [importance >= threshold]

Streamed in five statistics passes, none of which holds the tensor in memory:

0. the maximum of each row of ``a`` and ``b`` (exact in any order);
1. each row's ``sum exp(x - max)`` (the softmax normalisers);
2. each row's KL sum;
3. and 4. radix-select histograms (two 16-bit digits of the float32 importance's bits) for
   the three order statistics at once (tensors of at most :data:`SMALL` elements instead keep
   their float32 importance in pass 3 and sort it: the same order statistics).

Row sums are float64 and reproducible under any chunking: the flat index is cut into *pieces*,
the intersections of rows with fixed blocks of :data:`BLOCK` elements (chunk starts are aligned
to it, so no piece straddles two chunks); a piece's sum is a difference of a sequential float64
cumulative sum restarted at every block, and a row's sum adds its pieces one by one in index
order. ``exp`` and ``log`` are numpy's float64 ones, whose result does not depend on where an
element sits in an array (torch's vector loops may round tails differently).

Deterministic choices, where mergekit 0.1.5 differs:

* quantiles are exact order statistics of the whole tensor: the element at ascending position
  ``floor(q * (n - 1))`` computed in integers (mergekit samples 1,000,000 elements with
  replacement, unseeded, above that size, and multiplies ``q * (n - 1)`` in float32);
* the softmax/KL statistics are float64 (mergekit: the input dtype); a row's KL is rounded to
  float32 and clamped at +0 (it is >= 0 mathematically; rounding can make it -1e-17);
* the importance is float32 ``|b - a| * KL_row``, the threshold float32
  ``median + 1.5 * (q3 - q1)`` (mergekit: the input dtype, bf16 for bf16 models);
* the merge ``a + (b - a) * mask`` runs in the compute dtype.

Compared with mergekit 0.1.5 on tensors below its sampling size (random data, rows given), every
element that differed was one where mergekit's low-precision KL flipped the mask and ours agreed
with a float64 evaluation of the formula.

Rows: :class:`~streammerge.methods.base.TensorId` carries only the name and element count, so a
tensor is one row unless its ``TensorId`` also has a ``shape`` (duck-typed; the tests pass one).
With the engine's plain ``TensorId`` a 2-D tensor's softmax runs over the whole flattened tensor
instead of per row; 0-D and 1-D tensors are one row in mergekit too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId
from .select import RadixTopK
from .spec import MethodSpec

BLOCK = 4096
"""Elements per cumulative-sum block of the row sums (chunk starts are multiples of it)."""
EPS = 1e-8
"""Added to both softmaxes before the KL divergence (mergekit's)."""
QUANTILES = (1, 2, 3)
"""q1, median, q3 as quarters."""
PASSES = 5
SMALL = 2**16
"""Tensors of at most this many elements sort their importance (one float32 copy) instead of
running the radix histograms, whose fixed cost dominates on small tensors; both give the same
exact order statistics."""


def row_length(tensor: TensorId) -> int:
    """Elements per row: the last dimension when the id carries a shape, else the whole tensor."""
    shape = getattr(tensor, "shape", None)
    if shape:
        return max(1, int(shape[-1]))
    return max(1, tensor.numel)


def quantile_positions(n: int) -> list[int]:
    """Ascending positions of q1, the median and q3 among ``n`` values: floor(q (n - 1))."""
    return [q * (n - 1) // 4 for q in QUANTILES]


def row_index(start: int, n: int, row: int) -> np.ndarray:
    """Row of each element of the flat range ``[start, start + n)``."""
    return (start + np.arange(n, dtype=np.int64)) // row


def add_row_sums(vals: np.ndarray, start: int, row: int, out: np.ndarray) -> None:
    """Add the float64 sum of ``vals`` (elements ``[start, start + n)``) over each row's part to
    ``out[row]``, piece by piece in index order (see the module docstring)."""
    n = vals.size
    if n == 0:
        return
    assert start % BLOCK == 0, "ranges must start on a block"
    padded = np.zeros(-(-n // BLOCK) * BLOCK, dtype=np.float64)
    padded[:n] = vals
    cs = np.cumsum(padded.reshape(-1, BLOCK), axis=1).reshape(-1)[:n]
    row_ends = np.arange((-start - 1) % row, n, row, dtype=np.int64)
    block_ends = np.arange(BLOCK - 1, n, BLOCK, dtype=np.int64)
    ends = np.unique(np.concatenate([row_ends, block_ends, np.array([n - 1])]))
    starts = np.concatenate([np.array([0]), ends[:-1] + 1])
    before = np.where(starts % BLOCK == 0, 0.0, cs[np.maximum(starts - 1, 0)])
    pieces = cs[ends] - before
    rows = (start + ends) // row
    # rank of each piece within its row's run here: pieces of one row are added in order
    first = np.concatenate([np.array([True]), rows[1:] != rows[:-1]])
    run_start = np.maximum.accumulate(np.where(first, np.arange(rows.size), 0))
    rank = np.arange(rows.size) - run_start
    for j in range(int(rank.max()) + 1):
        sel = rank == j
        out[rows[sel]] += pieces[sel]


def _f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def exp_terms(x: np.ndarray, rows: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """exp(x - max of its row), float64."""
    return np.exp(x - row_max[rows])


def kl_terms(
    a: np.ndarray, b: np.ndarray, rows: np.ndarray, stats: Sequence[np.ndarray]
) -> np.ndarray:
    """p * log(p / q) per element, p = softmax(b) + EPS, q = softmax(a) + EPS (float64)."""
    max_a, max_b, sum_a, sum_b = stats
    p = np.exp(b - max_b[rows]) / sum_b[rows] + EPS
    q = np.exp(a - max_a[rows]) / sum_a[rows] + EPS
    return p * np.log(p / q)


def row_kl32(kl: np.ndarray) -> torch.Tensor:
    """Each row's KL in float32, clamped at +0."""
    return torch.from_numpy(np.where(kl > 0, kl, 0.0).astype(np.float32))


def importance(
    base: torch.Tensor, ft: torch.Tensor, start: int, row: int, kl32: torch.Tensor
) -> torch.Tensor:
    """float32 ``|b - a| * KL_row`` of a flat range (non-negative, never -0)."""
    rows = torch.from_numpy(row_index(start, base.numel(), row))
    diff = (ft.to("cpu", torch.float32) - base.to("cpu", torch.float32)).abs()
    return diff * kl32[rows]


def threshold(q1: float, median: float, q3: float) -> torch.Tensor:
    """float32 ``median + 1.5 * (q3 - q1)``."""
    f = torch.tensor([q1, median, q3], dtype=torch.float32)
    return f[1] + torch.tensor(1.5, dtype=torch.float32) * (f[2] - f[0])


def fuse(
    base: torch.Tensor, ft: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``a + (b - a) * mask`` in ``dtype``."""
    a, b = base.to(dtype), ft.to(dtype)
    return a + (b - a) * mask.to(a.device, dtype)


def add_digit_counts(selectors: Sequence[RadixTopK], key: torch.Tensor) -> None:
    """One digit pass of the three selectors over non-negative 32-bit keys, sharing the work:
    the first digit's histogram is the same for all of them."""
    key = key[key >= 0]  # a NaN with its sign bit set: ineligible, as RadixTopK.add has it
    high = key >> 16
    shared: torch.Tensor | None = None
    for t in selectors:
        if t.done:
            continue
        shift, prefix = t.digit_args()
        if prefix is None:
            if shared is None:
                shared = torch.bincount(high.long(), minlength=2**16)
            t.add_counts(shared)
        else:
            assert shift == 0
            low = key[high == prefix] & 0xFFFF
            t.add_counts(torch.bincount(low.long(), minlength=2**16))


def _float_of_key(key: int) -> float:
    return float(torch.tensor([key], dtype=torch.int32).view(torch.float32)[0])


@dataclass
class FusionState:
    tensor: TensorId
    dtype: torch.dtype
    row: int
    rows: int
    stats: list[np.ndarray] = field(default_factory=list)
    """max_a, max_b, sum_a, sum_b (float64 per row)."""
    kl: np.ndarray | None = None
    kl32: torch.Tensor | None = None
    topk: list[RadixTopK] = field(default_factory=list)
    min_key: int = 2**31 - 1
    small: list[torch.Tensor] | None = None
    """The importance so far, for tensors of at most SMALL elements."""
    thr: torch.Tensor | None = None


SPEC = MethodSpec(
    name="arcee_fusion",
    summary="take the other model where |b - a| times its row's softmax KL is an outlier",
    params=(),
    min_models=1,
    max_models=1,
    stats=(
        "per-row maxima of the base and the model",
        "per-row float64 softmax normalisers, sum exp(x - max), over row x 4096-block pieces",
        "per-row float64 KL(softmax(b) || softmax(a)) sums over the same pieces",
        "two radix-select passes (16-bit digits of the float32 importance) for q1, median, q3",
    ),
    card=(),
    example={},
)


class ArceeFusion(MethodBase):
    spec = SPEC

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return BLOCK

    def work_bytes(self, k: int, itemsize: int) -> int:
        # float64 copies of both inputs, row indices, exp terms, p, q, the KL terms and the
        # padded cumulative sum: about fourteen 8-byte temporaries per element
        return 14 * 8 + 2 * itemsize

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return 10 * 8 + 2 * itemsize

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return PASSES

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return True  # the statistics passes are redone on resume; the merge is elementwise

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> FusionState:
        if len(params) != 1:
            raise ValueError(
                f"arcee_fusion takes exactly one model besides the base, got {len(params)}"
            )
        row = row_length(tensor)
        rows = max(1, -(-tensor.numel // row))
        st = FusionState(tensor, dtype, row, rows)
        st.stats = [np.full(rows, -np.inf), np.full(rows, -np.inf), np.zeros(rows), np.zeros(rows)]
        st.kl = np.zeros(rows)
        n = tensor.numel
        if n <= SMALL:
            st.small = []
        else:
            st.topk = [RadixTopK(n - j, 32) for j in quantile_positions(n)]
        return st

    def accumulate(
        self,
        state: FusionState,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        st = state
        assert start % BLOCK == 0, "chunk starts must be aligned to BLOCK"
        if pass_index >= 3:
            assert st.kl32 is not None
            imp = importance(base, fts[0], start, st.row, st.kl32)
            if st.small is not None:
                if pass_index == 3:
                    st.small.append(imp)
                return
            key = imp.view(torch.int32)
            if pass_index == 3 and key.numel():
                st.min_key = min(st.min_key, int(key.min()))
            add_digit_counts(st.topk, key)
            return
        a, b = _f64(base), _f64(fts[0])
        rows = row_index(start, a.size, st.row)
        max_a, max_b, sum_a, sum_b = st.stats
        if pass_index == 0:
            np.maximum.at(max_a, rows, a)
            np.maximum.at(max_b, rows, b)
        elif pass_index == 1:
            add_row_sums(exp_terms(a, rows, max_a), start, st.row, sum_a)
            add_row_sums(exp_terms(b, rows, max_b), start, st.row, sum_b)
        else:
            assert st.kl is not None
            add_row_sums(kl_terms(a, b, rows, st.stats), start, st.row, st.kl)

    def end_pass(self, state: FusionState, pass_index: int) -> None:
        st = state
        if pass_index == 2:
            assert st.kl is not None
            st.kl32 = row_kl32(st.kl)
        elif st.small is not None:
            if pass_index == 3:
                ordered = torch.sort(torch.cat(st.small)).values if st.small else torch.zeros(1)
                st.thr = threshold(
                    *(float(ordered[j]) for j in quantile_positions(ordered.numel()))
                )
                st.small = []
        elif pass_index >= 3:
            for t in st.topk:
                t.end_pass()
            if pass_index == 4:
                vals = [st.min_key if t.threshold < 0 else t.threshold for t in st.topk]
                st.thr = threshold(*(_float_of_key(v) for v in vals))

    def merge(
        self, state: FusionState, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        st = state
        assert st.thr is not None and st.kl32 is not None, "merge before the statistics passes"
        mask = importance(base, fts[0], start, st.row, st.kl32) >= st.thr
        return MergeResult(fuse(base, fts[0], mask, st.dtype), None)

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
            raise ValueError(
                f"arcee_fusion takes exactly one model besides the base, got {len(fts)}"
            )
        a_t, b_t = base.flatten(), fts[0].flatten()
        n, row = a_t.numel(), row_length(tensor)
        if n == 0:
            return MergeResult(fuse(a_t, b_t, torch.zeros(0, dtype=torch.bool), dtype), None)
        a, b = _f64(a_t).reshape(-1, row), _f64(b_t).reshape(-1, row)
        rows = row_index(0, n, row)
        stats = [a.max(axis=1), b.max(axis=1), np.zeros(len(a)), np.zeros(len(a))]
        add_row_sums(exp_terms(a.ravel(), rows, stats[0]), 0, row, stats[2])
        add_row_sums(exp_terms(b.ravel(), rows, stats[1]), 0, row, stats[3])
        kl = np.zeros(len(a))
        add_row_sums(kl_terms(a.ravel(), b.ravel(), rows, stats), 0, row, kl)
        imp = importance(a_t, b_t, 0, row, row_kl32(kl))
        ordered = torch.sort(imp).values
        thr = threshold(*(float(ordered[j]) for j in quantile_positions(n)))
        return MergeResult(fuse(a_t, b_t, imp >= thr, dtype), None)
