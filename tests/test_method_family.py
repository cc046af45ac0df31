"""TIES, DARE, magnitude, linear and TADrop: reference vectors, corner cases, and the engine's
chunked streaming output against the in-memory reference, through mergekit-style recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_family, thin
from test_methods import TAU_A, call, close
from test_streaming_equals_reference import load_output, same_bytes

from streammerge import parse_recipe, run_merge
from streammerge.mask_store import MemoryMaskStore, ZarrMaskStore
from streammerge.methods import METHODS, MethodOptions, ModelParams
from streammerge.methods.select import dare_keep
from streammerge.reference import reference_merge
from streammerge.synth import generate_family

PATHS = ["merge", "reference"]
F32 = torch.float32


def run(name, path, deltas, weights, density=1.0, base=None, chunk=None, **options):
    base = torch.zeros(len(deltas[0])) if base is None else base
    fts = [base + torch.tensor(d) for d in deltas]
    params = [ModelParams(w, density=density) for w in weights]
    return call(METHODS[name], path, base, fts, params, MethodOptions(**options), F32, chunk)


# ---------------------------------------------------------------------------------------------
# Reference vectors (cabs_spec.md §11)


@pytest.mark.parametrize("path", PATHS)
def test_r6_magnitude_keeps_the_asked_fraction(path):
    # The official scripts keep 1 (RoBERTa: off by one) or 6 (Mistral: inverted) of 8 at
    # sparsity 0.75; streammerge keeps int(0.25 * 8) = 2, the two largest |tau|.
    r = run("magnitude", path, [TAU_A], [1.0], density=0.25)
    assert close(r.out, [0.9, 0, 0, -0.7, 0, 0, 0, 0])
    r = run("magnitude", path, [TAU_A], [1.0], density=0.5)
    assert close(r.out, [0.9, 0, 0.4, -0.7, 0, 0, 0, 0.6])
    assert r.masks[0].int().tolist() == [1, 0, 1, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("normalize", "expected"), [(True, [0.9, 0.3]), (False, [0.9, 0.6])])
def test_r7_ties_operator(path, normalize, expected):
    r = run("ties", path, [[0.9, 0.2], [-0.5, 0.4]], [1.0, 1.0], normalize=normalize)
    assert close(r.out, expected)


# ---------------------------------------------------------------------------------------------
# Sign election and density corner cases


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["ties", "dare_ties"])
def test_all_zero_deltas_leave_the_base(path, name):
    base = torch.linspace(-1, 1, 16)
    r = run(name, path, [[0.0] * 16, [0.0] * 16], [1.0, 2.0], density=0.5, base=base)
    assert torch.equal(r.out, base)
    assert all(int(m.sum()) == 0 for m in r.masks)  # nothing kept where nothing changed


@pytest.mark.parametrize("path", PATHS)
def test_exactly_balanced_signs_elect_plus(path):
    # mergekit: a sum of exactly 0 elects +, so only the positive delta survives
    r = run("ties", path, [[0.5, -0.25], [-0.5, 0.25]], [1.0, 1.0])
    assert close(r.out, [0.5, 0.25])
    r = run("ties", path, [[0.5, -0.25], [-0.5, 0.25]], [1.0, 1.0], normalize=False)
    assert close(r.out, [0.5, 0.25])


@pytest.mark.parametrize("path", PATHS)
def test_ties_normalize_divides_by_agreeing_weights(path):
    r = run("ties", path, [[0.4, 0.2], [0.2, -0.1], [0.6, 0.3]], [1.0, 3.0, 1.0])
    # element 0: all agree: (0.4 + 0.6 + 0.6) / 5; element 1: 0.2 - 0.3 + 0.3 = 0.2 >= 0,
    # so the positive deltas 0.2 and 0.3 with weights 1 + 1 survive
    assert close(r.out, [1.6 / 5, 0.25])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "magnitude"])
def test_density_zero_keeps_nothing(path, name):
    base = torch.linspace(-1, 1, 24)
    deltas = [[0.1 * (i % 5 - 2) for i in range(24)], [0.05 * (i % 3 - 1) for i in range(24)]]
    r = run(name, path, deltas, [1.0, 0.5], density=0.0, base=base)
    assert torch.equal(r.out, base)
    assert all(int(m.sum()) == 0 for m in r.masks)


def test_density_one_dare_linear_equals_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    deltas = [(torch.randn(1000, generator=g) * 0.01).tolist() for _ in range(3)]
    base = torch.randn(1000, generator=g)
    ta = run("task_arithmetic", "merge", deltas, [0.5, 1.0, -0.3], base=base)
    dare = run("dare_linear", "merge", deltas, [0.5, 1.0, -0.3], density=1.0, base=base)
    assert same_bytes(ta.out, dare.out)  # keep everything, rescale factor exactly 1


@pytest.mark.parametrize("path", PATHS)
def test_magnitude_ties_at_threshold_go_to_the_lower_index(path):
    deltas = [[0.25, -0.25, 0.25, 0.25, -0.25, 0.25, 0.5, -0.25]]
    r = run("magnitude", path, deltas, [1.0], density=0.5)
    assert r.masks[0].int().tolist() == [1, 1, 1, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("path", PATHS)
def test_conflict_aware_magnitude_never_overlaps(path):
    a = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]
    b = [0.9, 0.5, 0.8, 0.5, 0.1, 0.5, 0.1, 0.5]
    r = run("magnitude", path, [a, b], [1.0, 1.0], density=0.5, conflict_aware=True)
    assert r.masks[0].int().tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert r.masks[1].int().tolist() == [0, 1, 0, 1, 0, 1, 0, 1]  # the free half only
    plain = run("magnitude", path, [a, b], [1.0, 1.0], density=0.5)
    assert plain.masks[1].int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# DARE's random stream


def test_dare_stream_is_chunking_independent_seeded_and_unbiased():
    whole = dare_keep(7, 1, 1234, 0, 300_000, 0.3)
    parts = [
        dare_keep(7, 1, 1234, s, min(s + 77_777, 300_000), 0.3) for s in range(0, 300_000, 77_777)
    ]
    assert torch.equal(torch.cat(parts), whole)
    assert abs(float(whole.float().mean()) - 0.3) < 0.005
    assert not torch.equal(whole, dare_keep(8, 1, 1234, 0, 300_000, 0.3))  # seed
    assert not torch.equal(whole, dare_keep(7, 2, 1234, 0, 300_000, 0.3))  # model
    assert not torch.equal(whole, dare_keep(7, 1, 1235, 0, 300_000, 0.3))  # tensor


@pytest.mark.parametrize("chunk", [8, 1000, None])
def test_dare_rescale_matches_the_l1_norm(chunk):
    g = torch.Generator().manual_seed(1)
    d = (torch.randn(50_000, generator=g) * 0.01).tolist()
    r = run("dare_linear", "merge", [d], [1.0], density=0.2, chunk=chunk, seed=5)
    kept = r.masks[0]
    assert abs(float(kept.float().mean()) - 0.2) < 0.01
    l1 = math.fsum(abs(x) for x in d)
    assert math.isclose(float(r.out.double().abs().sum()), l1, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# Through the engine: chunked streaming output == in-memory reference, byte for byte

K_METHOD_PARAMS = {
    "ties": {"density": 0.4},
    "dare_ties": {"density": 0.5, "random_seed": 3},
    "dare_linear": {"density": 0.3},
    "magnitude": {"density": 0.35},
    "linear": {},
    "task_arithmetic": {"lambda": 0.8, "normalize": True},
}


def family_recipe(base, fts, method, weights, **params):
    doc = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(f), "parameters": {"weight": w}}
            for f, w in zip(fts, weights, strict=False)
        ],
        "parameters": params,
    }
    return parse_recipe(doc)


def check_engine(recipe, out: Path, chunk: int, densities=None) -> MemoryMaskStore:
    store = MemoryMaskStore()
    run_merge(recipe, out, chunk_elems=chunk, max_memory=2**30, mask_store=store)
    got = load_output(out)
    for name, expected, masks in reference_merge(recipe, densities):
        assert same_bytes(got[name], expected), name
        for k, m in enumerate(masks or []):
            assert torch.equal(store.read(k, name), m), (name, k)
    return store


@pytest.mark.parametrize("method", sorted(K_METHOD_PARAMS))
@pytest.mark.parametrize("k", thin([2, 4, 6], [2, 6]))
def test_engine_matches_reference(tmp_path, method, k):
    base, fts = make_family(tmp_path / "models", k=k, seed=10 + k, shards=(1, 2))
    weights = [1.0, 0.5, -0.7, 1.3, 0.9, 0.2][:k]
    recipe = family_recipe(base, fts, method, weights, **K_METHOD_PARAMS[method])
    for chunk in (8, 136):
        check_engine(recipe, tmp_path / f"out{chunk}", chunk)


@pytest.mark.parametrize("method", ["magnitude", "ties"])
def test_engine_conflict_aware_and_rescale(tmp_path, method):
    base, fts = make_family(tmp_path / "models", k=3, seed=4)
    params = {"density": 0.3, "rescale": True}
    if method == "magnitude":
        params["conflict_aware"] = True
    check_engine(family_recipe(base, fts, method, [1.0, 0.6, 0.3], **params), tmp_path / "o", 40)


# ---------------------------------------------------------------------------------------------
# mergekit recipes, verbatim in the style of mergekit's documentation

MERGEKIT_RECIPES = {
    "ties": """
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
""",
    "dare_ties": """
