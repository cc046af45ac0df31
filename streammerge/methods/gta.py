"""The generalized task-arithmetic family, with mergekit's semantics (mergekit.md §2.2).

Per tensor, for every model k in order::

    delta_k = ft_k - base                                  (compute dtype)
    mask_k  = sparsify(delta_k, density_k)                 none | magnitude | random (DARE)
    delta_k = delta_k * mask_k  [* ||delta_k||_1 / ||mask_k delta_k||_1 if rescale]
    wd_k    = w_k * delta_k
    consensus "sum": elected = sign(sum_k wd_k) (>= 0 is +); keep_k = sign(wd_k) == elected
    mixed   = sum_k wd_k * keep_k      [/ sum_k w_k * keep_k if normalize, 0 -> 1]
    out     = base + lambda * mixed

``magnitude`` keeps the ``int(density * numel)`` largest ``|delta_k|`` of the whole tensor
(ties toward the lower index); ``conflict_aware`` makes later models choose only among positions
earlier ones left free, as CABS does with n:m. ``random`` keeps each element with probability
``density`` from a seeded, chunking-independent stream. A mask never includes a position whose
delta is zero. Whole-tensor quantities (the magnitude threshold, L1 norms) come from exact
statistics passes, so every chunking gives the bytes of :meth:`Gta.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import kernels
from .base import MergeResult, MethodBase, MethodOptions, ModelParams, TensorId, scalar
from .kernels import kernel_input
from .nm import magnitude_key
from .select import ExactL1, RadixTopK, dare_keep, fsum_abs, key_bits, l1_ratio, select
from .spec import TADROP_PARAMS, MethodSpec, Param

SPARSIFIERS = ("none", "magnitude", "random")


@dataclass
class _State:
    tensor: TensorId
    params: Sequence[ModelParams]
    options: MethodOptions
    dtype: torch.dtype
    normalize: bool
    rescale: bool
    topk: list[RadixTopK] = field(default_factory=list)
    """Per model (magnitude only)."""
    taken: list[list[int]] = field(default_factory=list)
    """Threshold ties kept so far in the current pass, per model."""
    l1: list[tuple[ExactL1, ExactL1]] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    """Rescale factors per model (1.0 when not rescaling)."""
    mag_passes: int = 0
    """Threshold passes (radix digits, per model when conflict-aware); the L1 pass follows."""

    def topk_model(self, pass_index: int) -> int | None:
        """Conflict-aware passes find one model's threshold at a time: which one."""
        if not self.options.conflict_aware:
            return None
        return pass_index // (self.mag_passes // len(self.params))


