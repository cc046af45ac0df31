"""Where bytes meet disk: a memory-mapped safetensors reader and a positional shard writer.

Reading: we parse the header ourselves and ``mmap`` the shard privately. A chunk of a tensor
(a flat element range) is returned as a zero-copy torch view of the mapping; once the caller is
done with it, :meth:`SafetensorsFile.release` drops the pages from this process so that mapped
input never accumulates in RSS, whatever the model size. Where the OS can release pages of a
file mapping (Linux) one mapping covers the whole shard; elsewhere each chunk gets its own
mapped window, unmapped when its views are dropped (:mod:`.platform`).

Writing: every output shard is planned before any math (names, dtypes, shapes, offsets), so the
header is known up front. A shard is created as ``<name>.partial`` at its final size and filled
with positional writes at precomputed offsets, in any order; it is synced and renamed when
complete.
We never truncate a path that could be mapped as an input (safetensors issue #762).

Format facts (safetensors ``tensor.rs``): 8-byte little-endian header length N, N bytes of
compact JSON (``__metadata__`` first, right-padded with spaces so data starts 8-aligned), then
the data buffer with no holes, tensors ordered by dtype alignment (descending) then name.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, StreamMergeError
from .platform import BINARY, Platform, current

MAX_HEADER_SIZE = 100_000_000
"""Largest header the reference implementation accepts, in bytes."""

ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
"""Bytes per element for every dtype string we accept."""

# safetensors' Dtype enum order; the official writer lays tensors out by dtype in *descending*
# enum order (largest alignment first, ties between equal sizes broken by this order), then name.
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
               "F32", "F64", "I64", "U64")  # fmt: skip

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
"""Dtypes that take part in a merge; all others are copied from the base."""

TORCH_TO_ST = {v: k for k, v in FLOAT_DTYPES.items()}

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors file (an input's, or a planned output shard's)."""

    name: str
    dtype: str
    """safetensors dtype string, e.g. ``"BF16"``."""
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the first element in the file."""
    end: int
    """Absolute byte offset one past the last element (exclusive)."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Checks what a broken or hostile file could get wrong: header size, JSON syntax, known
    dtypes, byte length = numel x itemsize, offsets inside the file, no overlaps.
    Returns ``(tensors by name, __metadata__)``; offsets in the result are absolute.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: file too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_SIZE:
                raise InputError(f"{path}: header length {n} exceeds the 100 MB safetensors limit")
            if 8 + n > size:
                raise InputError(
                    f"{path}: header length {n} is larger than the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map str to str)")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError) as err:
            raise InputError(f"{path}: tensor {name!r}: malformed header entry") from err
        if not (_int_list(shape) and _int_list(offsets) and len(offsets) == 2):
            raise InputError(
                f"{path}: tensor {name!r}: shape and data_offsets must be integer lists"
            )
        _check_name(path, name)
        shape, (b, e) = tuple(shape), offsets
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise InputError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, data_start + b, data_start + e)
        if b < 0 or e < b or any(d < 0 or d >= 2**63 for d in shape) or e >= 2**63:
            raise InputError(f"{path}: tensor {name!r}: invalid offsets [{b}, {e}] or shape")
        if info.nbytes != info.numel * info.itemsize:
            raise InputError(
                f"{path}: tensor {name!r}: {info.nbytes} bytes for shape {list(shape)} "
                f"{dtype} (expected {info.numel * info.itemsize})"
            )
        if info.end > size:
            raise InputError(
                f"{path}: tensor {name!r}: data ends at byte {info.end} but the file has "
                f"{size} bytes (truncated?)"
            )
        tensors[name] = info
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.nbytes)
    for (_, e0, a), (b1, _, b) in itertools.pairwise(spans):
        if b1 < e0:
            raise InputError(f"{path}: tensors {a!r} and {b!r} overlap in the data buffer")
    _check_folders(path, tensors)
    return tensors, meta


