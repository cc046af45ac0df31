"""What a run needs from its process besides the math: stop requests from signals, the
background lanes that overlap reading and writing with computing, a progress bar that shows
RSS, handing freed heap back to the kernel, and compiling kernels in a child process."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from . import platform
from .memory import current_rss, format_size

if TYPE_CHECKING:
    from .methods import Method
    from .model import ModelFolder
    from .plan import MergePlan


class StopOnSignals:
    """SIGINT/SIGTERM set a flag the scheduler checks between chunks (main thread only)."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:  # a second Ctrl-C: stop now (the journal still allows a resume)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


class Lane:
    """A background thread running jobs in submission order, at most one at a time.

    ``submit`` first waits for the previous job, so one job runs while the caller prepares
    the next (and at most one job's buffers are alive besides the caller's); a job's
    exception surfaces in the caller at the next ``submit`` or ``drain``.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._job: Future[None] | None = None

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self.drain()
        self._job = self._pool.submit(fn, *args)

    def drain(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        """Wait for the job in flight (its result is the caller's to check first)."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


RSS_REFRESH_S = 0.5
"""How often the progress bar's RSS figure is refreshed (reading it costs ~20 us)."""


def with_rss(bar: tqdm) -> Callable[[int], None]:
    """``bar.update`` that also shows this process's current RSS, at most every 0.5 s."""
    last = 0.0

    def advance(n: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= RSS_REFRESH_S:
            last = now
            bar.set_postfix_str(f"RSS {format_size(current_rss()[0])}", refresh=False)
        bar.update(n)

    return advance


def trim_heap() -> None:
    """Hand freed heap pages back to the kernel where libc can (see ``platform.trim_heap``).

    The replay path's chunk temporaries are torch tensors of varying sizes below glibc's
    dynamic mmap threshold; without this the heap fragments and RSS creeps up by hundreds of
    MiB over a 1B-parameter replay (measured), past the budget the chunks were sized for.
    """
    platform.current().trim_heap()


def precompile_kernels(
    plan: MergePlan,
    base: ModelFolder,
    models: list[ModelFolder],
    verbose: bool = False,
    method: Method | None = None,
) -> None:
    """Have the compiled kernels the method's spec names built outside this process (see
    ``kernels.precompile``), for the raw input dtypes this plan will feed them. ``method``:
    the one that runs (default: the recipe's, from this process's registry)."""
    kernel = (method or plan.recipe.impl).spec.kernel
    raw = {
        "uint16" if src.info(t.name).dtype == "BF16" else "float32"
        for t in plan.tensors
        if t.merged
        for src in (base, *models)
    }
    if kernel is not None and raw and plan.recipe.dtype == torch.float32:
        from .methods import kernels

        kernels.precompile(kernel, len(models), sorted(raw), _announce if verbose else None)


KERNEL_NOTICE = (
    "compiling the merge kernels for this method and input dtype (for 1 to 8 models; once per "
    "install and again after an upgrade; up to a minute, not counted in the merge time)..."
)
"""What ``kernels.precompile`` is about to do: its cache key is the kernel family, the input
dtypes, the model slot count (one for 1 to 8 models), the kernel source and numba's version."""


def _announce() -> None:
    print(KERNEL_NOTICE, file=sys.stderr, flush=True)
