"""SCE: chunked == reference at awkward chunk lengths, agreement with an independent float64
rendering of mergekit's ``sce_merge``, parameter forms and the engine end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from test_method_family import check_engine
from test_streaming_equals_reference import same_bytes

from streammerge import parse_recipe
from streammerge.methods import METHODS, TensorId
from streammerge.methods.base import run_chunked
from streammerge.methods.sce import select_count

SCE = METHODS["sce"]
F32 = torch.float32


def data(n, k, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    if ties:
        fts = [base + torch.randint(-6, 7, (n,), generator=g) / 256 for _ in range(k)]
    else:
        fts = [base + torch.randn(n, generator=g) * 0.01 for _ in range(k)]
    return base.to(dtype), [f.to(dtype) for f in fts]


def setup(k, fraction):
    return [SCE.model_params({}) for _ in range(k)], SCE.options({"select_topk": fraction})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [1.0, 0.37, 0.0])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_chunked_equals_reference(dtype, fraction, ties, k):
    n = 1203
    base, fts = data(n, k, dtype, seed=k, ties=ties)
    ps, opts = setup(k, fraction)
    tid = TensorId("model.layers.2.self_attn.o_proj.weight", n)
    ref = SCE.reference(tid, base, fts, ps, opts, F32)
    assert ref.masks is None
    for chunk in (8, 40, 136, 1000, n - 1):
        got = run_chunked(SCE, tid, base, fts, ps, opts, F32, chunk)
        assert same_bytes(got.out, ref.out), chunk


def mergekit_float64(base, fts, fraction):
    """mergekit 0.1.5's sce_merge, in float64 numpy."""
    b = base.astype(np.float64)
    tvs = np.stack([f.astype(np.float64) - b for f in fts])
    if fraction < 1:
        var = tvs.var(axis=0)
        k = int(np.count_nonzero(var) * fraction) if fraction > 0 else 0
        mask = np.zeros(b.size)
        mask[np.argsort(-var, kind="stable")[:k]] = 1
        tvs = tvs * mask
    elected = np.where(tvs.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(tvs) == elected
    w = (tvs**2).mean(axis=1)
    w = np.full(len(fts), 1 / len(fts)) if abs(w.sum()) < 1e-6 else w / w.sum()
    ew = w[:, None] * erase
    return b + (tvs * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("k", [2, 4])
def test_agrees_with_mergekit_formula(fraction, k):
    n = 3000
    base, fts = data(n, k, F32, seed=20 + k)
    ps, opts = setup(k, fraction)
    got = run_chunked(SCE, TensorId("t", n), base, fts, ps, opts, F32, 136)
    want = mergekit_float64(base.numpy(), [f.numpy() for f in fts], fraction)
    assert np.allclose(got.out.double().numpy(), want, rtol=1e-5, atol=1e-7)
    if fraction < 1:  # unselected positions are exactly the base
        var = np.stack([(f - base).double().numpy() for f in fts]).var(axis=0)
        kept = np.argsort(-var, kind="stable")[: int(n * fraction)]
        off = np.ones(n, dtype=bool)
        off[kept] = False
        assert np.array_equal(got.out.numpy()[off], base.numpy()[off])


def test_select_count_is_mergekits_float32_product():
    assert select_count(1000, 0.3) == int(torch.tensor(1000) * 0.3)
    assert select_count(0, 0.5) == 0
    assert select_count(7, 0.1) == 0


def test_identical_models_give_uniform_weights_and_the_model():
    base = torch.zeros(64)
    ft = torch.linspace(-1, 1, 64)
    ps, opts = setup(2, 0.5)  # variance is 0 everywhere: nothing selected, the base
    r = SCE.reference(TensorId("t", 64), base, [ft, ft], ps, opts, F32)
    assert torch.equal(r.out, base)
    ps, opts = setup(2, 1.0)  # no selection: both agree, the model itself
    r = SCE.reference(TensorId("t", 64), base, [ft, ft], ps, opts, F32)
    assert torch.allclose(r.out, ft, atol=1e-6)


def recipe(base, fts, select_topk):
    return parse_recipe({
        "merge_method": "sce",
        "base_model": str(base),
        "models": [{"model": str(f)} for f in fts],
        "parameters": {"select_topk": select_topk},
    })  # fmt: skip


@pytest.mark.parametrize("k", [2, 3])
def test_engine_matches_reference(tmp_path, k):
    base, fts = make_family(tmp_path / "models", k=k, seed=40 + k, shards=(1, 2))
    for chunk in (8, 136):
        check_engine(recipe(base, fts, 0.4), tmp_path / f"out{chunk}", chunk)


def test_gradient_and_filter_select_topk(tmp_path):
    base, fts = make_family(tmp_path / "models", k=2, seed=9)
    r = recipe(base, fts, [{"filter": "mlp", "value": 0.2}, {"value": [0.3, 1.0]}])
    check_engine(r, tmp_path / "out", 40)
