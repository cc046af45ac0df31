"""DELLA (``della``, ``della_linear``): exact streamed ranks (chunked == reference at awkward
chunk lengths, every radix level exercised), agreement with an independent float64 rendering
of mergekit's ``della_magprune`` + GTA formula on the same random stream, parameter forms and
the engine end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_family
from test_method_family import check_engine, family_recipe
from test_streaming_equals_reference import same_bytes

from streammerge import RecipeError
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.methods.select import dare_keep, uniforms

NAMES = ["della", "della_linear"]
F32 = torch.float32
LAYERED = {
    "model.layers.0.mlp.up_proj.weight": (16, 24),
    "model.layers.0.self_attn.q_proj.weight": (24, 24),
    "model.layers.1.mlp.up_proj.weight": (16, 24),
    "model.layers.1.self_attn.q_proj.weight": (24, 24),
}


def data(n, k, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    if ties:
        fts = [base + torch.randint(-6, 7, (n,), generator=g) / 256 for _ in range(k)]
    else:
        fts = [base + torch.randn(n, generator=g) * 0.01 for _ in range(k)]
    return base.to(dtype), [f.to(dtype) for f in fts]


PARAMS = [
    ModelParams(1.0, density=0.5, extra=(("epsilon", 0.2),)),
    ModelParams(-0.6, density=0.3, extra=(("epsilon", 0.1),)),
    ModelParams(0.9, density=1.0, extra=(("epsilon", 0.15),)),  # density 1: no drop
]


def check_chunks(name, base, fts, ps, opts, dtype, chunks):
    n = base.numel()
    tid = TensorId("model.layers.5.self_attn.k_proj.weight", n)
    ref = METHODS[name].reference(tid, base, fts, ps, opts, dtype)
    for chunk in chunks:
        got = run_chunked(METHODS[name], tid, base, fts, ps, opts, dtype, chunk)
        assert same_bytes(got.out, ref.out), chunk
        for a, b in zip(got.masks, ref.masks, strict=True):
            assert torch.equal(a, b), chunk
    return ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_chunked_equals_reference(name, dtype, ties, rescale):
    n = 1203
    base, fts = data(n, 3, dtype, seed=3, ties=ties)
    opts = MethodOptions(seed=5, rescale=rescale)
    check_chunks(name, base, fts, PARAMS, opts, F32, (8, 40, 136, 1000, n - 1))


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_every_radix_level_is_exercised_and_exact(compute):
    # half Gaussian, half 1 + j * 2^-23 (j < 128): those share their top 24 key bits, so their
    # ranks are only settled by the last 7-bit digit and the index-order tie counts
    n = 20_001
    g = torch.Generator().manual_seed(8)
    base = torch.zeros(n)
    fts = []
    for _ in range(2):
        near_one = 1 + torch.randint(0, 128, (n,), generator=g).double() * 2.0**-23
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        ft = torch.where(torch.arange(n) % 2 == 0, near_one * sign, torch.randn(n, generator=g))
        fts.append(ft.float())
    opts = MethodOptions(seed=2)
    check_chunks("della", base, fts, PARAMS[:2], opts, compute, (40, 7_336, n - 1))
    st = METHODS["della"].new_state(TensorId("t", n), PARAMS[:2], opts, compute)
    for p in range(METHODS["della"].stats_passes(PARAMS[:2], opts, compute)):
        METHODS["della"].accumulate(st, p, 0, base, fts)
        METHODS["della"].end_pass(st, p)
    rows = [t.numel() for t in st.rankers[0].prefixes]
    if compute == torch.float32:  # 16 + 8 + 7 bits: undecided bins reach the last digit
        assert len(rows) == 3 and rows[1] > 0 and rows[2] > 0
    else:
        assert rows == [1]


def test_uniforms_are_dares_stream():
    u = uniforms(7, 1, 1234, 100, 70_000)
    assert torch.equal(u < 0.3, dare_keep(7, 1, 1234, 100, 70_000, 0.3))
    assert torch.equal(u[1000:2000], uniforms(7, 1, 1234, 1100, 2100))


def mergekit_float64(base, fts, ps, u, consensus, normalize, rescale, lam, row=None):
    """mergekit 0.1.5's della_magprune (ranks within rows of ``row`` elements; None: one row)
    + generalized task arithmetic, float64 numpy, with the same uniform draws ``u`` in place of
    torch.bernoulli's."""
    b = base.astype(np.float64)
    n = b.size
    row = row or n
    deltas, masks = [], []
    for f, p, uk in zip(fts, ps, u, strict=True):
        d = f.astype(np.float64) - b
        dens, eps = p.density, p.get("epsilon")
        if dens >= 1:
            masks.append(np.ones(n, dtype=bool))
            deltas.append(d)
            continue
        mag = np.abs(d).reshape(-1, row)
        ranks = np.argsort(np.argsort(mag, axis=1, kind="stable"), axis=1, kind="stable") + 1.0
        lo, hi = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
        norm = np.clip((ranks - lo) / (hi - lo), 0, 1)
        probs = (dens - eps) + norm * 2 * eps
        mask = uk < probs.reshape(-1)
        masked = d * mask
        if rescale:
            before, after = np.abs(d).sum(), np.abs(masked).sum()
            if before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
        masks.append(mask)
        deltas.append(masked)
    w = np.array([p.weight for p in ps])[:, None]
    wd = np.stack(deltas) * w
    if consensus:
        elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        keep = np.sign(wd) == elected
        mixed, div = (wd * keep).sum(0), (w * keep).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), w.sum()
        div = 1.0 if abs(div) < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return b + lam * mixed, masks


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rescale", [False, True])
def test_agrees_with_mergekit_formula(name, rescale):
    n = 3000
    base, fts = data(n, 3, F32, seed=13)
    normalize = name == "della"  # mergekit's defaults
    opts = MethodOptions(seed=9, rescale=rescale, lambda_=0.8)
    tid = TensorId("t", n)
    got = run_chunked(METHODS[name], tid, base, fts, PARAMS, opts, F32, 136)
    u = [uniforms(9, k, tid.key, 0, n).numpy() for k in range(3)]
    want, masks = mergekit_float64(base.numpy(), [f.numpy() for f in fts], PARAMS, u,
                                   name == "della", normalize, rescale, 0.8)  # fmt: skip
    for m, w in zip(got.masks, masks, strict=True):
        assert np.array_equal(m.numpy(), w)
    assert np.allclose(got.out.double().numpy(), want, rtol=1e-5, atol=1e-6)
    kept = [float(m.float().mean()) for m in got.masks]
    assert abs(kept[0] - 0.5) < 0.04 and abs(kept[1] - 0.3) < 0.04  # the expected density


