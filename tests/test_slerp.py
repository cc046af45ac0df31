"""slerp: chunked == in-memory reference byte for byte, close to a plain float64 numpy slerp
written from mergekit's formula, colinear fallback, end points, gradients, and a CLI run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_family
from safetensors.torch import load_file

from streammerge.errors import RecipeError
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.plan import layer_positions
from streammerge.recipe import parse_recipe

SLERP = METHODS["slerp"]
P = [ModelParams(1.0)]


def numpy_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit's slerp, in plain float64 numpy."""
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.sum((a / na if na > 1e-8 else a) * (b / nb if nb > 1e-8 else b))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = np.arccos(dot)
    return np.sin((1 - t) * th) / np.sin(th) * a + np.sin(t * th) / np.sin(th) * b


def pair(n: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.3, 0.77])
def test_chunked_equals_reference_any_chunk(dtype, t):
    n = 4096 * 11 + 123
    b, f = pair(n, 1, dtype)
    opts, tid = MethodOptions(t=t), TensorId("w", n)
    ref = SLERP.reference(tid, b, [f], P, opts, torch.float32).out
    for chunk in (None, 1, 4097, 3 * 4096 + 5, 10000, n - 1):
        got = run_chunked(SLERP, tid, b, [f], P, opts, torch.float32, chunk).out
        assert got.numpy().tobytes() == ref.numpy().tobytes(), chunk


def test_bytes_do_not_depend_on_the_thread_count():
    """A BLAS dot splits its work by threads and rounds differently with 1 or 2 of them; the
    statistics must not, or the same merge gives other bytes on a machine (or Ray worker) with
    another CPU count. float64 output shows changes of the coefficients; with a per-block
    ``torch.dot`` 4 of these 20 tensors came out different."""
    n = 4096 * 7 + 11
    before = torch.get_num_threads()
    try:
        for seed in range(20):
            b, f = pair(n, seed, torch.float64)
            f = 0.3 * b + f
            outs = set()
            for threads in (1, 2):
                torch.set_num_threads(threads)
                ref = SLERP.reference(TensorId("w", n), b, [f], P, MethodOptions(t=0.4),
                                      torch.float64)  # fmt: skip
                outs.add(ref.out.numpy().tobytes())
            assert len(outs) == 1, seed
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_close_to_numpy_slerp(t):
    b, f = pair(30000, 2)
    f = 0.6 * b + f  # partly aligned: a non-trivial angle
    got = run_chunked(SLERP, TensorId("w", 30000), b, [f], P, MethodOptions(t=t), torch.float32,
                      5000).out  # fmt: skip
    want = numpy_slerp(t, b.numpy(), f.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # and it is not the lerp: the spherical path differs here
    assert not np.allclose(want, (1 - t) * b.numpy() + t * f.numpy(), rtol=1e-3, atol=1e-4)


def test_colinear_falls_back_to_lerp():
    b, _ = pair(5000, 3)
    f = 2.5 * b  # cos = 1: arccos would give theta 0 and 0/0
    got = SLERP.reference(TensorId("w", 5000), b, [f], P, MethodOptions(t=0.25), torch.float32)
    want = 0.75 * b.double().numpy() + 0.25 * f.double().numpy()
    assert np.isfinite(got.out.numpy()).all()
    np.testing.assert_allclose(got.out.numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(got.out.numpy(), numpy_slerp(0.25, b.numpy(), f.numpy()), rtol=1e-6)


def test_zero_tensor_is_finite():
    b = torch.zeros(100)
    f = torch.ones(100)
    got = SLERP.reference(TensorId("w", 100), b, [f], P, MethodOptions(t=0.5), torch.float32).out
    np.testing.assert_allclose(got.numpy(), numpy_slerp(0.5, b.numpy(), f.numpy()), atol=1e-6)


def test_end_points():
    b, f = pair(9000, 4)
    tid = TensorId("w", 9000)
    zero = run_chunked(SLERP, tid, b, [f], P, MethodOptions(t=0.0), torch.float32, 4096).out
    one = run_chunked(SLERP, tid, b, [f], P, MethodOptions(t=1.0), torch.float32, 4096).out
    assert torch.equal(zero, b)
    np.testing.assert_allclose(one.numpy(), f.numpy(), rtol=1e-5, atol=1e-6)


def test_missing_t_is_refused():
    b, f = pair(10)
    with pytest.raises(ValueError, match="'t'"):
        SLERP.reference(TensorId("w", 10), b, [f], P, MethodOptions(), torch.float32)


def _recipe(root: Path, base: Path, fts: list[Path], t: object) -> dict:
    models = [{"model": str(p)} for p in [base, *fts]]
    return {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": models,
        "parameters": {"t": t},
    }


def test_recipe_checks(tmp_path):
    base, fts = make_family(tmp_path / "m", k=2)
    with pytest.raises(RecipeError, match="exactly one model"):
        parse_recipe(_recipe(tmp_path, base, fts, 0.5))
    doc = _recipe(tmp_path, base, fts[:1], 0.5)
    del doc["parameters"]
    with pytest.raises(RecipeError, match="'t'"):
        parse_recipe(doc)


def test_gradient_t_across_layers(tmp_path):
    base, fts = make_family(tmp_path / "m", k=1)
    r = parse_recipe(_recipe(tmp_path, base, fts, [0.0, 0.5, 1.0]))
    assert [r.options("layer.3.w", x).t for x in (0.0, 0.25, 0.5, 1.0)] == [0.0, 0.25, 0.5, 1.0]
    filt = [{"filter": "attn", "value": [1.0, 0.0]}, {"value": 0.4}]
    r = parse_recipe(_recipe(tmp_path, base, fts, filt))
    assert r.options("layer.0.attn.weight", 0.25).t == 0.75
    assert r.options("layer.0.mlp.weight", 0.25).t == 0.4


def test_cli_run_matches_reference(tmp_path):
    import yaml

    base, fts = make_family(tmp_path / "m", k=1)
    doc = _recipe(tmp_path, base, fts, [0.2, 0.8])
    rec = tmp_path / "slerp.yaml"
    rec.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streammerge", "run", str(rec), str(out), "--no-progress",
           "--chunk-elems", "4096"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    assert "| # | model | t |" in (out / "README.md").read_text()
    got = load_file(out / "model-00001-of-00001.safetensors")
    b, f = (load_file(p / "model.safetensors") for p in (base, fts[0]))
    recipe = parse_recipe(doc)
    pos = layer_positions(list(b))
    for name, x in b.items():
        if not x.is_floating_point():
            assert torch.equal(got[name], x)
            continue
        opts = recipe.options(name, pos[name])
        want = SLERP.reference(TensorId(name, x.numel()), x, [f[name]], P, opts, torch.float32)
        assert got[name].dtype == x.dtype
        assert torch.equal(got[name].flatten(), want.out.to(x.dtype)), name
