"""Tests for the synthetic model family generator (streammerge.synth)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from streammerge import synth
from streammerge.synth import PRESETS, generate_family, synth_tensor

TINY = PRESETS["tiny"]


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder, via the index, with the reference reader."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / fname), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = f.get_tensor(name)
    return out


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return generate_family(tmp_path_factory.mktemp("fam"), "tiny", n_finetunes=2, seed=0)


def test_layout_and_headers(tiny_family: tuple[Path, list[Path]]) -> None:
    base, fts = tiny_family
    assert base.name == "base" and [p.name for p in fts] == ["ft1", "ft2"]
    expected = {name: shape for name, _, shape in TINY.tensor_specs()}
    assert "lm_head.weight" in expected and len(expected) == 3 + 9 * TINY.layers
    for d in [base, *fts]:
        for fname in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            assert (d / fname).is_file()
        assert not list(d.glob("*.partial"))
        tensors = _load(d)
        assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["hidden_size"] == TINY.hidden
        assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"


def test_presets_match_published_dims() -> None:
    assert PRESETS["1b"].num_params() == 1_100_048_384  # TinyLlama-1.1B
    assert PRESETS["3b"].num_params() == 3_212_749_824  # Llama-3.2-3B
    assert PRESETS["8b"].num_params() == 8_030_261_248  # Llama-3-8B
    names = [n for n, _, _ in PRESETS["3b"].tensor_specs()]
    assert "lm_head.weight" not in names  # tied embeddings


def test_values_match_synth_tensor(tiny_family: tuple[Path, list[Path]]) -> None:
    base, fts = tiny_family
    for m, d in enumerate([base, *fts]):
        tensors = _load(d)
        for name in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
            want = synth_tensor("tiny", name, model=m, seed=0).to(torch.bfloat16)
            assert torch.equal(tensors[name], want), (d.name, name)


def test_same_seed_is_byte_identical(tiny_family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, fts = tiny_family
    # One worker instead of the default two: output must not depend on scheduling.
    again, again_fts = generate_family(tmp_path / "a", "tiny", seed=0, workers=1)
    for d0, d1 in zip([base, *fts], [again, *again_fts], strict=True):
        assert _files(d0) == _files(d1)


def test_other_seed_differs(tiny_family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, fts = tiny_family
    other, other_fts = generate_family(tmp_path / "b", "tiny", seed=1)
    for d0, d1 in zip([base, *fts], [other, *other_fts], strict=True):
        t0, t1 = _load(d0), _load(d1)
        assert all(not torch.equal(t0[n], t1[n]) for n in t0)


def test_deltas_small_nonzero_and_distinct(tiny_family: tuple[Path, list[Path]]) -> None:
    base, fts = tiny_family
    b = {n: t.float() for n, t in _load(base).items()}
    deltas = [{n: t.float() - b[n] for n, t in _load(ft).items()} for ft in fts]
    for name, w in b.items():
        d1, d2 = deltas[0][name], deltas[1][name]
        for d in (d1, d2):
            rel = (d.norm() / w.norm()).item()
            assert 1e-4 < rel < 0.1, (name, rel)
        assert not torch.equal(d1, d2), name
        # Independent per model, not one delta scaled.
        cos = torch.nn.functional.cosine_similarity(d1.flatten(), d2.flatten(), 0)
        assert abs(cos.item()) < 0.5, name
    # Base statistics: N(0, 0.02) matrices, norm gains around 1.
    emb = b["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 2e-3 and abs(emb.mean().item()) < 1e-3
    assert abs(b["model.norm.weight"].mean().item() - 1.0) < 0.01


def test_delta_has_spikes_and_low_rank_part() -> None:
    name = "model.layers.1.mlp.down_proj.weight"  # (64, 176)
    d = synth_tensor("tiny", name, model=1) - synth_tensor("tiny", name, model=0)
    std = synth.delta_std(TINY, name, 1, 0)
    assert d.abs().max().item() > 6 * std  # a Gaussian of 11k samples stays below ~4.5 std
    s = torch.linalg.svdvals(d)
    assert (s[synth.LOW_RANK - 1] / s[synth.LOW_RANK]).item() > 1.5  # rank-4 part stands out


def test_chunked_generation_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks: many row chunks per tensor, with ragged tails, written at offsets.
    monkeypatch.setattr(synth, "CHUNK_ELEMS", 1000)
    _, fts = generate_family(tmp_path, "tiny", n_finetunes=1, seed=3)
    tensors = _load(fts[0])
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        want = synth_tensor("tiny", name, model=1, seed=3).to(torch.bfloat16)
        assert torch.equal(tensors[name], want), name


def test_small_shards_make_a_valid_index(tmp_path: Path) -> None:
    base, fts = generate_family(tmp_path, "tiny", n_finetunes=1, shard_size=40_000)
    for d in (base, *fts):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 3
        assert sorted(p.name for p in d.glob("*.safetensors")) == files
        seen: dict[str, str] = {}
        for fname in files:
            assert fname.endswith(f"-of-{len(files):05d}.safetensors")
            with safe_open(str(d / fname), "pt") as f:
                for name in f.keys():  # noqa: SIM118
                    assert f.get_tensor(name).dtype == torch.bfloat16
                    seen[name] = fname
        assert seen == index["weight_map"]
        assert index["metadata"]["total_size"] == 2 * TINY.num_params()


def test_regenerating_into_a_folder_removes_stale_shards(tmp_path: Path) -> None:
    generate_family(tmp_path, "tiny", n_finetunes=1, shard_size=40_000)
    base, _ = generate_family(tmp_path, "tiny", n_finetunes=1)
    assert [p.name for p in base.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]


def test_loads_in_transformers(tiny_family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tied = dataclasses.replace(TINY, tie_embeddings=True)
    tied_base, _ = generate_family(tmp_path, tied, n_finetunes=1)
    assert "lm_head.weight" not in _load(tied_base)
    base, fts = tiny_family
    ids = torch.tensor([[1, 17, 200, 255]])
    for d in (base, *fts, tied_base):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert model.dtype == torch.bfloat16
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 4, TINY.vocab) and torch.isfinite(logits).all()
