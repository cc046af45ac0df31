"""Messages a mergekit user meets first: YAML errors with their position, hub ids, the
kernel-compile notice, ``--shard-size``'s default."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_family

from streammerge import RecipeError, load_recipe
from streammerge.cli import main

BROKEN = """\
merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters: {weight: 0.5
  - model: ./b
"""


def test_invalid_yaml_keeps_line_and_column(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(BROKEN)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: line 6, column 10: invalid YAML: ")  # where PyYAML stops
    r = CliRunner().invoke(main, ["plan", str(path), str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "line 6, column 10" in r.stderr


def test_tab_indentation_points_at_the_tab(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: ties\nmodels:\n\t- model: ./a\n")
    with pytest.raises(RecipeError, match=r"line 3, column 1: invalid YAML: found character '\\t'"):
        load_recipe(path)


def test_hub_id_as_a_model_says_to_download_first(tmp_path, monkeypatch):
    base, _ = make_family(tmp_path / "m", k=1)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": "mistralai/Mistral-7B-v0.1", "parameters": {"weight": 1}}],
    }))  # fmt: skip
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "local folders only" in msg
    assert "huggingface-cli download mistralai/Mistral-7B-v0.1 --local-dir DIR" in msg


@pytest.fixture
def cabs_recipe(tmp_path: Path) -> Path:
    base, fts = make_family(tmp_path / "m", k=2)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "merge_method": "cabs", "base_model": str(base),
        "models": [{"model": str(f)} for f in fts], "parameters": {"n_val": 2, "m_val": 4},
        "out_dtype": "float32",
    }))  # fmt: skip
    return path


@pytest.fixture
def slow_compile(monkeypatch):
    """Kernels that always need compiling and take 1.5 s (announced first, as the real ones)."""
    from streammerge.methods import kernels

    def precompile(kernel, k, raw, announce=None):
        if announce is not None:
            announce()
        time.sleep(1.5)

    monkeypatch.setattr(kernels, "precompile", precompile)


def merge_seconds(stdout: str) -> float:
    m = re.search(r"merged \d+ tensors in ([\d.]+) s", stdout)
    assert m, stdout
    return float(m.group(1))


def test_compile_notice_shows_without_progress_and_is_not_merge_time(
    cabs_recipe, tmp_path, slow_compile
):
    r = CliRunner().invoke(main, ["run", str(cabs_recipe), str(tmp_path / "a"), "--no-progress"])
    assert r.exit_code == 0, r.output
    notice = [line for line in r.stderr.splitlines() if "compiling" in line]
    assert len(notice) == 1
    # what it builds: this method's kernel and dtype, for any model count up to 8
    assert "method and input dtype" in notice[0] and "1 to 8 models" in notice[0]
    assert merge_seconds(r.stdout) < 1.5  # the tiny merge itself, without the 1.5 s compile
    assert re.search(r"kernels compiled in 1\.[5-9] s", r.stdout), r.stdout


def test_quiet_hides_the_compile_notice(cabs_recipe, tmp_path, slow_compile):
    r = CliRunner().invoke(main, ["run", str(cabs_recipe), str(tmp_path / "a"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout == ""


def test_shard_size_help_shows_a_readable_default():
    for command in ("run", "plan", "remix", "add"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "[default: 5GB]" in text, command
        assert "(5GB)" not in text, command
