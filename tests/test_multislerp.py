"""multislerp: chunked == in-memory reference byte for byte, close to a plain float64 numpy
multislerp written from mergekit's formula (with and without base, 1-4 models, weights
normalized or not), the two-model linear fallback, and an end-to-end run."""

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

MS = METHODS["multislerp"]


def numpy_multislerp(weights, fts, base=None, normalize=True, eps=1e-8):
    """mergekit's multislerp, in plain float64 numpy."""
    if len(fts) == 1:
        return fts[0].astype(np.float64)
    x = np.stack([f.astype(np.float64) for f in fts])
    if base is not None:
        x = x - base.astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    u = x / (norms + eps)
    mean = (u * w[:, None]).sum(0)
    mn = np.linalg.norm(mean)
    if mn < eps:
        assert len(fts) == 2
        res = x[0] * w[0] + x[1] * w[1]
        return res if base is None else res + base
    mean = mean / mn
    dots = (u * mean).sum(-1, keepdims=True)
    tangent = ((u - dots * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    res = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
    res = res * (norms[:, 0] * w).sum()
    return res if base is None else res + base


def family(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g)
    fts = [(b + torch.randn(n, generator=g) + 0.5 * (i + 1)).to(dtype) for i in range(k)]
    return b.to(dtype), fts


def opts(**kw):
    return MethodOptions(extra=tuple(sorted(kw.items())))


WEIGHTS = {1: [0.7], 2: [1.0, 0.6], 3: [0.5, 0.3, 0.9], 4: [1.0, 2.0, 0.5, 0.25]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("ignore_base", [0.0, 1.0])
def test_chunked_equals_reference_any_chunk(dtype, k, ignore_base):
    n = 4096 * 7 + 123
    b, fts = family(n, k, 1, dtype)
    p = [ModelParams(w) for w in WEIGHTS[k]]
    o, tid = opts(ignore_base=ignore_base), TensorId("w", n)
    ref = MS.reference(tid, b, fts, p, o, torch.float32).out
    for chunk in (None, 1, 7, 4097, 3 * 4096 + 5, n - 1):
        got = run_chunked(MS, tid, b, fts, p, o, torch.float32, chunk).out
        assert same_bytes(got, ref), chunk


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("use_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_close_to_numpy_multislerp(k, use_base, normalize):
    b, fts = family(20000, k, 2)
    p = [ModelParams(w) for w in WEIGHTS[k]]
    o = opts(ignore_base=float(not use_base), normalize_weights=float(normalize))
    got = run_chunked(MS, TensorId("w", 20000), b, fts, p, o, torch.float32, 5000).out
    want = numpy_multislerp(
        WEIGHTS[k], [f.numpy() for f in fts], b.numpy() if use_base else None, normalize
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_one_model_is_returned_as_is():
    b, fts = family(5000, 1, 3, torch.bfloat16)
    got = run_chunked(
        MS, TensorId("w", 5000), b, fts, [ModelParams(0.3)], opts(), torch.float32, 4096
    ).out
    assert torch.equal(got, fts[0].float())


def test_antipodal_pair_falls_back_to_linear_and_three_raise():
    b = torch.zeros(3000)
    d = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    p = [ModelParams(1.0), ModelParams(1.0)]
    got = MS.reference(TensorId("w", 3000), b, [d, -d], p, opts(), torch.float32).out
    want = numpy_multislerp([1.0, 1.0], [d.numpy(), -d.numpy()], b.numpy())
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7)
    assert float(got.abs().max()) == 0.0
    p3 = [ModelParams(1.0), ModelParams(1.0), ModelParams(2.0)]
    with pytest.raises(ValueError, match="zero"):
        MS.reference(TensorId("w", 3000), b, [d, d, -d], p3, opts(), torch.float32)


def test_run_merge_equals_reference_merge(tmp_path: Path):
    base, fts = make_family(tmp_path / "m", k=3)
    models = [
        {"model": str(f), "parameters": {"weight": w}}
        for f, w in zip(fts, [[1.0, 0.2], 0.5, 0.7], strict=True)
    ]
    doc = {"merge_method": "multislerp", "base_model": str(base), "models": models}
    recipe = parse_recipe(doc)
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(got)
