"""Memory: human sizes, RSS measurement, and the one place a budget becomes a chunk length.

:func:`decide_chunk` turns ``--max-memory`` (and ``--max-vram`` on the GPU path) and the
method's footprint per element into the chunk length that ``run``, ``plan``, remix/add and
the GPU path all use; :func:`predict_peak_rss` is ``plan``'s estimate of the resulting peak.

RSS here means what the kernel charges this process: anonymous memory (our buffers) plus
file-backed pages currently mapped (input shards we have touched and not yet released).
Anonymous RSS is ``rss - shared`` in psutil's terms.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from . import platform
from .errors import StreamMergeError

if TYPE_CHECKING:
    from .methods.base import Method

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


VRAM_RESERVE = 512 * 2**20
"""VRAM left out of ``--max-vram`` for the CUDA context's allocator slack, in bytes."""


def vram_bytes_per_element(k_models: int, work_bytes: int) -> float:
    """Peak VRAM per chunk element: two chunks of bf16 inputs in flight (K + 1 models), the
    method's torch temporaries, and the output and bool masks on their way back; x1.25 for
    the caching allocator's rounding."""
    return 1.25 * (2 * 2 * (k_models + 1) + work_bytes + 4 + k_models)


def host_bytes_per_element(k_models: int) -> float:
    """Host RSS per chunk element on the GPU path: mapped inputs, two pinned input slots, and
    two pinned output slots (up to 4-byte output + bool masks); x1.5 as on the CPU path."""
    return 1.5 * (2 * (k_models + 1) * 3 + 2 * (4 + k_models))


def vram_chunk_elems(max_vram: int, k_models: int, work_bytes: int) -> int:
    """The chunk length (elements) that keeps peak VRAM under ``max_vram`` bytes."""
    room = max_vram - VRAM_RESERVE
    if room <= 0:
        raise StreamMergeError(f"--max-vram must be more than {VRAM_RESERVE // 2**20} MiB")
    return int(room / vram_bytes_per_element(k_models, work_bytes))


def decide_chunk(
    max_memory: int,
    method: Method,
    k_models: int,
    itemsize: int,
    *,
    max_vram: int | None = None,
    chunk_elems: int | None = None,
) -> Budget:
    """The chunk length of a merge: from the RSS budget and the method's temporaries per
    element (``itemsize``: the compute dtype's), also bounded by ``max_vram`` on the GPU
    path; an explicit ``chunk_elems`` (tests, a resumed run's) bypasses the budget."""
    if chunk_elems is not None:
        return Budget(max_memory, 0, chunk_elems)
    work = method.work_bytes(k_models, itemsize)
    if max_vram is None:
        return plan_budget(max_memory, bytes_per_element(k_models, work))
    budget = plan_budget(max_memory, host_bytes_per_element(k_models))
    # on the GPU the methods run their torch code, whose temporaries are the larger ones
    work = max(work, 3 * itemsize + 16)
    chunk = min(budget.chunk_elems, vram_chunk_elems(max_vram, k_models, work))
    return Budget(budget.max_memory, budget.baseline, chunk)


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
