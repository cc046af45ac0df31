"""Compiled CPU kernel for CABS's per-model step (numba), with the torch code as fallback.

One call does, for one model and one chunk, what :meth:`Cabs.merge` does with a dozen torch
passes: ``tau = ft - base``, the conflict-aware n:m selection with ties to the lower index,
``mask = selected & tau != 0``, ``acc += (w * tau) * mask`` and ``claimed |= mask``, in a
single pass over each block of m elements, in parallel over blocks. It performs the same IEEE
float32 operations in the same order (no fastmath), so its bytes equal the torch path's; the
tests run both against the in-memory reference.

Why it is fast (``bench/kernels.py`` measures each step):

* bf16 inputs are read as raw ``uint16`` straight from the mapped file and widened in
  registers (a bf16 is the top half of a float32), so no float32 copy of any model's chunk
  is ever made;
* the n-th largest key of a block is found by a branch-free binary search over the bits of
  the key (count the keys >= a candidate, a loop the compiler vectorises), which stops as
  soon as exactly n keys reach the candidate. A quickselect mispredicts a branch per
  comparison and ran 5x slower.

numba is optional: without it (or with ``STREAMMERGE_KERNEL=torch``) the torch path runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

try:  # pragma: no cover - exercised whichever way the environment is
    import numba

    HAVE_NUMBA = os.environ.get("STREAMMERGE_KERNEL", "numba") != "torch"
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False


def enabled() -> bool:
    """Whether the compiled kernel is used (numba importable and not disabled)."""
    return HAVE_NUMBA


def kernel_input(x: torch.Tensor) -> np.ndarray:
    """What the kernels read: bf16 as its uint16 bit patterns (no copy), else float32."""
    if x.dtype == torch.bfloat16:
        return x.contiguous().view(torch.uint16).numpy()
    return x.to(torch.float32).contiguous().numpy()


if HAVE_NUMBA:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _load(src, s, r, bf16, f32, u32) -> None:
        """``f32[:r] = float32(src[s:s + r])``; ``u32`` aliases ``f32``'s bytes."""
        if bf16:  # src holds bf16 bit patterns: a bf16 is the top half of a float32
            for j in range(r):
                u32[j] = np.uint32(src[s + j]) << np.uint32(16)
        else:
            for j in range(r):
                f32[j] = src[s + j]

    @numba.njit(cache=True, nogil=True, inline="always")
    def _count_ge(u, r, c) -> int:
        n = 0
        for j in range(r):
            n += u[j] >= c
        return n

    @numba.njit(cache=True, nogil=True)
    def _qth_largest(u, r, q) -> tuple[np.uint32, bool]:
        """The q-th largest of ``u[:r]`` (1 <= q < r), built bit by bit from the top.

        Bits above the highest one in which the block's keys differ are common to all of
        them and are taken as they are. Returns ``(t, exact)``; ``exact`` means exactly q keys are
        >= t, so those are the selection and no tie rule is needed.
        """
        hi, lo, ones = u[0], u[0], u[0]
        for j in range(1, r):
            hi = max(hi, u[j])
            lo = min(lo, u[j])
            ones |= u[j]
        diff = hi ^ lo
        if diff == 0:
            return hi, False
        top = 31
        while not (diff >> np.uint32(top)) & np.uint32(1):
            top -= 1
        # Bits below the lowest one any key has set are zero in every key (a tau computed
        # from bf16 inputs has at most ~16 significant bits): no need to search them.
        low = 0
        while not (ones >> np.uint32(low)) & np.uint32(1):
            low += 1
        t = hi & ~((np.uint32(2) << np.uint32(top)) - np.uint32(1)) if top < 31 else np.uint32(0)
        for bit in range(top, low - 1, -1):
            c = t | (np.uint32(1) << np.uint32(bit))
            k = _count_ge(u, r, c)
            if k >= q:
                t = c
                if k == q:
                    return t, True
        return t, False

    @numba.njit(cache=True, nogil=True)
    def _blocks(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight, strict,
                keep_tail, b0, b1) -> None:  # fmt: skip
        """Blocks ``[b0, b1)``; scratch is allocated once per call, not per block."""
        size = acc.size
        bu = np.empty(m, dtype=np.uint32)
        bf = bu.view(np.float32)
        fu = np.empty(m, dtype=np.uint32)
        ff = fu.view(np.float32)
        key = np.empty(m, dtype=np.uint32)
        lax = not strict
        for blk in range(b0, b1):
            s = blk * m
            r = min(s + m, size) - s
            q = n if r == m else (min(n, r) if keep_tail else 0)
            _load(base, s, r, base_bf16, bf, bu)
            _load(ft, s, r, ft_bf16, ff, fu)
            for j in range(r):
                ff[j] = ff[j] - bf[j]  # tau, in place
            # Unsigned keys ordering like the torch path's signed ones: free positions by
            # |tau| above every claimed one; claimed ones rank by |tau| (fill) or not at all.
            for j in range(r):
                mag = fu[j] & np.uint32(0x7FFFFFFF)
                if not claimed[s + j]:
                    key[j] = mag | np.uint32(0x80000000)
                else:
                    key[j] = np.uint32(0) if strict else mag
            # Select keys > thr, plus the first ``need`` keys == thr (ties to the lower index).
            thr = np.uint32(0)
            need = 0
            if q == 0:
                thr = np.uint32(0xFFFFFFFF)
            elif q < r:
                thr, exact = _qth_largest(key, r, q)
                if exact:
                    thr -= np.uint32(1)  # exactly q keys are > thr - 1: no ties to break
                else:
                    need = q
                    for j in range(r):
                        need -= key[j] > thr
            else:  # q == r: keep all (thr = 0 would drop keys equal to 0)
                need = r
            # branch-free: a mispredicted branch per element costs more than the arithmetic
            ties = 0
            for j in range(r):
                i = s + j
                k = key[j]
                eq = (k == thr) | (q == r)
                sel = (k > thr) | (eq & (ties < need))
                ties += eq
                t = ff[j]
                c = claimed[i]
                keep = sel & (t != 0) & (lax | (c ^ True))
                mask[i] = keep
                prev = bf[j] if first else acc[i]
                acc[i] = prev + (weight * t) * np.float32(keep)
                claimed[i] = c | keep

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _cabs_step(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight, strict,
                   keep_tail, parts) -> None:  # fmt: skip
        blocks = (acc.size + m - 1) // m
        step = (blocks + parts - 1) // parts
        for p in numba.prange(parts):
            b0 = p * step
            b1 = min(blocks, b0 + step)
            if b0 < b1:
                _blocks(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight,
                        strict, keep_tail, b0, b1)  # fmt: skip

    def cabs_step(
        base: np.ndarray,
        ft: np.ndarray,
        claimed: np.ndarray,
        mask: np.ndarray,
        acc: np.ndarray,
        first: bool,
        n: int,
        m: int,
        weight: np.float32,
        strict: bool,
        keep_tail: bool,
    ) -> None:
        """One model of CABS on a chunk.

        ``base`` and ``ft`` are float32 arrays or ``uint16`` arrays of bf16 bit patterns.
        ``mask`` (bool) is written; ``acc`` (float32) and ``claimed`` (bool) are updated in
        place, except that ``first`` starts ``acc`` from ``base`` instead of reading it.
        Blocks are split into a few contiguous ranges per thread.
        """
        parts = 4 * numba.get_num_threads()
        _cabs_step(base, ft, base.dtype == np.uint16, ft.dtype == np.uint16, claimed, mask, acc,
                   first, n, m, weight, strict, keep_tail, parts)  # fmt: skip

    HIST_BLOCK = 4096

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _magnitude_hist(base, ft, base_bf16, ft_bf16, shift, prefix, use_prefix, out) -> None:
        parts = out.shape[0]
        size = ft.size
        step = -(-size // parts)
        for p in numba.prange(parts):
            h = out[p]
            bu = np.empty(HIST_BLOCK, dtype=np.uint32)
            bf = bu.view(np.float32)
            fu = np.empty(HIST_BLOCK, dtype=np.uint32)
            ff = fu.view(np.float32)
            for s in range(p * step, min(size, (p + 1) * step), HIST_BLOCK):
                r = min(HIST_BLOCK, min(size, (p + 1) * step) - s)
                _load(base, s, r, base_bf16, bf, bu)
                _load(ft, s, r, ft_bf16, ff, fu)
                for j in range(r):
                    ff[j] = ff[j] - bf[j]
                for j in range(r):
                    key = fu[j] & np.uint32(0x7FFFFFFF)
                    if use_prefix and (key >> np.uint32(shift + 16)) != prefix:
                        continue
                    h[(key >> np.uint32(shift)) & np.uint32(0xFFFF)] += 1

    def magnitude_hist(
        base: np.ndarray, ft: np.ndarray, shift: int, prefix: int | None
    ) -> np.ndarray:
        """Histogram (65536 bins, int64) of the 16-bit digit at ``shift`` of the magnitude keys
        of ``tau = ft - base`` (float32), counting only keys whose higher bits equal
        ``prefix`` (None: all keys). Inputs as for :func:`cabs_step`."""
        out = np.zeros((numba.get_num_threads(), 1 << 16), dtype=np.int64)
        _magnitude_hist(base, ft, base.dtype == np.uint16, ft.dtype == np.uint16, shift,
                        np.uint32(prefix or 0), prefix is not None, out)  # fmt: skip
        return out.sum(axis=0)

    @numba.njit(cache=True, nogil=True)
    def _gta_span(base, fts, bf16, thr, need, start_ties, sparsify, weights, factors, rescale,
                  consensus, normalize, norm_div, lambda_, out, masks, s0, s1) -> None:  # fmt: skip
        """Elements ``[s0, s1)``; ``start_ties[k]``: model k's threshold ties before s0."""
        k_models = len(fts)
        blk = HIST_BLOCK
        bu = np.empty(blk, dtype=np.uint32)
        bf = bu.view(np.float32)
        fu = np.empty((k_models, blk), dtype=np.uint32)
        d = fu.view(np.float32)
        keep = np.empty((k_models, blk), dtype=np.bool_)
        ties = start_ties.copy()
        for s in range(s0, s1, blk):
            r = min(blk, s1 - s)
            _load(base, s, r, bf16, bf, bu)
            for k in range(k_models):
                dk, uk = d[k], fu[k]
                _load(fts[k], s, r, bf16, dk, uk)
                for j in range(r):
                    dk[j] = dk[j] - bf[j]
                if sparsify:
                    for j in range(r):  # the magnitude trim, ties to the lower index
                        key = np.int64(uk[j] & np.uint32(0x7FFFFFFF))
                        eq = key == thr[k]
                        sel = (key > thr[k]) | (eq & (ties[k] < need[k]))
                        ties[k] += eq
                        m = sel & (dk[j] != 0)
                        masks[k, s + j] = m
                        dk[j] = dk[j] * np.float32(m)
                if rescale:
                    for j in range(r):
                        dk[j] = dk[j] * factors[k]
                for j in range(r):
                    dk[j] = dk[j] * weights[k]
            for j in range(r):
                if consensus:  # sign election on the sum, then the agreeing deltas only
                    total = d[0, j]
                    for k in range(1, k_models):
                        total = total + d[k, j]
                    positive = total >= 0
                    for k in range(k_models):
                        keep[k, j] = (d[k, j] > 0) if positive else (d[k, j] < 0)
                        d[k, j] = d[k, j] * np.float32(keep[k, j])
                mixed = d[0, j]
                for k in range(1, k_models):
                    mixed = mixed + d[k, j]
                if normalize and consensus:
                    div = np.float32(keep[0, j]) * weights[0]
                    for k in range(1, k_models):
                        div = div + np.float32(keep[k, j]) * weights[k]
                    if div == 0:
                        div = np.float32(1.0)
                    mixed = mixed / div
                elif normalize:
                    mixed = mixed / norm_div
                out[s + j] = mixed * lambda_ + bf[j]

    @numba.njit(cache=True, nogil=True)
    def _count_ties(fts, base, bf16, thr, s0, s1, counts) -> None:
        blk = HIST_BLOCK
        bu = np.empty(blk, dtype=np.uint32)
        bf = bu.view(np.float32)
        fu = np.empty(blk, dtype=np.uint32)
        ff = fu.view(np.float32)
        for s in range(s0, s1, blk):
            r = min(blk, s1 - s)
            _load(base, s, r, bf16, bf, bu)
            for k in range(len(fts)):
                _load(fts[k], s, r, bf16, ff, fu)
                for j in range(r):
                    ff[j] = ff[j] - bf[j]
                for j in range(r):
                    counts[k] += np.int64(fu[j] & np.uint32(0x7FFFFFFF)) == thr[k]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _gta_merge(base, fts, bf16, thr, need, taken, sparsify, weights, factors, rescale,
                   consensus, normalize, norm_div, lambda_, out, masks, tie_total,
                   parts) -> None:  # fmt: skip
        size = out.size
        step = -(-size // parts)
        k_models = len(fts)
        before = np.zeros((parts, k_models), dtype=np.int64)
        if sparsify:  # where each part's threshold ties start, in index order
            for p in numba.prange(parts):
                _count_ties(fts, base, bf16, thr, p * step, min(size, (p + 1) * step), before[p])
        start = np.empty((parts, k_models), dtype=np.int64)
        run = taken.copy()
        for p in range(parts):
            start[p] = run
            run += before[p]
        tie_total[:] = run - taken
        for p in numba.prange(parts):
            _gta_span(base, fts, bf16, thr, need, start[p], sparsify, weights, factors, rescale,
                      consensus, normalize, norm_div, lambda_, out, masks, p * step,
                      min(size, (p + 1) * step))  # fmt: skip

    def gta_merge(
        base: np.ndarray,
        fts: tuple[np.ndarray, ...],
        thr: np.ndarray,
        need: np.ndarray,
        taken: np.ndarray,
        sparsify: bool,
        weights: np.ndarray,
        factors: np.ndarray | None,
        consensus: bool,
        normalize: bool,
        norm_div: float | None,
        lambda_: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The task-arithmetic family's merge of one chunk, for the magnitude trim or none.

        Per model k: ``d = (ft - base) * mask * factor * weight`` with ``mask = (|d| > thr
        or one of the first need - taken ties) and d != 0``; then the sign election and
        normalisation of :meth:`Gta._combine`, in its order of float32 operations. All
        inputs share one dtype (bf16 bits or float32). Returns ``(out, masks, ties)``:
        ``masks`` is (K, n) bool (empty unless ``sparsify``), ``ties[k]`` the number of keys
        equal to model k's threshold in the chunk.
        """
        n, k = base.size, len(fts)
        out = np.empty(n, dtype=np.float32)
        masks = np.empty((k, n) if sparsify else (k, 0), dtype=np.bool_)
        f32 = np.float32
        ties = np.zeros(k, dtype=np.int64)
        _gta_merge(base, fts, base.dtype == np.uint16, thr, need, taken, sparsify,
                   weights.astype(f32), (factors if factors is not None else weights).astype(f32),
                   factors is not None, consensus, normalize, f32(norm_div or 1.0), f32(lambda_),
                   out, masks, ties, 4 * numba.get_num_threads())  # fmt: skip
        return out, masks, ties


KERNELS = ("cabs", "gta")
"""Kernel families a method's spec may name: :func:`cabs_step`, or :func:`gta_merge` with
:func:`magnitude_hist`."""


def warm_up(kernel: str, k: int, raw_dtypes: Sequence[str]) -> None:
    """Compile, or load from numba's on-disk cache, the ``kernel`` family a merge of ``k``
    models will call on inputs of ``raw_dtypes`` (``"uint16"`` for bf16, ``"float32"``)."""
    if not HAVE_NUMBA:
        return
    for name in raw_dtypes:
        x = np.zeros(64, dtype=np.dtype(name))
        if kernel == "cabs":
            cabs_step(x, x, np.zeros(64, np.bool_), np.empty(64, np.bool_),
                      np.empty(64, np.float32), True, 1, 4, np.float32(1), True, True)  # fmt: skip
        elif kernel == "gta":
            magnitude_hist(x, x, 0, None)
            z = np.zeros(k, dtype=np.int64)
            gta_merge(x, (x,) * k, z - 1, z, z, True, np.ones(k, np.float32), None, True, True,
                      None, 1.0)  # fmt: skip


def precompile(
    kernel: str, k: int, raw_dtypes: Sequence[str], announce: Callable[[], None] | None = None
) -> None:
    """Compile the kernels of a merge in a child process, once per install and kernel source.

    numba compiles on first use, and LLVM's working memory (100-300 MB) would count against
    the merge's ``--max-memory`` if it happened in the merging process (and takes 20-60 s,
    so ``announce`` is called first when there is work to do). The child fills
    numba's on-disk cache; the merge then only loads machine code from it. A marker file
    next to the cache records success; without a writable cache, or if the child fails,
    compilation simply happens in-process as before.
    """
    if not HAVE_NUMBA:
        return
    here = Path(__file__)
    key = hashlib.sha256(
        repr((here.read_bytes(), numba.__version__, kernel, k, sorted(raw_dtypes))).encode()
    ).hexdigest()[:16]
    marker = here.parent / "__pycache__" / f"streammerge-kernels-{key}.ok"
    if marker.exists():
        return
    code = f"from {__name__} import warm_up; warm_up({kernel!r}, {k}, {sorted(raw_dtypes)!r})"
    if announce is not None:
        announce()
    try:
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=900)
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    except (OSError, subprocess.SubprocessError):
        pass
