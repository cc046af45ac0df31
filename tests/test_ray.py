"""``run --executor ray`` on an in-process Ray instance (``ray.init(num_cpus=2)``): the same
bytes as a local run for every registered method, work units that cover the plan exactly
once, a worker's input error reported by the driver, and a local run resumed with Ray.
The real two-node cluster (faults, the CLI) is ``test_ray_cluster.py``. Skipped without Ray.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import make_family
from safetensors.torch import load_file, save_file
from test_method_contract import files, recipe_doc

import streammerge.engine as engine
from streammerge import StreamMergeError, parse_recipe, run_merge
from streammerge.journal import Progress
from streammerge.methods import METHODS
from streammerge.model import ModelFolder
from streammerge.plan import build_plan
from streammerge.ray_executor import cut_units, splittable, unit_progress

ray = pytest.importorskip("ray")

NAMES = sorted(METHODS)
CHUNK = 136  # cuts rows and n:m blocks
SHARD = 3000  # several output shards, so units of different shards run at once


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture
def fam(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "m", k=2, dtype=torch.bfloat16, shards=(2, 1))


def merge(recipe, out: Path, **kw) -> None:
    run_merge(recipe, out, chunk_elems=CHUNK, max_memory=2**30, shard_size=SHARD, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_same_bytes_as_a_local_run(name: str, fam, tmp_path: Path, local_ray) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(METHODS[name].spec, base, fts))
    merge(recipe, tmp_path / "local")
    merge(recipe, tmp_path / "ray", executor="ray")
    local, dist = files(tmp_path / "local"), files(tmp_path / "ray")
    assert any(k.startswith("model-") for k in local)
    assert local.keys() == dist.keys()
    for key, data in local.items():  # shards, masks and their counts, index, card
        assert dist[key] == data, key


@pytest.mark.parametrize("name", ["cabs", "ties"])  # chunk-local / statistics passes
def test_units_cover_the_remaining_work_once(name: str, fam) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(METHODS[name].spec, base, fts))
    folders = [ModelFolder(base), *(ModelFolder(f) for f in fts[:2])]
    plan = build_plan(recipe, folders[0], folders[1:], 2**30, SHARD, CHUNK)
    done = Progress()
    done.shards.add(0)  # a finished shard and a finished tensor are not handed out again
    finished = next(ti for ti, t in enumerate(plan.tensors) if t.shard == 1)
    done.tensors.add(finished)
    units = cut_units(plan, recipe.impl, done, target_bytes=2000)
    seen: list[tuple[int, int]] = []
    for u in units:
        assert {plan.tensors[ti].shard for ti, _, _ in u.work} == {u.shard}
        for ti, c0, c1 in u.work:
            task = plan.tensors[ti]
            whole = (c0, c1) == (0, len(task.chunks()))
            assert whole or splittable(recipe.impl, task, recipe.dtype)
            seen += [(ti, ci) for ci in range(c0, c1)]
            # the worker skips every chunk outside its range
            skip = unit_progress(plan, u, done).chunks[ti]
            assert skip == set(range(len(task.chunks()))) - set(range(c0, c1))
    want = [(ti, ci) for ti, t in enumerate(plan.tensors) if t.shard != 0 and ti != finished
            for ci in range(len(t.chunks()))]  # fmt: skip
    assert sorted(seen) == sorted(want)
    assert len(units) > len(plan.shards) - 1  # small units: more than one per shard left
    split = [u for u in units if len(u.work) == 1 and u.work[0][1] > 0]
    assert bool(split) == (name == "cabs")  # ties' statistics passes keep tensors whole
    for f in folders:
        f.close()


def test_input_error_in_a_worker_is_the_drivers_error(fam, tmp_path: Path, local_ray) -> None:
    base, fts = fam
    (shard,) = fts[0].glob("*.safetensors")
    tensors = load_file(shard)
    tensors["layer.0.mlp.weight"][3, 4] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    recipe = parse_recipe(recipe_doc(METHODS["cabs"].spec, base, fts))
    with pytest.raises(StreamMergeError, match="NaN or Inf") as err:
        merge(recipe, tmp_path / "ray", executor="ray")
    msg = str(err.value)
    assert str(shard) in msg and "layer.0.mlp.weight" in msg and "Traceback" not in msg
    assert (tmp_path / "ray" / "INCOMPLETE").exists()
    assert not (tmp_path / "ray" / "streammerge.json").exists()


def test_a_local_run_cut_short_resumes_with_ray(
    fam, tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(METHODS["cabs"].spec, base, fts))
    merge(recipe, tmp_path / "whole")
    check, calls = engine.Scheduler._check_stop, []

    def crash(self: engine.Scheduler) -> None:  # called after each chunk is handed over
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Scheduler, "_check_stop", crash)
    with pytest.raises(KeyboardInterrupt):
        merge(recipe, tmp_path / "out")
    monkeypatch.setattr(engine.Scheduler, "_check_stop", check)
    # no chunk_elems: the interrupted run's, from its journal
    summary = run_merge(recipe, tmp_path / "out", max_memory=2**30, shard_size=SHARD,
                        executor="ray")  # fmt: skip
    assert summary.resumed_chunks > 0
    assert files(tmp_path / "out") == files(tmp_path / "whole")


def test_options_refused_before_any_work(fam, tmp_path: Path) -> None:
    base, fts = fam
    recipe = parse_recipe(recipe_doc(METHODS["cabs"].spec, base, fts))
    with pytest.raises(StreamMergeError, match="--ray-address needs --executor ray"):
        merge(recipe, tmp_path / "out", ray_address="127.0.0.1:1")
    with pytest.raises(StreamMergeError, match="--executor must be one of"):
        merge(recipe, tmp_path / "out", executor="dask")
    assert not (tmp_path / "out").exists()


def test_sweep_on_ray_replays_to_the_bytes_of_direct_runs(fam, tmp_path: Path, local_ray) -> None:
    from streammerge.sweep import sweep

    base, fts = fam
    recipe = parse_recipe(recipe_doc(METHODS["cabs"].spec, base, fts))
    results = sweep(recipe, tmp_path / "sweep", {"ft2": [0.25, 2.0]}, executor="ray",
                    chunk_elems=CHUNK, max_memory=2**30, shard_size=SHARD)  # fmt: skip
    assert [p.replayed for p, _ in results] == [False, True]
    for p, _ in results:
        doc = recipe_doc(METHODS["cabs"].spec, base, fts)
        for item, (_, w) in zip(doc["models"], p.weights, strict=True):
            item["parameters"]["weight"] = w
        merge(parse_recipe(doc), tmp_path / f"direct-{p.index}")
        for f in (tmp_path / f"direct-{p.index}").glob("model-*.safetensors"):
            assert (p.out_dir / f.name).read_bytes() == f.read_bytes()