def _check_name(path: Path, name: str) -> None:
    """Refuse a tensor name that is not a valid store key (zarr path)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{path}: tensor {name!r}: name is not valid UTF-8") from None
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts) or "\\" in name or "\x00" in name:
        raise InputError(f"{path}: tensor {name!r}: name is not a valid tensor key")


def _check_folders(path: Path, names: Iterable[str]) -> None:
    """Refuse a name that is also a folder of another (``p`` beside ``p/q``): the two would
    collide as store keys. Linear in the total name length, so 90,000-tensor MoE headers
    cost nothing noticeable."""
    known = set(names)
    for name in sorted(known):  # sorted: the same error line on every run
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in known:
                raise InputError(
                    f"{path}: tensor {folder!r}: clashes with tensor {name!r} "
                    "(one is a prefix folder of the other)"
                )


def _int_list(x: object) -> bool:
    return isinstance(x, list) and all(type(v) is int for v in x)


class SafetensorsFile:
    """A privately memory-mapped safetensors file that hands out chunk views.

    Chunks are flat element ranges ``[start, end)`` of a tensor's row-major flattening.
    Views alias the mapping: never write to them (that would copy-on-write into anonymous
    memory) and drop them before :meth:`close`.
    """

    def __init__(self, path: Path, platform: Platform | None = None) -> None:
        self.path = path
        self.platform = platform or current()
        self.tensors, self.metadata = read_header(path)
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # preload threads and the reader open it lazily

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with self.path.open("rb") as f:
                # ACCESS_COPY (MAP_PRIVATE, writable) lets torch.frombuffer alias the pages
                # without a read-only warning; we never write, so nothing is ever copied.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.platform.advise_sequential(self._mm)
        return self._mm

    def _fileno(self) -> int:
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | BINARY)
            return self._fd

    def _mapped(self, b: int, e: int) -> tuple[mmap.mmap, int]:
        """A mapping holding bytes ``[b, e)`` and where ``b`` lies in it."""
        if self.platform.windowed_maps:
            return self.platform.map_window(self._fileno(), b, e - b)
        return self._map(), b

    def _byte_range(self, name: str, start: int, end: int) -> tuple[int, int]:
        t = self.tensors[name]
        if not 0 <= start <= end <= t.numel:
            raise IndexError(f"{self.path}: {name}: element range [{start}, {end}) out of bounds")
        return t.begin + start * t.itemsize, t.begin + end * t.itemsize

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Zero-copy 1-D view of elements ``[start, end)`` of a float tensor."""
        b, e = self._byte_range(name, start, end)
        dtype = FLOAT_DTYPES[self.tensors[name].dtype]
        if e == b:
            return torch.empty(0, dtype=dtype)
        mm, off = self._mapped(b, e)
        return torch.frombuffer(mm, dtype=dtype, count=end - start, offset=off)

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        """Raw bytes of elements ``[start, end)`` (any dtype), as a copy."""
        b, e = self._byte_range(name, start, end)
        if e == b:
            return b""
        mm, off = self._mapped(b, e)
        return bytes(mm[off : off + e - b])

    def preload(self, name: str, start: int, end: int, buf: bytearray) -> None:
        """Read elements ``[start, end)`` into the page cache (blocking; run it in a thread).

        ``pread`` into a scratch ``buf`` rather than touching the mapping: the pages land in
        the page cache without being mapped into this process, so a chunk read ahead costs
        no RSS until it is used. The GIL is released while the kernel reads.
        """
        b, e = self._byte_range(name, start, end)
        fd = self._fileno()
        view = memoryview(buf)
        while b < e:
            got = self.platform.pread_into(fd, view[: min(len(buf), e - b)], b)
            if got <= 0:
                raise InputError(f"{self.path}: unexpected end of file reading {name!r}")
            b += got

    def release(self, name: str, start: int, end: int) -> None:
        """Drop the mapped pages of a consumed range from this process's RSS.

        Pages stay in the page cache; touching them again just faults them back in. With
        windowed maps there is nothing to do: a window goes when its last view does.
        """
        if self._mm is None:
            return
        b, e = self._byte_range(name, start, end)
        lo = (b // _PAGE) * _PAGE
        hi = min(-(-e // _PAGE) * _PAGE, len(self._mm))
        if hi > lo:
            self.platform.release_pages(self._mm, lo, hi - lo)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output file: its name, exact header bytes and tensor offsets."""

    filename: str
    header: bytes
    """The 8-byte length prefix plus the padded JSON header."""
    tensors: tuple[TensorInfo, ...]
    """Each tensor's place in the file (absolute offsets), in file order."""

    @property
    def size(self) -> int:
        """Final file size in bytes."""
        return self.tensors[-1].end if self.tensors else len(self.header)


def _header_bytes(specs: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """Header bytes and data-relative begin offsets for specs already in file order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for name, dtype, shape in specs:
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    js = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    js += b" " * (-len(js) % 8)  # pad so the data section starts 8-aligned
    return struct.pack("<Q", len(js)) + js, offsets


def shard_layout(specs: Iterable[tuple[str, str, tuple[int, ...]]], filename: str) -> ShardPlan:
    """Lay out one shard like the official writer: dtype order descending, then name."""
    ordered = sorted(specs, key=lambda s: (-DTYPE_ORDER.index(s[1]), s[0]))
    header, offsets = _header_bytes(ordered)
    tensors = []
    for (name, dtype, shape), off in zip(ordered, offsets, strict=True):
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        tensors.append(
            TensorInfo(name, dtype, tuple(shape), len(header) + off, len(header) + off + n)
        )
    return ShardPlan(filename, header, tuple(tensors))


def plan_shards(
    specs: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int
) -> tuple[ShardPlan, ...]:
    """Split tensors (in the given order) greedily into shards of at most ``max_shard_bytes``.

    Same rule as huggingface_hub: a new shard starts when the next tensor would overflow the
    current one; a tensor larger than the limit gets a shard of its own. Names follow
    ``model-00001-of-0000N.safetensors``.
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for spec in specs:
        n = ITEMSIZE[spec[1]]
        for d in spec[2]:
            n *= d
        if groups[-1] and used + n > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += n
    total = len(groups)
    return tuple(
        shard_layout(g, f"model-{i + 1:05d}-of-{total:05d}.safetensors")
        for i, g in enumerate(groups)
    )


def write_index(out_dir: Path, shards: Sequence[ShardPlan], extra: dict[str, str]) -> None:
    """Write ``model.safetensors.index.json`` atomically (temp file + rename)."""
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(t.end - t.begin for s in shards for t in s.tensors)
    doc = {
        "metadata": {"total_size": total, **extra},
        "weight_map": dict(sorted(weight_map.items())),
    }
    atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(doc, indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see either the old or the complete new content."""
    plat = current()
    tmp = path.with_name(path.name + ".partial")
    # utf-8 and "\n" whatever the OS: the same bytes on every platform
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        plat.full_sync(f.fileno())
    plat.replace(tmp, path)
    plat.sync_dir(path.parent)  # the rename is durable before anything that follows it


class ShardWriter:
    """Fills one planned shard at precomputed offsets; renames it into place when complete."""

    def __init__(
        self, out_dir: Path, plan: ShardPlan, resume: bool = False, platform: Platform | None = None
    ) -> None:
        self.plan = plan
        self.platform = platform or current()
        self.final_path = out_dir / plan.filename
        self.partial_path = out_dir / (plan.filename + ".partial")
        self._by_name = {t.name: t for t in plan.tensors}
        if resume and self.partial_path.is_file():
            # continue filling a shard from an interrupted run: it must be the same layout
            self._fd = os.open(self.partial_path, os.O_RDWR | BINARY)
            head = self.platform.pread(self._fd, len(plan.header), 0)
            if head != plan.header or os.fstat(self._fd).st_size != plan.size:
                os.close(self._fd)
                raise StreamMergeError(
                    f"{self.partial_path} does not match the plan (damaged?); rerun with --restart"
                )
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | BINARY
        self._fd = os.open(self.partial_path, flags, 0o644)
        self.platform.pwrite(self._fd, plan.header, 0)
        os.ftruncate(self._fd, plan.size)  # sparse until filled
        # the new name must survive a power loss before the journal lists chunks inside it
        self.platform.sync_dir(out_dir)

    def sync(self) -> None:
        """Make the bytes written so far durable (before the journal says they are)."""
        self.platform.data_sync(self._fd)

    def write(self, name: str, start_elem: int, data: bytes | memoryview) -> None:
        """Write the bytes of elements starting at ``start_elem`` of tensor ``name``."""
        t = self._by_name[name]
        pos = t.begin + start_elem * t.itemsize
        if pos + len(data) > t.end:
            raise ValueError(f"{name}: write past the end of the tensor")
        mv = memoryview(data).cast("B")
        try:
            while mv:
                n = self.platform.pwrite(self._fd, mv, pos)
                mv, pos = mv[n:], pos + n
        except OSError as e:  # name the file: a bare ENOSPC from pwrite carries none
            raise OSError(e.errno, e.strerror, str(self.partial_path)) from e

    def finish(self) -> None:
        """Sync, close and rename ``.partial`` to the final name (closed first: Windows
        refuses to rename an open file)."""
        self.platform.full_sync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.platform.replace(self.partial_path, self.final_path)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")
