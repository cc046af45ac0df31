"""Reference vectors R1-R5 (cabs_spec.md §11), checked by hand there, against both paths.

Each method's fast chunk path (``merge``) and its in-memory reference must give the spec's
numbers; tie handling is checked separately because the spec's vectors avoid ties.
"""

from __future__ import annotations

import pytest
import torch

from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId, kernels
from streammerge.methods.base import run_chunked
from streammerge.methods.nm import magnitude_key, nm_select

TAU_A = [0.9, -0.1, 0.4, -0.7, 0.05, 0.3, -0.2, 0.6]
TAU_B = [0.8, 0.5, -0.3, 0.1, -0.6, 0.2, 0.7, -0.4]
TAU_C = [-0.2, 0.45, 0.35, -0.05, 0.1, 0.9, -0.8, 0.3]
CABS = METHODS["cabs"]
PATHS = ["merge", "merge-torch", "reference"]


def run_cabs(path, taus, weights, nm, overlap="strict", tail="keep_topn_padded", base=None):
    base = torch.ones(len(taus[0])) if base is None else base
    fts = [base + torch.tensor(t) for t in taus]
    params = [ModelParams(w, n, m) for w, (n, m) in zip(weights, nm, strict=True)]
    return call(CABS, path, base, fts, params, MethodOptions(tail, overlap))


def call(method, path, base, fts, params, options, dtype=torch.float32, chunk=None):
    """The fast chunked path or the in-memory reference of ``method`` on a 1-D tensor."""
    tid = TensorId("t", base.numel())
    if path == "reference":
        return method.reference(tid, base, fts, params, options, dtype)
    compiled = kernels.HAVE_NUMBA
    kernels.HAVE_NUMBA = compiled and path == "merge"  # "merge-torch": the fallback
    try:
        return run_chunked(method, tid, base, fts, params, options, dtype, chunk)
    finally:
        kernels.HAVE_NUMBA = compiled


def close(t: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(t, torch.tensor(expected), atol=1e-6, rtol=0)


def kept(result, k: int) -> list[float]:
    """tau_k * mask_k, recovered from the mask (weights are 1 where this is used)."""
    return result.masks[k].int().tolist()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("overlap", ["strict", "fill"])
def test_r1_two_to_four(path, overlap):
    r = run_cabs(path, [TAU_A, TAU_B], [1.0, 0.5], [(2, 4), (2, 4)], overlap)
    assert kept(r, 0) == [1, 0, 0, 1, 0, 1, 0, 1]
    assert kept(r, 1) == [0, 1, 1, 0, 1, 0, 1, 0]  # the exact complement
    assert close(r.out, [1.9, 1.25, 0.85, 0.3, 0.7, 1.3, 1.35, 1.6])


@pytest.mark.parametrize("path", PATHS)
def test_r2_one_to_four(path):
    r = run_cabs(path, [TAU_A, TAU_B], [1.0, 0.5], [(1, 4), (1, 4)])
    assert kept(r, 0) == [1, 0, 0, 0, 0, 0, 0, 1]
    assert kept(r, 1) == [0, 1, 0, 0, 0, 0, 1, 0]  # index 0 (0.8) is claimed by A
    assert close(r.out, [1.9, 1.25, 1, 1, 1, 1, 1.35, 1.6])


@pytest.mark.parametrize("path", PATHS)
def test_r3_three_tasks(path):
    r = run_cabs(path, [TAU_A, TAU_B, TAU_C], [1.0, 0.5, 2.0], [(1, 4)] * 3)
    assert kept(r, 2) == [0, 0, 1, 0, 0, 1, 0, 0]
    assert close(r.out, [1.9, 1.25, 1.7, 1.0, 1.0, 2.8, 1.35, 1.6])


TAU_B4 = [0.8, 0.01, -0.3, 0.1, -0.6, 0.2, 0.7, -0.4]


@pytest.mark.parametrize("path", PATHS)
def test_r4_strict_keeps_only_free_positions(path):
    r = run_cabs(path, [TAU_A, TAU_B4], [1.0, 1.0], [(3, 4), (3, 4)], "strict")
    assert kept(r, 0) == [1, 0, 1, 1, 0, 1, 1, 1]
    assert kept(r, 1) == [0, 1, 0, 0, 1, 0, 0, 0]
    tau_b = r.out - 1 - torch.tensor(TAU_A) * r.masks[0]
    assert close(tau_b, [0, 0.01, 0, 0, -0.6, 0, 0, 0])


@pytest.mark.parametrize("path", PATHS)
def test_r4_fill_tops_up_from_claimed(path):
    r = run_cabs(path, [TAU_A, TAU_B4], [1.0, 1.0], [(3, 4), (3, 4)], "fill")
    # the free entry first, then the top-2 |tau_B'| among claimed entries (not index 3: 0.1)
    assert kept(r, 1) == [1, 1, 1, 0, 1, 0, 1, 1]
    tau_b = r.out - 1 - torch.tensor(TAU_A) * r.masks[0]
    assert close(tau_b, [0.8, 0.01, -0.3, 0, -0.6, 0, 0.7, -0.4])


X5 = [0.9, -0.1, 0.4, -0.7, 0.05, 0.3, -0.2, 0.6, -0.25, 0.15]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("zero", [0.9, 0, 0, -0.7, 0, 0.3, 0, 0.6, 0, 0]),
        ("keep_topn_padded", [0.9, 0, 0, -0.7, 0, 0.3, 0, 0.6, -0.25, 0.15]),
    ],
)
def test_r5_tail_policy(path, tail, expected):
    zeros = [0.0] * 10
    r = run_cabs(path, [X5, zeros], [1.0, 1.0], [(2, 4), (2, 4)], tail=tail)
    assert close(r.out - 1, expected)
    assert r.masks[1].sum() == 0  # an all-zero task vector never claims anything


