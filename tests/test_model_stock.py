"""model_stock: chunked == in-memory reference byte for byte (per tensor and filter_wise), close
to a plain float64 numpy port of mergekit's formula, the singular case, and end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_family
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import RecipeError, parse_recipe, run_merge
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.methods.nuslerp import ShapedTensorId
from streammerge.reference import reference_merge

MS = METHODS["model_stock"]


def numpy_model_stock(base, fts, filter_wise=False):
    """mergekit's model_stock, in plain float64 numpy."""
    shape = base.shape
    w0 = base.astype(np.float64)
    ws = [f.astype(np.float64) for f in fts]
    if filter_wise:
        if w0.ndim <= 1:
            w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    off = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(off):
        for b in off[i + 1 :]:
            npd = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cos.append(np.clip((a * b).sum(-1) / np.maximum(npd, 1e-6), -1, 1))
    c = np.expand_dims(np.stack(cos).mean(0), -1)
    n = len(ws)
    den = 1 + (n - 1) * c
    sing = np.abs(den) < 1e-6
    t = np.where(sing, 0.0, n * c / np.where(sing, 1.0, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


def family(shape, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    fts = [(b + 0.5 * common + torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    return b.to(dtype), fts


def opts(**kw):
    return MethodOptions(extra=tuple(sorted(kw.items())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("filter_wise", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(96, 437), (5, 8192), (3 * 4096 + 5,)])
def test_chunked_equals_reference_any_chunk(dtype, k, filter_wise, shape):
    b, fts = family(shape, k, 1, dtype)
    n = b.numel()
    bf, ff = b.flatten(), [f.flatten() for f in fts]
    p, tid, o = [ModelParams(1.0)] * k, ShapedTensorId("w", n, shape), opts(filter_wise=filter_wise)
    ref = MS.reference(tid, bf, ff, p, o, torch.float32).out
    for chunk in (None, 1, 7, 4097, 3 * 4096 + 5, n - 1):
        got = run_chunked(MS, tid, bf, ff, p, o, torch.float32, chunk).out
        assert same_bytes(got, ref), chunk


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(96, 437), (3000,), (4, 6, 50)])
def test_close_to_numpy_model_stock(k, filter_wise, shape):
    b, fts = family(shape, k, 2)
    tid = ShapedTensorId("w", b.numel(), shape)
    got = run_chunked(
        MS,
        tid,
        b.flatten(),
        [f.flatten() for f in fts],
        [ModelParams(1.0)] * k,
        opts(filter_wise=float(filter_wise)),
        torch.float32,
        5000,
    ).out
    want = numpy_model_stock(b.numpy(), [f.numpy() for f in fts], filter_wise)
    np.testing.assert_allclose(got.numpy(), want.reshape(-1), rtol=1e-5, atol=1e-5)


def test_row_length_stands_in_for_the_shape():
    b, fts = family((96, 437), 3, 3)
    bf, ff = b.flatten(), [f.flatten() for f in fts]
    p = [ModelParams(1.0)] * 3
    shaped = MS.reference(
        ShapedTensorId("w", bf.numel(), (96, 437)), bf, ff, p, opts(filter_wise=1.0), torch.float32
    ).out
    got = run_chunked(
        MS,
        TensorId("w", bf.numel()),
        bf,
        ff,
        p,
        opts(filter_wise=1.0, row_length=437.0),
        torch.float32,
        4097,
    ).out
    assert same_bytes(got, shaped)
    with pytest.raises(ValueError, match="row_length"):
        MS.reference(TensorId("w", bf.numel()), bf, ff, p, opts(filter_wise=1.0), torch.float32)


def test_opposite_offsets_keep_the_base():
    b = torch.randn(2000, generator=torch.Generator().manual_seed(5))
    d = torch.randn(2000, generator=torch.Generator().manual_seed(6))
    got = MS.reference(
        TensorId("w", 2000), b, [b + d, b - d], [ModelParams(1.0)] * 2, opts(), torch.float32
    ).out
    assert torch.equal(got, b)  # cos = -1: 1 + cos = 0 is singular, t = 0


@pytest.mark.parametrize("parameters", [{}, {"filter_wise": True, "row_length": 24}])
def test_run_merge_equals_reference_merge(tmp_path: Path, parameters):
    shapes = {
        "embed.weight": (37, 24),
        "layer.0.attn.weight": (24, 24),
        "layer.0.norm.weight": (24,),
        "layer.1.mlp.weight": (50, 24),
    }
    base, fts = make_family(tmp_path / "m", k=3, shapes=shapes)
    doc = {
        "merge_method": "model_stock",
        "base_model": str(base),
        "models": [{"model": str(p)} for p in [base, *fts]],
        "parameters": parameters,
    }
    recipe = parse_recipe(doc)
    assert len(recipe.models) == 3  # the base listed among the models is the base
    run_merge(recipe, tmp_path / "out", chunk_elems=40, max_memory=2**30)
    got = load_output(tmp_path / "out")
    n = 0
    for name, expected, _ in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        n += 1
    assert n == len(shapes)


def test_one_model_is_refused(tmp_path: Path):
    base, fts = make_family(tmp_path / "m", k=1)
    doc = {"merge_method": "model_stock", "base_model": str(base), "models": [str(fts[0])]}
    with pytest.raises(RecipeError, match="model"):
        parse_recipe(doc)


def test_model_card_shows_filter_wise(tmp_path: Path):
    base, fts = make_family(tmp_path / "m", k=2)
    doc = {
        "merge_method": "model_stock",
        "base_model": str(base),
        "models": [{"model": str(f)} for f in fts],
    }
    run_merge(parse_recipe(doc), tmp_path / "out", chunk_elems=4096, max_memory=2**30)
    assert "| # | model | filter_wise |" in (tmp_path / "out" / "README.md").read_text()
