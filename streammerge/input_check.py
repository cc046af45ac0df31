"""Resume trusts no input it has not checked: the bytes a resumed run reads again must be the
bytes the interrupted run read.

The plan digest already holds every input's headers, file sizes and modification times; a
file replaced by one of the same shapes with its time preserved (``cp -p``, ``rsync -t``, a
restored backup) passes that. So every journaled chunk also records the CRC-32C of the bytes it
read from each source, and a resume compares, before any work:

* the last journaled chunk of every input file (a replaced or rewritten file is caught for
  certain: each of its chunks differs), and
* every journaled chunk the resumed run reads again anyway (statistics passes over a tensor that
  was half done, a tensor whose merge carries state from chunk to chunk), at no extra read.

A change elsewhere in a file (a few edited bytes in a chunk that is neither) is not detected:
catching that would mean reading every finished chunk's inputs again. A mismatch refuses the
resume: the finished part was merged from other bytes, so only ``--restart`` gives a model of
the current inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .checksum import crc32c
from .errors import InputError
from .journal import Progress
from .model import ModelFolder
from .plan import MergePlan


class InputCheck:
    """Compares what a resumed run reads with what the journal says was read."""

    def __init__(self, plan: MergePlan, done: Progress, sources: Sequence[ModelFolder]) -> None:
        """``sources``: every folder the plan reads, base first (the journal's order)."""
        self.plan, self.done, self.sources = plan, done, list(sources)
        self.checked: set[tuple[int, int]] = set()

    def chunk(self, ti: int, ci: int, views: Sequence[torch.Tensor]) -> None:
        """Check a journaled chunk read again (views: per source, base first); a chunk the
        journal does not list, or already checked, costs nothing."""
        want = self.done.inputs.get((ti, ci))
        if want is None or (ti, ci) in self.checked or ci not in self.done.chunks.get(ti, ()):
            return
        self.checked.add((ti, ci))
        for k, (view, crc) in enumerate(zip(views, want, strict=False)):
            if crc32c(view) != crc:
                self._changed(ti, ci, self.sources[k])

    def sample(self) -> int:
        """Check the last journaled chunk of every input file; returns the chunks checked."""
        last: dict[tuple[int, Path], tuple[int, int]] = {}  # (source, file) -> (tensor, chunk)
        for (ti, ci), crcs in sorted(self.done.inputs.items()):
            if ci not in self.done.chunks.get(ti, ()):
                continue
            name = self.plan.tensors[ti].name
            for k in range(len(crcs)):
                last[(k, self.sources[k].file_of(name))] = (ti, ci)
        for (k, _), (ti, ci) in sorted(last.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            src, task = self.sources[k], self.plan.tensors[ti]
            s, e = task.chunks()[ci]
            try:  # a copy of one chunk (any dtype: copied tensors may be integers)
                got = crc32c(src.read_bytes(task.name, s, e))
            finally:
                src.release(task.name, s, e)
            if got != self.done.inputs[(ti, ci)][k]:
                self._changed(ti, ci, src)
        return len(last)

    def _changed(self, ti: int, ci: int, src: ModelFolder) -> None:
        task = self.plan.tensors[ti]
        s, e = task.chunks()[ci]
        raise InputError(
            f"{src.file_of(task.name)}: tensor {task.name!r} (elements {s}..{e}) is not what "
            "the interrupted run read (its content checksum differs), so the merged part came "
            "from other bytes; rerun with --restart to merge the current inputs"
        )
