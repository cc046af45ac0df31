"""passthrough: copies its one model, times ``scale``; recipe checks; a CLI run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_family
from safetensors.torch import load_file

from streammerge.errors import RecipeError
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId
from streammerge.methods.base import run_chunked
from streammerge.recipe import parse_recipe

PT = METHODS["passthrough"]


def test_copy_and_scale_any_chunk():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tid, opts = TensorId("w", 1001), MethodOptions()
    for chunk in (None, 1, 17, 500):
        one = run_chunked(PT, tid, x, [x], [ModelParams(1.0)], opts, torch.float32, chunk).out
        assert torch.equal(one.to(torch.bfloat16), x)
        half = run_chunked(PT, tid, x, [x], [ModelParams(0.5)], opts, torch.float32, chunk).out
        assert torch.equal(half, x.float() / 2)  # halving is exact
        ref = PT.reference(tid, x, [x], [ModelParams(0.3)], opts, torch.float32).out
        got = run_chunked(PT, tid, x, [x], [ModelParams(0.3)], opts, torch.float32, chunk).out
        assert got.numpy().tobytes() == ref.numpy().tobytes()


def test_recipe(tmp_path):
    _, fts = make_family(tmp_path / "m", k=2)
    with pytest.raises(RecipeError, match="exactly one model"):
        parse_recipe({"merge_method": "passthrough", "models": [str(p) for p in fts]})
    filt = [{"filter": "mlp", "value": 0.5}, {"value": 2.0}]
    doc = {"merge_method": "passthrough", "models": [{"model": str(fts[0])}],
           "parameters": {"scale": filt}}  # fmt: skip
    r = parse_recipe(doc)
    assert r.base == fts[0].resolve()
    assert r.model_params(0, "layer.0.mlp.weight", 0.0).weight == 0.5
    assert r.model_params(0, "layer.0.attn.weight", 0.0).weight == 2.0
    r = parse_recipe({"merge_method": "passthrough", "models": [str(fts[0])]})
    assert r.model_params(0, "layer.0.mlp.weight", 0.0).weight == 1.0


def test_cli_run(tmp_path):
    _, fts = make_family(tmp_path / "m", k=1)
    scale = [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]
    doc = {"merge_method": "passthrough", "models": [{"model": str(fts[0])}],
           "parameters": {"scale": scale}}  # fmt: skip
    rec = tmp_path / "p.yaml"
    rec.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "streammerge", "run", str(rec), str(out),
                    "--no-progress"], check=True, capture_output=True)  # fmt: skip
    assert "| # | model | scale |" in (out / "README.md").read_text()
    got = load_file(out / "model-00001-of-00001.safetensors")
    src = load_file(fts[0] / "model.safetensors")
    assert set(got) == set(src)
    for name, x in src.items():
        want = (x.float() * 0.5).to(x.dtype) if "mlp" in name else x
        assert torch.equal(got[name], want), name
