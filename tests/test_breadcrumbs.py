"""Model Breadcrumbs (``breadcrumbs``, ``breadcrumbs_ties``): chunked == reference at awkward
chunk lengths, agreement with an independent float64 rendering of mergekit's
``magnitude_outliers`` + GTA formula, parameter forms and the engine end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from test_method_family import check_engine, family_recipe
from test_streaming_equals_reference import same_bytes

from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.methods.breadcrumbs import breadcrumbs_window

F32 = torch.float32
NAMES = ["breadcrumbs", "breadcrumbs_ties"]
LAYERED = {
    "model.layers.0.mlp.up_proj.weight": (16, 24),
    "model.layers.0.self_attn.q_proj.weight": (24, 24),
    "model.layers.1.mlp.up_proj.weight": (16, 24),
    "model.layers.1.self_attn.q_proj.weight": (24, 24),
}
"""Two layers, so a gradient [a, b] gives a in layer 0 and b in layer 1."""


def params(weights, density, gamma):
    return [ModelParams(w, density=density, extra=(("gamma", gamma),)) for w in weights]


def data(n, k, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    if ties:
        fts = [base + torch.randint(-6, 7, (n,), generator=g) / 256 for _ in range(k)]
    else:
        fts = [base + torch.randn(n, generator=g) * 0.01 for _ in range(k)]
    return base.to(dtype), [f.to(dtype) for f in fts]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_chunked_equals_reference(name, dtype, rescale, ties):
    n = 1203
    base, fts = data(n, 3, dtype, seed=5, ties=ties)
    method = METHODS[name]
    ps = [ModelParams(1.0, density=0.4, extra=(("gamma", 0.05),)),
          ModelParams(-0.6, density=0.7, extra=(("gamma", 0.4),)),  # windows overlap: shrunk
          ModelParams(0.9, density=0.2, extra=(("gamma", 0.0),))]  # fmt: skip
    opts = MethodOptions(rescale=rescale, normalize=name == "breadcrumbs_ties")
    tid = TensorId("model.layers.3.mlp.down_proj.weight", n)
    ref = method.reference(tid, base, fts, ps, opts, torch.float32)
    for chunk in (8, 40, 136, 1000, n - 1):
        got = run_chunked(method, tid, base, fts, ps, opts, torch.float32, chunk)
        assert same_bytes(got.out, ref.out), chunk
        for a, b in zip(got.masks, ref.masks, strict=True):
            assert torch.equal(a, b), chunk


def test_window_matches_mergekit_slice():
    # mergekit: ascending sort, keep [n_bot, n_bot + target), n_bot = max(0, N - target - n_top)
    for numel, density, gamma in [
        (100, 0.9, 0.01),
        (100, 0.5, 0.2),
        (50, 0.99, 0.5),
        (7, 0.3, 0.01),
    ]:
        target, n_top = int(density * numel), int(gamma * numel)
        n_bot = max(0, numel - target - n_top)
        asc = set(range(n_bot, n_bot + target))  # ascending ranks kept
        skip, tgt = breadcrumbs_window(numel, density, gamma)
        desc = {numel - 1 - r for r in range(skip, skip + tgt)}
        assert asc == desc, (numel, density, gamma)


def mergekit_float64(base, fts, weights, densities, gammas, consensus, normalize, rescale, lam):
    """mergekit 0.1.5's magnitude_outliers + generalized task arithmetic, in float64 numpy."""
    b = base.astype(np.float64)
    deltas = []
    for f, dens, gam in zip(fts, densities, gammas, strict=True):
        d = f.astype(np.float64) - b
        if dens < 1:
            n = d.size
            target, n_top = int(dens * n), int(gam * n)
            n_bot = max(0, n - target - n_top)
            idx = np.argsort(np.abs(d), kind="stable")
            mask = np.zeros(n)
            mask[idx[n_bot : n_bot + target]] = 1
            masked = d * mask
            if rescale:
                before, after = np.abs(d).sum(), np.abs(masked).sum()
                if before >= 1e-7 and after >= 1e-7:
                    masked = masked * (before / after)
            d = masked
        deltas.append(d)
    w = np.array(weights, dtype=np.float64)[:, None]
    wd = np.stack(deltas) * w
    if consensus:
        elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        keep = np.sign(wd) == elected
        mixed = (wd * keep).sum(0)
        div = (w * keep).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum()
        div = 1.0 if abs(div) < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_agrees_with_mergekit_formula(name, rescale, normalize):
    n = 2000
    base, fts = data(n, 3, torch.float32, seed=11)
    weights, dens, gams = [1.0, 0.5, -0.3], [0.3, 0.8, 1.0], [0.01, 0.1, 0.05]
    ps = [ModelParams(w, density=d, extra=(("gamma", g),))
          for w, d, g in zip(weights, dens, gams, strict=True)]  # fmt: skip
    opts = MethodOptions(rescale=rescale, normalize=normalize, lambda_=0.7)
    tid = TensorId("t", n)
    got = run_chunked(METHODS[name], tid, base, fts, ps, opts, torch.float32, 136)
    want = mergekit_float64(base.numpy(), [f.numpy() for f in fts], weights, dens, gams,
                            name == "breadcrumbs_ties", normalize, rescale, 0.7)  # fmt: skip
    assert np.allclose(got.out.double().numpy(), want, rtol=1e-5, atol=1e-6)
    # the masks are exactly mergekit's kept positions (tie-free data, no zero deltas)
    b = base.double()
    for f, m, d, g in zip(fts, got.masks, dens, gams, strict=True):
        delta = (f.double() - b).numpy()
        if d >= 1:
            assert bool(m.all())
            continue
        target, n_top = int(d * n), int(g * n)
        n_bot = max(0, n - target - n_top)
        expect = np.zeros(n, dtype=bool)
        expect[np.argsort(np.abs(delta), kind="stable")[n_bot : n_bot + target]] = True
        assert np.array_equal(m.numpy(), expect)


