"""The bad-input matrix: broken files, mismatched models, hostile indexes, a full or read-only
disk, a wrong OUT_DIR and a concurrent run are all refused the same way.

Through the real console (a subprocess), every case must: exit with status 2; print exactly
one ``error: ...`` line on stderr naming the offending file (and tensor, where there is one)
without a traceback; leave every input file byte- and mtime-identical; and leave no
complete-looking output (no ``streammerge.json``, no index). Environment failures that cannot
be staged from outside (disk full, no free space, a read-only filesystem) are simulated
in-process by patching the OS seam the engine writes through.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_family
from safetensors.torch import load_file, save_file

import streammerge.engine
import streammerge.safetensors_io
from streammerge import StreamMergeError, run_merge
from streammerge.journal import FolderLock
from streammerge.memory import format_size

FINISHED = ("streammerge.json", "model.safetensors.index.json")
"""Files whose presence would make OUT_DIR look like a finished merge."""

RECIPES = {
    "cabs": {"merge_method": "cabs", "parameters": {"n_val": 2, "m_val": 4}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5, "random_seed": 3}},
}

# --------------------------------------------------------------------------------------------
# helpers


def write_recipe(
    tmp: Path, base: Path, fts: list[Path], method: str = "cabs", **settings: object
) -> Path:
    doc = {
        **RECIPES[method],
        "parameters": {**RECIPES[method]["parameters"], **settings},
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
    }
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def family(tmp: Path, **kw: object) -> tuple[Path, list[Path]]:
    """Base + 2 fine-tunes under ``tmp/models`` (resolved, as the recipe loader reports them)."""
    base, fts = make_family(tmp / "models", **kw)  # type: ignore[arg-type]
    return base.resolve(), [f.resolve() for f in fts]


def fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root``."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_not_complete(out: Path) -> None:
    for name in FINISHED:
        assert not (out / name).exists(), f"{out / name} exists after a failed run"


def cli(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "streammerge", "run", str(recipe), str(out), "--no-progress"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)


def check_refused(recipe: Path, out: Path, inputs: Path, *fragments: str) -> str:
    """Run the CLI and check (1) exit 2, (2) one clean ``error:`` line holding every fragment,
    (3) ``inputs`` untouched, (4) no complete-looking ``out``. Returns the error line."""
    before = fingerprint(inputs)
    return assert_refused(cli(recipe, out), out, inputs, before, *fragments)


def assert_refused(
    proc: subprocess.CompletedProcess[str],
    out: Path,
    inputs: Path,
    before: dict[str, tuple[str, int]],
    *fragments: str,
) -> str:
    """Checks (1)-(4) on a finished CLI run; ``before`` is the inputs' fingerprint."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    # the one-time kernel-compile notice of a fresh install is not an error line
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("compiling the merge")]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert fingerprint(inputs) == before, "an input file changed"
    assert_not_complete(out)
    return lines[0]


