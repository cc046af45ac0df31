"""DELLA (mergekit's ``della`` and ``della_linear``, mergekit.md §2.2): MAGPRUNE, a random drop
whose keep probability grows with the magnitude rank, then the task-arithmetic family.

Per tensor of ``N`` elements, for every model k with ``density`` d and ``epsilon`` e::

    delta_k = ft_k - base                                   (compute dtype)
    r       = ascending rank of |delta_k| (0 .. N-1)
    p       = (d - e) + (r / (N - 1)) * 2e                  (float64; r / (N - 1) = 0 if N = 1)
    mask_k  = u < p,  u uniform from a seeded stream        (d >= 1: keep all; d <= 0: none)

then L1 rescale (default on), weights, sign election for ``della`` (normalize on by default),
plain sum for ``della_linear`` (normalize off), lambda: :mod:`.gta`'s ``_combine``. mergekit
raises unless ``0 < d - e`` and ``d + e < 1``; so does :meth:`Della.model_params`.

Deterministic choices where mergekit is not, and one deviation:

* **Rows.** As mergekit, a matrix is ranked within each row (``N`` is the row length, its last
  dimension) and a 1-D tensor is one row. A tensor of three or more dimensions is ranked as one
  flat row: mergekit ranks it along dimension 1, a strided ramp streamed chunks cannot follow.
* Equal magnitudes rank in index order (mergekit's ``argsort`` leaves their order undefined).
* ``u`` comes from fixed 64 Ki-element blocks, each with its own generator seeded by
  (seed, model, tensor, block) as DARE's stream (:func:`.select.uniforms`), instead of an
  unseeded ``torch.bernoulli``.
* The rescale factor is 1 when either L1 norm is below 1e-7, as mergekit's.
* TADrop's per-tensor densities are not checked against ``epsilon``: where ``d - e < 0`` or
  ``d + e > 1`` the probabilities simply saturate (mergekit has no TADrop).

**Matrices: whole rows per chunk.** A matrix's chunks hold whole rows (:meth:`Della.alignment`
is a multiple of the row length), so each chunk ranks its rows by a stable sort, and the only
statistics pass left is the rescale's L1 norms. Rows are thousands of elements, chunks
millions; a row longer than the budget's chunk still makes a chunk of its own.

**1-D tensors: exact ranks, streamed.** The keep decision is monotone in the rank, so an element
needs its exact rank only when its rank bounds straddle its ``u``. Keys (the bits of
``|delta|``) are split into digits (fp32: 16 + 8 + 7 bits; 16-bit dtypes: one 15-bit digit).
Pass 0 histograms the first digit; each element's rank then lies in ``[lo, lo + count)`` of its
bin, and where ``u < p(lo)`` equals ``u < p(lo + count - 1)`` it is decided. A following pass
collects the bins holding undecided elements, the next histograms their next digit, and so on;
at the last digit a bin is one key value and the rank is its base plus the number of equal keys
before it, counted in index order as chunks go by. Every count is exact and no chunk boundary
changes anything, so the streamed masks equal the reference's sort-based ranks bit for bit;
memory is the histograms of undecided bins only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import MergeResult, MethodOptions, ModelParams, TensorId
from .gta import GLOBALS, SIGNS, Gta, _spec, _State
from .nm import magnitude_key
from .select import ExactL1, fsum_abs, key_bits, l1_ratio, uniforms
from .spec import TADROP_PARAMS, CardColumn, MethodSpec, Param, Values, number

RESCALE_EPS = 1e-7
DIGITS = {16: (15,), 32: (16, 8, 7), 64: (16, 16, 16, 15)}
"""Digit widths of the magnitude keys per dtype width (the sign bit is never set)."""


def keep_probability(
    rank: torch.Tensor, numel: int, density: float, epsilon: float
) -> torch.Tensor:
    """MAGPRUNE's keep probability of 0-based ascending ranks, float64 (monotone in the rank)."""
    norm = rank.double() / (numel - 1) if numel > 1 else torch.zeros_like(rank, dtype=torch.float64)
    return (density - epsilon) + norm * (2 * epsilon)


def magprune_mask(
    d: torch.Tensor, u: torch.Tensor, density: float, epsilon: float, row: int | None = None
) -> torch.Tensor:
    """Keep decisions of flat ``d`` whose ranks (by a stable sort: equal |delta| in index order)
    are taken within each row of ``row`` elements (None: one row); the reference's rule, and
    a matrix chunk's, whose rows are whole."""
    n = d.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool)
    if density <= 0:
        return torch.zeros(n, dtype=torch.bool)
    row = row or max(n, 1)
    keys = d.abs().double().view(-1, row)
    order = torch.sort(keys, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(row).expand_as(order))
    return u < keep_probability(rank.view(-1), row, density, epsilon)


