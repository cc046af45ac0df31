"""karcher: chunked == in-memory reference byte for byte, close to a plain float64 numpy port of
mergekit's iteration on the data (the method iterates on the Gram matrix), max_iter / tol,
degenerate inputs, and end-to-end runs with and without a base_model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.reference import reference_merge

KA = METHODS["karcher"]


def numpy_karcher(tensors, max_iter=10, tol=1e-5):
    """mergekit's karcher_merge_tensors with equal weights, on the data, in float64 numpy."""
    xs = [t.astype(np.float64) for t in tensors]
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [np.linalg.norm(x) for x in xs]
    units = [np.zeros_like(x) if n == 0 else x / n for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(xs[0])
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(na, vu, strict=True))
    mn = np.linalg.norm(mean)
    mean = vu[0].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for a, u in zip(na, vu, strict=True):
            dot = np.clip(np.dot(mean, u), -1.0, 1.0)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += a * (theta / np.sin(theta)) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * (tangent / tn)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def models(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, generator=g)
    return [(common + (1.0 + i) * torch.randn(n, generator=g)).to(dtype) for i in range(k)]


def opts(**kw):
    return MethodOptions(extra=tuple(sorted(kw.items())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
def test_chunked_equals_reference_any_chunk(dtype, k):
    n = 4096 * 7 + 123
    fts = models(n, k, 1, dtype)
    base = torch.zeros(n, dtype=dtype)
    p, tid = [ModelParams(1.0)] * k, TensorId("w", n)
    ref = KA.reference(tid, base, fts, p, opts(), torch.float32).out
    for chunk in (None, 1, 7, 4097, 3 * 4096 + 5, n - 1):
        got = run_chunked(KA, tid, base, fts, p, opts(), torch.float32, chunk).out
        assert same_bytes(got, ref), chunk


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (50, 1e-12)])
def test_close_to_numpy_karcher(k, max_iter, tol):
    fts = models(20000, k, 2)
    p = [ModelParams(1.0)] * k
    o = opts(max_iter=float(max_iter), tol=tol)
    got = run_chunked(
        KA, TensorId("w", 20000), torch.zeros(20000), fts, p, o, torch.float32, 5000
    ).out
    want = numpy_karcher([f.numpy() for f in fts], max_iter, tol)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_iterating_moves_off_the_euclidean_start():
    fts = models(5000, 3, 3)
    p = [ModelParams(1.0)] * 3
    tid = TensorId("w", 5000)
    start = KA.reference(tid, fts[0], fts, p, opts(max_iter=0.0), torch.float32).out
    mean = KA.reference(tid, fts[0], fts, p, opts(), torch.float32).out
    assert not torch.allclose(start, mean, rtol=1e-4, atol=1e-4)


def test_degenerate_inputs():
    z = torch.zeros(3000)
    x = models(3000, 1, 4)[0]
    p2 = [ModelParams(1.0)] * 2
    tid = TensorId("w", 3000)
    got = KA.reference(tid, z, [z, z], p2, opts(), torch.float32).out
    assert torch.equal(got, z)
    # a zero model is not valid but still counts in the norm scale: half of x
    got = KA.reference(tid, z, [x, z], p2, opts(), torch.float32).out
    np.testing.assert_allclose(got.numpy(), numpy_karcher([x.numpy(), z.numpy()]), rtol=1e-6)
    # one model comes back as it is; colinear models give their mean
    one = KA.reference(tid, z, [x.bfloat16()], [ModelParams(1.0)], opts(), torch.float32).out
    assert torch.equal(one, x.bfloat16().float())
    got = KA.reference(tid, z, [x, 3 * x], p2, opts(), torch.float32).out
    np.testing.assert_allclose(got.numpy(), 2 * x.numpy(), rtol=1e-5)


@pytest.mark.parametrize("with_base", [True, False])
def test_run_merge_equals_reference_merge(tmp_path: Path, with_base: bool):
    base, fts = make_family(tmp_path / "m", k=3)
    doc: dict = {
        "merge_method": "karcher",
        "models": [{"model": str(f)} for f in fts],
        "parameters": {"max_iter": 20, "tol": [1e-5, 1e-7]},
    }
    if with_base:
        doc["base_model"] = str(base)
    recipe = parse_recipe(doc)
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(got)


def test_model_card_shows_the_settings(tmp_path: Path):
    _, fts = make_family(tmp_path / "m", k=2)
    doc = {
        "merge_method": "karcher",
        "models": [{"model": str(f)} for f in fts],
        "parameters": {"max_iter": 7},
    }
    run_merge(parse_recipe(doc), tmp_path / "out", chunk_elems=4096, max_memory=2**30)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| # | model | max_iter | tol |" in card
    assert "| 7 | 1e-05 |" in card
