"""Whole-tensor statistics computed exactly from chunks, and the DARE random stream.

* :class:`RadixTopK` finds the k-th largest magnitude key of a tensor in one pass per 16-bit
  digit (two passes for fp32) with 64 Ki-bin histograms: exact, bounded memory, independent
  of the chunking. Selection then keeps every key above the threshold and the first ``need``
  keys equal to it in index order (ties toward the lower index), tracked by a running count.
* :class:`ExactL1` sums ``|x|`` exactly (integer mantissa sums per binary exponent), so an L1
  norm, and anything derived from it, does not depend on where chunks split the tensor.
* :func:`dare_keep` draws DARE's Bernoulli mask from fixed 64 Ki-element blocks, each with its
  own generator seeded by (seed, model, tensor, block): any chunking sees the same bits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

DIGIT = 16
RNG_BLOCK = 2**16
"""Elements per independently seeded block of the DARE random stream."""


@dataclass
class RadixTopK:
    """Exact top-``k`` threshold over the non-negative integer keys of one tensor.

    Feed each digit pass's chunks to :meth:`add` (keys < 0 are ineligible and ignored), call
    :meth:`end_pass` after each pass; after ``passes`` passes, ``threshold`` and ``need`` define
    the selection (see :meth:`select`).
    """

    k: int
    """How many keys to keep."""
    key_bits: int
    """Width of the key type in bits (16, 32 or 64)."""
    prefix: int = 0
    remaining: int = 0
    digit: int = 0
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(2**DIGIT, dtype=torch.int64))
    threshold: int = -1
    """Keys above are kept; -1 keeps every eligible key."""
    need: int = 0
    """How many keys equal to ``threshold`` are kept (the lowest-index ones)."""
    done: bool = False

    def __post_init__(self) -> None:
        self.remaining = self.k
        if self.k == 0:  # keep nothing: no key exceeds the largest possible one
            self.threshold, self.need, self.done = (1 << (self.key_bits - 1)) - 1, 0, True

    @property
    def passes(self) -> int:
        return -(-(self.key_bits - 1) // DIGIT)

    def _shift(self) -> int:
        return DIGIT * (self.passes - 1 - self.digit)

    def add(self, key: torch.Tensor) -> None:
        if self.done:
            return
        shift = self._shift()
        key = key[key >= 0]
        if self.digit:
            key = key[(key >> (shift + DIGIT)) == self.prefix]
        self.hist += torch.bincount(((key >> shift) & (2**DIGIT - 1)).long(), minlength=2**DIGIT)

    def add_counts(self, hist: torch.Tensor) -> None:
        """Add a histogram of this pass's digit computed elsewhere (see :meth:`digit_args`)."""
        if not self.done:
            self.hist += hist

    def digit_args(self) -> tuple[int, int | None]:
        """``(shift, prefix)`` of this pass: keys whose bits above ``shift + 16`` equal
        ``prefix`` (None in the first pass: every key) count in bin ``(key >> shift) & 0xFFFF``."""
        return self._shift(), self.prefix if self.digit else None

    def end_pass(self) -> None:
        if self.done:
            return
        total = int(self.hist.sum())
        if self.digit == 0 and total <= self.k:  # fewer eligible keys than k: keep them all
            self.threshold, self.need, self.done = -1, 0, True
            return
        # walk bins from the largest key down to find the one holding the k-th largest
        counts = self.hist.flip(0).cumsum(0)
        b = int(torch.searchsorted(counts, torch.tensor(self.remaining)))
        above = int(counts[b - 1]) if b else 0
        self.prefix = (self.prefix << DIGIT) | (2**DIGIT - 1 - b)
        self.remaining -= above
        self.hist.zero_()
        self.digit += 1
        if self.digit == self.passes:
            self.threshold, self.need, self.done = self.prefix, self.remaining, True


def select(key: torch.Tensor, threshold: int, need: int, taken: list[int]) -> torch.Tensor:
    """Keys above ``threshold`` plus the first ``need - taken[0]`` equal to it, in index order.

    ``taken[0]`` counts threshold ties kept in earlier chunks and is updated in place, so
    calling this on consecutive chunks equals one call on the whole tensor.
    """
    sel = key > threshold
    if need > taken[0]:
        # positions of the ties, lowest index first (a few; no chunk-sized cumsum)
        ties = torch.nonzero(key == threshold).flatten()[: need - taken[0]]
        sel[ties] = True
        taken[0] += ties.numel()
    return sel


def key_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


