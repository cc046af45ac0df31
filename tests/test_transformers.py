"""A merged tiny Llama loads in transformers and computes the reference merge's logits."""

from __future__ import annotations

import pytest
import torch

from streammerge import parse_recipe, run_merge
from streammerge.reference import reference_merge

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int, tie: bool) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


@pytest.mark.parametrize("tie", [False, True])
def test_merged_llama_loads_and_matches_reference(tmp_path, tie):
    base = tiny_llama(0, tie)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    for k in (1, 2):
        ft = tiny_llama(0, tie)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
        ft.save_pretrained(tmp_path / f"ft{k}")
    recipe = parse_recipe(
        {
            "merge_method": "cabs",
            "base_model": str(tmp_path / "base"),
            "models": [
                {"model": str(tmp_path / "ft1"), "parameters": {"weight": 1.0}},
                {"model": str(tmp_path / "ft2"), "parameters": {"weight": 0.7}},
            ],
            "parameters": {"n_val": 4, "m_val": 16},
        }
    )
    run_merge(recipe, tmp_path / "out", chunk_elems=1000, max_memory=2**30, shard_size=40_000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1

    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.bfloat16
    )
    # built like `merged` (from_pretrained keeps e.g. rotary buffers in float32), then given
    # the in-memory reference merge's weights
    expected = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.bfloat16
    )
    missing, unexpected = expected.load_state_dict(
        dict((n, t) for n, t, _ in reference_merge(recipe)), strict=False
    )
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied: lm_head shares embed_tokens
    for (n, p), (_, q) in zip(merged.named_parameters(), expected.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    ids = torch.randint(0, 96, (2, 12), generator=g)
    with torch.no_grad():
        got, want = merged(ids).logits, expected(ids).logits
        plain = base(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, plain)  # the merge changed something
