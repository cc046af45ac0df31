"""The console: a successful run, and user mistakes as one clean line on stderr with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from conftest import SHAPES, write_model
from safetensors.torch import load_file

from streammerge.cli import main


# `family` (conftest): base + ft1 + ft2 under tmp_path/models
def fast() -> list[str]:
    """Small shards, no progress bar, and a budget of 1 GiB on top of what this process holds:
    CliRunner runs the merge in-process, and the suite's earlier tests grow the process."""
    budget = psutil.Process().memory_info().rss + 2**30
    return ["--max-memory", str(budget), "--shard-size", "2KB", "--no-progress"]


def write_recipe(path: Path, base: Path, fts: list[Path], **extra) -> Path:
    doc = {
        "merge_method": "cabs",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
        "parameters": {"n_val": 2, "m_val": 4},
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def recipe(tmp_path, family) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", *family)


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(stderr: str, exit_code: int, *fragments: str) -> str:
    """Exit status 2 and exactly one line on stderr, 'error: ...', without a traceback."""
    assert exit_code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


def test_run_writes_a_sharded_model(tmp_path, recipe, family):
    out = tmp_path / "merged"
    result = run("run", recipe, out, *fast())
    assert result.exit_code == 0, result.output
    assert "merged" in result.stdout and "peak RSS" in result.stdout
    assert result.stderr == ""
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "streammerge.json").read_text())["complete"] is True
    tensors = {}
    for s in shards:
        tensors |= load_file(out / s)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == SHAPES
    base = load_file(family[0] / "model.safetensors")
    assert torch.equal(tensors["position_ids"], base["position_ids"])  # copied as is


def test_run_in_a_subprocess(tmp_path, recipe):
    """The real console: exit statuses and a clean stderr (CliRunner catches SystemExit)."""
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "streammerge.cli", "run", str(recipe), str(out), *fast()]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "merged" in ok.stdout and "peak RSS" in ok.stdout
    assert (out / "streammerge.json").is_file()
    # the same command again: the finished output is not overwritten without --force
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert_user_error(again.stderr, again.returncode, "finished merge", "--force", str(out))
    assert again.stdout == ""


def test_invalid_recipe_value(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family, parameters={"n_val": 5, "m_val": 4})
    result = run("run", recipe, tmp_path / "out", *fast())
    assert_user_error(result.stderr, result.exit_code, str(recipe), "n_val")
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path, family):
    base, fts = family
    recipe = write_recipe(tmp_path / "r.yaml", base, [fts[0], tmp_path / "no-such-model"])
    result = run("run", recipe, tmp_path / "out", *fast())
    assert_user_error(result.stderr, result.exit_code, "no-such-model")


def test_mismatched_shapes_name_folder_tensor_and_shapes(tmp_path, family):
    base, fts = family
    odd = load_file(fts[1] / "model.safetensors")
    odd["odd.weight"] = torch.zeros(7, 12, dtype=torch.bfloat16)  # base: (7, 13)
    bad = write_model(tmp_path / "models" / "ft-odd", odd)
    recipe = write_recipe(tmp_path / "r.yaml", base, [fts[0], bad])
    result = run("run", recipe, tmp_path / "out", *fast())
    assert_user_error(result.stderr, result.exit_code, str(bad), "odd.weight", "[7, 12]", "[7, 13]")


def test_pickle_only_model(tmp_path, family):
    base, fts = family
    pickled = tmp_path / "models" / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a real checkpoint")
    recipe = write_recipe(tmp_path / "r.yaml", base, [fts[0], pickled])
    result = run("run", recipe, tmp_path / "out", *fast())
    assert_user_error(result.stderr, result.exit_code, "pytorch_model.bin", "safetensors")


def test_output_inside_an_input_folder(recipe, family):
    out = family[1][0] / "merged"
    result = run("run", recipe, out, *fast())
    assert_user_error(result.stderr, result.exit_code, "inside")
    assert not out.exists()


def test_non_empty_output_folder(tmp_path, recipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("run", recipe, out, *fast())
    assert_user_error(result.stderr, result.exit_code, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_budget_too_small(tmp_path, recipe):
    result = run("run", recipe, tmp_path / "out", "--max-memory", "10MiB", "--no-progress")
    assert_user_error(result.stderr, result.exit_code, "too small")


def test_bad_size_string_is_a_usage_error(tmp_path, recipe):
    result = run("run", recipe, tmp_path / "out", "--max-memory", "lots")
    assert result.exit_code == 2
    assert "--max-memory" in result.stderr and "'lots'" in result.stderr
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family, parameters={"n_val": 5, "m_val": 4})
    result = run("run", recipe, tmp_path / "out", "--verbose", *fast())
    assert result.exit_code not in (0, 2)
    assert type(result.exception).__name__ == "RecipeError"  # propagates: Python prints it
    assert "n_val" in str(result.exception)
    assert "error:" not in result.stderr


def test_recipe_warning_goes_to_stderr(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family, frobnicate=3)
    out = tmp_path / "out"
    result = run("run", recipe, out, *fast())
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if "frobnicate" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert "frobnicate" not in result.stdout
    assert (out / "streammerge.json").is_file()


def test_demo(tmp_path):
    budget = fast()[:2]  # in-process, like run's tests
    result = run("demo", tmp_path / "demo", *budget)
    assert result.exit_code == 0, result.output
    assert "merged" in result.stdout and "peak RSS" in result.stdout
    assert (tmp_path / "demo" / "recipe.yaml").is_file()
    assert (tmp_path / "demo" / "merged" / "streammerge.json").is_file()
    again = run("demo", tmp_path / "demo", *budget)  # refuses to overwrite its merge
    assert_user_error(again.stderr, again.exit_code, "already exists")


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_shows_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout and f"streammerge {command} " in result.stdout