@pytest.mark.parametrize("path", PATHS)
def test_ties_break_toward_lower_index(path):
    # every |tau| equal: the lowest indices of each block win, and B gets the next free ones
    a = [0.5, -0.5, 0.5, -0.5, 0.5, 0.5, 0.5, 0.5]
    b = [-0.25] * 8
    r = run_cabs(path, [a, b], [1.0, 1.0], [(1, 4), (2, 4)], base=torch.zeros(8))
    assert kept(r, 0) == [1, 0, 0, 0, 1, 0, 0, 0]
    assert kept(r, 1) == [0, 1, 1, 0, 0, 1, 1, 0]


def test_nm_select_ties_on_many_blocks():
    # 10,000 random blocks of small integers: compare with a per-block stable sort
    g = torch.Generator().manual_seed(0)
    key = torch.randint(0, 4, (10_000 * 16 + 7,), generator=g, dtype=torch.int32)
    sel = nm_select(key, 5, 16, "keep_topn_padded")
    for start in range(0, key.numel(), 16):
        block = key[start : start + 16]
        order = sorted(range(block.numel()), key=lambda i: (-int(block[i]), i))
        want = set(order[: min(5, block.numel())])
        got = set(torch.nonzero(sel[start : start + 16]).flatten().tolist())
        assert got == want, start


def test_magnitude_key_orders_like_abs():
    x = torch.tensor([-0.0, 0.0, 1e-30, -1e-30, 0.5, -0.75, float("inf"), -3.0])
    k = magnitude_key(x)
    for i in range(len(x)):
        for j in range(len(x)):
            assert (k[i] < k[j]) == (abs(x[i]) < abs(x[j]))
            assert (k[i] == k[j]) == (abs(x[i]) == abs(x[j]))


@pytest.mark.parametrize("path", PATHS)
def test_task_arithmetic(path):
    base = torch.ones(8)
    fts = [base + torch.tensor(TAU_A), base + torch.tensor(TAU_B)]
    params = [ModelParams(1.0), ModelParams(0.5)]
    r = call(METHODS["task_arithmetic"], path, base, fts, params, MethodOptions())
    assert r.masks is None
    assert close(r.out, [1 + a + 0.5 * b for a, b in zip(TAU_A, TAU_B, strict=True)])


@pytest.mark.parametrize("n", [0, 4])
def test_cabs_density_extremes(n):
    r = run_cabs("merge", [TAU_A, TAU_B], [1.0, 1.0], [(n, 4), (n, 4)])
    assert int(r.masks[0].sum()) == (8 if n == 4 else 0)
    assert int(r.masks[1].sum()) == 0  # with n = m, A claims everything
