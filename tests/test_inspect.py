"""inspect: densities and overlaps from the occupancy store, checked against the masks and
against the reference n:m on whole in-memory task vectors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from conftest import SHAPES, make_family
from safetensors.torch import load_file

import streammerge.inspect as inspect_mod
from streammerge import read_mask, run_merge
from streammerge.cli import main
from streammerge.inspect import inspect_merge
from streammerge.methods.cabs import reference_nm

MERGED = [n for n in SHAPES if n != "position_ids"]


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def merge(tmp_path: Path, k: int = 3, **params) -> tuple[Path, Path, list[Path]]:
    base, fts = make_family(tmp_path / "models", k=k)
    doc = {
        "merge_method": "cabs",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
        "parameters": {"n_val": 2, "m_val": 8, **params},
    }
    doc["models"][1]["parameters"]["n_val"] = 3  # a per-model n:m
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run_merge(tmp_path / "r.yaml", out, chunk_elems=48, max_memory=2**32)
    return out, base, fts


def independent_overlap(base: Path, fts: list[Path], name: str, nms: list[tuple[int, int]]):
    """Reference: every model's own n:m on its whole task vector, positions kept by >= 2."""
    b = load_file(base / "model.safetensors")[name].float().flatten()
    count = torch.zeros(b.numel(), dtype=torch.int64)
    for f, (n, m) in zip(fts, nms, strict=True):
        tau = load_file(f / "model.safetensors")[name].float().flatten() - b
        tier = torch.ones(b.numel(), dtype=torch.int64)
        count += reference_nm(tau.abs().double(), tier, n, m, "keep_topn_padded") & (tau != 0)
    return int((count >= 2).sum())


@pytest.mark.parametrize("policy", ["strict", "fill"])
def test_report_matches_masks_and_reference(tmp_path, monkeypatch, policy):
    monkeypatch.setattr(inspect_mod, "CHUNK_ELEMS", 64)  # stream in several chunks
    out, base, fts = merge(tmp_path, overlap_policy=policy, n_val=5)
    rep = inspect_merge(out)
    assert rep.models == ("ft1", "ft2", "ft3") and rep.overlap_policy == policy
    assert [t.name for t in rep.tensors] == sorted(MERGED, key=[*SHAPES].index)
    nms = [(5, 8), (3, 8), (5, 8)]
    for t in rep.tensors:
        masks = [read_mask(out, i, t.name).flatten() for i in range(3)]
        assert t.kept == tuple(int(m.sum()) for m in masks)
        assert t.overlap == int((torch.stack(masks).sum(0) >= 2).sum())
        assert t.overlap_independent == independent_overlap(base, fts, t.name, nms)
    total_overlap = rep.total.overlap
    assert (total_overlap == 0) == (policy == "strict")
    if policy == "fill":  # 5 + 3 + 5 of 8 cannot avoid overlap
        assert total_overlap > 0
    assert rep.total.overlap_independent > 0
    layer0 = next(s for s in rep.layers if s.layer == "0")
    assert layer0.numel == sum(t.numel for t in rep.tensors if t.name.startswith("layer.0."))
    assert [s.layer for s in rep.layers] == ["0", "other"]


def test_cli_table_json_and_missing_inputs(tmp_path):
    out, _base, fts = merge(tmp_path)
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "layer 0" in r.stdout and "overlap indep." in r.stdout and "total" in r.stdout
    assert "computed from the inputs" in r.stdout
    r = cli("inspect", out, "--tensors")
    assert r.exit_code == 0 and all(n in r.stdout for n in MERGED)
    r = cli("inspect", out, "--json")
    data = json.loads(r.stdout)
    assert data["total"]["overlap"] == 0 and data["total"]["overlap_independent"] > 0
    assert len(data["tensors"]) == len(MERGED)
    r = cli("inspect", out, "--json", "--no-inputs")
    data = json.loads(r.stdout)
    assert (
        data["total"]["overlap_independent"] is None and "--no-inputs" in data["independent_note"]
    )
    fts[1].rename(fts[1].with_name("gone"))  # inputs missing: skipped, and said so
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "skipped: input folder" in r.stdout and str(fts[1]) in r.stdout
    r = cli("inspect", tmp_path / "models")
    assert r.exit_code == 2 and "no occupancy store" in r.stderr


def test_tadrop_densities_are_reported(tmp_path):
    out, _, _ = merge(tmp_path, tadrop=1)
    rep = inspect_merge(out, use_inputs=False)
    assert rep.tadrop
    for t in rep.tensors:
        assert t.tadrop_density is not None and len(t.tadrop_density) == 3
    r = cli("inspect", out, "--tensors", "--no-inputs")
    assert "tadrop ft1" in r.stdout


def test_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out, _, _ = merge(tmp_path)
    png = tmp_path / "p.png"
    r = cli("inspect", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    r = cli("inspect", out, "--plot", tmp_path / "q.png")
    assert r.exit_code == 2 and "matplotlib" in r.stderr and "pip install" in r.stderr
    assert not (tmp_path / "q.png").exists()


def test_dense_merge_is_refused_not_reported_as_zeros(tmp_path):
    base, fts = make_family(tmp_path / "models", k=2)
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run_merge(tmp_path / "r.yaml", out, max_memory=2**32)
    r = cli("inspect", out)
    assert r.exit_code == 2 and "stored no masks" in r.stderr and "task_arithmetic" in r.stderr
