"""nearswap: chunked == in-memory reference byte for byte, close to a float64 numpy nearswap
written from mergekit's formula, its limits, recipe checks and an end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.errors import RecipeError
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.reference import reference_merge

NEARSWAP = METHODS["nearswap"]
P = [ModelParams(1.0)]


def numpy_nearswap(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mergekit's nearswap, in plain float64 numpy."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def pair(n: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * 0.02
    b = a + torch.randn(n, generator=g) * 0.002
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_reference_any_chunk(dtype):
    n = 4096 * 3 + 123
    a, b = pair(n, 1, dtype)
    opts, tid = MethodOptions(t=0.001), TensorId("w", n)
    ref = NEARSWAP.reference(tid, a, [b], P, opts, torch.float32).out
    for chunk in (None, 1, 7, 40, 4097, n - 1):
        got = run_chunked(NEARSWAP, tid, a, [b], P, opts, torch.float32, chunk).out
        assert same_bytes(got, ref), chunk


@pytest.mark.parametrize("t", [0.0, 1e-4, 0.001, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_numpy_nearswap(t, dtype):
    a, b = pair(20000, 2, dtype)
    got = run_chunked(NEARSWAP, TensorId("w", 20000), a, [b], P, MethodOptions(t=t),
                      torch.float32, 3000).out  # fmt: skip
    want = numpy_nearswap(t, a.float().numpy(), b.float().numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_limits():
    a, b = pair(5000, 3)
    tid = TensorId("w", 5000)
    zero = NEARSWAP.reference(tid, a, [b], P, MethodOptions(t=0.0), torch.float32).out
    assert torch.equal(zero, a)  # w = 0 everywhere: the base
    big = NEARSWAP.reference(tid, a, [b], P, MethodOptions(t=10.0), torch.float32).out
    assert torch.equal(big, b)  # w = 1 everywhere: the other model
    same = NEARSWAP.reference(tid, a, [a.clone()], P, MethodOptions(t=1e-3), torch.float32).out
    assert torch.equal(same, a)  # |a - b| = 0 is clamped, not divided by


def test_missing_t_and_model_count_are_refused(tmp_path):
    a, b = pair(10)
    with pytest.raises(ValueError, match="'t'"):
        NEARSWAP.reference(TensorId("w", 10), a, [b], P, MethodOptions(), torch.float32)
    base, fts = make_family(tmp_path / "m", k=2)
    doc = _recipe(base, fts, 0.001)
    with pytest.raises(RecipeError, match="model"):
        parse_recipe(doc)
    doc = _recipe(base, fts[:1], 0.001)
    del doc["parameters"]
    with pytest.raises(RecipeError, match="'t'"):
        parse_recipe(doc)


def _recipe(base, fts, t) -> dict:
    return {
        "merge_method": "nearswap",
        "base_model": str(base),
        "models": [{"model": str(p)} for p in fts],
        "parameters": {"t": t},
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_run_merge_matches_reference(tmp_path, dtype):
    base, fts = make_family(tmp_path / "m", k=1, dtype=dtype)
    recipe = parse_recipe(_recipe(base, fts, [0.005, 0.02]))
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(got)