class Gta(MethodBase):
    """One member of the family; see the module docstring."""

    def __init__(
        self,
        spec: MethodSpec,
        sparsifier: str,
        consensus: bool,
        normalize: bool,
        rescale: bool,
    ) -> None:
        assert sparsifier in SPARSIFIERS
        assert spec.writes_masks == (sparsifier != "none")
        self.spec = spec
        self.sparsifier = sparsifier
        self.consensus = consensus
        self.default_normalize = normalize
        self.default_rescale = rescale
        self.sparsifies = spec.writes_masks

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        return 8  # masks are stored as packed bits: chunks start on a byte

    def work_bytes(self, k: int, itemsize: int) -> int:
        # Live at once: base and all K deltas (the sign election needs them together), a sum
        # or divisor, the selection's int keys and comparisons, bool masks and keeps: about
        # (k + 4) * itemsize + 16 + 4k bytes. Measured on the 1b preset, glibc's heap (its
        # mmap threshold rises to 32 MiB, so chunk temporaries are recycled from the heap and
        # fragment) held about twice that, so the estimate carries the factor measured.
        return 2 * (k + 4) * itemsize + 16 + 4 * k

    def resident_bytes(self, k: int, itemsize: int) -> int:
        # plain task arithmetic holds the base and the running sum (tests/test_plan.py measures
        # it); the sparsifiers hold what work_bytes says, heap fragmentation included
        if self.sparsifier == "none":  # compiled: the float32 result alone
            return itemsize if itemsize == 4 and kernels.enabled() else 2 * itemsize
        return self.work_bytes(k, itemsize)

    # -- statistics passes -------------------------------------------------------------------

    def _magnitude_passes(self, k: int, dtype: torch.dtype, conflict_aware: bool) -> int:
        digits = RadixTopK(1, key_bits(dtype)).passes
        return digits * (k if conflict_aware else 1)

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        n = 0
        if self.sparsifier == "magnitude":
            n += self._magnitude_passes(len(params), dtype, options.conflict_aware)
        if self._rescale(options) and self.sparsifies:
            n += 1
        return n

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return self.sparsifier != "magnitude"  # threshold ties are counted across chunks

    def _rescale(self, options: MethodOptions) -> bool:
        return self.default_rescale if options.rescale is None else options.rescale

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> _State:
        st = _State(
            tensor,
            params,
            options,
            dtype,
            normalize=self.default_normalize if options.normalize is None else options.normalize,
            rescale=self._rescale(options) and self.sparsifies,
            factors=[1.0] * len(params),
        )
        if self.sparsifier == "magnitude":
            st.mag_passes = self._magnitude_passes(len(params), dtype, options.conflict_aware)
        if self.sparsifier == "magnitude":
            bits = key_bits(dtype)
            st.topk = [RadixTopK(int(p.density * tensor.numel), bits) for p in params]
        st.taken = [[0] for _ in params]
        if st.rescale:
            st.l1 = [(ExactL1(), ExactL1()) for _ in params]
        return st

    def _masks(
        self, st: _State, start: int, deltas: Sequence[torch.Tensor], upto: int
    ) -> list[torch.Tensor]:
        """Final masks of models ``0 .. upto-1`` for one chunk (thresholds must be known)."""
        masks: list[torch.Tensor] = []
        claimed: torch.Tensor | None = None
        for k in range(upto):
            d = deltas[k]
            if self.sparsifier == "random":
                p = st.params[k].density
                sel = dare_keep(st.options.seed, k, st.tensor.key, start, start + d.numel(), p)
            else:
                key = magnitude_key(d)
                if claimed is not None:
                    key.masked_fill_(claimed, -1)
                t = st.topk[k]
                sel = select(key, t.threshold, t.need, st.taken[k])
            mask = sel & (d != 0)
            if st.options.conflict_aware and self.sparsifier == "magnitude":
                claimed = mask.clone() if claimed is None else claimed | mask
            masks.append(mask)
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
        if (
            pass_index < st.mag_passes
            and st.topk_model(pass_index) is None
            and st.dtype == torch.float32
            and kernels.enabled()
        ):  # the compiled histogram: no float32 copies, one pass per model
            raw = kernel_input(base)
            for t, ft in zip(st.topk, fts, strict=True):
                if not t.done:
                    t.add_counts(
                        torch.from_numpy(
                            kernels.magnitude_hist(raw, kernel_input(ft), *t.digit_args())
                        )
                    )
            return
        b = base.to(st.dtype)
        deltas = [ft.to(st.dtype) - b for ft in fts]
        if pass_index < st.mag_passes:
            k = st.topk_model(pass_index)
            if k is not None:
                masks = self._masks(st, start, deltas, k)  # earlier models are final
                key = magnitude_key(deltas[k])
                for m in masks:
                    key.masked_fill_(m, -1)
                st.topk[k].add(key)
            else:
                for k, d in enumerate(deltas):
                    st.topk[k].add(magnitude_key(d))
        else:  # the L1 pass: norms of the full and the pruned deltas
            for (full, kept), d, m in zip(
                st.l1, deltas, self._masks(st, start, deltas, len(fts)), strict=True
            ):
                full.add(d)
                kept.add(d[m])

    def end_pass(self, state: _State, pass_index: int) -> None:
        st = state
        st.taken = [[0] for _ in st.params]  # every pass walks the tensor from the start
        if pass_index < st.mag_passes:
            k = st.topk_model(pass_index)
            if k is not None:
                st.topk[k].end_pass()
            else:
                for t in st.topk:
                    t.end_pass()
        else:
            st.factors = [l1_ratio(float(f.value()), float(k.value())) for f, k in st.l1]

    # -- merge ---------------------------------------------------------------------------------

    def merge(
        self, state: _State, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        st = state
        raw = self._kernel_inputs(st, base, fts)
        if raw is not None:
            return self._merge_compiled(st, *raw)
        b = base.to(st.dtype)
        deltas = [ft.to(st.dtype, copy=True).sub_(b) for ft in fts]
        masks = self._masks(st, start, deltas, len(fts)) if self.sparsifies else None
        return MergeResult(self._combine(st, b, deltas, masks), masks)

    def _kernel_inputs(
        self, st: _State, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
        """The compiled merge's inputs, or None where it does not apply (then torch runs):
        it covers float32 compute on the CPU, no trim or a plain magnitude trim."""
        if not (
            kernels.enabled()
            and st.dtype == torch.float32
            and base.device.type == "cpu"
            and fts
            and (self.sparsifier == "none" or self.sparsifier == "magnitude")
            and not (self.sparsifies and st.options.conflict_aware)
        ):
            return None
        raw = kernel_input(base), tuple(kernel_input(ft) for ft in fts)
        return raw if all(f.dtype == raw[0].dtype for f in raw[1]) else None

    def _merge_compiled(
        self, st: _State, base: np.ndarray, fts: tuple[np.ndarray, ...]
    ) -> MergeResult:
        k = len(fts)
        if self.sparsifies:
            thr = np.array([t.threshold for t in st.topk], dtype=np.int64)
            need = np.array([t.need for t in st.topk], dtype=np.int64)
        else:
            thr, need = np.full(k, -1, dtype=np.int64), np.zeros(k, dtype=np.int64)
        taken = np.array([t[0] for t in st.taken], dtype=np.int64)
        weights = np.array([p.weight for p in st.params], dtype=np.float32)
        div = None
        if st.normalize and not self.consensus:  # as _combine: the float32 sum of the weights
            total = weights[0]
            for w in weights[1:]:
                total = np.float32(total + w)
            div = float(total) if abs(float(total)) >= 1e-8 else None
        out, masks, ties = kernels.gta_merge(
            base, fts, thr, need, taken, self.sparsifies, weights,
            np.array(st.factors, dtype=np.float32) if st.rescale else None,
            self.consensus, st.normalize and (self.consensus or div is not None), div,
            st.options.lambda_,
        )  # fmt: skip
        for t, n_ties, nd in zip(st.taken, ties, need, strict=True):
            t[0] += int(min(n_ties, max(0, nd - t[0])))
        return MergeResult(
            torch.from_numpy(out),
            [torch.from_numpy(m) for m in masks] if self.sparsifies else None,
        )

    def _combine(
        self,
        st: _State,
        b: torch.Tensor,
        deltas: list[torch.Tensor],
        masks: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Everything after the masks, shared by ``merge`` and ``reference`` (elementwise)."""
        dt = st.dtype
        for k, d in enumerate(deltas):
            if masks is not None:
                d.mul_(masks[k])
            if st.rescale:
                d.mul_(scalar(st.factors[k], dt))
            d.mul_(scalar(st.params[k].weight, dt))
        weights = [scalar(p.weight, dt) for p in st.params]
        # in-place where possible: the chunk's temporaries bound the chunk size
        if self.consensus:
            total = deltas[0].clone()
            for d in deltas[1:]:
                total.add_(d)
            positive = total >= 0
            del total
            keeps = [torch.where(positive, d > 0, d < 0) for d in deltas]
            del positive
            for d, keep in zip(deltas, keeps, strict=True):
                d.mul_(keep)
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            if st.normalize:
                div = keeps[0].to(dt).mul_(weights[0])
                for w, keep in zip(weights[1:], keeps[1:], strict=True):
                    div.add_(keep.to(dt).mul_(w))
                div[div == 0] = 1
                mixed.div_(div)
        else:
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            if st.normalize:
                div = weights[0].clone()
                for w in weights[1:]:
                    div = div + w
                if abs(float(div)) >= 1e-8:
                    mixed.div_(div)
        return mixed.mul_(scalar(st.options.lambda_, dt)).add_(b)

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
        masks: list[torch.Tensor] | None = None
        if self.sparsifies:
            masks = []
            claimed = torch.zeros(b.numel(), dtype=torch.bool)
            for k, (d, p) in enumerate(zip(deltas, params, strict=True)):
                if self.sparsifier == "random":
                    sel = dare_keep(options.seed, k, tensor.key, 0, b.numel(), p.density)
                else:  # stable sort by |delta| among eligible positions, keep the first k
                    eligible = ~claimed if options.conflict_aware else torch.ones_like(claimed)
                    idx = torch.nonzero(eligible).flatten()
                    order = torch.sort(d[idx].abs().double(), descending=True, stable=True).indices
                    sel = torch.zeros_like(claimed)
                    sel[idx[order[: int(p.density * b.numel())]]] = True
                mask = sel & (d != 0)
                claimed |= mask
                masks.append(mask)
            if st.rescale:
                st.factors = [
                    l1_ratio(fsum_abs(d), fsum_abs(d[m]))
                    for d, m in zip(deltas, masks, strict=True)
                ]
        return MergeResult(self._combine(st, b, deltas, masks), masks)


# -- what each member declares ----------------------------------------------------------------

GLOBALS = (
    Param("lambda", per_model=False, doc="scales the merged delta"),
    Param("normalize", "bool", per_model=False, doc="divide by the sum of (agreeing) weights"),
    Param("rescale", "bool", per_model=False, doc="match each pruned delta's L1 norm"),
    Param("int8_mask", "bool", per_model=False, doc="accepted for mergekit; no effect"),
)
WEIGHT = Param("weight", required=True)
DENSITY = Param("density", low=0.0, high=1.0, default=1.0)
DENSITY_REQUIRED = Param("density", low=0.0, high=1.0, required=True)
SEED = Param("random_seed", "int", per_model=False, doc="seed of DARE's random streams")
THRESHOLD_STATS = (
    "radix-select histograms of |delta| per model (the exact top-k threshold), 8-11 bits a pass",
    "exact L1 norms of each delta and its kept part (rescale only)",
)
RANDOM_STATS = ("exact L1 norms of each delta and its kept part (rescale only)",)
SIGNS = (
    "elects signs from the weighted task vectors, so its output depends on the weights through "
    "more than the stored masks"
)
NOT_YET = "is not implemented yet (rescale/normalize factors are not stored)"
NO_EXTEND = (
    "only CABS merges can be extended (their masks and output alone determine the extended merge)"
)


def _spec(name: str, summary: str, params: tuple[Param, ...], **kw: object) -> MethodSpec:
    return MethodSpec(name, summary, (WEIGHT, *params), extend=lambda p: NO_EXTEND, **kw)  # type: ignore[arg-type]


TASK_ARITHMETIC = Gta(
    _spec("task_arithmetic", "base + lambda * sum of weighted task vectors", (DENSITY, *GLOBALS),
          cuda=True, mps=True, kernel="gta", example={"weight": 0.5}),
    "none", consensus=False, normalize=False, rescale=False,
)  # fmt: skip
TIES = Gta(
    _spec("ties", "magnitude trim, sign election, disjoint mean (TIES-merging)",
          (DENSITY, *GLOBALS, *TADROP_PARAMS), stats=THRESHOLD_STATS, writes_masks=True,
          tadrop=True, remix=f"TIES {SIGNS}", kernel="gta",
          example={"weight": 1.0, "density": 0.5}),
    "magnitude", consensus=True, normalize=True, rescale=False,
)  # fmt: skip
DARE_TIES = Gta(
    _spec("dare_ties", "random drop and rescale (DARE), sign election",
          (DENSITY_REQUIRED, *GLOBALS, *TADROP_PARAMS, SEED), stats=RANDOM_STATS,
          writes_masks=True, tadrop=True, remix=f"DARE-TIES {SIGNS}",
          example={"weight": 0.5, "density": 0.5, "random_seed": 3}),
    "random", consensus=True, normalize=False, rescale=True,
)  # fmt: skip
DARE_LINEAR = Gta(
    _spec("dare_linear", "random drop and rescale (DARE), weighted sum",
          (DENSITY_REQUIRED, *GLOBALS, *TADROP_PARAMS, SEED), stats=RANDOM_STATS,
          writes_masks=True, tadrop=True, remix=f"remixing dare_linear merges {NOT_YET}",
          example={"weight": 0.5, "density": 0.5, "random_seed": 3}),
    "random", consensus=False, normalize=False, rescale=True,
)  # fmt: skip
MAGNITUDE = Gta(
    _spec("magnitude", "magnitude trim per model, weighted sum",
          (DENSITY_REQUIRED, *GLOBALS, *TADROP_PARAMS,
           Param("conflict_aware", "bool", per_model=False,
                 doc="later models select only among positions earlier ones left free")),
          stats=THRESHOLD_STATS, writes_masks=True, tadrop=True,
          remix=f"remixing magnitude merges {NOT_YET}", kernel="gta",
          example={"weight": 1.0, "density": 0.5, "conflict_aware": True}),
    "magnitude", consensus=False, normalize=False, rescale=False,
)  # fmt: skip