@pytest.mark.parametrize("name", NAMES)
def test_a_matrix_is_ranked_within_each_row_as_mergekit_does(name):
    """mergekit ranks a 2-D weight row by row: every row gets the whole keep-probability ramp,
    whatever its scale. Rows here differ in scale by 10^3, so tensor-wide ranks would keep
    about d - e of the small rows and d + e of the large ones."""
    rows, cols = 24, 40
    n = rows * cols
    base, fts = data(n, 3, F32, seed=21)
    scale = torch.logspace(-3, 0, rows).repeat_interleave(cols)
    fts = [base + (f - base) * scale for f in fts]
    opts = MethodOptions(seed=5, rescale=True)
    tid = TensorId("model.layers.3.mlp.down_proj.weight", n, (rows, cols))
    u = [uniforms(5, k, tid.key, 0, n).numpy() for k in range(3)]
    consensus = name == "della"  # and normalize, mergekit's defaults
    want, masks = mergekit_float64(base.numpy(), [f.numpy() for f in fts], PARAMS, u,
                                   consensus, consensus, True, 1.0, row=cols)  # fmt: skip
    ref = METHODS[name].reference(tid, base, fts, PARAMS, opts, F32)
    for m, w, f in zip(ref.masks, masks, fts, strict=True):
        assert np.array_equal(m.numpy(), w & (f != base).numpy())  # a zero delta is not "kept"
    assert np.allclose(ref.out.double().numpy(), want, rtol=1e-5, atol=1e-6)
    per_row = ref.masks[0].view(rows, cols).float().mean(1)
    assert abs(float(per_row[: rows // 2].mean()) - float(per_row[rows // 2 :].mean())) < 0.1
    # streamed: chunks of whole rows, even where the requested length cuts one
    assert METHODS[name].alignment(PARAMS, (rows, cols)) == 40
    assert METHODS[name].stats_passes(PARAMS, opts, F32, (rows, cols)) == 1  # the L1 norms only
    for chunk in (1, 7, 136, 1000):
        got = run_chunked(METHODS[name], tid, base, fts, PARAMS, opts, F32, chunk)
        assert same_bytes(got.out, ref.out), chunk
        for a, b in zip(got.masks, ref.masks, strict=True):
            assert torch.equal(a, b), chunk


def test_larger_magnitudes_are_kept_more_often():
    n = 20_000
    base, fts = data(n, 1, F32, seed=1)
    ps = [ModelParams(1.0, density=0.5, extra=(("epsilon", 0.4),))]
    r = METHODS["della_linear"].reference(TensorId("t", n), base, fts, ps, MethodOptions(), F32)
    mag = (fts[0] - base).abs()
    small, large = mag < mag.median(), mag >= mag.median()
    assert float(r.masks[0][large].float().mean()) > float(r.masks[0][small].float().mean()) + 0.3


@pytest.mark.parametrize("name", NAMES)
def test_epsilon_must_keep_probabilities_inside(name, tmp_path):
    m = METHODS[name]
    with pytest.raises(ValueError, match="epsilon"):
        m.model_params({"weight": 1.0, "density": 0.1, "epsilon": 0.15})
    with pytest.raises(ValueError, match="epsilon"):
        m.model_params({"weight": 1.0, "density": 0.9, "epsilon": 0.15})
    m.model_params({"weight": 1.0, "density": 1.0, "epsilon": 0.15})  # no drop: no check
    base, fts = make_family(tmp_path / "models", k=2, seed=3)
    with pytest.raises(RecipeError, match="epsilon"):
        family_recipe(base, fts, name, [1.0, 1.0], density=0.05)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [2, 3])
def test_engine_matches_reference(tmp_path, name, k):
    base, fts = make_family(tmp_path / "models", k=k, seed=50 + k, shards=(1, 2))
    recipe = family_recipe(base, fts, name, [1.0, 0.5, -0.7][:k], density=0.5, epsilon=0.2,
                           random_seed=11)  # fmt: skip
    for chunk in (8, 136):
        check_engine(recipe, tmp_path / f"out{chunk}", chunk)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_density_and_epsilon(tmp_path, name):
    base, fts = make_family(tmp_path / "models", k=2, seed=17, shapes=LAYERED)
    recipe = family_recipe(
        base, fts, name, [1.0, 0.6], density=[0.3, 0.7],
        epsilon=[{"filter": "mlp", "value": 0.05}, {"value": [0.1, 0.2]}],
    )  # fmt: skip
    store = check_engine(recipe, tmp_path / "out", 40)
    info = store.info
    assert info[(0, "model.layers.0.mlp.up_proj.weight")]["density"] == pytest.approx(0.3)
    assert info[(1, "model.layers.1.self_attn.q_proj.weight")]["density"] == pytest.approx(0.7)
