"""Compiled CPU kernel for CABS's per-model step (numba), with the torch code as fallback.

One call does, for one model and one chunk, what :meth:`Cabs.merge` does with a dozen torch
passes: ``tau = ft - base``, the conflict-aware n:m selection with ties to the lower index,
``mask = selected & tau != 0``, ``acc += (w * tau) * mask`` and ``claimed |= mask``, in a
single pass over each block of m elements, in parallel over blocks. It performs the same IEEE
float32 operations in the same order (no fastmath), so its bytes equal the torch path's; the
tests run both against the in-memory reference.

numba is optional: without it (or with ``STREAMMERGE_KERNEL=torch``) the torch path runs.
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - exercised whichever way the environment is
    import numba

    HAVE_NUMBA = os.environ.get("STREAMMERGE_KERNEL", "numba") != "torch"
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False


def enabled() -> bool:
    """Whether the compiled kernel is used (numba importable and not disabled)."""
    return HAVE_NUMBA


if HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True)
    def _kth_largest(work: np.ndarray, r: int, q: int) -> np.int32:
        """The q-th largest of ``work[:r]`` (reorders ``work``): iterative quickselect."""
        lo, hi, k = 0, r - 1, r - q  # k-th smallest, 0-based
        while lo < hi:
            pivot = work[(lo + hi) // 2]
            i, j = lo, hi
            while i <= j:
                while work[i] < pivot:
                    i += 1
                while work[j] > pivot:
                    j -= 1
                if i <= j:
                    work[i], work[j] = work[j], work[i]
                    i += 1
                    j -= 1
            if k <= j:
                hi = j
            elif k >= i:
                lo = i
            else:
                break
        return work[k]

    @numba.njit(cache=True, nogil=True)
    def _blocks(base, ft, claimed, mask, acc, n, m, weight, strict, keep_tail, b0, b1) -> None:
        """Blocks ``[b0, b1)``; scratch is allocated once per call, not per block."""
        size = base.size
        tau = np.empty(m, dtype=np.float32)
        keys = tau.view(np.int32).copy()
        work = keys.copy()
        for blk in range(b0, b1):
            s = blk * m
            r = min(s + m, size) - s
            q = n if r == m else (min(n, r) if keep_tail else 0)
            for j in range(r):
                t = ft[s + j] - base[s + j]
                tau[j] = t
            bits = tau.view(np.int32)
            for j in range(r):
                k = bits[j] & np.int32(0x7FFFFFFF)
                if claimed[s + j]:
                    # strict: below every magnitude; fill: after every free position
                    k = np.int32(-1) if strict else np.int32(k - np.int32(0x7FFFFFFF) - np.int32(1))
                keys[j] = k
                work[j] = k
            take_all = q >= r and q > 0
            thr = np.int32(0x7FFFFFFF)
            need = 0
            if 0 < q < r:
                thr = _kth_largest(work, r, q)
                gt = 0
                for j in range(r):
                    if keys[j] > thr:
                        gt += 1
                need = q - gt
            for j in range(r):
                kj = keys[j]
                sel = take_all or kj > thr
                if not sel and kj == thr and need > 0:
                    sel = True
                    need -= 1
                i = s + j
                t = tau[j]
                keep = sel and t != 0 and not (strict and claimed[i])
                mask[i] = keep
                acc[i] = acc[i] + (weight * t) * (np.float32(1.0) if keep else np.float32(0.0))
                if keep:
                    claimed[i] = True

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _cabs_step(base, ft, claimed, mask, acc, n, m, weight, strict, keep_tail, parts) -> None:
        blocks = (base.size + m - 1) // m
        step = (blocks + parts - 1) // parts
        for p in numba.prange(parts):
            b0 = p * step
            b1 = min(blocks, b0 + step)
            if b0 < b1:
                _blocks(base, ft, claimed, mask, acc, n, m, weight, strict, keep_tail, b0, b1)

    def cabs_step(
        base: np.ndarray,
        ft: np.ndarray,
        claimed: np.ndarray,
        mask: np.ndarray,
        acc: np.ndarray,
        n: int,
        m: int,
        weight: np.float32,
        strict: bool,
        keep_tail: bool,
    ) -> None:
        """One model of CABS on a chunk (float32 arrays; bool ``claimed``/``mask``).

        ``mask`` is written; ``acc`` and ``claimed`` are updated in place. Blocks are split
        into a few contiguous ranges per thread.
        """
        parts = 4 * numba.get_num_threads()
        _cabs_step(base, ft, claimed, mask, acc, n, m, weight, strict, keep_tail, parts)
