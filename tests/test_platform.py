"""The platform layer: one contract run against every OS implementation on this machine.

Each implementation (:data:`LINUX`, :data:`MACOS`, :data:`WINDOWS`) is selected explicitly, so
the macOS and Windows fallbacks run here on Linux; branches that need a primitive Linux lacks
(``F_FULLFSYNC``) are driven with a stand-in. Then whole merges (and a kill + resume) run in
child processes with ``STREAMMERGE_PLATFORM`` forcing a fallback, and must give the bytes of
the Linux run. ``STREAMMERGE_PLATFORM=windows pytest tests/test_resume.py tests/test_memory.py``
runs the crash and memory tests with a fallback forced.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import make_family
from safetensors.torch import save_file
from test_resume import CHUNK, SHAPE, kill_after_chunks, snapshot, write_recipe

import streammerge
from streammerge import platform as plat_mod
from streammerge.errors import StreamMergeError
from streammerge.journal import STATE_DIR, FolderLock
from streammerge.platform import BINARY, ENV, LINUX, MACOS, PLATFORMS, WINDOWS, LockHeld, Platform
from streammerge.safetensors_io import SafetensorsFile
from streammerge.synth import generate_family

ALL = [LINUX, MACOS, WINDOWS]


@pytest.fixture(params=ALL, ids=lambda p: p.name)
def plat(request: pytest.FixtureRequest) -> Platform:
    return request.param


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


class TestContract:
    """What every implementation must do, whatever primitive it uses."""

    def test_positional_writes_and_syncs_keep_the_bytes(self, plat, tmp_path):
        path = tmp_path / "f"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | BINARY, 0o644)
        try:
            assert plat.pwrite(fd, b"world", 6) == 5
            assert plat.pwrite(fd, memoryview(b"hello "), 0) == 6
            plat.data_sync(fd)
            plat.full_sync(fd)
            assert plat.pread(fd, 64, 0) == b"hello world"
            buf = bytearray(5)
            assert plat.pread_into(fd, memoryview(buf), 6) == 5 and buf == b"world"
            assert plat.pread_into(fd, memoryview(buf), 11) == 0  # end of file
        finally:
            os.close(fd)
        assert path.read_bytes() == b"hello world"
        plat.sync_file(path)
        plat.sync_dir(tmp_path)
        with pytest.raises(FileNotFoundError):  # fsync_file relies on this to skip holes
            plat.sync_file(tmp_path / "missing")

    def test_replace_replaces_atomically(self, plat, tmp_path):
        src, dst = tmp_path / "new.partial", tmp_path / "file"
        dst.write_bytes(b"old")
        src.write_bytes(b"new")
        plat.replace(src, dst)
        assert dst.read_bytes() == b"new" and not src.exists()
        with pytest.raises(FileNotFoundError):
            plat.replace(src, dst)

    def test_lock_is_exclusive_and_released(self, plat, tmp_path):
        path = tmp_path / "lock"
        held = plat.lock(path)
        with pytest.raises(LockHeld, match=re.escape(str(path))):
            plat.lock(path)
        held.release()
        held.release()  # idempotent
        plat.lock(path).release()

    def test_lock_held_by_another_process_then_freed_by_its_death(self, plat, tmp_path):
        """Exclusive across processes; a holder that dies (SIGKILL) frees the folder: the kernel
        drops an flock, and a lock file naming a dead pid is taken over."""
        path = tmp_path / "lock"
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sys, time
                from pathlib import Path
                from streammerge.platform import PLATFORMS
                PLATFORMS[{plat.name!r}].lock(Path({str(path)!r}))
                print("held", flush=True)
                time.sleep(60)
            """)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(LockHeld):
                plat.lock(path)
        finally:
            holder.kill()
            holder.wait()
        plat.lock(path).release()

    def test_page_release_keeps_data_readable(self, plat, tmp_path):
        data = bytes(range(256)) * (5 * mmap.PAGESIZE // 256 + 7)
        path = tmp_path / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY | BINARY)
        try:
            whole = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            plat.advise_sequential(whole)
            assert whole[: 2 * mmap.PAGESIZE] == data[: 2 * mmap.PAGESIZE]
            plat.release_pages(whole, 0, 2 * mmap.PAGESIZE)
            assert whole[:] == data  # released pages fault back in from the file
            whole.close()
            mm, off = plat.map_window(fd, 3 * mmap.PAGESIZE + 5, 1000)
            assert off == (3 * mmap.PAGESIZE + 5) % mmap.ALLOCATIONGRANULARITY
            assert mm[off : off + 1000] == data[3 * mmap.PAGESIZE + 5 :][:1000]
            mm.close()
        finally:
            os.close(fd)

    def test_safetensors_reads_survive_release(self, plat, tmp_path):
        t = torch.arange(100_000, dtype=torch.float32).reshape(100, 1000)
        save_file({"a": t, "b": -t}, tmp_path / "m.safetensors")
        f = SafetensorsFile(tmp_path / "m.safetensors", platform=plat)
        for name, ref in (("a", t), ("b", -t)):
            first = f.read(name, 1234, 56_789).clone()
            f.release(name, 1234, 56_789)
            assert torch.equal(first, ref.flatten()[1234:56_789])
            assert torch.equal(f.read(name, 1234, 56_789), first)
            assert f.read_bytes(name, 10, 12) == ref.flatten()[10:12].numpy().tobytes()
        buf = bytearray(4096)
        f.preload("a", 0, 100_000, buf)
        f.close()
        assert f._mm is None and f._fd is None

    def test_trim_heap_is_safe(self, plat):
        plat.trim_heap()


