"""Hugging Face model folders: find the shards, index the tensors, check models agree.

A model is a folder holding ``model.safetensors``, or shards plus
``model.safetensors.index.json``. Only headers are read here; data stays on disk until the
scheduler asks for a chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .errors import InputError
from .safetensors_io import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class ModelFolder:
    """The tensors of one model folder, by name, each with the shard that holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_dir():
            raise InputError(f"{path}: model folder not found")
        index = path / INDEX_NAME
        if index.is_file():
            shard_names = self._read_index(index)
        elif (path / SINGLE_NAME).is_file():
            shard_names = {SINGLE_NAME: None}
        else:
            pickles = [p.name for pat in PICKLE_PATTERNS for p in path.glob(pat)]
            if pickles:
                raise InputError(
                    f"{path}: only pickle checkpoints found ({pickles[0]}); streammerge reads "
                    "safetensors only (pickle files can run arbitrary code); convert it first: "
                    f"streammerge convert {path} NEW_FOLDER"
                )
            raise InputError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} in the folder")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        for fname, expected in shard_names.items():
            f = SafetensorsFile(path / fname)
            self.files[fname] = f
            for name in f.tensors if expected is None else expected:
                if name not in f.tensors:
                    raise InputError(f"{f.path}: tensor {name!r} listed in {INDEX_NAME} is missing")
                self.where[name] = f
        if not self.where:
            raise InputError(f"{path}: the model has no tensors")

    def _read_index(self, index: Path) -> dict[str, list[str] | None]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: unreadable index ({e})") from e
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: weight_map must be an object mapping tensor to shard")
        shards: dict[str, list[str] | None] = {}
        for name, fname in weight_map.items():
            # judge the name as written: a plain file name in this folder. (Following links
            # first would refuse the Hugging Face cache, whose snapshot files link to blobs/.)
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise InputError(
                    f"{index}: tensor {name!r} points to {fname!r}, outside the model folder"
                )
            target = self.path / fname
            if not target.is_file():
                raise InputError(f"{index}: tensor {name!r}: shard {fname!r} does not exist")
            shards.setdefault(fname, []).append(name)  # type: ignore[union-attr]
        return shards

    def fingerprint(self) -> list[tuple[str, int, int, str]]:
        """(file, size, mtime_ns, sha256 of the header) per shard: what a resume must match."""
        out = []
        for fname, f in sorted(self.files.items()):
            st = f.path.stat()
            with f.path.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                head = hashlib.sha256(fh.read(n)).hexdigest()
            out.append((fname, st.st_size, st.st_mtime_ns, head))
        return out

    @property
    def ref(self) -> str:
        """How plan digests name this input: its path (``MODEL+ADAPTER`` with a LoRA adapter,
        :mod:`streammerge.lora`)."""
        return str(self.path)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def names(self) -> list[str]:
        """Tensor names in on-disk order (shard by shard, by offset): a stable plan order."""
        return sorted(self.where, key=lambda n: (self.where[n].path.name, self.info(n).begin, n))

    def file_of(self, name: str) -> Path:
        """The shard file holding tensor ``name`` (for error messages)."""
        return self.where[name].path

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Zero-copy 1-D view of elements ``[start, end)``; :meth:`release` it once consumed."""
        return self.where[name].read(name, start, end)

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        """A copy of the raw bytes of elements ``[start, end)`` (any dtype)."""
        return self.where[name].read_bytes(name, start, end)

    def preload(self, name: str, start: int, end: int, buf: bytearray) -> None:
        """Pull elements ``[start, end)`` into the page cache without mapping them (blocking:
        run it on a reader thread); ``buf`` is scratch space."""
        self.where[name].preload(name, start, end, buf)

    def release(self, name: str, start: int, end: int) -> None:
        """Drop the mapped pages of a consumed range from RSS (they stay in the page cache)."""
        self.where[name].release(name, start, end)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


Chunk = tuple[int, int, list[torch.Tensor]]
"""``(start, end, views)``: one element range and a zero-copy view of it per source."""


def read_chunks(
    sources: Sequence[ModelFolder],
    name: str,
    ranges: Iterable[tuple[int, int]],
    before: Callable[[int], None] | None = None,
) -> Iterator[Chunk]:
    """Walk tensor ``name`` of every source chunk by chunk, releasing each chunk's pages once
    the consumer asks for the next one (or stops), so mapped input never accumulates in RSS.

    ``before(i)`` runs before chunk ``i`` is mapped (the scheduler starts its read-ahead there).
    The consumer must drop the views before asking for the next chunk.
    """
    for i, (s, e) in enumerate(ranges):
        if before is not None:
            before(i)
        try:
            yield s, e, [src.read(name, s, e) for src in sources]
        finally:
            for src in sources:
                src.release(name, s, e)


def check_compatible(base: ModelFolder, others: Sequence[ModelFolder]) -> None:
    """All models must have the base's tensor names, shapes and (for non-floats) dtypes.

    Every mismatch is collected and reported in one error, so the user fixes them in one go.
    """
    problems: list[str] = []
    for m in others:
        missing = sorted(set(base.where) - set(m.where))
        extra = sorted(set(m.where) - set(base.where))
        problems += [
            f"{m.path}: tensor {n!r} is missing (present in base {base.path})" for n in missing
        ]
        problems += [f"{m.path}: tensor {n!r} is not in base {base.path}" for n in extra]
        for n in sorted(set(base.where) & set(m.where)):
            b, t = base.info(n), m.info(n)
            if b.shape != t.shape:
                problems.append(
                    f"{m.path}: tensor {n!r} has shape {list(t.shape)}, base has {list(b.shape)}"
                )
            elif b.is_float != t.is_float or (not b.is_float and b.dtype != t.dtype):
                problems.append(f"{m.path}: tensor {n!r} has dtype {t.dtype}, base has {b.dtype}")
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise InputError(f"models do not match ({count}): " + "; ".join(shown))
