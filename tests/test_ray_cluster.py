"""``run --executor ray`` on a real two-node Ray cluster (``raycluster.local_cluster``: a head
and a second node on this machine, separate ``ray start`` processes, 1 CPU each): the CLI's
bytes equal a local run's with a worker killed mid-unit (Ray reruns the unit), a unit
whose worker dies twice fails resumably with the unit named, a killed driver is resumed by
rerunning the command locally, and a bad input is refused on the driver before any worker
starts. Skipped without Ray.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import raykill
import torch
from conftest import make_family
from raycluster import ENV, NODE_MEMORY, local_cluster
from safetensors.torch import load_file, save_file
from test_method_contract import files, recipe_doc

from streammerge import StreamMergeError, parse_recipe, run_merge
from streammerge.methods import METHODS
from streammerge.recipe import load_recipe

ray = pytest.importorskip("ray")

TESTS = Path(__file__).parent
CHUNK = 136
SHARD = 3000
BUDGET = 2**30
"""Each worker's --max-memory: one fits a node (``NODE_MEMORY``), two do not."""
assert NODE_MEMORY // BUDGET == 1


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # this process's drivers join the cluster the same way
    with local_cluster() as address:
        yield address
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def fam(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "m", k=2, dtype=torch.bfloat16, shards=(2, 1))


def cabs(base: Path, fts: list[Path]):
    return parse_recipe(recipe_doc(METHODS["cabs"].spec, base, fts))


def write_recipe(tmp_path: Path, base: Path, fts: list[Path]) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_doc(METHODS["cabs"].spec, base, fts)))
    return path


def cli(*args: str, cabs: str | None = None) -> subprocess.Popen:
    """The CLI in a child process; ``cabs``: ``slow:SECONDS`` or ``die:LOG`` (see
    ``raykill.DRIVER``)."""
    code = ["-c", raykill.DRIVER, str(TESTS), cabs] if cabs else ["-m", "streammerge"]
    return subprocess.Popen([sys.executable, *code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def run_args(recipe: Path, out: Path, address: str, *extra: str) -> list[str]:
    return ["run", str(recipe), str(out), "--executor", "ray", "--ray-address", address,
            "--max-memory", str(BUDGET), "--shard-size", str(SHARD), "--chunk-elems",
            str(CHUNK), "--quiet", *extra]  # fmt: skip


def local(recipe, out: Path) -> None:
    run_merge(recipe, out, chunk_elems=CHUNK, max_memory=BUDGET, shard_size=SHARD)


def test_cli_on_two_nodes_with_a_worker_killed_writes_a_local_runs_bytes(
    fam, tmp_path: Path, cluster: str
) -> None:
    base, fts = fam
    recipe = write_recipe(tmp_path, base, fts)
    local(load_recipe(recipe), tmp_path / "local")  # the card quotes the recipe's text
    log = tmp_path / "deaths"
    proc = cli(*run_args(recipe, tmp_path / "ray", cluster), cabs=f"die:{log}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert len(log.read_text().splitlines()) == 1  # one worker died mid-unit; Ray reran it
    assert files(tmp_path / "ray") == files(tmp_path / "local")


@pytest.fixture
def dying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make this process's CABS a :class:`raykill.DyingCabs` (sent to workers by value)."""
    ray.cloudpickle.register_pickle_by_value(raykill)
    log = tmp_path / "deaths"

    def install(deaths: int, tensor: str | None = None) -> Path:
        monkeypatch.setitem(METHODS, "cabs", raykill.DyingCabs(log, deaths, tensor))
        return log

    yield install
    ray.cloudpickle.unregister_pickle_by_value(raykill)


def test_unit_whose_worker_dies_twice_fails_resumably(
    fam, tmp_path: Path, cluster: str, dying, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, fts = fam
    recipe = cabs(base, fts)
    local(recipe, tmp_path / "local")
    dying(10**6, "embed.weight")  # every attempt dies at the tensor's second chunk
    with pytest.raises(StreamMergeError) as err:
        run_merge(recipe, tmp_path / "ray", chunk_elems=CHUNK, max_memory=BUDGET,
                  shard_size=SHARD, executor="ray", ray_address=cluster)  # fmt: skip
    msg = str(err.value)
    assert re.search(r"work unit \d+ \(\S+ chunks \d+-\d+.*\) failed: its worker died 2 times", msg)
    assert "run the same command again to resume" in msg.lower()
    assert (tmp_path / "ray" / "INCOMPLETE").exists()
    monkeypatch.setitem(METHODS, "cabs", type(METHODS["cabs"]).__mro__[1]())  # plain CABS
    local(recipe, tmp_path / "ray")  # the same command, locally: resumes
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_killed_driver_is_resumed_by_rerunning_locally(fam, tmp_path: Path, cluster: str) -> None:
    base, fts = fam
    path = write_recipe(tmp_path, base, fts)
    recipe = load_recipe(path)
    local(recipe, tmp_path / "local")
    out = tmp_path / "ray"
    proc = cli(*run_args(path, out, cluster), cabs="slow:0.05")
    journal = out / ".streammerge" / "journal.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err  # killed mid-run, not finished
    assert (out / "INCOMPLETE").exists() and not (out / "streammerge.json").exists()
    summary = run_merge(recipe, out, max_memory=BUDGET, shard_size=SHARD)
    assert summary.resumed_chunks > 0
    assert files(out) == files(tmp_path / "local")


def test_bad_input_is_refused_on_the_driver(fam, tmp_path: Path, cluster: str) -> None:
    base, fts = fam
    (shard,) = fts[0].glob("*.safetensors")
    tensors = load_file(shard)
    tensors["layer.0.mlp.weight"] = tensors["layer.0.mlp.weight"][:, :20].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "ray"
    proc = cli(*run_args(write_recipe(tmp_path, base, fts), out, cluster))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "layer.0.mlp.weight" in lines[0] and str(fts[0]) in lines[0]
    assert not out.exists()  # nothing written, by the driver or a worker
