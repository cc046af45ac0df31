"""Crash safety: SIGKILL at random points then resume gives the bytes of an uninterrupted run;
SIGTERM/SIGINT stop cleanly; changed plans, finished outputs and concurrent runs are refused.

The kill test runs a real ``streammerge run`` subprocess. Kill times are random but seeded;
``STREAMMERGE_KILL_POINTS`` sets the number of points per recipe (default 4, or 10 with
``STREAMMERGE_SLOW=1``).
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SLOW

import streammerge.engine as engine
from streammerge import StreamMergeError, run_merge
from streammerge.journal import STATE_DIR, FolderLock
from streammerge.synth import LlamaShape, generate_family

SHAPE = LlamaShape(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=4000)
CHUNK = "16384"
RECIPES = {
    "cabs": "merge_method: cabs\nparameters: {n_val: 16, m_val: 64}\n",
    "dare_ties": "merge_method: dare_ties\nparameters: {density: 0.3, random_seed: 7}\n",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    generate_family(root / "fam", SHAPE, n_finetunes=2, seed=1)
    return root


def write_recipe(root: Path, method: str, weight2: float = 0.8) -> Path:
    text = RECIPES[method] + (
        f"base_model: {root}/fam/base\nmodels:\n"
        f"  - model: {root}/fam/ft1\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {root}/fam/ft2\n    parameters: {{weight: {weight2}}}\n"
    )
    path = root / f"{method}-{weight2}.yaml"
    path.write_text(text)
    return path


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "streammerge", "run", *map(str, args), "--no-progress"]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a finished output except the marker (it records the wall time) and the
    run's own bookkeeping, which a kill in the last milliseconds can leave behind."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and rel.parts[0] not in ("streammerge.json", STATE_DIR, "INCOMPLETE"):
            files[str(rel)] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def uninterrupted(family: Path) -> dict[str, dict[str, bytes]]:
    """Outputs of uninterrupted runs."""
    refs = {}
    for method in RECIPES:
        out = family / f"ref-{method}"
        subprocess.run(cli(write_recipe(family, method), out, "--chunk-elems", CHUNK), check=True)
        refs[method] = snapshot(out)
    return refs


def wait_for_chunks(proc: subprocess.Popen, out: Path, chunks: int) -> None:
    """Wait until ``proc``'s journal lists ``chunks`` finished chunks (or it exits)."""
    journal = out / STATE_DIR / "journal.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if journal.read_text().count('"chunk"') >= chunks:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)