class TestFallbackBranches:
    """Branches the contract alone cannot show are taken."""

    def test_linux_data_sync_is_fdatasync(self, tmp_path, monkeypatch):
        calls = []
        monkeypatch.setattr(os, "fdatasync", calls.append)
        LINUX.data_sync(7)
        assert calls == [7]

    def test_macos_full_fsync_then_fsync_fallback(self, monkeypatch):
        calls: list[tuple] = []

        def fake_fcntl(fd: int, op: int) -> None:
            calls.append(("fcntl", fd, op))
            if fd == 2:
                raise OSError(45, "Operation not supported")  # e.g. an SMB share

        monkeypatch.setattr(
            plat_mod, "fcntl", types.SimpleNamespace(F_FULLFSYNC=51, fcntl=fake_fcntl)
        )
        monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)))
        MACOS.data_sync(1)
        assert calls == [("fcntl", 1, 51)]
        calls.clear()
        MACOS.full_sync(2)
        assert calls == [("fcntl", 2, 51), ("fsync", 2)]
        calls.clear()
        monkeypatch.setattr(plat_mod, "fcntl", types.SimpleNamespace())  # constant missing
        MACOS.data_sync(3)
        assert calls == [("fsync", 3)]

    def test_windows_replace_retries_sharing_violations(self, tmp_path, monkeypatch):
        win = dataclasses.replace(WINDOWS, replace_attempts=3)
        real, tries = os.replace, []

        def flaky(src: Path, dst: Path) -> None:
            tries.append(1)
            if len(tries) < 3:
                raise PermissionError(13, "The process cannot access the file")
            real(src, dst)

        monkeypatch.setattr(plat_mod.time, "sleep", lambda s: None)
        monkeypatch.setattr(os, "replace", flaky)
        (tmp_path / "a").write_text("x")
        win.replace(tmp_path / "a", tmp_path / "b")
        assert len(tries) == 3 and (tmp_path / "b").read_text() == "x"
        tries.clear()

        def always_busy(src: Path, dst: Path) -> None:
            tries.append(1)
            raise PermissionError(13, "busy")

        monkeypatch.setattr(os, "replace", always_busy)
        with pytest.raises(PermissionError):
            win.replace(tmp_path / "b", tmp_path / "c")
        assert len(tries) == 3  # gives up after replace_attempts

    def test_windows_lock_file_holds_pid_and_is_removed(self, tmp_path):
        path = tmp_path / "lock"
        held = WINDOWS.lock(path)
        assert int(path.read_text().split()[0]) == os.getpid()
        with pytest.raises(LockHeld, match=f"process {os.getpid()}"):
            WINDOWS.lock(path)
        held.release()
        assert not path.exists()

    def test_windows_lock_takes_over_a_dead_pid(self, tmp_path):
        path = tmp_path / "lock"
        path.write_text(f"{dead_pid()} 0123\n")
        held = WINDOWS.lock(path)
        assert int(path.read_text().split()[0]) == os.getpid()
        held.release()

    def test_windows_lock_respects_a_live_pid(self, tmp_path):
        path = tmp_path / "lock"
        path.write_text(f"{os.getppid()} 0123\n")  # our parent: alive
        with pytest.raises(LockHeld, match=f"process {os.getppid()}"):
            WINDOWS.lock(path)
        assert path.read_text().startswith(str(os.getppid()))

    def test_windows_lock_empty_file_is_held_then_stale(self, tmp_path):
        """A lock file without a pid is being created (held) unless it is old (a crash)."""
        path = tmp_path / "lock"
        path.write_bytes(b"")
        with pytest.raises(LockHeld):
            WINDOWS.lock(path)
        old = path.stat().st_mtime - 2 * plat_mod.STALE_EMPTY_LOCK_S
        os.utime(path, (old, old))
        WINDOWS.lock(path).release()
        assert not path.exists()

    def test_release_of_a_removed_lock_file_is_quiet(self, tmp_path):
        """The engine removes ``.streammerge`` (lock included) before leaving the lock."""
        path = tmp_path / "lock"
        held = WINDOWS.lock(path)
        path.unlink()
        held.release()
        path.write_text("someone else's\n")
        held.release()
        assert path.exists()

    def test_folder_lock_message(self, tmp_path):
        with (
            FolderLock(tmp_path, WINDOWS),
            pytest.raises(StreamMergeError, match=r"another streammerge run .*delete"),
        ):
            FolderLock(tmp_path, WINDOWS).__enter__()
        assert not (tmp_path / STATE_DIR / "lock").exists()

    def test_windows_sync_dir_is_a_noop(self, tmp_path):
        WINDOWS.sync_dir(tmp_path / "not-even-there")

    def test_current_follows_the_environment(self, monkeypatch):
        for name, p in PLATFORMS.items():
            monkeypatch.setenv(ENV, name.upper())
            assert plat_mod.current() is p
        monkeypatch.setenv(ENV, "beos")
        with pytest.raises(StreamMergeError, match="STREAMMERGE_PLATFORM must be one of"):
            plat_mod.current()
        monkeypatch.delenv(ENV)
        if sys.platform.startswith("linux"):
            assert plat_mod.current() is LINUX


