"""End to end through the console on the `tiny` bench preset: plan, run, inspect, remix, add.

Each command runs as a user would run it (a subprocess of ``python -m streammerge``), and the
outputs of remix and add are compared byte for byte with full runs of the equivalent recipes.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_remix import write_recipe

from streammerge.synth import generate_family


def sm(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "streammerge", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def recipe(path: Path, base: Path, fts: list[Path], weights: list[float]) -> Path:
    return write_recipe(path, base, fts, weights, parameters={"n_val": 16, "m_val": 64})


def same_shards(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return generate_family(tmp_path_factory.mktemp("tiny") / "fam", "tiny", n_finetunes=3)


def test_tiny_preset_through_every_command(tmp_path, tiny):
    base, fts = tiny
    two = recipe(tmp_path / "two.yaml", base, fts[:2], [1.0, 0.8])
    opts = ["--max-memory", "1GiB", "--shard-size", "20MB"]

    plan = json.loads(
        sm("plan", two, tmp_path / "merged", "--json", "--no-calibrate", *opts).stdout
    )
    assert plan["method"] == "cabs" and not (tmp_path / "merged").exists()

    log = tmp_path / "log.jsonl"
    sm("run", two, tmp_path / "merged", "--quiet", "--log-json", log, *opts)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == plan["merged"] + plan["copied"] == len(plan["tensors"])
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("---\n") and "streammerge" in card

    report = json.loads(sm("inspect", tmp_path / "merged", "--json").stdout)
    assert report["total"]["overlap_rate"] == 0.0  # strict CABS: no position kept twice
    assert report["total"]["overlap_independent_rate"] > 0.0  # independent n:m would overlap
    assert [round(d, 2) for d in report["total"]["density"]] == [0.25, 0.25]

    sm("remix", tmp_path / "merged", tmp_path / "remixed", "--weight", "ft1=0.5",
       "--weight", "ft2=1.2", "--no-progress", *opts)  # fmt: skip
    sm("run", recipe(tmp_path / "w.yaml", base, fts[:2], [0.5, 1.2]), tmp_path / "full-w",
       "--quiet", *opts)  # fmt: skip
    same_shards(tmp_path / "full-w", tmp_path / "remixed")

    sm("add", tmp_path / "merged", tmp_path / "added", "--model", fts[2], "--weight", "0.6",
       "--no-progress", *opts)  # fmt: skip
    sm("run", recipe(tmp_path / "three.yaml", base, fts, [1.0, 0.8, 0.6]), tmp_path / "full-3",
       "--quiet", *opts)  # fmt: skip
    same_shards(tmp_path / "full-3", tmp_path / "added")