models:
  - model: {base}
  - model: {ft1}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {ft2}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
""",
    "dare_linear": """
models:
  - model: {ft1}
    parameters:
      weight: 0.6
      density: 0.4
  - model: {ft2}
    parameters:
      weight: 0.4
      density: 0.4
merge_method: dare_linear
base_model: {base}
dtype: float16
""",
    "task_arithmetic": """
models:
  - model: {ft1}
    parameters:
      weight: 1.0
  - model: {ft2}
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: {base}
parameters:
  normalize: true
dtype: float32
""",
    "linear": """
models:
  - model: {ft1}
    parameters:
      weight: 1.0
  - model: {ft2}
    parameters:
      weight: 0.3
merge_method: linear
dtype: float32
""",
    "magnitude": """
merge_method: magnitude
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.25}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.25}}
parameters:
  conflict_aware: true
""",
}


@pytest.mark.parametrize("method", sorted(MERGEKIT_RECIPES))
def test_mergekit_recipe_runs_unchanged(tmp_path, method):
    base, fts = make_family(tmp_path / "models", k=2, seed=21)
    text = MERGEKIT_RECIPES[method].format(base=base, ft1=fts[0], ft2=fts[1])
    (tmp_path / "r.yaml").write_text(text)
    recipe = parse_recipe(yaml.safe_load(text))
    assert recipe.method == method
    assert not recipe.warnings  # every key means something to streammerge
    check_engine(recipe, tmp_path / "out", 72)


def test_ties_recipe_means_what_mergekit_means(tmp_path):
    """ties, density 0.5, normalize: computed by hand with mergekit's algorithm (§2.2)."""
    base, fts = make_family(tmp_path / "models", k=2, seed=22)
    text = MERGEKIT_RECIPES["ties"].format(base=base, ft1=fts[0], ft2=fts[1])
    recipe = parse_recipe(yaml.safe_load(text))
    run_merge(recipe, tmp_path / "out", chunk_elems=64, max_memory=2**30)
    got = load_output(tmp_path / "out")
    from safetensors.torch import load_file

    b, f1, f2 = (load_file(p / "model.safetensors") for p in (base, *fts))
    name = "layer.0.mlp.weight"
    deltas = []
    for f, w in ((f1, 0.5), (f2, 0.3)):
        d = (f[name].float() - b[name].float()).flatten()
        k = int(0.5 * d.numel())
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[torch.argsort(d.abs(), descending=True, stable=True)[:k]] = True
        deltas.append((d * keep, w))
    total = sum(w * d for d, w in deltas)
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [(torch.sign(w * d) == sign) for d, w in deltas]
    mixed = sum(w * d * a for (d, w), a in zip(deltas, agree, strict=True))
    div = sum(w * a.float() for (_, w), a in zip(deltas, agree, strict=True))
    div[div == 0] = 1
    want = b[name].float().flatten() + mixed / div
    # the recipe's `dtype: float32` is the output dtype (mergekit's rule), on a bf16 family
    assert got[name].dtype == torch.float32
    # rounding order only: a wrongly trimmed or elected delta is off by ~1e-3
    assert torch.allclose(got[name].flatten(), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Parameter forms, exclude, TADrop


def test_gradients_filters_and_exclude(tmp_path):
    base, fts = generate_family(tmp_path / "models", "tiny", n_finetunes=2, seed=1)
    doc = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": [1.0, 0.2], "density": 0.5}},
            {"model": str(fts[1]), "parameters": {
                "weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.1}],
                "density": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.4}],
            }},
        ],
        "exclude": ["embed_tokens", "norm"],
    }  # fmt: skip
    recipe = parse_recipe(doc)
    store = check_engine(recipe, tmp_path / "out", 200)
    got = load_output(tmp_path / "out")
    from safetensors.torch import load_file

    b = load_file(base / "model-00001-of-00001.safetensors")
    for name in got:  # excluded tensors are the base's bytes
        if "embed_tokens" in name or "norm" in name:
            assert same_bytes(got[name], b[name]), name
        else:
            assert not same_bytes(got[name], b[name]), name
    info = store.info
    # the weight gradient reaches layer 1 (t = 1) at 0.2; the filter picks mlp tensors
    assert info[(0, "model.layers.1.mlp.up_proj.weight")]["weight"] == pytest.approx(0.2)
    assert info[(0, "model.layers.0.mlp.up_proj.weight")]["weight"] == pytest.approx(1.0)
    assert info[(1, "model.layers.0.mlp.up_proj.weight")]["weight"] == pytest.approx(0.9)
    assert info[(1, "model.layers.1.self_attn.q_proj.weight")]["density"] == pytest.approx(0.8)
    assert info[(1, "model.layers.0.self_attn.q_proj.weight")]["density"] == pytest.approx(0.2)
    assert info[(1, "lm_head.weight")]["weight"] == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["cabs", "ties", "dare_linear"])
