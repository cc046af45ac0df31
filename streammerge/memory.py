"""Memory: human sizes, RSS measurement, and turning a budget into a chunk size.

RSS here means what the kernel charges this process: anonymous memory (our buffers) plus
file-backed pages currently mapped (input shards we have touched and not yet released).
Anonymous RSS is ``rss - shared`` in psutil's terms.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import psutil

from . import platform
from .errors import StreamMergeError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``'512MiB'`` -> 536870912, ``'5GB'`` -> 5000000000, ``'1.5GiB'``; plain ints are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise StreamMergeError(f"invalid size {text!r} (examples: 512MiB, 1GiB, 5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string, e.g. ``'1.2 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def default_max_memory() -> int:
    """Half of the RAM available now, at least 1 GiB."""
    return max(2**30, psutil.virtual_memory().available // 2)


def current_rss() -> tuple[int, int]:
    """(RSS, anonymous RSS) of this process, in bytes (anonymous = RSS outside Linux)."""
    return platform.rss()


def peak_rss() -> int:
    """Peak RSS (VmHWM) of this process so far, in bytes: the kernel's exact high-water mark."""
    return platform.peak_rss()


class RssSampler:
    """Samples anonymous RSS in a background thread (the kernel keeps no peak for it)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_anon = current_rss()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_anon = max(self.peak_anon, current_rss()[1])

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, current_rss()[1])


@dataclass(frozen=True, slots=True)
class Budget:
    """How a memory budget is spent."""

    max_memory: int
    """The user's limit on peak RSS, in bytes."""
    baseline: int
    """RSS before any chunk is processed (interpreter, torch, zarr), in bytes."""
    chunk_elems: int
    """Elements per processing chunk (before rounding to a method's alignment)."""


def bytes_per_element(k_models: int, work_bytes: int) -> float:
    """Peak bytes per chunk element: the mapped inputs (2 bytes each for bf16, K + 1 models),
    the method's temporaries, and the previous chunk's output bytes and bool masks still being
    written in the background, times 1.5 for allocator slack and readahead."""
    return 1.5 * (2 * (k_models + 1) + work_bytes + 2 + k_models)


SAFETY = 64 * 2**20  # headroom for Python objects and the progress bar
LATE_GROWTH = 192 * 2**20
"""RSS that appears after planning whatever the chunk size: library pages touched later
(zarr codecs, numba's kernel, torch ops first used), input readahead. Measured: 180-290 MiB
above the planning-time RSS for a small-chunk merge in a freshly installed environment."""
ASSUMED_BASELINE = 384 * 2**20  # interpreter, torch, numba, zarr: measured at 270-290 MiB
MAX_CHUNK_ELEMS = 64 * 2**20  # larger chunks stop paying off and delay progress updates
MIN_CHUNK_ELEMS = 2**16


def plan_budget(max_memory: int, per_element: float) -> Budget:
    """Derive the chunk length from ``max_memory``.

    The chunk length depends only on the budget and the recipe, not on this process's current
    RSS, so that a rerun (or a resume) makes the same chunks; only if the process is already
    larger than we assume do we shrink chunks to stay inside the budget.
    """
    baseline = max(ASSUMED_BASELINE, current_rss()[0])
    room = max_memory - baseline - SAFETY - LATE_GROWTH
    chunk = int(room / per_element) if room > 0 else 0
    if chunk < MIN_CHUNK_ELEMS:
        need = baseline + SAFETY + LATE_GROWTH + int(per_element * MIN_CHUNK_ELEMS)
        raise StreamMergeError(
            f"--max-memory {format_size(max_memory)} is too small: the process itself needs "
            f"about {format_size(baseline)}; allow at least {format_size(need)}"
        )
    return Budget(max_memory, baseline, min(chunk, MAX_CHUNK_ELEMS))


RUN_OVERHEAD = 48 * 2**20
"""RSS a merge adds on top of a process that has loaded the method's code, whatever the chunk
size: the zarr store and codecs, the journal, the progress bar, written output pages in flight.
Measured (tests/test_plan.py checks it): see the README's ``plan`` section."""


def resident_per_element(
    input_itemsizes: int, resident_bytes: int, out_itemsize: int, k_models: int
) -> float:
    """Bytes per chunk element live at a merge's peak, without the budget's slack: the mapped
    input chunk of every model (``input_itemsizes`` summed over base and models), the method's
    live temporaries, the output bytes, and the previous chunk's output bytes and bool masks
    still being written in the background."""
    return input_itemsizes + resident_bytes + 2 * out_itemsize + k_models


def predict_peak_rss(baseline: int, chunk_elems: int, per_element: float) -> int:
    """Predicted peak RSS in bytes of a merge whose largest chunk holds ``chunk_elems`` elements.

    ``baseline`` is the RSS of a process that has imported streammerge and run the method once
    (``streammerge plan`` measures its own); unlike :func:`plan_budget`, which bounds the peak
    with slack, this aims at the value itself.
    """
    return int(baseline + RUN_OVERHEAD + chunk_elems * per_element)
