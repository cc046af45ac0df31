"""The chunked streaming engine produces exactly the bytes of the in-memory reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_family
from safetensors import safe_open

from streammerge import parse_recipe, read_mask, run_merge
from streammerge.mask_store import MemoryMaskStore
from streammerge.methods import kernels
from streammerge.reference import reference_merge


def load_output(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``out``."""
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[k] = h.get_tensor(k)
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(it), b.contiguous().view(it))
    return torch.equal(a, b)


def recipe_for(base, fts, method="cabs", **params):
    weights = params.pop("weights", [1.0, 0.5, 2.0, -0.7, 1.3, 0.9])
    per_model = params.pop("per_model", [{} for _ in fts])
    doc = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(f), "parameters": {"weight": w, **pm}}
            for f, w, pm in zip(fts, weights, per_model, strict=False)
        ],
        "parameters": params,
    }
    for key in ("dtype", "out_dtype", "compute_dtype"):
        if key in params:
            doc[key] = params.pop(key)
    return parse_recipe(doc)


def check_against_reference(recipe, out: Path, chunk_elems: int) -> None:
    store = MemoryMaskStore()
    run_merge(recipe, out, chunk_elems=chunk_elems, max_memory=2**30, mask_store=store)
    got = load_output(out)
    n_checked = 0
    for name, expected, masks in reference_merge(recipe):
        assert same_bytes(got[name], expected), name
        if masks is not None:
            for k, m in enumerate(masks):
                assert torch.equal(store.read(k, name), m), (name, k)
                assert store.kept_counts[(k, name)] == int(m.sum())
        n_checked += 1
    assert n_checked == len(got)


# Chunk lengths that split rows (24 and 13 wide) and tensors at awkward places; the engine
# rounds them up to the method's alignment (lcm(8, m_k)), never to a row boundary.
CHUNKS = [8, 40, 72, 136, 1000, 10**6]


@pytest.fixture(params=["compiled", "torch"])
def kernel(request, monkeypatch):
    """Run a test with the numba kernel and with the pure-torch fallback."""
    if request.param == "compiled" and not kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setattr(kernels, "HAVE_NUMBA", request.param == "compiled")
    return request.param


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (16, 64), (5, 12)])
def test_cabs_two_models(tmp_path, family, chunk, n, m, kernel):
    base, fts = family
    recipe = recipe_for(base, fts, n_val=n, m_val=m)
    check_against_reference(recipe, tmp_path / "out", chunk)


@pytest.mark.parametrize("chunk", [8, 72, 1000])
@pytest.mark.parametrize("k", [2, 3, 4, 6])
@pytest.mark.parametrize("overlap", ["strict", "fill"])
@pytest.mark.parametrize("tail", ["keep_topn_padded", "zero"])
def test_cabs_k_models_policies(tmp_path, chunk, k, overlap, tail, kernel):
    base, fts = make_family(tmp_path / "models", k=k, seed=k, shards=(2, 1, 3))
    # per-model n:m, including models whose blocks are not the same length
    per_model = [
        {"n_val": n, "m_val": m} for n, m in [(2, 8), (1, 4), (3, 6), (2, 4), (5, 8), (4, 4)]
    ]
    recipe = recipe_for(
        base, fts, per_model=per_model[:k], overlap_policy=overlap, tail_policy=tail
    )
    check_against_reference(recipe, tmp_path / "out", chunk)


@pytest.mark.parametrize("chunk", [8, 40, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_task_arithmetic_dtypes(tmp_path, chunk, dtype):
    base, fts = make_family(tmp_path / "models", k=3, dtype=dtype)
    check_against_reference(recipe_for(base, fts, "task_arithmetic"), tmp_path / "out", chunk)


@pytest.mark.parametrize(
    ("compute", "out_dtype"), [("bfloat16", None), ("float64", "float16"), ("float32", "float32")]
)
def test_compute_and_out_dtypes(tmp_path, compute, out_dtype):
    base, fts = make_family(tmp_path / "models", k=2)
    params = {"n_val": 3, "m_val": 8, "compute_dtype": compute}
    if out_dtype:
        params["out_dtype"] = out_dtype
    recipe = recipe_for(base, fts, **params)
    check_against_reference(recipe, tmp_path / "out", 72)


def test_zarr_masks_match_and_never_overlap_under_strict(tmp_path):
    base, fts = make_family(tmp_path / "models", k=3, seed=5)
    recipe = recipe_for(base, fts, n_val=3, m_val=8)
    out = tmp_path / "out"
    run_merge(recipe, out, chunk_elems=48, max_memory=2**30)
    for name, _, masks in reference_merge(recipe):
        if masks is None:
            continue
        stored = [read_mask(out, k, name) for k in range(3)]
        for k in range(3):
            assert torch.equal(stored[k], masks[k]), (name, k)
        assert stored[0].shape == masks[0].shape
        total = stored[0].int() + stored[1].int() + stored[2].int()
        assert int(total.max()) <= 1, name
    # models are addressable by the name written in the recipe and by folder name
    assert torch.equal(
        read_mask(out, str(fts[1]), "embed.weight"), read_mask(out, 1, "embed.weight")
    )
    assert torch.equal(read_mask(out, "ft3", "embed.weight"), read_mask(out, 2, "embed.weight"))