def test_tadrop_allocates_recorded_densities_and_matches_reference(tmp_path, method):
    base, fts = generate_family(tmp_path / "models", "tiny", n_finetunes=2, seed=2)
    params = {"tadrop": 1, "tadrop_alpha": 1.0}
    per_model = {"n_val": 16, "m_val": 64} if method == "cabs" else {"density": 0.3}
    doc = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.7, **per_model}} for f in fts],
        "parameters": params,
    }
    recipe = parse_recipe(doc)
    out = tmp_path / "out"
    run_merge(recipe, out, chunk_elems=1000, max_memory=2**30)
    store = ZarrMaskStore(out / "occupancy.zarr")
    attrs = store.attrs()
    assert attrs["tadrop"]["rule"].startswith("streammerge TADrop")
    numel, dens = {}, {}
    for name, _, masks in reference_merge(recipe):
        if masks is not None:
            numel[name] = masks[0].numel()
            dens[name] = store.info(0, name)["density"]
    d_bar = 0.25 if method == "cabs" else 0.3
    achieved = sum(numel[n] * dens[n] for n in numel) / sum(numel.values())
    tol = 0.02 if method == "cabs" else 1e-3  # n:m rounds each density to a multiple of 1/m
    assert abs(achieved - d_bar) < tol
    assert len({round(d, 6) for d in dens.values()}) > 2  # densities really differ per tensor
    densities = {(k, n): store.info(k, n)["density"] for n in numel for k in range(2)}
    got = load_output(out)
    for name, expected, _ in reference_merge(recipe, densities):
        assert same_bytes(got[name], expected), name
    marker = json.loads((out / "streammerge.json").read_text())
    assert marker["complete"]
    assert marker["tadrop"]["densities"]["lm_head.weight"][1] == densities[(1, "lm_head.weight")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_exact_l1_is_exact_and_order_free(dtype):
    from fractions import Fraction

    from streammerge.methods.select import ExactL1

    g = torch.Generator().manual_seed(1)
    scale = 10.0 ** torch.randint(-6, 3, (20_011,), generator=g).double()
    x = (torch.randn(20_011, generator=g) * scale).to(dtype)
    x[3] = torch.finfo(dtype).tiny / 2 if dtype != torch.bfloat16 else 0  # a subnormal
    want = sum((Fraction(v) for v in x.double().abs().tolist()), Fraction(0))
    for step in (20_011, 4_096, 999):
        acc = ExactL1()
        for s in reversed(range(0, x.numel(), step)):  # any chunking, any order
            acc.add(x[s : s + step])
        assert acc.value() == want
