"""Never a wrong model marked complete: what an interruption leaves is verified before a resume
trusts it, finished folders can be verified, dead ends have a way out, and nothing is written
into an input. Each test damages an interrupted or finished output the way a user (or a disk)
would, and checks the rerun ends in the uninterrupted bytes or one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_family

import streammerge.engine as engine
from streammerge import StreamMergeError, parse_recipe, run_merge
from streammerge.cli import main
from streammerge.journal import Journal
from streammerge.model import ModelFolder
from streammerge.verify import verify_output

RUN = {"chunk_elems": 40, "max_memory": 2**30, "shard_size": 1500}
"""Small chunks and several shards, so an interruption leaves finished and partial shards."""


def recipe(base: Path, fts: list[Path], method: str = "cabs"):
    params = {"n_val": 2, "m_val": 4} if method == "cabs" else {"density": 0.5}
    return parse_recipe({
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": w}}
                   for f, w in zip(fts, (1.0, 0.7), strict=True)],
        "parameters": params,
    })  # fmt: skip


def files(out: Path) -> dict[str, str]:
    """SHA-256 of every output file a finished merge keeps (not the marker: it holds times)."""
    keep = (p for p in sorted(out.rglob("*")) if p.is_file() and p.name != "streammerge.json")
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in keep}


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def fam(tmp_path: Path):
    base, fts = make_family(tmp_path / "m", k=2)
    return base, fts, recipe(base, fts)


@pytest.fixture
def whole(fam, tmp_path: Path) -> dict[str, str]:
    """The bytes of an uninterrupted run."""
    run_merge(fam[2], tmp_path / "whole", **RUN)
    return files(tmp_path / "whole")


def interrupt(r, out: Path, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Run until ``after`` chunks were handed to the writer, then crash."""
    calls = {"n": 0}
    check = engine.Scheduler._check_stop

    def crash(self: engine.Scheduler) -> None:
        calls["n"] += 1
        if calls["n"] == after:
            raise RuntimeError("simulated crash")
        check(self)

    monkeypatch.setattr(engine.Scheduler, "_check_stop", crash)
    monkeypatch.setattr(engine, "JOURNAL_INTERVAL_S", 0.0)  # journal every chunk at once
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_merge(r, out, **RUN)
    monkeypatch.setattr(engine.Scheduler, "_check_stop", check)
    assert not (out / "streammerge.json").exists()


