"""Measure a command's wall time and peak memory.

Two peak-RSS figures are reported because each has a blind spot:

* sampled: ``/proc/<pid>/status`` of the process and all its descendants, summed, every
  50 ms. Splits RSS into anonymous memory (what a merge really allocates) and file-backed
  pages (mmapped inputs, reclaimable), but can miss a spike shorter than the interval.
* ``ru_maxrss`` from ``os.wait4``: the kernel's exact high-water mark of the largest single
  process (the child, or a descendant it waited for), anonymous and file pages together.

Usage: ``python bench/measure.py [--drop-caches] [--interval S] -- CMD...``; prints one JSON
line on stdout after the command's own output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_KIB_PER_MIB = 1024


@dataclass(slots=True)
class _Peaks:
    """Running maxima of tree-wide sums, in KiB."""

    rss: int = 0
    anon: int = 0
    file: int = 0
    samples: int = 0
    pids: set[int] = field(default_factory=set)


def _status_kib(pid: int) -> tuple[int, int, int] | None:
    """``(VmRSS, RssAnon, RssFile)`` in KiB, or None if the process is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    vals: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            vals[key] = int(rest.split()[0])
    if "VmRSS" not in vals:  # zombies and kernel threads have no memory lines
        return None
    return vals["VmRSS"], vals.get("RssAnon", 0), vals.get("RssFile", 0)


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants, via ``/proc/<pid>/task/*/children``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(k) for k in kids)
    return out


def _sample_loop(pid: int, interval: float, stop: threading.Event, peaks: _Peaks) -> None:
    while True:
        rss = anon = file = 0
        for p in _descendants(pid):
            st = _status_kib(p)
            if st is not None:
                rss, anon, file = rss + st[0], anon + st[1], file + st[2]
                peaks.pids.add(p)
        peaks.rss, peaks.anon = max(peaks.rss, rss), max(peaks.anon, anon)
        peaks.file = max(peaks.file, file)
        peaks.samples += 1
        if stop.wait(interval):
            return


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache (needs root); warn and go on if refused."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        print(f"measure: warning: cannot drop caches ({e}); timings are warm", file=sys.stderr)
        return False
    return True


def evict(paths: Iterable[Path]) -> None:
    """Flush dirty pages, then drop the clean cached pages of ``paths`` (no root needed).

    ``POSIX_FADV_DONTNEED`` cannot drop pages some process still maps, nor dirty ones (hence
    the sync first).
    """
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    interval: float = 0.05,
    stdout: int | None = None,
) -> dict[str, object]:
    """Run ``cmd`` to completion and return its timings and memory peaks.

    Keys: ``wall_s`` (seconds), ``peak_rss_mib``, ``peak_anon_mib``, ``peak_file_mib``
    (sampled, summed over the process tree, MiB), ``maxrss_mib`` (exact ``ru_maxrss`` of the
    largest process, MiB), ``user_s`` / ``sys_s`` (CPU seconds, child and waited-for
    descendants), ``samples``, ``processes`` (distinct pids seen) and ``returncode``
    (negative signal number if killed by a signal). ``stdout`` is passed to ``Popen`` (e.g.
    ``2`` sends the command's output to our stderr).
    """
    peaks = _Peaks()
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env), stdout=stdout)
    sampler = threading.Thread(
        target=_sample_loop, args=(proc.pid, interval, stop, peaks), daemon=True
    )
    sampler.start()
    try:
        while True:
            try:
                # wait4, not Popen.wait: it also returns the child's resource usage.
                _, status, ru = os.wait4(proc.pid, 0)
                break
            except InterruptedError:
                continue
            except KeyboardInterrupt:
                proc.terminate()
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # already reaped; keep Popen from waiting again
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(peaks.rss / _KIB_PER_MIB, 1),
        "peak_anon_mib": round(peaks.anon / _KIB_PER_MIB, 1),
        "peak_file_mib": round(peaks.file / _KIB_PER_MIB, 1),
        "maxrss_mib": round(ru.ru_maxrss / _KIB_PER_MIB, 1),  # Linux reports KiB
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "samples": peaks.samples,
        "processes": len(peaks.pids),
        "returncode": rc,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drop-caches", action="store_true", help="sync and drop the page cache")
    ap.add_argument("--interval", type=float, default=0.05, help="sampling period in seconds")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run, after --")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (usage: measure.py [options] -- CMD...)")
    if args.drop_caches:
        drop_caches()
    result = measure(cmd, interval=args.interval)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    rc = result["returncode"]
    assert isinstance(rc, int)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