def row_length(shape: tuple[int, ...]) -> int | None:
    """Elements per ranked row: a matrix's last dimension; None (one row) for other shapes."""
    return shape[-1] if len(shape) == 2 and shape[-1] > 0 else None


@dataclass
class Ranker:
    """Exact ascending ranks of one tensor's keys, resolved only where a decision needs them.

    Level ``l`` holds, for each of its rows (a prefix of the key: the bits above digit ``l``),
    a histogram of digit ``l``; ``base`` is the number of keys below the row's prefix. Level 0
    has one row (the empty prefix).
    """

    widths: tuple[int, ...]
    numel: int
    density: float
    epsilon: float
    prefixes: list[torch.Tensor] = field(default_factory=list)
    hists: list[torch.Tensor] = field(default_factory=list)
    bases: list[torch.Tensor] = field(default_factory=list)
    excl: list[torch.Tensor] = field(default_factory=list)
    found: list[torch.Tensor] = field(default_factory=list)
    """Prefixes with undecided elements collected in the current set pass."""
    taken: torch.Tensor | None = None
    """Keys seen so far in this pass per last-level bin (index-order tie counts)."""

    def __post_init__(self) -> None:
        self.prefixes = [torch.zeros(1, dtype=torch.int64)]
        self.hists = [torch.zeros(1, 1 << self.widths[0], dtype=torch.int64)]
        self.bases = [torch.zeros(1, dtype=torch.int64)]

    @property
    def levels(self) -> int:
        return len(self.widths)

    def shift(self, level: int) -> int:
        """Bits below digit ``level``."""
        return sum(self.widths[level + 1 :])

    def rows(self, level: int, key: torch.Tensor) -> torch.Tensor:
        """Row of each key at ``level`` (-1: its prefix has no row)."""
        prefix = key >> (self.shift(level) + self.widths[level])
        table = self.prefixes[level]
        if table.numel() == 0:
            return torch.full_like(prefix, -1)
        i = torch.searchsorted(table, prefix).clamp_(max=table.numel() - 1)
        return torch.where(table[i] == prefix, i, -1)

    def digit(self, level: int, key: torch.Tensor) -> torch.Tensor:
        return (key >> self.shift(level)) & ((1 << self.widths[level]) - 1)

    def add(self, level: int, key: torch.Tensor) -> None:
        """Histogram pass of ``level``: count digit ``level`` of keys that have a row."""
        row = self.rows(level, key)
        ok = row >= 0
        flat = row[ok] * (1 << self.widths[level]) + self.digit(level, key[ok])
        self.hists[level].view(-1).index_add_(0, flat, torch.ones_like(flat))

    def end_hist(self, level: int) -> None:
        h = self.hists[level]
        self.excl.append(h.cumsum(1) - h)

    def bounds(
        self, level: int, key: torch.Tensor, row: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, count)`` of each key's bin at ``level`` (rows must exist)."""
        dg = self.digit(level, key)
        return self.bases[level][row] + self.excl[level][row, dg], self.hists[level][row, dg]

    def decide(
        self, key: torch.Tensor, u: torch.Tensor, upto: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Resolve through levels ``0 .. upto-1``: ``(keep, undecided, last_level_rows)``.

        ``keep`` is final where ``undecided`` is False; the undecided ones sit in a bin of
        level ``upto - 1`` whose row index is returned (-1 elsewhere)."""
        keep = torch.zeros(key.numel(), dtype=torch.bool)
        pending = torch.ones(key.numel(), dtype=torch.bool)
        row = torch.zeros(key.numel(), dtype=torch.int64)
        for level in range(upto):
            if level:
                row = torch.where(pending, self.rows(level, key), -1)
                pending &= row >= 0  # (always true: the set pass gave them rows)
            idx = torch.nonzero(pending).flatten()
            lo, cnt = self.bounds(level, key[idx], row[idx])
            a = u[idx] < keep_probability(lo, self.numel, self.density, self.epsilon)
            b = u[idx] < keep_probability(lo + cnt - 1, self.numel, self.density, self.epsilon)
            keep[idx] = a
            pending[idx[a == b]] = False
        return keep, pending, torch.where(pending, row, -1)

    def collect(self, level: int, key: torch.Tensor, u: torch.Tensor) -> None:
        """Set pass after histogram ``level``: remember bins with undecided elements."""
        _, pending, _ = self.decide(key, u, level + 1)
        self.found.append(torch.unique(key[pending] >> self.shift(level)))

    def end_collect(self, level: int) -> None:
        found = (
            torch.unique(torch.cat(self.found)) if self.found else torch.zeros(0, dtype=torch.int64)
        )
        self.found = []
        # a bin's base is the lower bound of its keys at ``level``
        probe = found << self.shift(level)
        row = self.rows(level, probe)
        lo, _ = self.bounds(level, probe, row)
        self.prefixes.append(found)
        self.bases.append(lo)
        self.hists.append(
            torch.zeros(found.numel(), 1 << self.widths[level + 1], dtype=torch.int64)
        )

    def start_pass(self) -> None:
        self.taken = torch.zeros_like(self.hists[-1])

    def mask(self, key: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Final keep decisions of a chunk (consecutive chunks in order, after all levels)."""
        last = self.levels - 1
        keep, pending, _ = self.decide(key, u, self.levels)
        # index-order tie counts of every key with a last-level row
        row = self.rows(last, key)
        has = torch.nonzero(row >= 0).flatten()
        flat = row[has] * (1 << self.widths[last]) + self.digit(last, key[has])
        assert self.taken is not None
        taken = self.taken.view(-1)
        sorted_flat, order = torch.sort(flat, stable=True)
        first = torch.searchsorted(sorted_flat, sorted_flat)  # start of each run of equal bins
        before = torch.empty_like(flat)
        before[order] = torch.arange(flat.numel()) - first + taken[sorted_flat]
        taken.index_add_(0, flat, torch.ones_like(flat))
        idx = torch.nonzero(pending).flatten()
        if idx.numel():
            pos = torch.full((key.numel(),), -1, dtype=torch.int64)
            pos[has] = torch.arange(has.numel())
            lo, _ = self.bounds(last, key[idx], row[idx])
            rank = lo + before[pos[idx]]
            keep[idx] = u[idx] < keep_probability(rank, self.numel, self.density, self.epsilon)
        return keep


@dataclass
class _DState(_State):
    rankers: list[Ranker | None] = field(default_factory=list)
    """Per model (None: density outside (0, 1), nothing to rank)."""
    rank_passes: int = 0
    row: int | None = None
    """Row length of a matrix, ranked within chunks (no rankers); None: streamed ranks."""


def _key(d: torch.Tensor) -> torch.Tensor:
    return magnitude_key(d).to(torch.int64)


def _epsilon(p: ModelParams) -> float:
    return float(p.get("epsilon", 0.15) or 0.0)


class Della(Gta):
    """``della`` (sign election, normalize) or ``della_linear`` (weighted sum)."""

    def __init__(self, spec: MethodSpec, consensus: bool) -> None:
        super().__init__(spec, "random", consensus=consensus, normalize=consensus, rescale=True)

    def model_params(self, values: Values) -> ModelParams:
        p = super().model_params(values)
        d, e = p.density, _epsilon(p)
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise ValueError(
                f"della: epsilon must keep density +/- epsilon in (0, 1), got density {d:g}, "
                f"epsilon {e:g}"
            )
        return p

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return False  # equal keys are counted across chunks

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        row = row_length(shape)
        return super().alignment(params, shape) if row is None else math.lcm(8, row)

    def work_bytes(self, k: int, itemsize: int) -> int:
        # the family's deltas and masks, plus one model's ranking temporaries at a time: int64
        # keys, rows, bins, bounds and tie counts, float64 draws and probabilities (~16 x 8)
        return super().work_bytes(k, itemsize) + 128

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return self.work_bytes(k, itemsize)

    def _rank_passes(self, dtype: torch.dtype) -> int:
        return 2 * len(DIGITS[key_bits(dtype)]) - 1

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        ranks = 0 if row_length(shape) else self._rank_passes(dtype)
        return ranks + (1 if self._rescale(options) else 0)

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> _DState:
        widths = DIGITS[key_bits(dtype)]
        row = row_length(tensor.shape)
        st = _DState(
            tensor,
            params,
            options,
            dtype,
            normalize=self.default_normalize if options.normalize is None else options.normalize,
            rescale=self._rescale(options),
            factors=[1.0] * len(params),
            rankers=[
                Ranker(widths, tensor.numel, p.density, _epsilon(p))
                if 0 < p.density < 1 and row is None
                else None
                for p in params
            ],
            rank_passes=0 if row else self._rank_passes(dtype),
            row=row,
        )
        if st.rescale:
            st.l1 = [(ExactL1(), ExactL1()) for _ in params]
        for r in st.rankers:
            if r is not None:
                r.start_pass()
        return st

    def _masks(
        self, st: _State, start: int, deltas: Sequence[torch.Tensor], upto: int
    ) -> list[torch.Tensor]:
        assert isinstance(st, _DState)
        masks = []
        for k in range(upto):
            d, r, p = deltas[k], st.rankers[k], st.params[k]
            if not 0 < p.density < 1:
                keep = torch.full((d.numel(),), p.density >= 1, dtype=torch.bool)
            else:
                u = uniforms(st.options.seed, k, st.tensor.key, start, start + d.numel())
                # a matrix chunk holds whole rows (the alignment) and ranks them itself
                keep = (
                    r.mask(_key(d), u)
                    if r is not None
                    else magprune_mask(d, u, p.density, _epsilon(p), st.row)
                )
            masks.append(keep & (d != 0))
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
        assert isinstance(st, _DState)
        b = base.to(st.dtype)
        deltas = [ft.to(st.dtype) - b for ft in fts]
        if pass_index < st.rank_passes:
            level, collect = divmod(pass_index, 2)
            for k, (r, d) in enumerate(zip(st.rankers, deltas, strict=True)):
                if r is None:
                    continue
                if collect:
                    u = uniforms(st.options.seed, k, st.tensor.key, start, start + d.numel())
                    r.collect(level, _key(d), u)
                else:
                    r.add(level, _key(d))
            return
        for (full, kept), d, m in zip(
            st.l1, deltas, self._masks(st, start, deltas, len(fts)), strict=True
        ):
            full.add(d)
            kept.add(d[m])

    def end_pass(self, state: _State, pass_index: int) -> None:
        st = state
        assert isinstance(st, _DState)
        for r in st.rankers:
            if r is None:
                continue
            if pass_index < st.rank_passes:
                level, collect = divmod(pass_index, 2)
                if collect:
                    r.end_collect(level)
                else:
                    r.end_hist(level)
            r.start_pass()
        if pass_index >= st.rank_passes:
            st.factors = [
                l1_ratio(float(f.value()), float(k.value()), RESCALE_EPS) for f, k in st.l1
            ]

    def _kernel_inputs(
        self, st: _State, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        return None

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
        n = b.numel()
        masks = []
        for k, (d, p) in enumerate(zip(deltas, params, strict=True)):
            u = uniforms(options.seed, k, tensor.key, 0, n)
            masks.append(magprune_mask(d, u, p.density, _epsilon(p), st.row) & (d != 0))
        if st.rescale:
            st.factors = [
                l1_ratio(fsum_abs(d), fsum_abs(d[m]), RESCALE_EPS)
                for d, m in zip(deltas, masks, strict=True)
            ]
        return MergeResult(self._combine(st, b, deltas, masks), masks)


EPSILON = Param("epsilon", low=0.0, high=1.0, default=0.15, doc="keep probability spread")
DENSITY = Param("density", low=0.0, high=1.0, default=1.0)
SEED = Param("random_seed", "int", per_model=False, doc="seed of the random streams")
STATS = (
    "exact ranks of |delta| per model: radix histograms of the first digit, then of the next "
    "digit only inside bins whose keep decisions the bounds leave open",
    "exact L1 norms of each delta and its kept part (rescale)",
)
CARD = (
    CardColumn("weight", lambda p, o: number(p.weight)),
    CardColumn("density", lambda p, o: number(p.density)),
    CardColumn("epsilon", lambda p, o: number(_epsilon(p))),
)
EXAMPLE = {"weight": 1.0, "density": 0.5, "epsilon": 0.1, "random_seed": 3}

DELLA = Della(
    _spec("della", "rank-dependent random drop (MAGPRUNE), rescale, sign election (DELLA)",
          (DENSITY, EPSILON, *GLOBALS, *TADROP_PARAMS, SEED), stats=STATS, writes_masks=True,
          tadrop=True, card=CARD, remix=f"DELLA {SIGNS}", example=EXAMPLE),
    consensus=True,
)  # fmt: skip
DELLA_LINEAR = Della(
    _spec("della_linear", "rank-dependent random drop (MAGPRUNE), rescale, weighted sum",
          (DENSITY, EPSILON, *GLOBALS, *TADROP_PARAMS, SEED), stats=STATS, writes_masks=True,
          tadrop=True, card=CARD, remix="remixing della_linear merges is not implemented yet",
          example=EXAMPLE),
    consensus=False,
)  # fmt: skip