def check_merged(recipe: Path, out: Path, inputs: Path, *extra: str) -> None:
    """Run the CLI and check it succeeds with a complete output and untouched inputs."""
    before = fingerprint(inputs)
    proc = cli(recipe, out, *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for name in FINISHED:
        assert (out / name).is_file()
    assert json.loads((out / "streammerge.json").read_text())["complete"] is True
    assert fingerprint(inputs) == before, "an input file changed"


def st_header(path: Path) -> tuple[int, dict]:
    """(header length, header JSON) of a safetensors file."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def rewrite_header(path: Path, header: dict) -> None:
    """Replace the JSON header in place, keeping its length (space-padded) and the file size."""
    n, _ = st_header(path)
    js = json.dumps(header, separators=(",", ":")).encode()
    assert len(js) <= n, "rewritten header does not fit"
    with path.open("r+b") as f:
        f.seek(8)
        f.write(js.ljust(n))


def data_order(header: dict) -> list[str]:
    """Tensor names by data offset."""
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def holder(folder: Path, name: str) -> Path:
    """The shard of a model folder that holds tensor ``name``."""
    return next(p for p in sorted(folder.glob("*.safetensors")) if name in st_header(p)[1])


def edit_model(shard: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load a shard, let ``edit`` change its tensors, write it back."""
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


# --------------------------------------------------------------------------------------------
# corruptions: each breaks a fresh family and returns the fragments the error line must hold


def truncated_shard(base: Path, fts: list[Path]) -> list[str]:
    shard = fts[0] / "model-00002-of-00002.safetensors"
    header = st_header(shard)[1]
    last = data_order(header)[-1]
    b, e = header[last]["data_offsets"]
    data = shard.read_bytes()
    shard.write_bytes(data[: -((e - b) // 2 + 1)])  # cut into the last tensor only
    return [str(shard), repr(last), "truncated"]


def corrupt_header_json(base: Path, fts: list[Path]) -> list[str]:
    shard = fts[1] / "model.safetensors"
    with shard.open("r+b") as f:
        f.seek(8 + 20)
        f.write(b"#garbage\xff\x00{")
    return [str(shard), "corrupt safetensors header"]


def header_length_too_large(base: Path, fts: list[Path]) -> list[str]:
    shard = fts[1] / "model.safetensors"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.write(struct.pack("<Q", size + 1000))
    return [str(shard), "header length", "larger than the file"]


def overlapping_offsets(base: Path, fts: list[Path]) -> list[str]:
    shard = fts[0] / "model-00001-of-00002.safetensors"
    _, header = st_header(shard)
    order = data_order(header)
    a, b = order[1], order[2]  # shift b back by 4 bytes so it starts inside a (size unchanged)
    header[b]["data_offsets"] = [x - 4 for x in header[b]["data_offsets"]]
    rewrite_header(shard, header)
    return [str(shard), repr(a), repr(b), "overlap"]


def out_of_range_offsets(base: Path, fts: list[Path]) -> list[str]:
    shard = fts[1] / "model.safetensors"
    _, header = st_header(shard)
    last = data_order(header)[-1]
    header[last]["data_offsets"] = [x + 64 for x in header[last]["data_offsets"]]
    rewrite_header(shard, header)
    return [str(shard), repr(last), "data ends at byte"]


def shape_mismatch(base: Path, fts: list[Path]) -> list[str]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["layer.0.mlp.weight"] = t["layer.0.mlp.weight"].reshape(24, 50).contiguous()

    edit_model(holder(fts[1], "layer.0.mlp.weight"), edit)
    return [str(fts[1]), "'layer.0.mlp.weight'", "[24, 50]", "[50, 24]"]


def int_dtype_mismatch(base: Path, fts: list[Path]) -> list[str]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["position_ids"] = t["position_ids"].to(torch.int32)

    edit_model(holder(fts[0], "position_ids"), edit)
    return [str(fts[0]), "'position_ids'", "I32", "I64"]


def missing_tensor(base: Path, fts: list[Path]) -> list[str]:
    edit_model(holder(fts[1], "odd.weight"), lambda t: t.pop("odd.weight"))
    return [str(fts[1]), "'odd.weight'", "missing"]


def pickle_only(base: Path, fts: list[Path]) -> list[str]:
    torch.save(load_file(fts[1] / "model.safetensors"), fts[1] / "pytorch_model.bin")
    (fts[1] / "model.safetensors").unlink()
    return [str(fts[1]), "pytorch_model.bin", "safetensors"]


def index_outside_folder(base: Path, fts: list[Path]) -> list[str]:
    index = fts[0] / "model.safetensors.index.json"  # ft1 is sharded in this family
    doc = json.loads(index.read_text())
    name, fname = next(iter(doc["weight_map"].items()))
    shutil.copyfile(fts[0] / fname, fts[0].parent / "evil.safetensors")
    doc["weight_map"][name] = "../evil.safetensors"
    index.write_text(json.dumps(doc))
    return [str(index), repr(name), "../evil.safetensors", "outside the model folder"]


def nan_value(base: Path, fts: list[Path]) -> list[str]:
    return put_nonfinite(fts[1], "layer.0.mlp.weight", float("nan"))


def inf_value(base: Path, fts: list[Path]) -> list[str]:
    return put_nonfinite(fts[0], "layer.0.attn.weight", float("-inf"))


def put_nonfinite(folder: Path, name: str, value: float) -> list[str]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name].view(-1)[-1] = value  # the last element: earlier chunks are already written

    shard = edit_model(holder(folder, name), edit)
    return [str(shard), repr(name), "NaN or Inf", "--allow-nonfinite"]


CORRUPTIONS = [
    truncated_shard,
    corrupt_header_json,
    header_length_too_large,
    overlapping_offsets,
    out_of_range_offsets,
    shape_mismatch,
    int_dtype_mismatch,
    missing_tensor,
    pickle_only,
    index_outside_folder,
    nan_value,
    inf_value,
]


@dataclass
class BrokenRun:
    fragments: list[str]
    out: Path
    inputs: Path
    before: dict[str, tuple[str, int]]
    proc: Future[subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory) -> Iterator[dict[str, BrokenRun]]:
    """Every corruption on its own fresh family (ft1 sharded with an index, ft2 single-file),
    run through the CLI; the runs go in parallel since each pays ~2 s of interpreter start."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        runs = {}
        for corrupt in CORRUPTIONS:
            tmp = tmp_path_factory.mktemp(corrupt.__name__)
            base, fts = family(tmp, shards=(1, 2))
            fragments = corrupt(base, fts)
            recipe, out, inputs = write_recipe(tmp, base, fts), tmp / "out", tmp / "models"
            before = fingerprint(inputs)
            runs[corrupt.__name__] = BrokenRun(
                fragments, out, inputs, before, pool.submit(cli, recipe, out)
            )
        yield runs


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_broken_input_is_refused(broken_runs, corrupt):
    run = broken_runs[corrupt.__name__]
    assert_refused(run.proc.result(), run.out, run.inputs, run.before, *run.fragments)


def test_nonfinite_values_merge_when_allowed(tmp_path):
    base, fts = family(tmp_path)
    nan_value(base, fts)
    inf_value(base, fts)
    recipe = write_recipe(tmp_path, base, fts)
    check_merged(recipe, tmp_path / "out", tmp_path / "models", "--allow-nonfinite")


@pytest.mark.parametrize("allow", [False, True], ids=["default", "allow-nonfinite"])
def test_nonfinite_values_with_tadrop(tmp_path, allow):
    base, fts = family(tmp_path)
    fragments = nan_value(base, fts)
    recipe = write_recipe(tmp_path, base, fts, tadrop=True)
    out = tmp_path / "out"
    if allow:
        run_merge(recipe, out, allow_nonfinite=True)
        assert (out / "streammerge.json").is_file()
    else:
        with pytest.raises(StreamMergeError) as e:
            run_merge(recipe, out)
        assert all(f in str(e.value) for f in fragments), str(e.value)
        assert_not_complete(out)


def test_float_dtypes_may_differ_between_models(tmp_path):
    """bf16 base and ft1, fp16 ft2: allowed (all are merged in the recipe dtype)."""
    base, fts = family(tmp_path)

    def to_fp16(t: dict[str, torch.Tensor]) -> None:
        for k, v in t.items():
            if v.is_floating_point():
                t[k] = v.to(torch.float16)

    edit_model(fts[1] / "model.safetensors", to_fp16)
    recipe = write_recipe(tmp_path, base, fts, method="dare_ties")
    out = tmp_path / "out"
    check_merged(recipe, out, tmp_path / "models")
    merged = load_file(out / "model-00001-of-00001.safetensors")
    assert merged["layer.0.attn.weight"].dtype == torch.bfloat16  # the base's dtype
    assert torch.isfinite(merged["layer.0.attn.weight"]).all()


def test_index_shards_symlinked_like_the_hf_cache_are_accepted(tmp_path):
    """The flip side of ``index_outside_folder``: a weight_map entry that names a file in the
    folder is fine even when that file is a symlink (``snapshots/<rev>/x -> ../../blobs/x``)."""
    base, fts = family(tmp_path, shards=(1, 2))
    repo = tmp_path / "hub" / "models--org--ft1"
    snapshot, blobs = repo / "snapshots" / "rev", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for p in fts[0].iterdir():
        shutil.copyfile(p, blobs / p.name)
        (snapshot / p.name).symlink_to(Path("../../blobs") / p.name)
    run_merge(write_recipe(tmp_path, base, [snapshot, fts[1]]), tmp_path / "out")
    assert (tmp_path / "out" / "streammerge.json").is_file()


# --------------------------------------------------------------------------------------------
# the output folder


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_out_dir_in_an_input_folder(tmp_path, where):
    base, fts = family(tmp_path)
    out, input_dir = (base, base) if where == "equal" else (fts[1] / "merged" / "v1", fts[1])
    recipe = write_recipe(tmp_path, base, fts)
    check_refused(recipe, out, tmp_path / "models", str(out), str(input_dir), "inside input")
    assert out.exists() == (where == "equal")  # nothing created inside the input


def test_out_dir_symlinked_to_an_input_folder(tmp_path):
    base, fts = family(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(fts[0], target_is_directory=True)
    with pytest.raises(StreamMergeError, match="inside input model folder"):
        run_merge(write_recipe(tmp_path, base, fts), link)


def test_concurrent_run_is_refused(tmp_path):
    base, fts = family(tmp_path)
    recipe = write_recipe(tmp_path, base, fts)
    out = tmp_path / "out"
    with FolderLock(out):
        check_refused(recipe, out, tmp_path / "models", "another streammerge run", str(out))


def _read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make ``root`` and everything under it behave like a read-only filesystem (EROFS on
    creating a folder or opening a file for writing), whatever the caller's privileges."""
    root = root.absolute()

    def inside(p: object) -> bool:
        q = Path(os.fsdecode(p)).absolute()  # type: ignore[arg-type]
        return q == root or root in q.parents

    def erofs(p: object) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", os.fsdecode(p))  # type: ignore[arg-type]

    real_mkdir, real_os_open, real_open = os.mkdir, os.open, io.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def mkdir(path, *a, **k):
        if inside(path):  # the kernel checks the path before the filesystem's flags
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(path))
            if not os.path.isdir(os.path.dirname(os.fsdecode(path))):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            raise erofs(path)
        return real_mkdir(path, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & writes and inside(path):
            raise erofs(path)
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        writing = set(mode) & set("wax+")
        if writing and isinstance(file, str | bytes | os.PathLike) and inside(file):
            raise erofs(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", open_)


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "new"])
def test_read_only_out_dir_simulated(tmp_path, monkeypatch, exists):
    base, fts = family(tmp_path)
    recipe = write_recipe(tmp_path, base, fts)
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if exists else ro / "merged"
    before = fingerprint(tmp_path / "models")
    _read_only(monkeypatch, ro)
    with pytest.raises(StreamMergeError) as e:
        run_merge(recipe, out)
    monkeypatch.undo()
    assert f"output folder {out} is not writable" in str(e.value)
    assert "Read-only file system" in str(e.value)
    assert fingerprint(tmp_path / "models") == before
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits: chmod cannot stop it")
def test_read_only_out_dir_chmod(tmp_path):
    base, fts = family(tmp_path)
    recipe = write_recipe(tmp_path, base, fts)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        check_refused(recipe, out, tmp_path / "models", str(out), "not writable")
    finally:
        out.chmod(0o755)


# --------------------------------------------------------------------------------------------
# the disk


def shard_bytes(out: Path) -> dict[str, bytes]:
    names = [*sorted(p.name for p in out.glob("*.safetensors")), "model.safetensors.index.json"]
    return {n: (out / n).read_bytes() for n in names}


@pytest.mark.parametrize("method", list(RECIPES))
def test_disk_full_then_resume(tmp_path, monkeypatch, method):
    base, fts = family(tmp_path)
    recipe = write_recipe(tmp_path, base, fts, method)
    kw = {"chunk_elems": 40, "shard_size": 2000}  # 4 shards, 74 chunks: 78 pwrite calls
    run_merge(recipe, tmp_path / "ref", **kw)
    reference = shard_bytes(tmp_path / "ref")
    assert len(reference) > 2

    real_pwrite, calls = os.pwrite, [0]

    def pwrite(fd: int, data: object, pos: int) -> int:
        calls[0] += 1
        if calls[0] > 40:  # past the first shard, in the middle of the second
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, pos)

    out = tmp_path / "out"
    before = fingerprint(tmp_path / "models")
    monkeypatch.setattr(streammerge.safetensors_io.os, "pwrite", pwrite)
    with pytest.raises(StreamMergeError, match="disk full") as e:
        run_merge(recipe, out, **kw)
    monkeypatch.undo()
    assert "resume" in str(e.value)
    assert_not_complete(out)
    assert fingerprint(tmp_path / "models") == before
    assert (out / "model-00001-of-00004.safetensors").is_file()
    assert (out / "model-00002-of-00004.safetensors.partial").is_file()

    summary = run_merge(recipe, out, **kw)  # space freed: the same call resumes
    assert summary.resumed_chunks > 0
    assert (out / "streammerge.json").is_file()
    assert shard_bytes(out) == reference


def test_not_enough_free_disk_at_preflight(tmp_path, monkeypatch):
    base, fts = family(tmp_path)
    recipe = write_recipe(tmp_path, base, fts)
    out = tmp_path / "out"
    free = 1000
    fake = SimpleNamespace(total=10**9, used=10**9 - free, free=free)
    monkeypatch.setattr(streammerge.output.shutil, "disk_usage", lambda path: fake)
    with pytest.raises(StreamMergeError, match="not enough disk space") as e:
        run_merge(recipe, out, shard_size=2000)
    monkeypatch.undo()
    assert not list(out.glob("model-*")), "a shard was created before the preflight check"
    assert_not_complete(out)
    run_merge(recipe, out, shard_size=2000)  # with the space back, the same folder works
    assert (out / "streammerge.json").is_file()
    # needed: the shards, plus one mask bit per merged element per fine-tune
    merged = sum(
        v.numel() for v in load_file(base / "model.safetensors").values() if v.is_floating_point()
    )
    need = sum(p.stat().st_size for p in out.glob("model-*.safetensors")) + merged * 2 // 8
    assert f"{out}: the output and occupancy store need {format_size(need)}" in str(e.value)
    assert f"{format_size(free)} is free" in str(e.value)