def test_deleted_partial_is_redone_not_zeroed(fam, whole, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    interrupt(fam[2], out, monkeypatch, after=30)
    partials = sorted(out.glob("*.partial"))
    assert partials
    for p in partials:
        p.unlink()  # "disk full": deleting the big file is the natural thing to do
    s = run_merge(fam[2], out, **RUN)
    assert files(out) == whole
    assert any("gone" in line for line in s.repaired), s.repaired


def test_altered_partial_and_finished_shard_are_redone(fam, whole, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    interrupt(fam[2], out, monkeypatch, after=45)
    finished = sorted(p for p in out.glob("model-*.safetensors"))
    partial = sorted(out.glob("*.partial"))
    assert finished and partial, "the interruption should leave both kinds"
    for p in (finished[0], partial[0]):
        data = bytearray(p.read_bytes())
        first = 8 + int.from_bytes(data[:8], "little")  # the first tensor's first byte
        data[first] ^= 0xFF
        p.write_bytes(bytes(data))
    s = run_merge(fam[2], out, **RUN)
    assert files(out) == whole
    assert len(s.repaired) >= 2, s.repaired


def test_deleted_mask_chunk_is_redone(fam, whole, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    interrupt(fam[2], out, monkeypatch, after=45)
    chunks = sorted(p for p in (out / "occupancy.zarr").rglob("c/*") if p.is_file())
    assert chunks
    chunks[0].unlink()
    s = run_merge(fam[2], out, **RUN)
    assert files(out) == whole
    assert any("mask" in line for line in s.repaired), s.repaired


def test_state_folder_linked_into_an_input_is_refused(fam, tmp_path) -> None:
    _, fts, r = fam
    before = tree_digest(fts[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / ".streammerge").symlink_to(fts[0])
    with pytest.raises(StreamMergeError, match="link"):
        run_merge(r, out, **RUN)
    assert tree_digest(fts[0]) == before


def test_log_json_into_an_input_is_refused(fam, tmp_path) -> None:
    base, fts, _ = fam
    doc = tmp_path / "r.yaml"
    doc.write_text(
        f"merge_method: cabs\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n"
        f"  - model: {fts[1]}\nparameters: {{n_val: 2, m_val: 4}}\n"
    )
    before = tree_digest(base)
    res = CliRunner().invoke(main, ["run", str(doc), str(tmp_path / "o"), "--no-progress",
                                    "--log-json", str(base / "config.json")])  # fmt: skip
    assert res.exit_code == 2 and "inside input model folder" in res.stderr
    assert tree_digest(base) == before


def test_kill_between_marker_and_incomplete_then_rerun(fam, whole, tmp_path) -> None:
    out = tmp_path / "whole"
    (out / "INCOMPLETE").write_text("left by a kill during finalize\n")
    (out / ".streammerge").mkdir()
    s = run_merge(fam[2], out, **RUN)  # the same merge: nothing to redo, exit 0
    assert s.up_to_date
    assert not (out / "INCOMPLETE").exists() and not (out / ".streammerge").exists()
    assert files(out) == whole


def test_rerun_of_a_finished_merge_is_a_no_op_and_leaves_no_lock(fam, whole, tmp_path) -> None:
    out = tmp_path / "whole"
    s = run_merge(fam[2], out, **RUN)
    assert s.up_to_date and not (out / ".streammerge").exists()
    changed = recipe(fam[0], fam[1], "ties")  # a different merge still needs --force
    with pytest.raises(StreamMergeError, match="--force"):
        run_merge(changed, out, **RUN)


def test_orphaned_shards_need_restart_and_restart_works(fam, whole, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt(fam[2], out, monkeypatch, after=30)
    shutil.rmtree(out / ".streammerge")
    with pytest.raises(StreamMergeError, match="--restart"):
        run_merge(fam[2], out, **RUN)
    run_merge(fam[2], out, restart=True, **RUN)
    assert files(out) == whole


def test_verify_finds_every_change(fam, whole, tmp_path) -> None:
    out = tmp_path / "whole"
    report = verify_output(out, inputs=True)
    assert report.ok and report.shards > 1 and report.store and report.inputs == 3
    res = CliRunner().invoke(main, ["verify", str(out), "--inputs"])
    assert res.exit_code == 0, res.output

    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["verify", str(out)])
    assert res.exit_code == 1 and shard.name in res.stderr
    data[-1] ^= 1
    shard.write_bytes(bytes(data))

    chunk = next(p for p in (out / "occupancy.zarr").rglob("c/*") if p.is_file())
    chunk.unlink()
    assert not verify_output(out).ok

    cfg = fam[1][0] / "model.safetensors"
    cfg.write_bytes(cfg.read_bytes())  # same bytes, new modification time: a changed input
    assert any("changed" in p for p in verify_output(out, inputs=True).problems)


def test_verify_refuses_what_is_not_a_finished_merge(tmp_path) -> None:
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert (
        res.exit_code == 2 and res.stderr.startswith("error: ") and "not a finished" in res.stderr
    )
    (tmp_path / "streammerge.json").write_text(json.dumps({"complete": True}))
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 2 and "no shard digests" in res.stderr


def test_invalid_base_config_is_refused_before_any_work(fam, tmp_path) -> None:
    base, _, r = fam
    (base / "config.json").write_text("{not json")
    with pytest.raises(StreamMergeError, match=r"config\.json: invalid JSON"):
        run_merge(r, tmp_path / "o", **RUN)
    assert not (tmp_path / "o").exists()
    from streammerge.planning import describe_plan

    with pytest.raises(StreamMergeError, match=r"config\.json"):
        describe_plan(r, tmp_path / "o", calibrate=False)


def test_block_alignment_beyond_the_budget_is_refused(tmp_path, monkeypatch) -> None:
    import streammerge.plan as plan_mod
    from streammerge.memory import Budget

    # a budget that allows chunks of 2^16 elements (the smallest it ever derives)
    monkeypatch.setattr(plan_mod, "decide_chunk", lambda m, *a, **k: Budget(m, 1, 2**16))
    base, fts = make_family(tmp_path / "m", k=2, shapes={"w": (1024, 1024)})
    r = parse_recipe({
        "merge_method": "cabs", "base_model": str(base),
        "models": [{"model": str(f)} for f in fts],
        "parameters": {"n_val": 1, "m_val": 2**20},
    })  # fmt: skip
    with pytest.raises(StreamMergeError, match="m_val"):
        run_merge(r, tmp_path / "o", max_memory=2**30)
    assert not (tmp_path / "o" / "streammerge.json").exists()


def rewrite_keeping_stamp(path: Path, lo: int, hi: int) -> None:
    """Flip bytes [lo, hi) of a file's data, keeping its size, header and modification time:
    what ``cp -p`` of a same-shaped model over it leaves, invisible to the plan digest."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    for i in range(lo, hi):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def data_start(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_input_replaced_with_its_stamp_kept_is_refused_on_resume(fam, tmp_path, monkeypatch):
    _, fts, r = fam
    out = tmp_path / "out"
    interrupt(r, out, monkeypatch, after=30)
    shard = next(fts[0].glob("*.safetensors"))
    rewrite_keeping_stamp(shard, data_start(shard), shard.stat().st_size)  # every data byte
    with pytest.raises(StreamMergeError, match=r"content checksum differs.*--restart") as e:
        run_merge(r, out, **RUN)
    assert str(shard) in str(e.value)
    assert not (out / "streammerge.json").exists()
    run_merge(r, out, restart=True, **RUN)  # the way out: a merge of the current inputs
    assert (out / "streammerge.json").exists()


def test_edited_input_of_a_tensor_read_again_is_refused(tmp_path, monkeypatch):
    """A few edited bytes early in a file are caught when the resumed run reads them again:
    TIES's statistics pass rereads the half-done tensor from its first chunk."""
    base, fts = make_family(tmp_path / "m", k=2)
    r = recipe(base, fts, "ties")
    out = tmp_path / "out"
    plans = []
    init = engine.Scheduler.__init__

    def keep_plan(self, plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        plans.append(plan)
        init(self, plan, *args, **kwargs)

    monkeypatch.setattr(engine.Scheduler, "__init__", keep_plan)
    interrupt(r, out, monkeypatch, after=14)
    _, done = Journal(out).read()
    half = [t for t in sorted(done.chunks) if t not in done.tensors and len(done.chunks[t]) > 1]
    assert half, "the interruption should land inside a tensor, after its first chunk"
    name = plans[0].tensors[half[0]].name
    with closing(ModelFolder(fts[1])) as folder:
        begin, shard = folder.info(name).begin, folder.file_of(name)
    rewrite_keeping_stamp(shard, begin, begin + 8)  # the tensor's first elements only
    with pytest.raises(StreamMergeError, match=f"{re.escape(name)}.*content checksum differs"):
        run_merge(r, out, **RUN)


def test_renames_and_new_files_are_durable_before_what_depends_on_them(fam, tmp_path, monkeypatch):
    """Directory entries are synced where a power loss could lose a name the journal (or the
    marker's reader) relies on: a new ``.partial``, a zarr mask chunk renamed into place, and
    the completion marker before ``INCOMPLETE`` goes."""
    from streammerge.platform import Platform

    events: list[tuple[str, str]] = []
    sync_dir, unlink, extend = Platform.sync_dir, Path.unlink, Journal.extend

    def log_sync_dir(self, path):  # type: ignore[no-untyped-def]
        events.append(("dir", str(path)))
        sync_dir(self, path)

    def log_unlink(self, *a, **k):  # type: ignore[no-untyped-def]
        events.append(("unlink", self.name))
        unlink(self, *a, **k)

    def log_extend(self, entries):  # type: ignore[no-untyped-def]
        entries = list(entries)
        events.extend(("journal", json.dumps(entry)) for entry in entries)
        extend(self, entries)

    monkeypatch.setattr(Platform, "sync_dir", log_sync_dir)
    monkeypatch.setattr(Path, "unlink", log_unlink)
    monkeypatch.setattr(Journal, "extend", log_extend)
    out = tmp_path / "out"
    run_merge(fam[2], out, **RUN)
    first_chunk = next(i for i, e in enumerate(events) if e[0] == "journal" and "chunk" in e[1])
    assert ("dir", str(out)) in events[:first_chunk], "the first .partial's name was not synced"
    first_mask = next(i for i, e in enumerate(events) if e[0] == "journal" and "kept" in e[1])
    chunk_dirs = [i for i, e in enumerate(events) if e[0] == "dir" and e[1].endswith("/c")]
    assert chunk_dirs and chunk_dirs[0] < first_mask, "mask chunk renames were not synced"
    gone = events.index(("unlink", "INCOMPLETE"))
    assert ("dir", str(out)) == events[gone - 1], "the marker's rename was not synced first"