def kill_after_chunks(proc: subprocess.Popen, out: Path, chunks: int, delay: float) -> None:
    """SIGKILL ``proc`` once its journal lists ``chunks`` finished chunks, then ``delay`` s."""
    wait_for_chunks(proc, out, chunks)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def inputs_digest(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in (root / "fam").rglob("*")}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_sigkill_anywhere_then_resume_is_byte_identical(family, uninterrupted, method, tmp_path):
    ref = uninterrupted[method]
    recipe = write_recipe(family, method)
    points = int(os.environ.get("STREAMMERGE_KILL_POINTS", "10" if SLOW else "4"))
    rng = random.Random(f"kill-{method}")
    before = inputs_digest(family)
    chunks = sum(-(-math.prod(shape) // int(CHUNK)) for _, _, shape in SHAPE.tensor_specs())
    resumed = 0
    for i in range(points):
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen(cli(recipe, out, "--chunk-elems", CHUNK), stderr=subprocess.PIPE)
        # kill once the journal holds a random number of chunks, plus a random delay, so the
        # points spread over the whole merge (and land between journal flushes)
        kill_after_chunks(proc, out, rng.randint(1, chunks - 1), rng.uniform(0, 0.3))
        if (out / "streammerge.json").exists():  # killed after completing: nothing to resume
            assert snapshot(out) == ref, f"kill point {i}"
            continue
        done = subprocess.run(
            cli(recipe, out, "--chunk-elems", CHUNK), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        resumed += "resumed:" in done.stdout
        assert snapshot(out) == ref, f"kill point {i}"
        assert not (out / STATE_DIR).exists() and not (out / "INCOMPLETE").exists()
    assert resumed >= points - 2  # nearly every kill landed mid-merge, after some progress
    assert inputs_digest(family) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_says_how_to_resume(family, uninterrupted, sig, tmp_path):
    ref = uninterrupted["cabs"]
    recipe = write_recipe(family, "cabs")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli(recipe, out, "--chunk-elems", CHUNK), stderr=subprocess.PIPE, text=True
    )
    wait_for_chunks(proc, out, 20)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "resume" in err and "Traceback" not in err
    assert (out / "INCOMPLETE").exists() and not (out / "streammerge.json").exists()
    subprocess.run(cli(recipe, out, "--chunk-elems", CHUNK), check=True, capture_output=True)
    assert snapshot(out) == ref


def interrupted_run(family: Path, out: Path, method: str = "cabs") -> None:
    proc = subprocess.Popen(cli(write_recipe(family, method), out, "--chunk-elems", CHUNK))
    kill_after_chunks(proc, out, 20, 0.0)
    assert (out / STATE_DIR / "journal.jsonl").exists()


def test_changed_recipe_is_refused_then_restart(family, uninterrupted, tmp_path):
    out = tmp_path / "out"
    interrupted_run(family, out)
    other = write_recipe(family, "cabs", weight2=0.5)
    refused = subprocess.run(cli(other, out), capture_output=True, text=True)
    assert refused.returncode == 2
    assert "the recipe" in refused.stderr and "--restart" in refused.stderr
    assert "Traceback" not in refused.stderr
    ok = subprocess.run(cli(other, out, "--restart"), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_changed_input_is_refused(family, uninterrupted, tmp_path):
    out = tmp_path / "out"
    interrupted_run(family, out)
    shard = next((family / "fam" / "ft2").glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "rewritten"
    try:
        refused = subprocess.run(
            cli(write_recipe(family, "cabs"), out), capture_output=True, text=True
        )
        assert refused.returncode == 2
        assert "ft2" in refused.stderr and "changed" in refused.stderr
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_finished_output_needs_force(family, uninterrupted, tmp_path):
    ref = uninterrupted["dare_ties"]
    recipe = write_recipe(family, "dare_ties")
    out = tmp_path / "out"
    subprocess.run(cli(recipe, out, "--chunk-elems", CHUNK), check=True, capture_output=True)
    again = subprocess.run(cli(recipe, out), capture_output=True, text=True)  # the same merge
    assert again.returncode == 0 and "already holds this merge" in again.stdout, again.stderr
    other = write_recipe(family, "dare_ties", weight2=0.5)  # a different one needs --force
    refused = subprocess.run(cli(other, out), capture_output=True, text=True)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert snapshot(out) == ref  # untouched
    forced = subprocess.run(
        cli(recipe, out, "--force", "--chunk-elems", CHUNK), capture_output=True
    )
    assert forced.returncode == 0
    assert snapshot(out) == ref


def test_concurrent_run_is_refused(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out), pytest.raises(StreamMergeError, match="another streammerge run"):
        run_merge(write_recipe(family, "cabs"), out)
    assert not (out / "streammerge.json").exists()


def test_tadrop_merge_resumes(tmp_path, monkeypatch):
    """TADrop's densities come from a sampling pass that a resume repeats: same plan, same bytes."""
    import errno

    from streammerge import parse_recipe
    from streammerge.safetensors_io import ShardWriter

    base, fts = generate_family(tmp_path / "m", "tiny", n_finetunes=2, seed=3)
    doc = {
        "merge_method": "cabs",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts],
        "parameters": {"n_val": 8, "m_val": 32, "tadrop": 1},
    }
    recipe = parse_recipe(doc)
    run_merge(recipe, tmp_path / "ref", chunk_elems=512, max_memory=2**32)
    write, calls = ShardWriter.write, []

    def failing_write(self, *args):
        calls.append(1)
        if len(calls) > 100:  # after a few whole tensors (journaled at tensor ends)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, *args)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    monkeypatch.setattr(engine, "JOURNAL_INTERVAL_S", 0.0)  # journal every chunk at once
    with pytest.raises(StreamMergeError, match="disk full"):
        run_merge(recipe, tmp_path / "out", chunk_elems=512, max_memory=2**32)
    monkeypatch.setattr(ShardWriter, "write", write)
    summary = run_merge(recipe, tmp_path / "out", chunk_elems=512, max_memory=2**32)
    assert summary.resumed_chunks > 0
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref")


SHARDED = ("--chunk-elems", CHUNK, "--shard-size", "1MB")
"""Small shards: a kill halfway leaves finished shards, a ``.partial`` and mask chunks."""


def _flip_first_data_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0xFF
    p.write_bytes(bytes(data))


FAULTS = {
    "delete_partial": lambda out: [p.unlink() for p in out.glob("*.partial")],
    "alter_partial": lambda out: [_flip_first_data_byte(p) for p in out.glob("*.partial")],
    "alter_finished_shard": lambda out: [
        _flip_first_data_byte(p) for p in out.glob("model-*.safetensors")
    ],
    "delete_mask_chunks": lambda out: [
        p.unlink() for p in (out / "occupancy.zarr").rglob("c/*") if p.is_file()
    ][:3],
}


@pytest.fixture(scope="module")
def sharded_ref(family: Path) -> dict[str, bytes]:
    out = family / "ref-sharded"
    subprocess.run(cli(write_recipe(family, "cabs"), out, *SHARDED), check=True)
    return snapshot(out)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_sigkill_then_damage_then_resume_gives_the_uninterrupted_bytes(
    family, sharded_ref, fault, tmp_path
):
    """A real process is killed halfway, then what it left is damaged the way a user or a disk
    would (a deleted or edited partial, an edited finished shard, lost mask chunks): the rerun
    repairs what does not check out and ends in the uninterrupted bytes."""
    recipe = write_recipe(family, "cabs")
    before = inputs_digest(family)
    chunks = sum(-(-math.prod(shape) // int(CHUNK)) for _, _, shape in SHAPE.tensor_specs())
    for attempt in range(4):  # until the kill leaves something of the kind to damage
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen(cli(recipe, out, *SHARDED), stderr=subprocess.PIPE)
        kill_after_chunks(proc, out, chunks // 2 + 5 * attempt, 0.0)
        if FAULTS[fault](out):
            break
    else:
        pytest.fail(f"no kill left anything for {fault}")
    done = subprocess.run(cli(recipe, out, *SHARDED), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(out) == sharded_ref
    assert inputs_digest(family) == before