def test_no_os_specific_call_outside_the_platform_module():
    package = Path(streammerge.__file__).parent
    excluded = {"platform.py"}
    pattern = re.compile(r"fcntl|msvcrt|fdatasync|MADV_|malloc_trim|libc\.so|os\.pread|os\.pwrite")
    offenders = [
        f"{p.relative_to(package)}:{i}: {line.strip()}"
        for p in sorted(package.rglob("*.py"))
        if str(p.relative_to(package)) not in excluded
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "OS-specific calls belong in streammerge/platform.py:\n" + "\n".join(
        offenders
    )


# --------------------------------------------------------------------------------------------
# Whole runs with a fallback forced for the process


def run_cli(recipe: Path, out: Path, platform: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, ENV: platform}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "streammerge",
            "run",
            str(recipe),
            str(out),
            "--no-progress",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
    )


def test_forced_fallbacks_write_the_linux_bytes(tmp_path):
    base, fts = make_family(tmp_path / "models", shards=(2, 1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: cabs\nbase_model: {base}\nparameters: {{n_val: 4, m_val: 16}}\nmodels:\n"
        + "".join(f"  - model: {f}\n    parameters: {{weight: 0.7}}\n" for f in fts)
    )
    outs = {}
    for name in ("linux", "windows", "macos"):
        done = run_cli(recipe, tmp_path / name, name, "--chunk-elems", "64", "--shard-size", "3KB")
        assert done.returncode == 0, done.stderr
        outs[name] = snapshot(tmp_path / name)
        assert not (tmp_path / name / STATE_DIR).exists()
    assert len([f for f in outs["linux"] if f.endswith(".safetensors")]) > 1
    assert any(f.startswith("occupancy.zarr") for f in outs["linux"])
    assert outs["windows"] == outs["linux"]
    assert outs["macos"] == outs["linux"]


def test_kill_then_resume_under_the_windows_fallback(tmp_path):
    """SIGKILL leaves the Windows-style lock file naming a dead pid; the resumed run takes it
    over and finishes with the bytes of an uninterrupted Linux run."""
    generate_family(tmp_path / "fam", SHAPE, n_finetunes=2, seed=1)
    recipe = write_recipe(tmp_path, "dare_ties")
    done = run_cli(recipe, tmp_path / "ref", "linux", "--chunk-elems", CHUNK)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    args = [sys.executable, "-m", "streammerge", "run", str(recipe), str(out), "--no-progress"]
    proc = subprocess.Popen(
        [*args, "--chunk-elems", CHUNK], env={**os.environ, ENV: "windows"}, stderr=subprocess.PIPE
    )
    kill_after_chunks(proc, out, 30, 0.0)
    lock = out / STATE_DIR / "lock"
    assert int(lock.read_text().split()[0]) == proc.pid  # left behind, naming a dead process
    resumed = run_cli(recipe, out, "windows", "--chunk-elems", CHUNK)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stdout
    assert snapshot(out) == snapshot(tmp_path / "ref")
    assert not (out / STATE_DIR).exists()


def test_rss_figures_are_bytes_from_the_host_kernel():
    """``ru_maxrss`` units differ by OS: a wrong factor puts the peak 1024x off the current RSS."""
    now, anon = plat_mod.rss()
    peak = plat_mod.peak_rss()
    assert 0 < anon <= now <= peak < 100 * now


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """A child started by ``subprocess`` (vfork on Linux) must not report its parent's peak."""
    ballast = bytearray(700 * 2**20)  # touched: 700 MiB resident in this process
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from streammerge.platform import peak_rss; print(peak_rss())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    assert int(out.stdout) < 400 * 2**20, f"child peak {int(out.stdout) / 2**20:.0f} MiB"
