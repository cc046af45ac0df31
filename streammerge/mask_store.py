"""The occupancy store: every model's kept mask for every tensor, as packed bits in zarr.

Layout of ``OUT_DIR/occupancy.zarr`` (zarr v3, store format 2):

* group attributes: ``streammerge_version``, ``method``, ``recipe`` (as parsed), ``options``,
  ``models`` (processing order: name, path, weight, n, m), ``order`` (model names);
* ``masks`` group attributes: ``format`` (2), ``pack_bytes`` and ``tensors``: for every tensor
  with masks, in plan order, its ``shape``, processing ``chunk`` (elements), ``offset`` (its
  first byte in the packed array, or null when it has an array of its own), and per model
  (position in processing order) ``kept`` and ``info`` (weight, density, n, m used);
* masks are packed bits (``np.packbits`` order, MSB first: bit ``i`` is element ``i`` of the
  tensor's row-major flattening), zstd level 1, full chunks (zarr's edge-chunk rule):

  - a tensor of one processing chunk whose mask fits ``PACK_BYTES`` lives in
    ``masks/<k>/packed``, a 1-D ``uint8`` array of ``PACK_BYTES`` chunks shared by consecutive
    small tensors (plan order, byte-aligned, a tensor may straddle two chunks);
  - every other tensor has ``masks/<k>/<tensor name>``, chunked like the processing chunks,
    so every chunk write fills exactly one zarr chunk (no read-modify-write).

Why two kinds: a MoE has thousands of small tensors, and an array (folder, metadata, chunk
file, their syncs) per model and tensor cost ~90 ms each (296 s for 3,219 tensors). Packed
chunks are buffered and written once per :meth:`ZarrMaskStore.sync` (the journal's flush), so
a flush costs a few files whatever the tensor count. Per-tensor metadata is appended to
``masks/layout.jsonl`` while a merge runs (synced with the chunks, before the journal line
that depends on them) and folded into the ``masks`` attributes once, by
:meth:`ZarrMaskStore.seal`, when the merge is done. The layout is a function of the plan
(tensors are laid out in plan order as they are created), so an interrupted and resumed merge
writes the same bytes as an uninterrupted one.

Chunks are read and written as files directly (zarr's per-call machinery cost ~1 ms a call);
zarr still reads a sealed store (``zarr.open_group``). Format 1 (one array per model and
tensor, kept counts as array attributes) is read for inspect, remix, add and
:func:`read_mask`; resuming into it is refused.

:class:`MaskStore` is the seam; :class:`ZarrMaskStore` is the real thing and
:class:`MemoryMaskStore` a dict-backed twin for tests. Both pass the same contract tests.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import zarr
from numcodecs.zstd import Zstd

from .errors import StreamMergeError
from .platform import current

if TYPE_CHECKING:
    from .plan import MergePlan

STORE_NAME = "occupancy.zarr"
FORMAT = 2
"""The store layout's version (``masks`` attribute ``format``); 1 had no such attribute."""
PACK_BYTES = 1 << 18
"""Chunk size of the packed arrays, bytes (256 KiB: 2 Mi mask elements; a flush re-encodes a
dirty one in ~0.3 ms)."""
LAYOUT_LOG = "layout.jsonl"
_ZSTD = Zstd(level=1)  # what zarr's ZstdCodec(level=1) writes: a plain zstd frame


