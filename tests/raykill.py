"""A CABS that kills its own worker process mid-unit, for Ray fault tests.

An instance reaches each Ray task by value (the test registers this module with
``cloudpickle.register_pickle_by_value``), fresh per task: ``merge`` SIGKILLs the process at
the second merged chunk of a tensor (of ``tensor`` only, if given; so the unit has already
handed a chunk to its writer) while the death log in ``log`` holds fewer than ``deaths``
lines. Otherwise it is CABS, byte for byte.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from streammerge.methods.base import MergeResult, TensorId
from streammerge.methods.cabs import Cabs


class DyingCabs(Cabs):
    def __init__(self, log: Path, deaths: int, tensor: str | None = None) -> None:
        self.log, self.deaths, self.tensor = log, deaths, tensor
        self.calls = 0

    def new_state(self, tensor: TensorId, *args: Any) -> Any:
        self.calls = 0 if self.tensor is None or tensor.name == self.tensor else -(10**9)
        return super().new_state(tensor, *args)

    def merge(
        self, state: Any, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        self.calls += 1
        if self.calls == 2:
            died = len(self.log.read_text().splitlines()) if self.log.exists() else 0
            if died < self.deaths:
                with self.log.open("a") as f:
                    f.write(f"{os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        return super().merge(state, start, base, fts)


class SlowCabs(Cabs):
    """CABS that sleeps ``delay`` seconds per merged chunk, so a driver kill lands mid-run."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def merge(
        self, state: Any, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        import time

        time.sleep(self.delay)
        return super().merge(state, start, base, fts)


DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import ray.cloudpickle
import raykill
ray.cloudpickle.register_pickle_by_value(raykill)
from streammerge.methods import METHODS
kind, arg = sys.argv[2].split(":", 1)
if kind == "slow":
    METHODS["cabs"] = raykill.SlowCabs(float(arg))
else:
    METHODS["cabs"] = raykill.DyingCabs(Path(arg), 1)
from streammerge.cli import main
main(sys.argv[3:], prog_name="streammerge")
"""
"""``python -c DRIVER TESTS_DIR slow:SECONDS|die:LOG ARGS...``: the CLI with CABS slowed
down, or with the first worker to reach a tensor's second chunk killed."""
