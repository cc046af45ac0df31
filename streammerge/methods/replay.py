"""CABS from stored masks: re-weighting a merge (remix) and appending a model (add).

Pure functions on one chunk, and :class:`Replay`, the method the engine runs when it replays
a finished merge's occupancy store instead of selecting (``streammerge remix`` / ``add``).
Both perform the same
IEEE operations in the same order as :meth:`Cabs.merge` (torch and compiled paths alike), so
their bytes equal a full run's:

* ``acc = base``; for each model in pruning order ``acc = acc + (w_k * tau_k) * mask_k``,
  where ``mask_k`` multiplies as 1.0 / 0.0 (so a masked-out position still adds a signed zero,
  which can turn ``-0.0`` into ``+0.0``), then the cast to the output dtype.

:func:`add_next` reconstructs the accumulator of the K-model merge from the old output where it
can do so exactly; see its docstring for the one case it cannot (subnormal underflow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import kernels
from .base import (
    ChunkLocal,
    ChunkLocalMethod,
    MergeResult,
    Method,
    MethodOptions,
    ModelParams,
    TensorId,
    scalar,
)
from .nm import _INT_OF, magnitude_key, nm_select

if kernels.HAVE_NUMBA:
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _apply_one(  # pragma: no cover - compiled
        base: np.ndarray, ft: np.ndarray, mask: np.ndarray, acc: np.ndarray, weight: np.float32
    ) -> None:
        """``acc += (weight * (ft - base)) * mask`` in float32, one fused pass (no fastmath)."""
        for i in numba.prange(base.size):
            t = ft[i] - base[i]
            acc[i] = acc[i] + (weight * t) * (np.float32(1.0) if mask[i] else np.float32(0.0))

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _prior(  # pragma: no cover - compiled
        base: np.ndarray, old: np.ndarray, claimed: np.ndarray, acc: np.ndarray
    ) -> None:
        """``acc = old if claimed or base == 0 else base`` (the K-model accumulator)."""
        for i in numba.prange(base.size):
            acc[i] = old[i] if claimed[i] or base[i] == np.float32(0.0) else base[i]


def apply_masks(
    base: torch.Tensor,
    fts: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``base + sum_k (w_k * tau_k) * mask_k`` in the compute dtype, in pruning order.

    Exactly CABS's arithmetic once its masks are known (they do not depend on the weights), so
    re-weighting a CABS merge needs no selection work. In float32 with numba, one fused
    compiled pass per model performs the same IEEE operations as the torch code below.
    """
    b = base.to(dtype)
    acc = b.clone()
    if dtype == torch.float32 and kernels.enabled():
        bn, an = b.contiguous().numpy(), acc.numpy()
        for ft, mask, w in zip(fts, masks, weights, strict=True):
            f = ft.to(dtype).contiguous().numpy()
            _apply_one(bn, f, mask.contiguous().numpy(), an, np.float32(w))
        return acc
    for ft, mask, w in zip(fts, masks, weights, strict=True):
        tau = ft.to(dtype, copy=True).sub_(b)
        acc.add_(tau.mul_(scalar(w, dtype)).mul_(mask))
    return acc


def select_next(
    tau: torch.Tensor, claimed: torch.Tensor, p: ModelParams, options: MethodOptions
) -> torch.Tensor:
    """The mask of one more model under ``strict``: n:m among unclaimed positions, tau != 0.

    The same rule CABS applies to every model after the first (ties to the lower index; the
    tail policy for a last partial block).
    """
    key = magnitude_key(tau)
    key.masked_fill_(claimed, -1)  # below every magnitude key (>= 0)
    mask = nm_select(key, p.n, p.m, options.tail_policy)
    mask &= tau != 0
    mask &= ~claimed
    return mask


