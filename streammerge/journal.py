"""Crash safety: the run journal, the output-folder lock, and what a folder's state is.

``OUT_DIR/.streammerge/journal.jsonl`` is append-only JSON lines, fsynced after every line.
The first line is the plan digest (streammerge version, recipe, input headers, output layout)
and the chunk length; every later line records work that is already durable on disk:

* ``{"chunk": [t, c]}``: chunk c of tensor t (plan order) is in its shard and mask store;
* ``{"tensor": t}``: tensor t is complete, mask attributes included;
* ``{"shard": s}``: shard s was fsynced and renamed to its final name.

Order of durability: data first (``fdatasync`` of the shard, ``fsync`` of mask chunk files),
then the journal line. A line cut short by a crash is ignored. Running the same command again
replays the journal and continues; the finished folder is byte-identical to an uninterrupted
run because every byte written is a deterministic function of the plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import StreamMergeError

STATE_DIR = ".streammerge"
JOURNAL = "journal.jsonl"
LOCK = "lock"
INCOMPLETE = "INCOMPLETE"
"""A file in OUT_DIR while a merge is unfinished; removed after the completion marker."""


def digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Progress:
    """What a journal says is done."""

    chunks: dict[int, set[int]] = field(default_factory=dict)
    tensors: set[int] = field(default_factory=set)
    shards: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.tensors or self.shards)


class Journal:
    """The append-only progress log of one output folder."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / STATE_DIR
        self.path = self.dir / JOURNAL
        self._f: IO[str] | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> tuple[dict[str, Any], Progress]:
        """The header and the progress recorded so far (a torn last line is ignored)."""
        header: dict[str, Any] = {}
        done = Progress()
        with self.path.open() as f:
            for i, line in enumerate(f):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # torn write at the crash point: everything before it is valid
                if i == 0:
                    header = entry
                elif "chunk" in entry:
                    t, c = entry["chunk"]
                    done.chunks.setdefault(t, set()).add(c)
                elif "tensor" in entry:
                    done.tensors.add(entry["tensor"])
                elif "shard" in entry:
                    done.shards.add(entry["shard"])
        return header, done

    def create(self, header: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        with tmp.open("w") as f:
            f.write(json.dumps(header, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.dir)

    def append(self, entry: Mapping[str, Any]) -> None:
        if self._f is None:
            # the journal may end in a torn line from a crash: cut it before appending
            self._truncate_torn_tail()
            self._f = self.path.open("a")
        self._f.write(json.dumps(entry) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def _truncate_torn_tail(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class FolderLock:
    """An exclusive ``flock`` on ``OUT_DIR/.streammerge/lock``; the kernel drops it if we die."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / LOCK
        self._fd = -1

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise StreamMergeError(
                f"another streammerge run is writing {self.path.parent.parent}; wait for it "
                "to finish or stop it first"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the lock
            self._fd = -1


def fsync_dir(path: Path) -> None:
    """Make renames and creations in ``path`` durable."""
    _fsync(path)


def fsync_file(path: Path) -> None:
    """fsync an existing file (zarr's LocalStore writes atomically but never fsyncs)."""
    # an all-zero chunk is not stored at all (write_empty_chunks=False)
    with contextlib.suppress(FileNotFoundError):
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def explain_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which parts of the plan digest changed, in words."""
    parts = []
    labels = {"version": "streammerge version", "recipe": "the recipe",
              "layout": "the output layout (--shard-size or dtypes)"}  # fmt: skip
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            parts.append(label)
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    changed = sorted(f for f in set(old_in) | set(new_in) if old_in.get(f) != new_in.get(f))
    parts += [f"input {f}" for f in changed]
    return ", ".join(parts) or "the plan"
