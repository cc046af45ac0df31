"""The console: a successful run, and user mistakes as one clean line on stderr with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
def fast_budget() -> int:
    """1 GiB on top of what this process holds: CliRunner runs the merge in-process, and the
    suite's earlier tests grow the process."""
    return psutil.Process().memory_info().rss + 2**30


def fast() -> list[str]:
    """Small shards, no progress bar, and an in-process budget (:func:`fast_budget`)."""
    return ["--max-memory", str(fast_budget()), "--shard-size", "2KB", "--no-progress"]


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
    # the same command again: the same merge is already there, complete (exit 0, like make)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already holds this merge" in again.stdout, again.stderr


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


@pytest.mark.parametrize("command", ["run", "demo", "plan"])
def test_help_shows_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout and f"streammerge {command} " in result.stdout


def front_matter(card: str) -> dict:
    """The YAML between the card's opening '---' lines."""
    assert card.startswith("---\n"), card[:40]
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_model_card(tmp_path, family):
    base, fts = family
    (base / "README.md").write_text("the base's own card\n")  # not copied over ours
    recipe = write_recipe(tmp_path / "r.yaml", base, fts, pruning_order=[str(fts[1]), str(fts[0])])
    out = tmp_path / "merged"
    result = run("run", recipe, out, *fast())
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(base)
    assert meta["tags"] == ["merge", "streammerge"] and meta["library_name"] == "transformers"
    body = card.split("---\n", 2)[2]
    assert "`cabs`" in body and "2:4" in body
    assert body.index(str(fts[1])) < body.index(str(fts[0]))  # pruning order
    assert recipe.read_text() in body  # the recipe verbatim
    assert time.strftime("%Y-%m-%d", time.gmtime()) in body
    # written before the completion marker
    assert (out / "README.md").stat().st_mtime_ns <= (out / "streammerge.json").stat().st_mtime_ns


def test_model_card_tadrop_and_densities(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "r.yaml", *family, merge_method="ties", parameters={"density": 0.5, "tadrop": 1}
    )
    out = tmp_path / "merged"
    result = run("run", recipe, out, *fast())
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert front_matter(card)["base_model"] == str(family[0])
    assert "| density |" in card and "## TADrop" in card and "| mean | min | max |" in card


def test_model_card_of_a_baseless_linear_merge_names_no_fine_tune_as_base(tmp_path, family):
    _, fts = family
    doc = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 0.5}}
                                                for f in fts]}  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "merged"
    result = run("run", recipe, out, *fast())
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert front_matter(card)["base_model"] == [str(f) for f in fts]
    assert "as the base" not in card and "without a base model" in card


def test_quiet_prints_nothing_but_warnings(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family, frobnicate=3)
    result = run("run", recipe, tmp_path / "out", *fast()[:4], "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert [ln.split()[0] for ln in result.stderr.splitlines()] == ["warning:"]
    assert (tmp_path / "out" / "streammerge.json").is_file()


def test_progress_shows_rate_eta_and_rss(tmp_path, recipe):
    result = run("run", recipe, tmp_path / "out", *fast()[:4], "--progress")
    assert result.exit_code == 0, result.output
    assert "merging" in result.stderr and "B/s" in result.stderr and "RSS " in result.stderr
    assert "<" in result.stderr  # tqdm's elapsed<remaining (the ETA)


def plan_order(base: Path) -> list[str]:
    from streammerge.model import ModelFolder

    return ModelFolder(base).names()


def test_log_json_one_line_per_tensor(tmp_path, recipe, family):
    log = tmp_path / "log.jsonl"
    result = run("run", recipe, tmp_path / "out", *fast(), "--log-json", log)
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [e["name"] for e in lines] == plan_order(family[0])
    assert set(plan_order(family[0])) == set(SHAPES)
    by_name = {e["name"]: e for e in lines}
    assert by_name["position_ids"]["merged"] is False and by_name["position_ids"]["kept"] is None
    odd = by_name["odd.weight"]
    assert odd["merged"] and odd["bytes_written"] == 91 * 2 and odd["bytes_read"] == 3 * 91 * 2
    assert len(odd["kept"]) == 2 and 0 < odd["kept"][0] <= 2 * 23  # 2:4 over 23 blocks
    assert all(e["seconds"] >= 0 and e["chunks"] >= 1 and not e["skipped"] for e in lines)
    summary = json.loads((tmp_path / "out" / "streammerge.json").read_text())
    assert sum(e["bytes_written"] for e in lines) == summary["bytes_written"]


def test_log_json_marks_tensors_a_resumed_run_skipped(tmp_path, recipe, family):
    from streammerge import run_merge

    class Stop(Exception):
        pass

    def stop_at(report):
        if report.name == "layer.0.norm.weight":
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        run_merge(recipe, out, max_memory=fast_budget(), shard_size=2000, on_tensor=stop_at)
    log = tmp_path / "log.jsonl"
    result = run("run", recipe, out, *fast(), "--log-json", log)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.stdout
    skipped = [json.loads(ln)["skipped"] for ln in log.read_text().splitlines()]
    names = plan_order(family[0])
    assert skipped == [i <= names.index("layer.0.norm.weight") for i in range(len(names))]


def test_colour_only_on_a_terminal(tmp_path, family):
    bad = write_recipe(tmp_path / "r.yaml", *family, parameters={"n_val": 5, "m_val": 4})
    plain = run("run", bad, tmp_path / "out", *fast())
    assert plain.stderr.startswith("error: ") and "\x1b[" not in plain.output
    # CliRunner(color=True) plays a terminal: click keeps the ANSI codes
    tty = CliRunner().invoke(main, ["run", str(bad), str(tmp_path / "out"), *fast()], color=True)
    assert tty.exit_code == 2 and "\x1b[31m" in tty.stderr and "error:" in tty.stderr
    warn = write_recipe(tmp_path / "w.yaml", *family, frobnicate=3)
    quiet = run("run", warn, tmp_path / "out2", *fast(), "--quiet")
    assert quiet.stderr.startswith("warning: ") and "\x1b[" not in quiet.stderr
