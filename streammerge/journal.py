"""Crash safety: the run journal, the output-folder lock, and what a folder's state is.

``OUT_DIR/.streammerge/journal.jsonl`` is append-only JSON lines, fsynced after every line.
The first line is the plan digest (streammerge version, recipe, input headers, output layout)
and the chunk length; every later line records work that is already durable on disk:

* ``{"chunk": [t, c], "crc": ..., "in": [...]}``: chunk c of tensor t (plan order) is in its
  shard and mask store; ``crc`` is the CRC-32C of the bytes it wrote, ``in`` that of the bytes
  it read from each source (base first), so a resume can tell whether an input changed;
* ``{"tensor": t}``: tensor t is complete, mask attributes included;
* ``{"shard": s}``: shard s was fsynced and renamed to its final name.

Order of durability: data first (a data sync of the shard, a full sync of mask chunk files),
then the journal line. A line cut short by a crash is ignored. Running the same command again
replays the journal and continues; the finished folder is byte-identical to an uninterrupted
run because every byte written is a deterministic function of the plan.

The OS-specific calls (syncs, the lock, atomic renames) come from :mod:`.platform`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import StreamMergeError
from .platform import HeldLock, LockHeld, Platform, current

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
    crc: dict[tuple[int, int], int] = field(default_factory=dict)
    """CRC-32C of the output bytes each journaled chunk wrote, by (tensor, chunk)."""
    inputs: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """CRC-32C of the bytes each journaled chunk read, per source (base first)."""
    kept: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """Kept elements per model of each journaled chunk's masks (sparsifying methods)."""
    shard_sha256: dict[int, str] = field(default_factory=dict)
    """SHA-256 of each finished shard file."""

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.tensors or self.shards)

    def add(self, entry: Mapping[str, Any]) -> None:
        """Fold in one journal entry (a distributed run's driver, as it journals a unit)."""
        _record(self, dict(entry))

    def forget_chunk(self, t: int, c: int) -> None:
        """Redo chunk c of tensor t (and so the tensor's completion)."""
        self.chunks.get(t, set()).discard(c)
        self.crc.pop((t, c), None)
        self.inputs.pop((t, c), None)
        self.kept.pop((t, c), None)
        self.tensors.discard(t)

    def forget_shard(self, s: int, tensors: list[int]) -> None:
        """Redo shard s: its file and every chunk of its ``tensors``."""
        self.shards.discard(s)
        self.shard_sha256.pop(s, None)
        for t in tensors:
            for c in list(self.chunks.get(t, ())):
                self.forget_chunk(t, c)
            self.tensors.discard(t)


def _int(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"not an index: {x!r}")
    return x


def _record(done: Progress, entry: dict[str, Any]) -> None:
    """Fold one journal line into ``done``; ValueError/TypeError/KeyError if it is malformed."""
    if "chunk" in entry:
        t, c = (_int(x) for x in entry["chunk"])
        done.chunks.setdefault(t, set()).add(c)
        if "crc" in entry:
            done.crc[(t, c)] = _int(entry["crc"])
        if "in" in entry:
            done.inputs[(t, c)] = [_int(x) for x in entry["in"]]
        if "kept" in entry:
            done.kept[(t, c)] = [_int(x) for x in entry["kept"]]
    elif "tensor" in entry:
        done.tensors.add(_int(entry["tensor"]))
    elif "shard" in entry:
        s = _int(entry["shard"])
        done.shards.add(s)
        if "sha256" in entry:
            done.shard_sha256[s] = str(entry["sha256"])
    else:
        raise KeyError("unknown journal entry")


class Journal:
    """The append-only progress log of one output folder."""

    def __init__(self, out_dir: Path, platform: Platform | None = None) -> None:
        self.dir = out_dir / STATE_DIR
        self.path = self.dir / JOURNAL
        self.platform = platform or current()
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
                    if i == 0:
                        if not isinstance(entry, dict):
                            raise ValueError("header")
                        header = entry
                    else:
                        _record(done, entry)
                except (ValueError, TypeError, KeyError):
                    # a torn write at the crash point (or a damaged line): what came before
                    # it is valid, nothing after it is trusted
                    break
        return header, done

    def create(self, header: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(json.dumps(header, sort_keys=True) + "\n")
            f.flush()
            self.platform.full_sync(f.fileno())
        self.platform.replace(tmp, self.path)
        self.platform.sync_dir(self.dir)

    def append(self, entry: Mapping[str, Any]) -> None:
        self.extend((entry,))

    def extend(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Append lines, durable on return: one sync for the batch (a sync per line cost a
        MoE's flush ~2 ms a tensor); a crash before it leaves at most a torn tail."""
        if self._f is None:
            # the journal may end in a torn line from a crash: cut it before appending
            self._truncate_torn_tail()
            self._f = self.path.open("a", encoding="utf-8", newline="")
        text = "".join(json.dumps(entry) + "\n" for entry in entries)
        if not text:
            return
        self._f.write(text)
        self._f.flush()
        self.platform.full_sync(self._f.fileno())

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
    """An exclusive lock on ``OUT_DIR/.streammerge/lock`` (:meth:`.Platform.lock`): ``flock``,
    which the kernel drops if we die, or on Windows a pid file that a later run takes over
    once its process is gone."""

    def __init__(self, out_dir: Path, platform: Platform | None = None) -> None:
        self.path = out_dir / STATE_DIR / LOCK
        self.platform = platform or current()
        self._held: HeldLock | None = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._held = self.platform.lock(self.path)
        except LockHeld as e:
            # a pid is known only for lock files, which a reused pid could keep: name the file
            who = f" (process {e.pid}; if it is not one, delete {self.path})" if e.pid else ""
            raise StreamMergeError(
                f"another streammerge run is writing {self.path.parent.parent}; wait for it "
                f"to finish or stop it first{who}"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None


def fsync_dir(path: Path, platform: Platform | None = None) -> None:
    """Make renames and creations in ``path`` durable (a no-op where the OS journals them)."""
    (platform or current()).sync_dir(path)


def fsync_file(path: Path, platform: Platform | None = None) -> None:
    """Sync an existing file (zarr's LocalStore writes atomically but never syncs)."""
    # an all-zero chunk is not stored at all (write_empty_chunks=False)
    with contextlib.suppress(FileNotFoundError):
        (platform or current()).sync_file(path)


def explain_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which parts of the plan digest changed, in words."""
    parts = []
    labels = {"version": "streammerge version", "recipe": "the recipe",
              "layout": "the output layout (--shard-size or dtypes)",
              "vocab": "the inputs' tokenizers (the embedding row mapping)"}  # fmt: skip
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            parts.append(label)
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    changed = sorted(f for f in set(old_in) | set(new_in) if old_in.get(f) != new_in.get(f))
    parts += [f"input {f}" for f in changed]
    return ", ".join(parts) or "the plan"
