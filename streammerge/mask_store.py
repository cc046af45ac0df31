"""The occupancy store: every model's kept mask for every tensor, as packed bits in zarr.

Layout of ``OUT_DIR/occupancy.zarr`` (zarr v3):

* group attributes: ``streammerge_version``, ``method``, ``recipe`` (as parsed), ``options``,
  ``models`` (processing order: name, path, weight, n, m), ``order`` (model names);
* one 1-D ``uint8`` array per (model, tensor) at ``masks/<k>/<tensor name>``, where ``k`` is
  the model's position in processing order. Bit ``i`` (``np.packbits`` order: MSB first) is
  element ``i`` of the tensor's row-major flattening. Array chunks are the packed bytes of one
  processing chunk, so every chunk write fills exactly one zarr chunk (no read-modify-write),
  compressed with zstd level 1. Attributes: ``shape``, ``numel``, ``kept`` (set when done).

:class:`MaskStore` is the seam; :class:`ZarrMaskStore` is the real thing and
:class:`MemoryMaskStore` a dict-backed twin for tests. Both pass the same contract tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from .errors import StreamMergeError
from .journal import fsync_dir, fsync_file

if TYPE_CHECKING:
    from .plan import MergePlan

STORE_NAME = "occupancy.zarr"


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
        """Record the kept count (and e.g. the density used) once all chunks are written."""
        ...

    def read(self, model: int, tensor: str) -> torch.Tensor:
        """The whole mask as a bool tensor of the tensor's shape."""
        ...

    def sync(self, chunks: Iterable[tuple[int, str, int]]) -> None:
        """Make the chunks written at ``(model, tensor, start element)`` durable (a batch:
        folders shared by several chunks are synced once)."""
        ...

    def read_range(self, model: int, tensor: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of a mask (``start`` a multiple of 8), 1-D bool."""
        ...

    def kept(self, model: int, tensor: str) -> int | None:
        """The kept count recorded by :meth:`finish`, or None."""
        ...


def _pack(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.numpy())


def _unpack(packed: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(packed, count=numel).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


class ZarrMaskStore:
    """:class:`MaskStore` on a zarr v3 directory store."""

    def __init__(self, path: Path, mode: str = "r") -> None:
        self.path = path
        try:
            self.group = zarr.open_group(store=str(path), mode=mode)  # type: ignore[arg-type]
        except FileNotFoundError as e:
            raise StreamMergeError(f"{path}: no occupancy store here") from e
        self._arrays: dict[tuple[int, str], zarr.Array] = {}  # opening one costs ~1 ms
        self._durable: set[tuple[int, str]] = set()  # arrays whose folders were synced
        if mode == "r+":  # resuming: drop temp files of writes a crash cut short
            for p in path.rglob("*.partial"):
                p.unlink()

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        self.group.attrs.update(dict(attrs))

    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def _key(self, model: int, tensor: str) -> str:
        return f"masks/{model}/{tensor}"

    def create(self, model: int, tensor: str, shape: Sequence[int], chunk_elems: int) -> None:
        if chunk_elems % 8:
            raise ValueError("mask chunks must hold a whole number of bytes")
        numel = int(np.prod(shape, dtype=np.int64))
        nbytes = -(-numel // 8)
        chunk = max(1, min(chunk_elems // 8, nbytes))
        try:  # resuming: keep the chunks an interrupted run already wrote
            arr = self._array(model, tensor)
            if arr.shape == (nbytes,) and arr.chunks == (chunk,):
                return
        except KeyError:
            pass
        self._arrays[(model, tensor)] = self.group.create_array(
            self._key(model, tensor),
            shape=(nbytes,),
            chunks=(chunk,),
            dtype="uint8",
            fill_value=0,
            compressors=ZstdCodec(level=1),
            overwrite=True,
            attributes={"shape": list(shape), "numel": numel},
        )

    def _array(self, model: int, tensor: str) -> zarr.Array:
        if (model, tensor) not in self._arrays:
            self._arrays[(model, tensor)] = self.group[self._key(model, tensor)]  # type: ignore[assignment]
        return self._arrays[(model, tensor)]

    def write(self, model: int, tensor: str, start: int, mask: torch.Tensor) -> None:
        packed = _pack(mask)
        self._array(model, tensor)[start // 8 : start // 8 + packed.size] = packed

    def read_range(self, model: int, tensor: str, start: int, end: int) -> torch.Tensor:
        packed = np.asarray(self._array(model, tensor)[start // 8 : -(-end // 8)])
        return torch.from_numpy(np.unpackbits(packed, count=end - start).astype(bool))

    def finish(
        self, model: int, tensor: str, kept: int, info: Mapping[str, Any] | None = None
    ) -> None:
        arr = self._array(model, tensor)  # one metadata write, not one per key
        arr.update_attributes({**arr.attrs, **(info or {}), "kept": int(kept)})
        fsync_file(self.path / self._key(model, tensor) / "zarr.json")

    def read(self, model: int, tensor: str) -> torch.Tensor:
        try:
            arr = self._array(model, tensor)
        except KeyError as e:
            raise StreamMergeError(
                f"{self.path}: no mask for model {model}, tensor {tensor!r}"
            ) from e
        return _unpack(np.asarray(arr[:]), arr.attrs["shape"])  # type: ignore[arg-type]

    def kept(self, model: int, tensor: str) -> int | None:
        return self._array(model, tensor).attrs.get("kept")  # type: ignore[return-value]

    def sync(self, chunks: Iterable[tuple[int, str, int]]) -> None:
        # zarr writes a chunk to a temporary name and renames it into place: the rename, and
        # on an array's first sync the new folders above it, must be durable too
        folders: set[Path] = set()
        for model, tensor, start in chunks:
            array_dir = self.path / self._key(model, tensor)
            chunk = array_dir / "c" / str(start // 8 // self._array(model, tensor).chunks[0])
            fsync_file(chunk)
            if chunk.exists():  # an all-zero chunk is not stored at all
                folders.add(chunk.parent)
            if (model, tensor) not in self._durable:
                folders.update(self.path / d for d in array_dir.relative_to(self.path).parents)
                folders.add(array_dir)
                self._durable.add((model, tensor))
        for folder in sorted(folders, key=lambda p: -len(p.parts)):  # deepest first
            fsync_dir(folder)


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

    def sync(self, chunks: Iterable[tuple[int, str, int]]) -> None:
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