def cast_is_exact(dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether every value of the compute dtype survives the cast to the output dtype."""
    if out_dtype == dtype or out_dtype == torch.float64:
        return True
    return out_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)


def add_next(
    base: torch.Tensor,
    ft: torch.Tensor,
    old_out: torch.Tensor,
    old_masks: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: MethodOptions,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> MergeResult:
    """Append model K+1 (last in pruning order) to a K-model ``strict`` CABS merge, one chunk.

    Args:
        base, ft: the chunk of the base and of the new model.
        old_out: the same chunk of the K-model merge's output (in ``out_dtype``).
        old_masks: the K stored masks of the chunk (disjoint under ``strict``).
        params: all K+1 models' parameters for this tensor (the new model last).
        options, dtype, out_dtype: as in the full run.

    Returns:
        The output chunk, already in ``out_dtype``, and the K+1 masks.

    The full run computes ``acc_{K+1} = acc_K + (w * tau) * mask`` and casts it. ``acc_K`` is
    known exactly wherever the K models claimed nothing: there it is ``base`` (plus signed
    zeros), or, when ``base`` is zero, a zero whose sign the old output keeps. That covers every
    position the new model can claim. Where an earlier model claimed, the new mask is 0 and the
    result is ``acc_K + (w * tau) * 0``: the old bytes, except that ``-0.0 + +0.0 = +0.0``.
    When the cast is exact the old output *is* ``acc_K`` and the full-run operation is done on
    it. When it narrows (e.g. float32 to bfloat16) an old ``-0.0`` may have been a tiny negative
    ``acc_K``; it is taken as exactly ``-0.0`` (and becomes ``+0.0``) only where it provably
    was: base zero and the claiming model's weight zero. Otherwise the old ``-0.0`` is kept,
    which differs from a full run only if that model's ``w * tau`` underflowed to ``-0.0``
    (``|w * tau|`` below the smallest subnormal) on a zero base.
    """
    b = base.to(dtype)
    claimed = old_masks[0].clone() if old_masks else torch.zeros(b.numel(), dtype=torch.bool)
    for mk in old_masks[1:]:
        claimed |= mk
    p = params[-1]
    compiled = dtype == torch.float32 and kernels.enabled()
    # acc_K where it is known exactly (and, where claimed, exactly when the cast is exact)
    old_c = old_out.to(dtype)
    if compiled:
        acc = torch.empty_like(b)
        _prior(b.contiguous().numpy(), old_c.contiguous().numpy(), claimed.numpy(), acc.numpy())
        # the compiled CABS step: the same selection and ``acc += (w * tau) * mask``
        mask_np = np.empty(b.numel(), dtype=np.bool_)
        kernels.cabs_step(b.contiguous().numpy(), ft.to(dtype).contiguous().numpy(),
                          claimed.numpy().copy(), mask_np, acc.numpy(), False, p.n, p.m,
                          np.float32(p.weight), True,
                          options.tail_policy == "keep_topn_padded")  # fmt: skip
        mask = torch.from_numpy(mask_np)
    else:
        acc = torch.where(claimed | (b == 0), old_c, b)
        tau = ft.to(dtype, copy=True).sub_(b)
        mask = select_next(tau, claimed, p, options)
        acc.add_(tau.mul_(scalar(p.weight, dtype)).mul_(mask))
        del tau
    del old_c
    out = acc.to(out_dtype)
    if not cast_is_exact(dtype, out_dtype):
        # candidates: an old -0.0 (sign bit only), rare; the other conditions on those alone
        it = _INT_OF[out_dtype]
        idx = torch.nonzero(old_out.view(it) == torch.iinfo(it).min).squeeze(1)
        if idx.numel():
            zero_w = torch.zeros(idx.numel(), dtype=torch.bool)
            for mk, q in zip(old_masks, params, strict=False):
                if float(scalar(q.weight, dtype)) == 0.0:
                    zero_w |= mk[idx]
            keep = claimed[idx] & ~torch.isnan(acc[idx]) & ~((b[idx] == 0) & zero_w)
            out[idx[keep]] = old_out[idx[keep]]
    return MergeResult(out, [*old_masks, mask])


MaskReader = Callable[[int, str, int, int], torch.Tensor]
"""``read(k, tensor, start, end)``: model k's stored mask of elements ``[start, end)``."""


class Replay(ChunkLocalMethod):
    """A finished merge replayed from its masks, as a method (the scheduler sees no difference).

    ``remix``: the sources are the base and every model; the masks of all of them are read
    through ``read_mask``. ``add``: the sources are the base, the new model and the finished
    output; the earlier models' masks are read, the new model's is selected by
    :func:`add_next`. The method's spec (parameters, card, capabilities) is the replayed
    method's; only a method whose spec allows ``remix`` is replayed (CABS).
    """

    releases_heap = True
    """Its chunk temporaries fragment glibc's heap (see ``runtime.trim_heap``)."""

    def __init__(self, inner: Method, read_mask: MaskReader, add: bool = False) -> None:
        self.spec = inner.spec
        self.inner = inner
        self.read_mask = read_mask
        self.add = add

    def alignment(self, params: Sequence[ModelParams]) -> int:
        return self.inner.alignment(params)

    def work_bytes(self, k: int, itemsize: int) -> int:
        return self.inner.work_bytes(k, itemsize)

    def resident_bytes(self, k: int, itemsize: int) -> int:
        return self.inner.resident_bytes(k, itemsize)

    def merge(
        self, state: ChunkLocal, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        end = start + base.numel()
        stored = len(state.params) - 1 if self.add else len(state.params)
        name = state.tensor.name
        masks = [self.read_mask(k, name, start, end) for k in range(stored)]
        if self.add:
            ft, old = fts
            # the finished output's dtype is the plan's output dtype
            return add_next(base, ft, old, masks, state.params, state.options, state.dtype,
                            old.dtype)  # fmt: skip
        weights = [p.weight for p in state.params]
        return MergeResult(apply_masks(base, fts, masks, weights, state.dtype), masks)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        """The replayed method's reference (a replay's bytes must equal a full run's)."""
        return self.inner.reference(tensor, base, fts, params, options, dtype)
