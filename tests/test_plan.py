"""``streammerge plan``: validates like ``run``, writes nothing, and predicts the peak RSS that
a real merge then reaches (measured here, in child processes, so kernel changes that move the
peak make this fail until the method's ``resident_bytes`` is updated)."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from childproc import run_measured
from click.testing import CliRunner
from conftest import SHAPES
from test_cli import assert_user_error, fast, fast_budget, write_recipe

from streammerge import run_merge
from streammerge.cli import main
from streammerge.planning import describe_plan
from streammerge.synth import LlamaShape, generate_family

# embed_tokens and lm_head hold 8 Mi elements, more than one chunk at these budgets, so the
# chunk length (and the predicted peak) is set by the budget, not by the largest tensor
SHAPE = LlamaShape(hidden=1024, intermediate=2816, layers=1, heads=8, kv_heads=4, vocab=8192)
BUDGETS = {"task_arithmetic": "1GiB", "cabs": "700MiB"}
TOLERANCE = 0.20


def run(*args: object, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="module")
def big_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return generate_family(tmp_path_factory.mktemp("plan"), SHAPE, n_finetunes=2, seed=3)


@pytest.mark.parametrize("method", ["task_arithmetic", "cabs"])
def test_predicted_peak_rss_matches_a_real_merge(tmp_path, big_family, method):
    base, fts = big_family
    extra = {"parameters": {"n_val": 16, "m_val": 64} if method == "cabs" else {}}
    recipe = write_recipe(tmp_path / "r.yaml", base, fts, merge_method=method, **extra)
    out = tmp_path / "out"
    budget = BUDGETS[method]
    rc, stdout, err, _ = run_measured(
        ["plan", str(recipe), str(out), "--max-memory", budget, "--json", "--no-calibrate"]
    )
    assert rc == 0, err
    assert not out.exists()
    plan = json.loads(stdout)
    assert plan["chunk_elems"] < SHAPE.vocab * SHAPE.hidden  # budget-bound chunks
    predicted = plan["predicted_peak_rss"] / 2**20
    rc, _, err, measured = run_measured(
        ["run", str(recipe), str(out), "--max-memory", budget, "--quiet"]
    )
    assert rc == 0, err
    print(f"{method}: predicted {predicted:.0f} MiB, measured {measured:.0f} MiB")
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


def test_plan_writes_nothing_and_describes_the_merge(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family)
    out = tmp_path / "new" / "merged"
    result = run("plan", recipe, out, *fast()[:4])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "new").exists()
    text = result.stdout
    assert "6 merged, 1 copied" in text  # position_ids (int64) is copied
    assert "peak RSS (predicted)" in text and "peak VRAM: n/a (cpu)" in text
    assert "needed" in text and "free" in text and "time (estimated)" in text
    assert "position_ids" not in text  # the table only with --tensors
    table = run("plan", recipe, out, *fast()[:4], "--tensors", "--no-calibrate")
    assert table.exit_code == 0, table.output
    rows = {ln.split()[0]: ln.split() for ln in table.stdout.splitlines() if ln.split()}
    assert set(SHAPES) <= set(rows)
    assert rows["position_ids"][2] == "copy" and rows["odd.weight"][2] == "merge"
    assert "time (estimated)" not in table.stdout


def test_plan_json(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family)
    out = tmp_path / "merged"
    result = run("plan", recipe, out, *fast()[:4], "--json", "--chunk-elems", "64")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not out.exists()
    assert plan["method"] == "cabs" and plan["merged"] == 6 and plan["copied"] == 1
    assert plan["device"] == "cpu" and plan["predicted_peak_vram"] is None
    by_name = {t["name"]: t for t in plan["tensors"]}
    assert set(by_name) == set(SHAPES)
    assert by_name["embed.weight"]["chunks"] == -(-37 * 24 // 64)  # 888 elements in 64s
    assert plan["chunks"] == sum(t["chunks"] for t in plan["tensors"])
    assert plan["disk_needed"] > 0 and plan["disk_ok"] is True
    assert plan["estimated_seconds"] > 0 and plan["calibration"]["read_bytes_per_s"] > 0
    assert plan["predicted_peak_rss"] > plan["baseline_rss"]


def test_plan_refuses_what_run_refuses(tmp_path, family):
    bad = write_recipe(tmp_path / "bad.yaml", *family, parameters={"n_val": 5, "m_val": 4})
    result = run("plan", bad, tmp_path / "out", *fast()[:4])
    assert_user_error(result.stderr, result.exit_code, "n_val")
    recipe = write_recipe(tmp_path / "r.yaml", *family)
    inside = family[1][0] / "merged"
    result = run("plan", recipe, inside, *fast()[:4])
    assert_user_error(result.stderr, result.exit_code, "inside")
    assert not inside.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = run("plan", recipe, foreign, *fast()[:4])
    assert_user_error(result.stderr, result.exit_code, "not empty")


def test_plan_reports_a_full_disk(tmp_path, family, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    recipe = write_recipe(tmp_path / "r.yaml", *family)
    report = describe_plan(recipe, tmp_path / "out", max_memory=2**34, calibrate=False)
    assert not report.disk_ok and report.disk_free == 100
    result = run("plan", recipe, tmp_path / "out", *fast()[:4], "--no-calibrate")
    assert "peak RSS (predicted)" in result.stdout  # the plan is still shown
    assert_user_error(result.stderr, result.exit_code, "not enough disk space")


def test_plan_of_a_finished_or_interrupted_output(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", *family)
    out = tmp_path / "merged"

    class Stop(Exception):
        pass

    def stop(report):
        if report.name == "odd.weight":
            raise Stop

    with pytest.raises(Stop):
        run_merge(recipe, out, max_memory=fast_budget(), shard_size=2000, chunk_elems=64,
                  on_tensor=stop)  # fmt: skip
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    plan = run("plan", recipe, out, *fast()[:4], "--json", "--no-calibrate")
    assert plan.exit_code == 0, plan.output
    assert "interrupted run" in " ".join(json.loads(plan.stdout)["warnings"])
    assert json.loads(plan.stdout)["chunk_elems"] == 64  # the interrupted run's chunks
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert run("run", recipe, out, *fast()).exit_code == 0
    done = run("plan", recipe, out, *fast()[:4], "--no-calibrate")
    assert done.exit_code == 0 and "--force" in done.stderr
