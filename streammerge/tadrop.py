"""TADrop: per-tensor density allocation from the shape of each task vector's distribution.

This is **streammerge's formulation of the TADrop idea** (Luo et al., "One Size Does Not Fit
All", arXiv 2508.06163); **the paper's statistic and mapping were not available**, so the rule
below is ours (``cabs_spec.md`` §10.3), not the paper's. For one task vector:

1. ``kappa_t = E[(x-mu)^4] / E[(x-mu)^2]^2`` of tensor ``t``, on a deterministic, evenly strided
   sample of at most ``max_sample`` elements (:func:`sample_positions`, :func:`kurtosis`);
2. ``u_t = log kappa_t``, standardised with parameter-count weights: ``z_t = (u_t - u_bar) /
   sigma_u`` (population weighted mean and standard deviation; ``sigma_u = 0`` gives ``z = 0``);
3. ``d_t = clip(d_bar * exp(alpha * z_t), lo, hi)``;
4. one factor ``c`` such that ``sum numel_t * clip(c * d_t, lo, hi) = d_bar * sum numel_t``.

Heavy-tailed tensors ("sparser, more critical") keep more; Gaussian-like ones are pruned harder.
The densities plug into any sparsifier: keep fraction ``d`` (magnitude/TIES), keep probability
``d`` (DARE), or ``n = nm_from_density(d, m)`` (n:m, CABS).

Everything here is a pure, deterministic function of its arguments: kurtosis sums are taken by
numpy's single-threaded pairwise summation in float64 (``torch.sum`` on CPU splits reductions
by thread count, so its last bits depend on ``torch.get_num_threads()``), the allocation uses
``math.fsum`` on Python floats and a fixed-length bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

BISECTION_STEPS = 100
"""Fixed bisection length on ``log c``. The bracket is at most ~1.5e3 wide (float64 exponent
range; ``log((hi/lo)^2) <= log 256`` with default bounds), and ``1.5e3 * 2**-100 < 1e-26``, far
below float64 resolution, so the last steps are no-ops and the result is reproducible."""

_LOG_C_MAX = 709.0
"""Cap on ``log c`` so ``c = exp(log c)`` stays finite (``exp(709.79)`` overflows)."""


@dataclass(frozen=True, slots=True)
class TadropConfig:
    """User parameters of the allocation for one task (densities are fractions in [0, 1])."""

    density: float
    """``d_bar``: the parameter-count-weighted average density asked for, ``0 < d_bar <= 1``."""
    alpha: float = 0.5
    """Temperature on the standardised log-kurtosis; 0 gives ``d_bar`` everywhere."""
    d_min: float | None = None
    """Lower density bound ``lo``; ``None`` means ``d_bar / 4``."""
    d_max: float | None = None
    """Upper density bound ``hi``; ``None`` means ``min(1, 4 * d_bar)``."""
    max_sample: int = 2**20
    """Most elements per tensor the kurtosis is estimated on."""

    def __post_init__(self) -> None:
        # ``not (a <= b)`` forms also reject NaN.
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {self.alpha!r}")
        lo, hi = self.lo, self.hi
        if not 0 <= lo <= self.density:
            raise ValueError(f"d_min must be in [0, density={self.density}], got {lo!r}")
        if not self.density <= hi <= 1:
            raise ValueError(f"d_max must be in [density={self.density}, 1], got {hi!r}")
        if isinstance(self.max_sample, bool) or not isinstance(self.max_sample, int):
            raise ValueError(f"max_sample must be an int, got {self.max_sample!r}")
        if self.max_sample < 1:
            raise ValueError(f"max_sample must be >= 1, got {self.max_sample}")

    @property
    def lo(self) -> float:
        """Resolved lower density bound."""
        return self.density / 4 if self.d_min is None else float(self.d_min)

    @property
    def hi(self) -> float:
        """Resolved upper density bound."""
        return min(1.0, 4 * self.density) if self.d_max is None else float(self.d_max)


def sample_positions(numel: int, max_sample: int) -> tuple[int, int, int]:
    """(start, step, count): the deterministic, evenly strided sample of the flattened tensor.

    All elements (``(0, 1, numel)``) if ``numel <= max_sample``. Otherwise ``step`` is the
    smallest **odd** integer ``>= ceil(numel / max_sample)`` and ``count = ceil(numel / step)
    <= max_sample``; the sampled span is centred in the tensor. Positions are ``start + i*step``
    for ``0 <= i < count``, all ``< numel``.
    """
    if numel < 0 or max_sample < 1:
        raise ValueError(f"need numel >= 0 and max_sample >= 1, got {numel}, {max_sample}")
    if numel <= max_sample:
        return 0, 1, numel
    step = -(-numel // max_sample)
    # An odd step is coprime with power-of-two row widths, so the sample visits every column
    # of such a matrix rather than a fixed 1/step of them (outlier feature columns drive the
    # kurtosis of LLM weights and must not be skipped systematically).
    step += 1 - step % 2
    count = -(-numel // step)
    start = (numel - ((count - 1) * step + 1)) // 2  # leftover is in [0, step - 1]
    return start, step, count


def sample(flat: torch.Tensor, max_sample: int) -> torch.Tensor:
    """The :func:`sample_positions` elements of a 1-D tensor, as a strided view (no copy)."""
    if flat.dim() != 1:
        raise ValueError(f"sample expects a 1-D tensor, got shape {tuple(flat.shape)}")
    start, step, count = sample_positions(flat.numel(), max_sample)
    return flat[start : start + (count - 1) * step + 1 : step] if count else flat[:0]


def chunk_sample_slice(offset: int, length: int, numel: int, max_sample: int) -> slice:
    """Slice of a chunk ``flat[offset : offset + length]`` holding its sample elements.

    Concatenating the chunk slices of consecutive chunks, in order, gives exactly
    :func:`sample` of the whole tensor, so a streaming statistics pass matches the in-memory one.
    """
    if offset < 0 or length < 0 or offset + length > numel:
        raise ValueError(f"chunk [{offset}, {offset + length}) outside a tensor of {numel}")
    start, step, count = sample_positions(numel, max_sample)
    end = start + (count - 1) * step + 1 if count else start
    lo_pos = max(offset, start)
    hi_pos = min(offset + length, end)
    if hi_pos <= lo_pos:
        return slice(0, 0)
    first = start + -(-(lo_pos - start) // step) * step  # first sampled position >= lo_pos
    if first >= hi_pos:
        return slice(0, 0)
    return slice(first - offset, hi_pos - offset, step)


def kurtosis(x: torch.Tensor) -> float | None:
    """``kappa = E[(x-mu)^4] / E[(x-mu)^2]^2`` (population moments; 3 for a normal, >= 1).

    Computed in float64 on the CPU with numpy's pairwise summation (single-threaded, fixed order
    for a given length), so the value does not depend on thread count. ``None`` when ``x`` is
    empty or constant (variance 0). Raises ``ValueError`` on NaN or infinite values.
    """
    a = np.ascontiguousarray(x.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy())
    if a.size == 0:
        return None
    if not np.isfinite(a).all():
        raise ValueError("kurtosis of a tensor with NaN or infinite values")
    # Exact test: a computed mean of a constant vector can be off by an ulp, which would turn
    # rounding noise into a spurious kurtosis.
    if a.min() == a.max():
        return None
    c = a - a.sum() / a.size
    # kappa is scale-free: an exact power-of-two rescale to max|c| in [0.5, 1) keeps c**4 from
    # underflowing (tiny deltas) or overflowing without changing any rounding otherwise.
    _, exp = math.frexp(float(np.abs(c).max()))
    c = np.ldexp(c, -exp)
    c2 = c * c
    m2 = c2.sum() / c2.size
    m4 = (c2 * c2).sum() / c2.size
    if m2 == 0:  # only if every deviation rounded to 0
        return None
    return float(m4 / (m2 * m2))


@dataclass(frozen=True, slots=True)
class Allocation:
    """Result of :func:`allocate` for one task."""

    densities: tuple[float, ...]
    """Per tensor, in input order, each in ``[lo, hi]`` (``d_bar`` for excluded tensors)."""
    achieved: float
    """``sum numel_t * d_t / sum numel_t``."""
    scale: float
    """The budget factor ``c``; 1.0 when no bisection was run (every density is ``d_bar``)."""


def allocate(
    numels: Sequence[int], kappas: Sequence[float | None], cfg: TadropConfig
) -> Allocation:
    """Per-tensor densities for ONE task: steps 2-4 of ``cabs_spec.md`` §10.3.

    Tensors with ``kappa is None`` (zero variance) or ``numel == 0`` are *fixed* at exactly
    ``d_bar``: they take no part in the standardisation and are not scaled by ``c``, but they
    count in the budget at ``d_bar``. The rest (the *active* set) is then solved for
    ``sum_active numel * clip(c * d_t) = d_bar * sum_active numel``, so the overall budget holds
    too. If ``lo == d_bar`` or ``hi == d_bar`` (e.g. ``d_bar = 1`` with default bounds) the
    budget forces every density to ``d_bar``, which is returned exactly.

    The budget is always attainable when ``lo <= d_bar <= hi``, except when ``lo = 0`` and some
    ``d_bar * exp(alpha * z_t)`` underflows to 0 (below ~5e-324): such a tensor stays at 0 and
    the closest achievable average is returned (``achieved`` says what it is). Otherwise
    ``|achieved - d_bar|`` is at float64 rounding level.
    """
    if len(numels) != len(kappas):
        raise ValueError(f"{len(numels)} numels but {len(kappas)} kappas")
    d_bar, lo, hi = float(cfg.density), cfg.lo, cfg.hi
    for n, k in zip(numels, kappas, strict=True):
        if n < 0:
            raise ValueError(f"numel must be >= 0, got {n}")
        if k is not None and not (math.isfinite(k) and k > 0):
            raise ValueError(f"kappa must be None or finite and > 0, got {k!r}")
    active = [
        (i, float(n), k)
        for i, (n, k) in enumerate(zip(numels, kappas, strict=True))
        if n > 0 and k is not None
    ]
    dens = [d_bar] * len(numels)
    total = sum(numels)

    # lo == d_bar or hi == d_bar (e.g. d_bar = 1 with default bounds): the budget forces every
    # density to d_bar exactly; bisection would only reach it to within rounding.
    if active and lo < d_bar < hi:
        w = [n for _, n, _ in active]
        u = [math.log(k) for _, _, k in active]
        w_sum = math.fsum(w)
        if max(u) == min(u):
            # Exact check: the computed mean of equal values can be off by an ulp, and dividing
            # that by an ulp-sized sigma would give O(1) z-scores out of nothing.
            z = [0.0] * len(u)
        else:
            u_bar = math.fsum(wi * ui for wi, ui in zip(w, u, strict=True)) / w_sum
            var = math.fsum(wi * (ui - u_bar) ** 2 for wi, ui in zip(w, u, strict=True)) / w_sum
            sigma = math.sqrt(var)
            z = [(ui - u_bar) / sigma for ui in u] if sigma > 0 else [0.0] * len(u)
        raw = [_raw_density(d_bar, cfg.alpha * zi, lo, hi) for zi in z]
        if all(r == d_bar for r in raw):
            scale = 1.0  # already on budget; skip bisection so the result is exactly d_bar
        else:
            scale = _solve_scale(w, raw, d_bar * w_sum, lo, hi)
            raw = [_clip(scale * r, lo, hi) for r in raw]
        for (i, _, _), d in zip(active, raw, strict=True):
            dens[i] = d
    else:
        scale = 1.0

    achieved = (
        math.fsum(n * d for n, d in zip(numels, dens, strict=True)) / total if total else d_bar
    )
    return Allocation(densities=tuple(dens), achieved=achieved, scale=scale)


def nm_from_density(d: float, m: int) -> int:
    """n for an n:m pattern of density ``d``: ``clamp(floor(d*m + 0.5), 1, m)``.

    Rounds half up (``d*m = 1.5`` gives 2), not Python's half-to-even ``round``; ``d*m`` is the
    float64 product. At least one element per block is kept, as in §10.3.
    """
    if not 0 <= d <= 1:
        raise ValueError(f"density must be in [0, 1], got {d!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an int >= 1, got {m!r}")
    return min(m, max(1, math.floor(d * m + 0.5)))


def _clip(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def _raw_density(d_bar: float, e: float, lo: float, hi: float) -> float:
    """``clip(d_bar * exp(e), lo, hi)`` without overflowing ``exp`` for large ``alpha * z``."""
    # Weighted z-scores of tiny tensors (biases, norms) reach |z| ~ sqrt(N / numel) ~ 1e3.
    if e >= math.log(hi / d_bar):
        return hi
    return _clip(d_bar * math.exp(e), lo, hi)  # e < log(hi/d_bar) < 745: finite


def _solve_scale(
    w: Sequence[float], d: Sequence[float], target: float, lo: float, hi: float
) -> float:
    """``c`` with ``sum w * clip(c * d, lo, hi)`` closest to ``target``, by bisection on log c.

    ``F(c) = sum w * clip(c*d)`` is continuous and non-decreasing. The bracket ends satisfy
    ``F(c_lo) <= target <= F(c_hi)`` when attainable: ``c_hi = hi / min d`` puts every positive
    ``d`` at ``hi``; ``c_lo = lo / max d`` puts every one at ``lo``, or for ``lo = 0``,
    ``c_lo = target / sum w*d`` since then ``F(c) <= c * sum w*d``. Bisecting on ``log c`` makes
    the step count independent of how wide the bracket is in absolute terms.
    """

    def f(c: float) -> float:
        return math.fsum(wi * _clip(c * di, lo, hi) for wi, di in zip(w, d, strict=True))

    pos = [di for di in d if di > 0]
    if not pos:
        return 1.0  # every density is 0 (lo = 0, underflow): no factor changes anything
    s_hi = min(math.log(hi) - math.log(min(pos)), _LOG_C_MAX)
    if lo > 0:
        s_lo = math.log(lo) - math.log(max(pos))
    else:
        s_lo = math.log(target) - math.log(math.fsum(wi * di for wi, di in zip(w, d, strict=True)))
    s_lo = min(s_lo, s_hi)  # equal F at both ends then; either end is a solution
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (s_lo + s_hi)
        if f(math.exp(mid)) < target:
            s_lo = mid
        else:
            s_hi = mid
    c_lo, c_hi = math.exp(s_lo), math.exp(s_hi)
    # Both ends are within float resolution of the root; take the closer (ties: lower c). When
    # the target is out of reach the bracket has collapsed onto the best end.
    return c_lo if abs(f(c_lo) - target) <= abs(f(c_hi) - target) else c_hi