class MaskStore(Protocol):
    """Write-once-per-chunk storage of per-(model, tensor) boolean masks."""

    def set_attrs(self, attrs: Mapping[str, Any]) -> None: ...

    def attrs(self) -> dict[str, Any]: ...

    def create(self, model: int, tensor: str, shape: Sequence[int], chunk_elems: int) -> None:
        """Declare a mask; ``chunk_elems`` must be a multiple of 8."""
        ...

    def write(self, model: int, tensor: str, start: int, mask: torch.Tensor) -> None:
        """Store ``mask`` (1-D bool) at element ``start`` (a multiple of ``chunk_elems``)."""
        ...

    def finish(
        self, model: int, tensor: str, kept: int, info: Mapping[str, Any] | None = None
    ) -> None:
        """Record the kept count (and e.g. the density used) once all chunks are written;
        durable at the next :meth:`sync`."""
        ...

    def read(self, model: int, tensor: str) -> torch.Tensor:
        """The whole mask as a bool tensor of the tensor's shape."""
        ...

    def sync(self, chunks: Iterable[tuple[int, str, int]]) -> None:
        """Make the chunks written at ``(model, tensor, start element)`` durable, and every
        :meth:`create` and :meth:`finish` so far (a batch: files and folders shared by several
        chunks are synced once)."""
        ...

    def seal(self) -> None:
        """The merge is done: write the store's final form (durably)."""
        ...

    def read_range(self, model: int, tensor: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of a mask (``start`` a multiple of 8), 1-D bool."""
        ...

    def kept(self, model: int, tensor: str) -> int | None:
        """The kept count recorded by :meth:`finish`, or None."""
        ...


def _pack(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.numpy())


def _bits(packed: np.ndarray, count: int) -> torch.Tensor:
    # unpackbits gives 0/1 bytes: viewed as bool without the copy astype would make
    return torch.from_numpy(np.unpackbits(packed, count=count).view(np.bool_))


def _unpack(packed: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64))
    return _bits(packed, numel).reshape(tuple(shape))


def _array_meta(nbytes: int, chunk: int, attributes: Mapping[str, Any]) -> bytes:
    """A ``uint8`` zarr v3 array's ``zarr.json``, as zarr 3.1 writes it for this store."""
    meta = {
        "shape": [nbytes],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [
            {"name": "bytes"},
            {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        ],
        "attributes": dict(attributes),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    return json.dumps(meta, indent=2).encode()


def _group_meta(attributes: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {"attributes": dict(attributes), "zarr_format": 3, "node_type": "group"}, indent=2
    ).encode()


@dataclass
class _Entry:
    """One tensor's masks: where they live and, per model, what :meth:`finish` recorded."""

    shape: list[int]
    chunk: int
    """Processing chunk, elements."""
    offset: int | None
    """First byte in the packed arrays; None: an array of its own per model."""
    kept: dict[int, int] = field(default_factory=dict)
    info: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return -(-self.numel // 8)

    @property
    def chunk_bytes(self) -> int:
        """Bytes per zarr chunk of an own array (format 1's rule: at most the tensor)."""
        return max(1, min(self.chunk // 8, self.nbytes))


class ZarrMaskStore:
    """:class:`MaskStore` on a zarr v3 directory store.

    ``mode``: ``"r"`` read a finished store; ``"w"`` a new one; ``"r+"`` resume (temp files of
    cut-short writes are dropped); ``"a"`` a Ray worker's view of its driver's store.
    """

    def __init__(self, path: Path, mode: str = "r") -> None:
        self.path = path
        self.mode = mode
        try:
            self.group = zarr.open_group(store=str(path), mode=mode)  # type: ignore[arg-type]
        except FileNotFoundError as e:
            raise StreamMergeError(f"{path}: no occupancy store here") from e
        self.format = FORMAT
        self._entries: dict[str, _Entry] = {}
        self._packed_end = 0  # next free byte of the packed arrays
        self._models: set[int] = set()
        self._dirty: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        """Packed chunk (model, index) -> (byte in chunk, bytes) written since the last sync."""
        self._cache: dict[tuple[int, int], np.ndarray] = {}  # decoded packed chunks (reads)
        self._log: list[str] = []  # layout lines not yet appended
        self._touched: set[Path] = set()  # folders with new names since the last sync
        self._files: set[Path] = set()  # own-array chunk files written since the last sync
        self._own_made: set[tuple[int, str]] = set()
        self._mutex = threading.Lock()  # write() runs on the write lane, reads elsewhere
        self._v1: dict[tuple[int, str], zarr.Array] = {}
        if mode == "r+":  # resuming: drop temp files of writes a crash cut short
            for p in path.rglob("*.partial"):
                p.unlink()
        if mode != "w":
            self._load()

    # -- loading -------------------------------------------------------------------------------

    def _load(self) -> None:
        masks = self.path / "masks"
        meta = masks / "zarr.json"
        log = masks / LAYOUT_LOG
        if meta.is_file():
            attrs = json.loads(meta.read_text()).get("attributes", {})
            if attrs.get("format") != FORMAT:
                if attrs.get("format") is None and not log.exists():
                    self.format = 1  # one array per (model, tensor), attributes on each
                    if self.mode != "r":
                        raise StreamMergeError(
                            f"{self.path}: occupancy store format 1, written by an older "
                            "streammerge; rerun with --restart to merge into it anew"
                        )
                    return
                raise StreamMergeError(
                    f"{self.path}: occupancy store format {attrs.get('format')} is not one this "
                    f"streammerge reads (format {FORMAT}); upgrade streammerge"
                )
            for name, t in attrs["tensors"].items():
                e = _Entry(list(t["shape"]), int(t["chunk"]), t["offset"])
                for k, (kept, info) in enumerate(zip(t["kept"], t["info"], strict=True)):
                    self._models.add(k)
                    if kept is not None:
                        e.kept[k] = int(kept)
                    if info is not None:
                        e.info[k] = dict(info)
                self._add(name, e)
        if log.is_file():
            for line in log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the line a crash cut short: never synced
                    break
                self._replay_line(rec)

    def _replay_line(self, rec: Mapping[str, Any]) -> None:
        name = rec["t"]
        if "shape" in rec:
            if name in self._entries and self._same(self._entries[name], rec):
                return
            self._add(name, _Entry(list(rec["shape"]), int(rec["chunk"]), rec["offset"]))
        else:
            k = int(rec["k"])
            self._models.add(k)
            self._entries[name].kept[k] = int(rec["kept"])
            self._entries[name].info[k] = dict(rec["info"])

    @staticmethod
    def _same(e: _Entry, rec: Mapping[str, Any]) -> bool:
        return e.shape == list(rec["shape"]) and e.chunk == int(rec["chunk"])

    def _add(self, name: str, e: _Entry) -> None:
        self._entries.pop(name, None)  # a redeclared tensor moves to the end
        self._entries[name] = e
        if e.offset is not None:
            self._packed_end = max(self._packed_end, e.offset + e.nbytes)

    # -- attributes ----------------------------------------------------------------------------

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        self.group.attrs.update(dict(attrs))

    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def _key(self, model: int, tensor: str) -> str:
        return f"masks/{model}/{tensor}"

    def _writable(self) -> None:
        if self.format != FORMAT or self.mode == "r":
            raise StreamMergeError(f"{self.path}: occupancy store opened read-only")

    # -- writing -------------------------------------------------------------------------------

    def _mkdirs(self, folder: Path) -> None:
        """Create ``folder`` and its parents; every folder that gained a name is synced."""
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            self._touched.add(d.parent)
        if missing:
            self._touched.add(folder)

    def _put(self, path: Path, data: bytes, sync: bool = False) -> None:
        """Write ``path`` atomically (temp name, rename); ``sync``: data durable first."""
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                current().full_sync(f.fileno())
        current().replace(tmp, path)
        self._touched.add(path.parent)

    def create(self, model: int, tensor: str, shape: Sequence[int], chunk_elems: int) -> None:
        if chunk_elems % 8:
            raise ValueError("mask chunks must hold a whole number of bytes")
        self._writable()
        with self._mutex:
            self._models.add(model)
            rec = {"t": tensor, "shape": [int(x) for x in shape], "chunk": int(chunk_elems)}
            e = self._entries.get(tensor)
            if e is None or not self._same(e, rec):  # resuming: keep what is laid out
                numel = int(np.prod(shape, dtype=np.int64))
                small = numel <= chunk_elems and -(-numel // 8) <= PACK_BYTES
                rec["offset"] = self._packed_end if small else None
                e = _Entry(rec["shape"], rec["chunk"], rec["offset"])
                self._add(tensor, e)
                self._log.append(json.dumps(rec))
                self._own_made = {m for m in self._own_made if m[1] != tensor}
            if e.offset is None and (model, tensor) not in self._own_made:
                folder = self.path / self._key(model, tensor)
                meta = folder / "zarr.json"
                attrs = {"shape": e.shape, "numel": e.numel}
                data = _array_meta(e.nbytes, e.chunk_bytes, attrs)
                if not (meta.is_file() and meta.read_bytes() == data):
                    self._mkdirs(folder / "c")
                    self._put(meta, data)
                self._own_made.add((model, tensor))

    def _entry(self, model: int, tensor: str) -> _Entry:
        e = self._entries.get(tensor)  # the layout is shared: every model has every tensor
        if e is None or model < 0:
            raise StreamMergeError(f"{self.path}: no mask for model {model}, tensor {tensor!r}")
        return e

    def write(self, model: int, tensor: str, start: int, mask: torch.Tensor) -> None:
        packed = _pack(mask)
        with self._mutex:
            e = self._entry(model, tensor)
            if e.offset is not None:  # buffered; written by the next sync
                pos = e.offset + start // 8
                for b, at, lo, hi in _spans(pos, packed.size):
                    self._dirty.setdefault((model, b), []).append((at, packed[lo:hi]))
                return
            cb = e.chunk_bytes
            chunk = np.zeros(cb, np.uint8)  # zarr stores edge chunks at full size
            chunk[: packed.size] = packed
            path = self.path / self._key(model, tensor) / "c" / str(start // 8 // cb)
            self._put(path, _ZSTD.encode(chunk))
            self._files.add(path)

    def finish(
        self, model: int, tensor: str, kept: int, info: Mapping[str, Any] | None = None
    ) -> None:
        with self._mutex:
            e = self._entry(model, tensor)
            e.kept[model], e.info[model] = int(kept), dict(info or {})
            rec = {"t": tensor, "k": model, "kept": int(kept), "info": e.info[model]}
            self._log.append(json.dumps(rec))

    def sync(self, chunks: Iterable[tuple[int, str, int]] = ()) -> None:
        # order: the data (chunk files, then the names renamed into place), then the layout
        # log, then its folder; the journal line that depends on them follows (the caller)
        del chunks  # every chunk written since the last sync is synced (a superset)
        with self._mutex:
            self._write_packed()
            for path in sorted(self._files):
                with contextlib.suppress(FileNotFoundError):
                    current().sync_file(path)
            self._files.clear()
            if self._log:
                log = self.path / "masks" / LAYOUT_LOG
                self._mkdirs(log.parent)
                new = not log.exists()
                with open(log, "a") as f:
                    f.write("".join(line + "\n" for line in self._log))
                    f.flush()
                    current().full_sync(f.fileno())
                if new:
                    self._touched.add(log.parent)
                self._log.clear()
            for folder in sorted(self._touched, key=lambda p: -len(p.parts)):  # deepest first
                current().sync_dir(folder)
            self._touched.clear()

    def _write_packed(self) -> None:
        """Write the packed chunks dirtied since the last sync: read what is on disk (another
        process may share the chunk), lay the new bytes over it, write it back."""
        if not self._dirty:
            return
        with self._locked():
            for (k, b), spans in sorted(self._dirty.items(), key=lambda kv: kv[0]):
                path = self.path / "masks" / str(k) / "packed" / "c" / str(b)
                chunk = self._read_packed(path)
                for at, data in spans:
                    chunk[at : at + data.size] = data
                self._mkdirs(path.parent)
                # synced before the rename: the old chunk holds other tensors' durable masks
                self._put(path, _ZSTD.encode(chunk), sync=True)
                self._cache.pop((k, b), None)
        self._dirty.clear()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise packed-chunk updates between processes (Ray workers on one host)."""
        held = current().wait_lock(self.path)
        try:
            yield
        finally:
            if held is not None:
                held.release()

    def seal(self) -> None:
        """Fold the layout log into the ``masks`` attributes (and write the arrays' and
        groups' metadata zarr reads); durable before it returns."""
        self.sync()
        if not self._entries or self.format != FORMAT or self.mode == "r":
            return
        models = range(max(self._models, default=-1) + 1)  # lists indexed by position
        with self._mutex:
            masks = self.path / "masks"
            tensors = {
                name: {
                    "shape": e.shape,
                    "chunk": e.chunk,
                    "offset": e.offset,
                    "kept": [e.kept.get(k) for k in models],
                    "info": [e.info.get(k) for k in models],
                }
                for name, e in self._entries.items()
            }
            for k in models:
                self._mkdirs(masks / str(k))
                self._put(masks / str(k) / "zarr.json", _group_meta({}), sync=True)
                if any(e.offset is not None for e in self._entries.values()):
                    packed = masks / str(k) / "packed"
                    self._mkdirs(packed / "c")
                    meta = _array_meta(self._packed_end, PACK_BYTES, {})
                    self._put(packed / "zarr.json", meta, sync=True)
            attrs = {"format": FORMAT, "pack_bytes": PACK_BYTES, "tensors": tensors}
            self._put(masks / "zarr.json", _group_meta(attrs), sync=True)
            for folder in sorted(self._touched, key=lambda p: -len(p.parts)):
                current().sync_dir(folder)
            self._touched.clear()
            log = masks / LAYOUT_LOG
            if log.exists():  # folded in: the attributes now say all it said
                log.unlink()
                current().sync_dir(masks)

    # -- reading -------------------------------------------------------------------------------

    def _read_packed(self, path: Path) -> np.ndarray:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return np.zeros(PACK_BYTES, np.uint8)  # never written: the fill value
        out = np.frombuffer(_ZSTD.decode(raw), np.uint8).copy()
        if out.size != PACK_BYTES:
            raise StreamMergeError(f"{path}: a damaged mask chunk")
        return out

    def _packed_chunk(self, k: int, b: int) -> np.ndarray:
        chunk = self._cache.get((k, b))
        if chunk is None:
            chunk = self._read_packed(self.path / "masks" / str(k) / "packed" / "c" / str(b))
            # reads walk each model's chunks in order: keep the latest one per model
            self._cache = {key: c for key, c in self._cache.items() if key[0] != k}
            self._cache[(k, b)] = chunk
        if (k, b) in self._dirty:  # written but not yet synced: what a reader must see
            chunk = chunk.copy()
            for at, data in self._dirty[(k, b)]:
                chunk[at : at + data.size] = data
        return chunk

    def _read_bytes(self, model: int, tensor: str, lo: int, hi: int) -> np.ndarray:
        """Packed bytes ``[lo, hi)`` of a mask."""
        e = self._entry(model, tensor)
        hi = min(hi, e.nbytes)
        if e.offset is not None:
            out = np.empty(max(0, hi - lo), np.uint8)
            for b, at, s, t in _spans(e.offset + lo, out.size):
                out[s:t] = self._packed_chunk(model, b)[at : at + t - s]
            return out
        cb = e.chunk_bytes
        folder = self.path / self._key(model, tensor) / "c"
        parts = []
        for i in range(lo // cb, -(-hi // cb)):
            try:
                chunk = np.frombuffer(_ZSTD.decode((folder / str(i)).read_bytes()), np.uint8)
            except FileNotFoundError:
                chunk = np.zeros(cb, np.uint8)
            if chunk.size != cb:
                raise StreamMergeError(f"{folder / str(i)}: a damaged mask chunk")
            s, t = max(lo, i * cb) - i * cb, min(hi, (i + 1) * cb) - i * cb
            parts.append(chunk[s:t])
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def read_range(self, model: int, tensor: str, start: int, end: int) -> torch.Tensor:
        if self.format == 1:
            packed = np.asarray(self._v1_array(model, tensor)[start // 8 : -(-end // 8)])
        else:
            with self._mutex:
                packed = self._read_bytes(model, tensor, start // 8, -(-end // 8))
        return _bits(packed, end - start)

    def read(self, model: int, tensor: str) -> torch.Tensor:
        if self.format == 1:
            arr = self._v1_array(model, tensor)
            return _unpack(np.asarray(arr[:]), arr.attrs["shape"])  # type: ignore[arg-type]
        with self._mutex:
            e = self._entry(model, tensor)
            packed = self._read_bytes(model, tensor, 0, e.nbytes)
        return _unpack(packed, e.shape)

    def kept(self, model: int, tensor: str) -> int | None:
        if self.format == 1:
            return self._v1_array(model, tensor).attrs.get("kept")  # type: ignore[return-value]
        return self._entry(model, tensor).kept.get(model)

    def info(self, model: int, tensor: str) -> dict[str, Any]:
        """A mask's ``shape``, ``numel``, the parameters recorded by :meth:`finish` (weight,
        density, n, m) and ``kept`` (absent until finished)."""
        if self.format == 1:
            return dict(self._v1_array(model, tensor).attrs)
        e = self._entry(model, tensor)
        out: dict[str, Any] = {"shape": e.shape, "numel": e.numel, **e.info.get(model, {})}
        if model in e.kept:
            out["kept"] = e.kept[model]
        return out

    def names(self) -> list[str]:
        """Tensors with masks: plan order (format 1: sorted)."""
        if self.format == 1:
            try:
                return sorted(self.group["masks/0"].array_keys())  # type: ignore[union-attr]
            except KeyError:
                return []
        return list(self._entries)

    def _v1_array(self, model: int, tensor: str) -> zarr.Array:
        if (model, tensor) not in self._v1:
            try:
                self._v1[(model, tensor)] = self.group[self._key(model, tensor)]  # type: ignore[assignment]
            except KeyError as e:
                raise StreamMergeError(
                    f"{self.path}: no mask for model {model}, tensor {tensor!r}"
                ) from e
        return self._v1[(model, tensor)]


def _spans(pos: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """Split packed bytes ``[pos, pos + size)`` by packed chunk: (chunk, byte in chunk, first,
    end byte of the span)."""
    done = 0
    while done < size:
        b, at = divmod(pos + done, PACK_BYTES)
        n = min(size - done, PACK_BYTES - at)
        yield b, at, done, done + n
        done += n


class MemoryMaskStore:
    """:class:`MaskStore` in a dict; same contract, no disk."""

    def __init__(self) -> None:
        self._attrs: dict[str, Any] = {}
        self._masks: dict[tuple[int, str], tuple[np.ndarray, list[int]]] = {}
        self.kept_counts: dict[tuple[int, str], int] = {}
        self.info: dict[tuple[int, str], dict[str, Any]] = {}

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        self._attrs.update(attrs)

    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def create(self, model: int, tensor: str, shape: Sequence[int], chunk_elems: int) -> None:
        if chunk_elems % 8:
            raise ValueError("mask chunks must hold a whole number of bytes")
        numel = int(np.prod(shape, dtype=np.int64))
        self._masks[(model, tensor)] = (np.zeros(-(-numel // 8), np.uint8), list(shape))

    def write(self, model: int, tensor: str, start: int, mask: torch.Tensor) -> None:
        packed = _pack(mask)
        self._masks[(model, tensor)][0][start // 8 : start // 8 + packed.size] = packed

    def finish(
        self, model: int, tensor: str, kept: int, info: Mapping[str, Any] | None = None
    ) -> None:
        self.kept_counts[(model, tensor)] = kept
        self.info[(model, tensor)] = dict(info or {})

    def sync(self, chunks: Iterable[tuple[int, str, int]] = ()) -> None:
        pass

    def seal(self) -> None:
        pass

    def read_range(self, model: int, tensor: str, start: int, end: int) -> torch.Tensor:
        packed = self._masks[(model, tensor)][0][start // 8 : -(-end // 8)]
        return torch.from_numpy(np.unpackbits(packed, count=end - start).astype(bool))

    def kept(self, model: int, tensor: str) -> int | None:
        return self.kept_counts.get((model, tensor))

    def read(self, model: int, tensor: str) -> torch.Tensor:
        if (model, tensor) not in self._masks:
            raise StreamMergeError(f"no mask for model {model}, tensor {tensor!r}")
        packed, shape = self._masks[(model, tensor)]
        return _unpack(packed, shape)


def read_mask(out_dir: str | Path, model: int | str, tensor: str) -> torch.Tensor:
    """One model's kept mask for one tensor of a finished merge, as a bool tensor.

    Args:
        out_dir: the merge's output folder (holding ``occupancy.zarr``).
        model: position in processing (pruning) order, or the model's reference as written in
            the recipe, its folder name, or its resolved path.
        tensor: tensor name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

    Returns:
        A bool tensor of the tensor's shape; True where the model's task vector was kept.
    """
    store = ZarrMaskStore(Path(out_dir) / STORE_NAME)
    return store.read(model_index(store.attrs(), model), tensor)


def model_index(attrs: Mapping[str, Any], model: int | str) -> int:
    """Resolve a model reference against the store's ``models`` attribute."""
    models = attrs.get("models", [])
    if isinstance(model, int):
        if not 0 <= model < len(models):
            raise StreamMergeError(f"model index {model} out of range (0..{len(models) - 1})")
        return model
    hits = [
        i for i, m in enumerate(models) if model in (m["name"], m["path"], Path(m["path"]).name)
    ]
    names = ", ".join(m["name"] for m in models)
    if len(hits) != 1:
        problem = "matches several models" if hits else "is not a model of this merge"
        raise StreamMergeError(f"{model!r} {problem} (models: {names})")
    return hits[0]


def merge_attrs(plan: MergePlan, tadrop: Mapping[str, object]) -> dict[str, object]:
    """The store's group attributes for a merge: provenance, and what remix/add rebuild the
    recipe from (models in processing order with their first merged tensor's parameters)."""
    from . import __version__

    recipe = plan.recipe
    first = next((t for t in plan.tensors if t.merged), None)
    models = []
    for k, m in enumerate(recipe.models):
        entry: dict[str, object] = {"name": m.name, "path": str(m.path)}
        if first is not None:  # per-tensor values are on each mask array
            p = first.params[k]
            entry.update(weight=p.weight, density=p.density, n=p.n, m=p.m)
        models.append(entry)
    return {
        "streammerge_version": __version__,
        "method": recipe.method,
        "recipe": json.loads(json.dumps(recipe.source, default=str)),
        "base": str(recipe.base),
        "models": models,
        "order": [m.name for m in recipe.models],
        "tadrop": dict(tadrop),
    }
