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
  the key (count the keys >= a candidate), which stops as soon as exactly n keys reach the
  candidate. A quickselect mispredicts a branch per comparison and ran 5x slower.
* that search runs for 64 blocks side by side (:func:`_lanes`): their keys are transposed so
  that each SIMD lane counts for its own block, on 16-bit halves (the high halves first,
  then, where needed, the low halves of the keys tied on the high half: 16 lanes per AVX2
  register), and the tie rule and the writes are loops the compiler vectorises too. The
  per-block search (:func:`_blocks`) still does the partial last block, m > 256, and
  ``group=0`` (tests, bench); both write the same bytes.

  ``NUMBA_NUM_THREADS=2 python bench/kernels.py --cabs-kernel --repeat 5`` (16:64 strict,
  base + 2 fine-tunes, 16Mi elements, medians of 5, ns per element and model, wall / CPU)
  on a 2-core AMD EPYC (AVX2) shared with other work (load average ~5, so the wall times
  are noisy): bf16 27.4 / 13.5 per block vs 19.6 / 10.0 lane-parallel; fp32 16.5 / 10.2 vs
  14.2 / 9.1. One thread, 4Mi elements, CPU: bf16 9.8 vs 7.0, fp32 8.8 vs 7.3. Of the
  lane-parallel time about 1.5 ns is loading the inputs and the keys (memory bound), 0.8
  the transpose, 2 the search, 1 the tie rule and the writes (one thread).

numba is optional: without it (or with ``STREAMMERGE_KERNEL=torch``) the torch path runs.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import types
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


PARALLEL_MIN = 1 << 18
"""Elements below which a kernel runs on the calling thread alone: waking the thread pool
costs more than such work, and on a busy machine each wake-up waits for a scheduler slice
(30-90 ms a call measured on this project's 2-core CI machine under load, against 1-2 ms on
one thread for a 16 Ki-element MoE expert). Every kernel's result is independent of how its
range is split, so both variants give the same bytes."""


