"""ram / ramplus_tl: chunked == in-memory reference byte for byte, close to a float64 numpy
implementation of mergekit's formulas, the unique/shared cases, recipe defaults and an
end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.reference import reference_merge

RAM = METHODS["ram"]
RAMPLUS = METHODS["ramplus_tl"]


def numpy_ram(base, fts, eps=1e-5, r=None, alpha=0.2):
    """mergekit's ram (``r`` None) or ramplus_tl in float64 numpy."""
    b = base.astype(np.float64).ravel()
    tv = np.stack([f.astype(np.float64).ravel() - b for f in fts])
    nz = np.abs(tv) > eps
    c = nz.sum(axis=0, keepdims=True)
    unique, overlap = c == 1, c > 1
    lam = np.ones((len(fts), 1))
    if r is not None:
        shared = (nz & overlap).sum(axis=1)
        uniq = (nz & unique).sum(axis=1)
        rho = shared / np.maximum(uniq, eps)
        lam = (1 + r * np.clip(rho, 0, alpha))[:, None]
    z = tv * nz
    return b + (z * unique * lam + z * overlap / np.maximum(c, 1)).sum(axis=0)


def family(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A base and k models, each changing a random part of the elements (some overlap)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    fts = []
    for _ in range(k):
        touched = torch.rand(n, generator=g) < 0.4
        fts.append((base + touched * torch.randn(n, generator=g) * 1e-2).to(dtype))
    return base.to(dtype), fts


def params(k: int) -> list[ModelParams]:
    return [ModelParams(1.0)] * k


def options(method, **values) -> MethodOptions:
    spec = METHODS[method].spec
    return METHODS[method].options({p.name: values.get(p.name, p.default) for p in spec.params})


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_chunked_equals_reference_any_chunk(method, dtype, k):
    m = METHODS[method]
    n = 4096 * 2 + 77
    base, fts = family(n, k, 1, dtype)
    opts, tid = options(method), TensorId("w", n)
    ref = m.reference(tid, base, fts, params(k), opts, torch.float32).out
    for chunk in (None, 1, 7, 40, 4097, n - 1):
        got = run_chunked(m, tid, base, fts, params(k), opts, torch.float32, chunk).out
        assert same_bytes(got, ref), chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, 3e-3])
def test_ram_close_to_numpy(dtype, eps):
    base, fts = family(20000, 3, 2, dtype)
    got = run_chunked(RAM, TensorId("w", 20000), base, fts, params(3), options("ram", epsilon=eps),
                      torch.float32, 3000).out  # fmt: skip
    want = numpy_ram(base.float().numpy(), [f.float().numpy() for f in fts], eps)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-8)


def test_ram_unique_and_shared_elements():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([0.0, 4.0, 0.0, 1e-6])  # last: below epsilon, not active
    got = RAM.reference(TensorId("w", 4), base, [a, b], params(2), options("ram"),
                        torch.float32).out  # fmt: skip
    assert got.tolist() == [1.0, 3.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("r", "alpha", "eps"), [(0.1, 0.2, 1e-5), (0.5, 0.8, 3e-3), (2.0, 5.0, 1e-4)]
)
def test_ramplus_close_to_numpy(dtype, r, alpha, eps):
    base, fts = family(20000, 3, 3, dtype)
    opts = options("ramplus_tl", r=r, alpha=alpha, epsilon=eps)
    got = run_chunked(RAMPLUS, TensorId("w", 20000), base, fts, params(3), opts, torch.float32,
                      3000).out  # fmt: skip
    want = numpy_ram(base.float().numpy(), [f.float().numpy() for f in fts], eps, r, alpha)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-8)
    plain = numpy_ram(base.float().numpy(), [f.float().numpy() for f in fts], eps)
    assert not np.allclose(want, plain, rtol=1e-6, atol=1e-8)  # the boost does change things


def test_ramplus_boost():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 0.0])  # unique 3, shared 1
    b = torch.tensor([0.0, 0.0, 0.0, 4.0, 1.0, 0.0])  # unique 1, shared 1
    opts = options("ramplus_tl", r=0.5, alpha=0.5)
    got = RAMPLUS.reference(TensorId("w", 6), base, [a, b], params(2), opts, torch.float32).out
    la = 1 + 0.5 * (1 / 3)  # rho 1/3 (below alpha)
    lb = 1 + 0.5 * 0.5  # rho 1, clipped to alpha
    np.testing.assert_allclose(got.numpy(), [la, la, la, 3.0, lb, 0.0], rtol=1e-7)
    one = RAMPLUS.reference(TensorId("w", 6), base, [a], params(1), opts, torch.float32).out
    assert torch.equal(one, a)  # one model: nothing shared, lambda 1


def _recipe(method, base, fts, **parameters) -> dict:
    doc = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p)} for p in fts],
    }
    if parameters:
        doc["parameters"] = parameters
    return doc


def test_defaults_are_mergekits(tmp_path):
    base, fts = make_family(tmp_path / "m", k=2)
    r = parse_recipe(_recipe("ram", base, fts))
    assert r.options("layer.0.mlp.weight", 0.0).get("epsilon") == 1e-5
    o = parse_recipe(_recipe("ramplus_tl", base, fts)).options("layer.0.mlp.weight", 0.0)
    assert (o.get("r"), o.get("alpha"), o.get("epsilon")) == (0.1, 0.2, 1e-5)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_run_merge_matches_reference(tmp_path, method, dtype):
    base, fts = make_family(tmp_path / "m", k=3, dtype=dtype)
    recipe = parse_recipe(_recipe(method, base, fts, epsilon=0.004))
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(got)