@pytest.mark.parametrize("name", NAMES)
def test_density_one_keeps_everything_and_small_tensors_drop_no_outliers(name):
    base, fts = data(50, 2, torch.float32, seed=1)
    tid = TensorId("norm", 50)
    r = METHODS[name].reference(tid, base, fts, params([1.0, 1.0], 1.0, 0.5), MethodOptions(),
                                torch.float32)  # fmt: skip
    assert all(bool(m.all()) for m in r.masks)
    # 50 elements at gamma 0.01: int(0.5) = 0 outliers, so the top half is kept (mergekit 0.1.5
    # slices [n_bot : n_bot + target], which no longer zeroes the delta when n_top == 0)
    r = METHODS[name].reference(tid, base, fts, params([1.0, 1.0], 0.5, 0.01), MethodOptions(),
                                torch.float32)  # fmt: skip
    for f, m in zip(fts, r.masks, strict=True):
        mag = (f - base).abs()
        assert int(m.sum()) == 25
        assert float(mag[m].min()) >= float(mag[~m].max())


def test_gamma_drops_the_largest():
    base = torch.zeros(10)
    ft = torch.arange(1.0, 11.0)
    ps = params([1.0], 0.5, 0.2)
    r = METHODS["breadcrumbs"].reference(TensorId("t", 10), base, [ft], ps, MethodOptions(), F32)
    assert r.masks[0].int().tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert r.out.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [2, 3])
def test_engine_matches_reference(tmp_path, name, k):
    base, fts = make_family(tmp_path / "models", k=k, seed=30 + k, shards=(1, 2))
    recipe = family_recipe(base, fts, name, [1.0, 0.5, -0.7][:k], density=0.5, gamma=0.1,
                           rescale=True)  # fmt: skip
    for chunk in (8, 136):
        check_engine(recipe, tmp_path / f"out{chunk}", chunk)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_density_and_gamma(tmp_path, name):
    base, fts = make_family(tmp_path / "models", k=2, seed=7, shapes=LAYERED)
    recipe = family_recipe(
        base, fts, name, [1.0, 0.6], density=[0.2, 0.9],
        gamma=[{"filter": "mlp", "value": 0.2}, {"value": [0.0, 0.1]}],
    )  # fmt: skip
    store = check_engine(recipe, tmp_path / "out", 40)
    info = store.info
    assert info[(0, "model.layers.0.mlp.up_proj.weight")]["density"] == pytest.approx(0.2)
    assert info[(0, "model.layers.1.mlp.up_proj.weight")]["density"] == pytest.approx(0.9)
    assert info[(1, "model.layers.1.self_attn.q_proj.weight")]["density"] == pytest.approx(0.9)