def _serial(kernel: Callable[..., object]) -> Callable[..., object]:
    """``kernel`` compiled without threads (its ``prange`` loops run as ``range``), under a
    name of its own so that numba's on-disk cache keeps the two variants apart."""
    f = kernel.py_func  # type: ignore[attr-defined]
    name, qualname = f.__name__ + "_serial", f.__qualname__ + "_serial"
    code = f.__code__.replace(co_name=name, co_qualname=qualname)
    g = types.FunctionType(code, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = qualname
    return numba.njit(cache=True, nogil=True)(g)  # type: ignore[no-any-return]


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

    @numba.njit(cache=True, nogil=True, inline="always")
    def _qth_lanes(kt, m, G, gc, q, t, hi, lo, ones, cand, cnt, done) -> None:
        """Per lane ``g < gc``: ``t[g]`` = the ``q[g]``-th largest (1 <= q[g] <= m) of the
        16-bit keys ``kt[j * G + g]``, ``j < m``, or a value that exactly ``q[g]`` of them reach.

        :func:`_qth_largest` for all lanes at once: each step counts, in every lane, the keys
        >= the lane's candidate, in a loop over lanes that LLVM vectorises (16 per AVX2
        register). The bit range searched is the union of the lanes' ranges; the search stops
        early once every lane has found a candidate that exactly ``q[g]`` keys reach.
        """
        for g in range(gc):
            hi[g] = kt[g]
            lo[g] = kt[g]
            ones[g] = kt[g]
        for j in range(1, m):
            o = j * G
            for g in range(gc):
                v = kt[o + g]
                hi[g] = max(hi[g], v)
                lo[g] = min(lo[g], v)
                ones[g] |= v
        diff = np.uint32(0)
        anyone = np.uint32(0)
        for g in range(gc):
            diff |= np.uint32(hi[g] ^ lo[g])
            anyone |= np.uint32(ones[g])
        if diff == 0:  # every lane's keys are all equal
            for g in range(gc):
                t[g] = hi[g]
            return
        # Bits above the highest one in which some lane's keys differ are common to each
        # lane's keys; bits below the lowest one any key has set are zero in all of them.
        top = 15
        while not (diff >> np.uint32(top)) & np.uint32(1):
            top -= 1
        low = 0
        while not (anyone >> np.uint32(low)) & np.uint32(1):
            low += 1
        prefix = np.uint16(~((np.uint32(2) << np.uint32(top)) - np.uint32(1)) & np.uint32(0xFFFF))
        for g in range(gc):
            t[g] = hi[g] & prefix
            done[g] = 0
        for bit in range(top, low - 1, -1):
            b = np.uint16(1 << bit)
            for g in range(gc):
                cand[g] = t[g] | b
                cnt[g] = 0
            for j in range(m):
                o = j * G
                for g in range(gc):
                    cnt[g] += np.uint16(kt[o + g] >= cand[g])
            finished = 0
            for g in range(gc):
                ok = cnt[g] >= q[g]
                t[g] = cand[g] if ok else t[g]
                done[g] |= np.uint16(ok & (cnt[g] == q[g]))
                finished += done[g]
            if finished == gc:
                break

    LANES_MAX_M = 256
    """Largest m searched lane-parallel (scratch ~14 bytes per element of a group)."""

    @numba.njit(cache=True, nogil=True)
    def _lanes(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight, strict,
               b0, b1, G) -> None:  # fmt: skip
        """Full blocks ``[b0, b1)``, ``G`` at a time, each SIMD lane searching its own block.

        The keys of a group of blocks are split into 16-bit halves and transposed into
        ``kh/kl[j * G + g]`` (element j of block g), so that every step of the bitwise search
        is a loop over blocks that LLVM vectorises, where :func:`_blocks` runs a short
        dependent reduction per block and step. The n-th largest key is found on the high
        halves first, then on the low halves of the keys whose high half equals it (most
        often none is needed: the low halves of a tau of bf16 inputs are mostly zero).
        The selection is :func:`_blocks`'s: the keys above the n-th largest plus the first
        ties at it in index order; so are the arithmetic and the bytes written.
        """
        lax = not strict
        q = n
        span = G * m
        bu = np.empty(span, dtype=np.uint32)
        bf = bu.view(np.float32)
        fu = np.empty(span, dtype=np.uint32)
        ff = fu.view(np.float32)
        ku = np.empty(span, dtype=np.uint32)
        kh = np.empty(span, dtype=np.uint16)
        kl = np.empty(span, dtype=np.uint16)
        kp = np.empty(span, dtype=np.bool_)
        t = np.empty(G, dtype=np.uint32)
        th = np.empty(G, dtype=np.uint16)
        tl = np.empty(G, dtype=np.uint16)
        qv = np.empty(G, dtype=np.uint16)
        hi = np.empty(G, dtype=np.uint16)
        lo = np.empty(G, dtype=np.uint16)
        ones = np.empty(G, dtype=np.uint16)
        cand = np.empty(G, dtype=np.uint16)
        cnt = np.empty(G, dtype=np.uint16)
        done = np.empty(G, dtype=np.uint16)
        last = np.empty(G, dtype=np.int16)
        cmask = np.uint32(0) if strict else np.uint32(0x7FFFFFFF)
        for g0 in range(b0, b1, G):
            gc = min(G, b1 - g0)
            s0 = g0 * m
            r = gc * m
            _load(base, s0, r, base_bf16, bf, bu)
            _load(ft, s0, r, ft_bf16, ff, fu)
            for j in range(r):
                ff[j] = ff[j] - bf[j]  # tau, in place
            cl = claimed[s0 : s0 + r]
            mk = mask[s0 : s0 + r]
            ac = acc[s0 : s0 + r]
            # _blocks's keys, branch-free: free positions by |tau| above every claimed one,
            # claimed ones by |tau| (fill) or at 0 (strict)
            for j in range(r):
                mag = fu[j] & np.uint32(0x7FFFFFFF)
                free = np.uint32(cl[j] ^ True)
                ku[j] = (mag | (free << np.uint32(31))) & (cmask | (np.uint32(0) - free))
            if q == 0:  # nothing selected: no key is > 0xFFFFFFFF, no tie is taken
                for g in range(gc):
                    t[g] = np.uint32(0xFFFFFFFF)
                    last[g] = -1
            elif q >= m:  # everything selected
                for g in range(gc):
                    t[g] = np.uint32(0)
                    last[g] = m
            else:
                for g in range(gc):  # transpose, split into 16-bit halves
                    o = g * m
                    for j in range(m):
                        k = ku[o + j]
                        kh[j * G + g] = np.uint16(k >> np.uint32(16))
                        kl[j * G + g] = np.uint16(k & np.uint32(0xFFFF))
                for g in range(gc):
                    qv[g] = q
                _qth_lanes(kh, m, G, gc, qv, th, hi, lo, ones, cand, cnt, done)
                # The low half of the n-th largest key is the q'-th largest low half among
                # the keys whose high half is th, q' = q - #(high > th); the other keys'
                # low halves are set to 0, which cannot move a q'-th largest above 0.
                for g in range(gc):
                    cnt[g] = 0
                    ones[g] = 0
                for j in range(m):
                    o = j * G
                    for g in range(gc):
                        h = kh[o + g]
                        cnt[g] += np.uint16(h > th[g])
                        v = kl[o + g] & (np.uint16(0) - np.uint16(h == th[g]))
                        kl[o + g] = v
                        ones[g] |= v
                any_low = np.uint16(0)
                for g in range(gc):
                    any_low |= ones[g]
                    qv[g] = np.uint16(q) - cnt[g]
                if any_low:
                    _qth_lanes(kl, m, G, gc, qv, tl, hi, lo, ones, cand, cnt, done)
                else:
                    for g in range(gc):
                        tl[g] = 0
                # Ties: the keys > t are in, and of the keys == t the first need = q - #(> t)
                # in index order. With kl masked as above, key > t iff kh > th or kl > tl,
                # and key == t iff kh == th and kl == tl.
                for g in range(gc):
                    cnt[g] = 0
                    done[g] = 0
                for j in range(m):
                    o = j * G
                    for g in range(gc):
                        h = kh[o + g]
                        v = kl[o + g]
                        cnt[g] += np.uint16((h > th[g]) | (v > tl[g]))
                        done[g] += np.uint16((h == th[g]) & (v == tl[g]))
                some = False
                for g in range(gc):
                    qv[g] = np.uint16(q) - cnt[g]  # need
                    some |= done[g] != qv[g]
                    last[g] = m
                    t[g] = (np.uint32(th[g]) << np.uint32(16)) | np.uint32(tl[g])
                if some:  # the index of each block's need-th tie: #(j with fewer before)
                    for g in range(gc):
                        cnt[g] = 0
                        done[g] = 0
                    for j in range(m):
                        o = j * G
                        for g in range(gc):
                            cnt[g] += np.uint16((kh[o + g] == th[g]) & (kl[o + g] == tl[g]))
                            done[g] += np.uint16(cnt[g] < qv[g])
                    for g in range(gc):
                        last[g] = done[g]
            # the selection, one simple loop per array written, so that each vectorises
            for g in range(gc):
                thr = t[g]
                lg = last[g]
                o = g * m
                for j in range(m):
                    k = ku[o + j]
                    sel = (k > thr) | ((k == thr) & (j <= lg))
                    kp[o + j] = sel & (ff[o + j] != 0) & (lax | (cl[o + j] ^ True))
            for j in range(r):
                mk[j] = kp[j]
            for j in range(r):
                cl[j] = cl[j] | kp[j]
            if first:
                for j in range(r):
                    ac[j] = bf[j] + (weight * ff[j]) * np.float32(kp[j])
            else:
                for j in range(r):
                    ac[j] = ac[j] + (weight * ff[j]) * np.float32(kp[j])

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _cabs_step(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight, strict,
                   keep_tail, parts, G) -> None:  # fmt: skip
        size = acc.size
        blocks = (size + m - 1) // m
        if G < 2 or m > LANES_MAX_M:  # the per-block search for every block
            step = (blocks + parts - 1) // parts
            for p in numba.prange(parts):
                b0 = p * step
                b1 = min(blocks, b0 + step)
                if b0 < b1:
                    _blocks(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m,
                            weight, strict, keep_tail, b0, b1)  # fmt: skip
            return
        full = size // m
        groups = (full + G - 1) // G
        step = (groups + parts - 1) // parts * G
        for p in numba.prange(parts):
            b0 = p * step
            b1 = min(full, b0 + step)
            if b0 < b1:
                _lanes(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight,
                       strict, b0, b1, G)  # fmt: skip
        if full < blocks:  # the partial last block
            _blocks(base, ft, base_bf16, ft_bf16, claimed, mask, acc, first, n, m, weight,
                    strict, keep_tail, full, blocks)  # fmt: skip

    _cabs_step_serial = _serial(_cabs_step)

    GROUP = 64
    """Blocks searched side by side by :func:`_lanes`."""

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
        group: int | None = None,
    ) -> None:
        """One model of CABS on a chunk.

        ``base`` and ``ft`` are float32 arrays or ``uint16`` arrays of bf16 bit patterns.
        ``mask`` (bool) is written; ``acc`` (float32) and ``claimed`` (bool) are updated in
        place, except that ``first`` starts ``acc`` from ``base`` instead of reading it.
        Blocks are split into a few contiguous ranges per thread. ``group``: blocks per
        lane-parallel group (default :data:`GROUP`); 0 runs the per-block search
        (:func:`_blocks`) everywhere, for tests and ``bench/kernels.py``.
        """
        threaded = acc.size >= PARALLEL_MIN
        kernel = _cabs_step if threaded else _cabs_step_serial
        parts = 4 * numba.get_num_threads() if threaded else 1
        g = GROUP if group is None else group
        kernel(base, ft, base.dtype == np.uint16, ft.dtype == np.uint16, claimed, mask, acc,
               first, n, m, weight, strict, keep_tail, parts, g)  # fmt: skip

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

    _magnitude_hist_serial = _serial(_magnitude_hist)

    def magnitude_hist(
        base: np.ndarray, ft: np.ndarray, shift: int, prefix: int | None
    ) -> np.ndarray:
        """Histogram (65536 bins, int64) of the 16-bit digit at ``shift`` of the magnitude keys
        of ``tau = ft - base`` (float32), counting only keys whose higher bits equal
        ``prefix`` (None: all keys). Inputs as for :func:`cabs_step`."""
        threaded = ft.size >= PARALLEL_MIN
        kernel = _magnitude_hist if threaded else _magnitude_hist_serial
        out = np.zeros((numba.get_num_threads() if threaded else 1, 1 << 16), dtype=np.int64)
        kernel(base, ft, base.dtype == np.uint16, ft.dtype == np.uint16, shift,
               np.uint32(prefix or 0), prefix is not None, out)  # fmt: skip
        return out.sum(axis=0)

    @numba.njit(cache=True, nogil=True)
    def _gta_span(base, fts, k_models, bf16, thr, need, start_ties, sparsify, weights, factors,
                  rescale, consensus, normalize, norm_div, lambda_, out, masks, s0,
                  s1) -> None:  # fmt: skip
        """Elements ``[s0, s1)`` of the first ``k_models`` of ``fts``; ``start_ties[k]``: model
        k's threshold ties before s0."""
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
    def _count_ties(fts, k_models, base, bf16, thr, s0, s1, counts) -> None:
        blk = HIST_BLOCK
        bu = np.empty(blk, dtype=np.uint32)
        bf = bu.view(np.float32)
        fu = np.empty(blk, dtype=np.uint32)
        ff = fu.view(np.float32)
        for s in range(s0, s1, blk):
            r = min(blk, s1 - s)
            _load(base, s, r, bf16, bf, bu)
            for k in range(k_models):
                _load(fts[k], s, r, bf16, ff, fu)
                for j in range(r):
                    ff[j] = ff[j] - bf[j]
                for j in range(r):
                    counts[k] += np.int64(fu[j] & np.uint32(0x7FFFFFFF)) == thr[k]

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _gta_merge(base, fts, k_models, bf16, thr, need, taken, sparsify, weights, factors,
                   rescale, consensus, normalize, norm_div, lambda_, out, masks, tie_total,
                   parts) -> None:  # fmt: skip
        size = out.size
        step = -(-size // parts)
        before = np.zeros((parts, k_models), dtype=np.int64)
        if sparsify:  # where each part's threshold ties start, in index order
            for p in numba.prange(parts):
                _count_ties(fts, k_models, base, bf16, thr, p * step, min(size, (p + 1) * step),
                            before[p])  # fmt: skip
        start = np.empty((parts, k_models), dtype=np.int64)
        run = taken.copy()
        for p in range(parts):
            start[p] = run
            run += before[p]
        tie_total[:] = run - taken
        for p in numba.prange(parts):
            _gta_span(base, fts, k_models, bf16, thr, need, start[p], sparsify, weights, factors,
                      rescale, consensus, normalize, norm_div, lambda_, out, masks, p * step,
                      min(size, (p + 1) * step))  # fmt: skip

    _gta_merge_serial = _serial(_gta_merge)

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
        padded = tuple(fts) + (base,) * (model_slots(k) - k)  # one signature for k <= 8
        out = np.empty(n, dtype=np.float32)
        masks = np.empty((k, n) if sparsify else (k, 0), dtype=np.bool_)
        f32 = np.float32
        ties = np.zeros(k, dtype=np.int64)
        threaded = n >= PARALLEL_MIN
        kernel = _gta_merge if threaded else _gta_merge_serial
        kernel(base, padded, k, base.dtype == np.uint16, thr, need, taken, sparsify,
               weights.astype(f32), (factors if factors is not None else weights).astype(f32),
               factors is not None, consensus, normalize, f32(norm_div or 1.0), f32(lambda_),
               out, masks, ties, 4 * numba.get_num_threads() if threaded else 1)  # fmt: skip
        return out, masks, ties


def model_slots(k: int) -> int:
    """Arrays in the tuple of fine-tunes a ``gta`` kernel takes for ``k`` models: numba compiles
    one signature per tuple length, so ``k`` is padded to :data:`MODEL_SLOTS` (or the next
    multiple of it) with the base, and the kernel reads only the first ``k``."""
    return -(-max(k, 1) // MODEL_SLOTS) * MODEL_SLOTS


MODEL_SLOTS = 8
"""Model counts up to this share one compiled ``gta`` kernel (beyond: one per multiple)."""

RAW_DTYPES = ("float32", "uint16")
"""What kernels read: float32, or bf16 as raw 16-bit words (:func:`kernel_input`)."""

KERNELS = ("cabs", "gta")
"""Kernel families a method's spec may name: :func:`cabs_step`, or :func:`gta_merge` with
:func:`magnitude_hist`."""


def warm_up(kernel: str, k: int, raw_dtypes: Sequence[str]) -> None:
    """Compile, or load from numba's on-disk cache, the ``kernel`` family (threaded and
    single-thread variants) a merge of ``k`` models will call on inputs of ``raw_dtypes``
    (``"uint16"`` for bf16, ``"float32"``); the ``gta`` kernel for ``k``'s model slots."""
    if not HAVE_NUMBA:
        return
    for name, size in itertools.product(raw_dtypes, (64, PARALLEL_MIN)):  # both variants
        x = np.zeros(size, dtype=np.dtype(name))
        if kernel == "cabs":
            no, mask = np.zeros(size, np.bool_), np.empty(size, np.bool_)
            cabs_step(x, x, no, mask, np.empty(size, np.float32), True, 1, 4, np.float32(1),
                      True, True)  # fmt: skip
        elif kernel == "gta":
            magnitude_hist(x, x, 0, None)
            z = np.zeros(k, dtype=np.int64)
            gta_merge(x, (x,) * k, z - 1, z, z, True, np.ones(k, np.float32), None, True, True,
                      None, 1.0)  # fmt: skip


def precompile(
    kernel: str, k: int, raw_dtypes: Sequence[str], announce: Callable[[], None] | None = None
) -> None:
    """Compile a merge's kernels in a child process, once per install, kernel source, kernel
    family, input dtypes and model slot count (:func:`model_slots`: one for 1 to 8 models).

    numba compiles on first use, and LLVM's working memory (100-300 MB) would count against
    the merge's ``--max-memory`` if it happened in the merging process (and takes 20-60 s,
    so ``announce`` is called first when there is work to do). The child fills numba's
    on-disk cache; the merge then only loads machine code from it. A marker file next to the
    cache records success; without a writable cache, or if the child fails, compilation
    simply happens in-process as before.
    """
    if not HAVE_NUMBA:
        return
    here = Path(__file__)
    slots, dtypes = model_slots(k), sorted(raw_dtypes)
    key = hashlib.sha256(
        repr((here.read_bytes(), numba.__version__, kernel, slots, dtypes)).encode()
    ).hexdigest()[:16]
    marker = here.parent / "__pycache__" / f"streammerge-kernels-{key}.ok"
    if marker.exists():
        return
    code = f"from {__name__} import warm_up; warm_up({kernel!r}, {slots}, {dtypes!r})"
    if announce is not None:
        announce()
    try:
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=900)
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    except (OSError, subprocess.SubprocessError):
        pass