class ExactL1:
    """Exact ``sum(|x|)`` of finite floats, accumulated chunk by chunk in any order.

    Each value is split into a binary exponent and an integer mantissa; mantissas are summed
    per exponent in int64, which is exact for up to 2^39 values (fp32, bf16, fp16: via their
    exact fp32 image) or 2^36 values (fp64, whose 53-bit mantissa is split in two halves).
    Work proceeds in slices of 2^20 elements so its temporaries stay small.
    """

    SLICE = 2**20

    def __init__(self) -> None:
        self.hi = torch.zeros(2048, dtype=torch.int64)
        self.lo = torch.zeros(2048, dtype=torch.int64)
        self.f32 = torch.zeros(256, dtype=torch.int64)

    def add(self, x: torch.Tensor) -> None:
        for s in range(0, x.numel(), self.SLICE):
            part = x[s : s + self.SLICE]
            if part.dtype == torch.float64:
                self._add64(part)
            else:
                self._add32(part.to(torch.float32))

    def _add32(self, x: torch.Tensor) -> None:
        bits = x.view(torch.int32) & 0x7FFFFFFF
        exp = bits >> 23
        mant = (bits & 0x7FFFFF) | ((exp > 0).to(torch.int32) << 23)
        self.f32.index_add_(0, exp.clamp_(min=1).long(), mant.long())  # subnormals: exp 1

    def _add64(self, x: torch.Tensor) -> None:
        bits = x.abs().view(torch.int64)
        exp = bits >> 52
        mant = bits & ((1 << 52) - 1)
        normal = exp > 0
        mant = torch.where(normal, mant | (1 << 52), mant)
        idx = torch.where(normal, exp, 1)  # subnormals share exponent 1's scale
        self.hi.index_add_(0, idx, mant >> 26)
        self.lo.index_add_(0, idx, mant & ((1 << 26) - 1))

    def value(self) -> Fraction:
        total = Fraction(0)
        for e in torch.nonzero(self.hi | self.lo).flatten().tolist():
            total += Fraction((int(self.hi[e]) << 26) + int(self.lo[e])) * Fraction(2) ** (e - 1075)
        for e in torch.nonzero(self.f32).flatten().tolist():
            total += Fraction(int(self.f32[e])) * Fraction(2) ** (e - 150)
        return total


def l1_ratio(full: float, kept: float, eps: float = 0.0) -> float:
    """mergekit's L1 rescale factor ``||x||_1 / ||mask x||_1`` in float64 (1 when nothing kept,
    or when either norm is below ``eps``: mergekit's ``rescaled_masked_tensor`` uses 1e-7)."""
    if not kept or full < eps or kept < eps:
        return 1.0
    return full / kept


def dare_keep(
    seed: int, model: int, tensor_key: int, start: int, end: int, p: float
) -> torch.Tensor:
    """DARE's keep mask for elements ``[start, end)``: Bernoulli(p), chunking-independent."""
    out = torch.empty(end - start, dtype=torch.bool)
    if p >= 1.0 or p <= 0.0:
        out.fill_(p >= 1.0)
        return out
    g = torch.Generator()
    u = torch.empty(RNG_BLOCK, dtype=torch.float64)  # reused: no page faults per block
    for blk in range(start // RNG_BLOCK, -(-end // RNG_BLOCK)):
        b0 = blk * RNG_BLOCK
        g.manual_seed(_block_seed(seed, model, tensor_key, blk))
        torch.rand(RNG_BLOCK, generator=g, dtype=torch.float64, out=u)
        lo, hi = max(start, b0), min(end, b0 + RNG_BLOCK)
        out[lo - start : hi - start] = u[lo - b0 : hi - b0] < p
    return out


def uniforms(seed: int, model: int, tensor_key: int, start: int, end: int) -> torch.Tensor:
    """Uniform float64 draws for elements ``[start, end)`` from DARE's blocks (the same
    generators as :func:`dare_keep`: ``dare_keep(..., p) == (uniforms(...) < p)`` for
    0 < p < 1), chunking-independent."""
    out = torch.empty(end - start, dtype=torch.float64)
    g = torch.Generator()
    u = torch.empty(RNG_BLOCK, dtype=torch.float64)
    for blk in range(start // RNG_BLOCK, -(-end // RNG_BLOCK)):
        b0 = blk * RNG_BLOCK
        g.manual_seed(_block_seed(seed, model, tensor_key, blk))
        torch.rand(RNG_BLOCK, generator=g, dtype=torch.float64, out=u)
        lo, hi = max(start, b0), min(end, b0 + RNG_BLOCK)
        out[lo - start : hi - start] = u[lo - b0 : hi - b0]
    return out


def _block_seed(seed: int, model: int, tensor_key: int, block: int) -> int:
    h = hashlib.blake2b(f"{seed}/{model}/{tensor_key}/{block}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def fsum_abs(x: torch.Tensor) -> float:
    """Correctly rounded ``sum(|x|)`` in float64 (the reference's independent L1 norm)."""
    return math.fsum(x.double().abs().tolist())
