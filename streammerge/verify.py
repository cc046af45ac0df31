"""``streammerge verify``: does a finished output folder still hold what the merge wrote?

The completion marker records the SHA-256 of every shard and of the occupancy store, and the
plan digest (which includes every input's fingerprint: shard sizes, modification times and
header hashes). Verification re-hashes the folder and compares; with ``inputs`` it also checks
that the input folders still match their fingerprints (so a rerun would reproduce the merge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import StreamMergeError
from .journal import INCOMPLETE, digest
from .lora import open_ref
from .output import COMPLETE_MARKER, INDEX_NAME, file_sha256, store_digest


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What was checked and what did not match (empty ``problems``: all good)."""

    out_dir: Path
    shards: int
    store: bool
    """Whether an occupancy store was checked."""
    inputs: int
    """Input folders checked against their fingerprints (0 without ``inputs``)."""
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(
    out_dir: Path | str, *, inputs: bool = False, shards: bool = True
) -> VerifyReport:
    """Re-hash a finished merge's shards (unless not ``shards``) and store against its marker
    (and, with ``inputs``, its inputs against their recorded fingerprints). Raises
    StreamMergeError when the folder is not a finished streammerge output at all."""
    out_dir = Path(out_dir)
    try:
        record = json.loads((out_dir / COMPLETE_MARKER).read_text())
    except FileNotFoundError:
        raise StreamMergeError(f"{out_dir}: no {COMPLETE_MARKER}: not a finished merge") from None
    except (OSError, ValueError) as e:
        raise StreamMergeError(f"{out_dir / COMPLETE_MARKER}: unreadable ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("shards"), dict):
        raise StreamMergeError(
            f"{out_dir / COMPLETE_MARKER}: records no shard digests (written by an older "
            "streammerge); nothing to verify against"
        )
    problems: list[str] = []
    if (out_dir / INCOMPLETE).exists():
        problems.append(f"{out_dir / INCOMPLETE}: present next to the completion marker")
    digests: dict[str, str] = record["shards"] if shards else {}
    try:
        weight_map = json.loads((out_dir / INDEX_NAME).read_text())["weight_map"]
        named = set(weight_map.values())
        if not named <= set(record["shards"]):
            problems.append(f"{INDEX_NAME}: names shards the merge did not write")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{out_dir / INDEX_NAME}: unreadable ({e})")
    for name, want in sorted(digests.items()):
        p = out_dir / name
        if p.is_symlink() or not p.is_file():
            problems.append(f"{p}: missing or not a regular file")
        elif file_sha256(p) != want:
            problems.append(f"{p}: content differs from what the merge wrote")
    store = record.get("store")
    if store is not None and store_digest(out_dir) != store:
        problems.append(f"{out_dir}: occupancy store differs from what the merge wrote")
    checked = 0
    if inputs:
        recorded = (record.get("digest") or {}).get("inputs") or {}
        for path, want in sorted(recorded.items()):
            checked += 1
            try:
                folder = open_ref(path)  # a folder, or MODEL+ADAPTER
            except StreamMergeError as e:
                problems.append(f"input {path}: {e}")
                continue
            try:
                if digest(folder.fingerprint()) != want:
                    problems.append(f"input {path}: changed since the merge (size, time or header)")
            finally:
                folder.close()
    return VerifyReport(out_dir, len(digests), store is not None, checked, tuple(problems))
