"""The lane-parallel CABS kernel against the per-block kernel and the in-memory reference.

:func:`kernels.cabs_step` searches groups of blocks side by side (``_lanes``); ``group=0``
runs the per-block search (``_blocks``) everywhere. Both, for several group sizes (partial
groups included), must write the bytes of :meth:`Cabs.reference` on keys with many ties,
constant blocks, zeros, n = 0 and n = m, partial tail blocks, bf16 and float32 inputs, both
overlap and tail policies and 1 to 4 models.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId, kernels

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba kernel disabled")

CABS = METHODS["cabs"]
WEIGHTS = [1.0, 0.5, -0.7, 2.0]
SIZE = 64 * 70 + 37  # > one group of 64 blocks per part for small m; a partial tail block


def family(kind: str, k: int, size: int, dtype: torch.dtype, seed: int):
    """A base and k fine-tunes whose deltas are of the given kind."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, generator=g) * 0.02).to(dtype)
    fts = []
    for i in range(k):
        if kind == "ties":  # few distinct magnitudes, both signs, some zeros
            d = torch.randint(-3, 4, (size,), generator=g).float() * 2.0**-8
        elif kind == "constant":  # every block of 8 (so every block of 4) shares one delta
            d = torch.randint(-2, 3, (size // 8 + 1,), generator=g).float().repeat_interleave(8)
            d = d[:size] * 2.0**-6
        elif kind == "zeros":  # mostly unchanged weights
            d = torch.randn(size, generator=g) * 1e-3 * (torch.rand(size, generator=g) < 0.2)
        else:  # "random": continuous, wide magnitudes, exact ties rare in float32
            d = torch.randn(size, generator=g) * 1e-3 * torch.rand(size, generator=g) ** 4
        if i == 1 and kind != "constant":
            d[: size // 3] = 0.0  # a whole run of unchanged positions
        fts.append((base.float() + d).to(dtype))
    return base, fts


def compiled(base, fts, params, options, group: int):
    """What ``cabs._merge_compiled`` does, with the lane group size chosen."""
    b = kernels.kernel_input(base)
    acc = np.empty(b.size, dtype=np.float32)
    claimed = np.zeros(b.size, dtype=np.bool_)
    masks = []
    for k, (ft, p) in enumerate(zip(fts, params, strict=True)):
        mask = np.empty(b.size, dtype=np.bool_)
        kernels.cabs_step(b, kernels.kernel_input(ft), claimed, mask, acc, k == 0, p.n, p.m,
                          np.float32(p.weight), options.overlap_policy == "strict",
                          options.tail_policy == "keep_topn_padded", group)  # fmt: skip
        masks.append(mask)
    return acc, masks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("overlap", ["strict", "fill"])
@pytest.mark.parametrize("tail", ["keep_topn_padded", "zero"])
@pytest.mark.parametrize("kind", ["ties", "constant", "zeros", "random"])
def test_lanes_equal_blocks_and_reference(dtype, overlap, tail, kind):
    options = MethodOptions(tail, overlap)
    nms = [(2, 4), (0, 8), (8, 8), (1, 7), (16, 64), (63, 64), (5, 300)]
    for case, (n, m) in enumerate(nms):
        for k in range(1, 5):
            size = SIZE if m <= 64 else 3 * m + 11
            base, fts = family(kind, k, size, dtype, seed=100 * case + k)
            # per-model n varies a little (the quota, not the block size, differs per model)
            params = [ModelParams(WEIGHTS[i], max(0, n - (i % 2)) if n < m else n, m)
                      for i in range(k)]  # fmt: skip
            ref = CABS.reference(TensorId("t", size), base, fts, params, options, torch.float32)
            want_out = ref.out.view(torch.int32).numpy()
            for group in (0, None, 5, 1000):
                acc, masks = compiled(base, fts, params, options, group)
                what = f"n:m={n}:{m} K={k} group={group}"
                assert np.array_equal(acc.view(np.int32), want_out), what
                for km, (got, want) in enumerate(zip(masks, ref.masks, strict=True)):
                    assert np.array_equal(got, want.numpy()), f"{what} mask {km}"


def test_lanes_all_equal_and_extreme_keys():
    """Whole groups of constant blocks (the search's early return), NaN/inf/-0.0 deltas."""
    size = 64 * 200 + 5
    base = torch.zeros(size)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan")])
    g = torch.Generator().manual_seed(7)
    fts = [
        torch.full((size,), 0.25),  # every key equal
        specials[torch.randint(0, 7, (size,), generator=g)],
        torch.where(torch.rand(size, generator=g) < 0.5, 2.0**-126, 2.0**-149),  # subnormals
    ]
    params = [ModelParams(w, n, 64) for w, n in zip([1.0, 0.5, 2.0], [16, 16, 40], strict=True)]
    for overlap in ("strict", "fill"):
        options = MethodOptions("keep_topn_padded", overlap)
        ref = CABS.reference(TensorId("t", size), base, fts, params, options, torch.float32)
        for group in (0, None, 3):
            acc, masks = compiled(base, fts, params, options, group)
            assert np.array_equal(acc.view(np.int32), ref.out.view(torch.int32).numpy())
            for got, want in zip(masks, ref.masks, strict=True):
                assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_threaded_and_single_thread_variants_write_the_same_bytes(dtype, monkeypatch):
    """Small inputs run a kernel's single-thread twin (``PARALLEL_MIN``): each kernel must give
    the bytes of its threaded variant, which splits the range into parts."""
    base, fts = family("ties", 3, SIZE, dtype, seed=11)
    b, f = kernels.kernel_input(base), tuple(kernels.kernel_input(x) for x in fts)
    z = np.zeros(3, np.int64)
    thr = np.full(3, int(np.float32(2.0**-8).view(np.uint32)), np.int64)  # a threshold with ties

    def run_all():
        acc, masks = compiled(base, fts, [ModelParams(1.0, n=3, m=8)] * 3,
                              MethodOptions(), group=64)  # fmt: skip
        hist = kernels.magnitude_hist(b, f[0], 16, None)
        gta = kernels.gta_merge(b, f, thr, z + 40, z, True, np.ones(3, np.float32), None, True,
                                True, None, 1.0)  # fmt: skip
        return [acc, *masks, hist, *gta]

    monkeypatch.setattr(kernels, "PARALLEL_MIN", 0)
    threaded = run_all()
    monkeypatch.setattr(kernels, "PARALLEL_MIN", 1 << 62)
    single = run_all()
    for a, s in zip(threaded, single, strict=True):
        assert a.tobytes() == s.tobytes()


NO_COMPILE = """
import numpy as np
from streammerge.methods import kernels
for family in kernels.KERNELS:  # what first merges of two models do (no-ops once they have)
    kernels.precompile(family, 2, kernels.RAW_DTYPES)
for name in kernels.RAW_DTYPES:
    x = np.zeros(70_000, dtype=name)
    for k in (1, 3, 5, 8):  # other model counts than the first merge's
        z = np.zeros(k, dtype=np.int64)
        kernels.gta_merge(x, (x,) * k, z - 1, z, z, True, np.ones(k, np.float32), None, True,
                          True, None, 1.0)
    kernels.cabs_step(x, x, np.zeros(x.size, bool), np.empty(x.size, bool),
                      np.empty(x.size, np.float32), True, 1, 4, np.float32(1), True, True)
    kernels.magnitude_hist(x, x, 0, None)
misses = {n: sum(d.stats.cache_misses.values()) for n in dir(kernels)
          if hasattr(d := getattr(kernels, n), "stats")}
print(sum(misses.values()), sorted(n for n, v in misses.items() if v))
"""


@pytest.mark.skipif(not kernels.enabled(), reason="numba kernels are off")
def test_after_the_first_merge_no_model_count_up_to_8_compiles_again():
    """Once the precompiling child has run for merges of 2 models (each kernel family, each
    input dtype), merges of 1, 3, 5 or 8 models load every kernel from numba's cache: no cache
    miss (a miss is a compile in the merging process)."""
    out = subprocess.run([sys.executable, "-c", NO_COMPILE], capture_output=True, text=True,
                         check=True, timeout=900)  # fmt: skip
    assert out.stdout.split()[0] == "0", out.stdout
