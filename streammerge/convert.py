"""``streammerge convert``: a pickle checkpoint folder to safetensors, one ``.bin`` at a time.

Handles ``pytorch_model.bin``, sharded ``pytorch_model-*.bin`` with
``pytorch_model.bin.index.json``, and PEFT adapter folders (``adapter_model.bin``). Each file is
opened with ``torch.load(weights_only=True, mmap=True)``: torch's restricted unpickler, which
builds tensors, containers and plain values only and refuses anything else (a pickle that
would import or call something is refused, never run). Tensors stay mapped from the file; a
first pass reads only the pickles' metadata (names, dtypes, shapes) to lay out every output
shard, a second writes each ``.bin``'s tensors at their planned offsets and drops its mapping
before the next, so peak memory is about one ``.bin`` file's pages (file-backed) plus one
tensor when it must be made contiguous.

Shared storage (safetensors refuses it): names that are the *same* tensor (same storage,
offset, shape and strides: tied weights such as ``lm_head.weight`` and
``model.embed_tokens.weight``) are written once, as transformers' ``save_pretrained`` does:
the output-head name (``lm_head``, ``embed_out``, ``output``) is dropped in favour of the other,
else every name but the first in sorted order; transformers re-ties them from
``tie_word_embeddings`` on load, and Hugging Face's own safetensors checkpoints of tied models
have the same names, so a converted model merges with them. Tensors that only share a buffer
(views of one storage with different offsets or shapes) are each written as their own copy.

The output is written in a hidden temporary folder beside ``OUT`` and renamed to ``OUT`` only
when complete and synced, so ``OUT`` either does not exist or is whole.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, StreamMergeError
from .platform import current
from .safetensors_io import (
    ShardPlan,
    ShardWriter,
    plan_shards,
    shard_layout,
    write_index,
)

DEFAULT_SHARD_SIZE = 5 * 10**9
"""Bytes per output shard by default (as transformers' ``max_shard_size="5GB"``)."""
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_BIN = "adapter_model.bin"
NOT_COPIED = re.compile(
    r".*\.(bin|pt|pth|ckpt|pkl|pickle|safetensors)$|.*\.bin\.index\.json$|"
    r"^model\.safetensors\.index\.json$"
)
"""Files never copied to the output: weights (pickles are never carried over) and indexes."""
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output)\.")
"""Output-head names: the copy dropped when tied to another name, as transformers does."""

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """How to convert."""

    shard_size: int = DEFAULT_SHARD_SIZE
    """Largest output shard in bytes (a larger tensor gets a shard of its own); adapters are
    always one ``adapter_model.safetensors``."""


@dataclass(frozen=True, slots=True)
class ConvertSummary:
    """What :func:`convert_checkpoint` wrote."""

    out_dir: Path
    tensors: int
    """Tensors written (tied duplicates counted once)."""
    shards: tuple[str, ...]
    bytes_written: int
    """Tensor data bytes written (headers excluded)."""
    tied: tuple[tuple[str, str], ...]
    """``(dropped, kept)`` for each name written once under another name."""
    copied: tuple[str, ...]
    """Other files copied (config, tokenizer, adapter_config.json, ...)."""
    skipped: tuple[str, ...]
    """Top-level entries left out: other pickles, subfolders."""


def _sources(src: Path) -> tuple[list[Path], bool]:
    """The ``.bin`` files to read, in order, and whether ``src`` is a PEFT adapter."""
    if not src.is_dir():
        raise InputError(f"{src}: folder not found")
    if (src / "model.safetensors").exists() or (src / "model.safetensors.index.json").exists():
        raise InputError(f"{src}: already holds safetensors weights; nothing to convert")
    index = src / BIN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: unreadable index ({e})") from None
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise InputError(f"{index}: shard {name!r} is not a file in {src}")
            if not (src / name).is_file():
                raise InputError(f"{index}: shard {name!r} does not exist")
            files.append(src / name)
        return files, False
    if (src / BIN_SINGLE).is_file():
        return [src / BIN_SINGLE], False
    if (src / ADAPTER_BIN).is_file():
        if (src / "adapter_model.safetensors").exists():
            raise InputError(f"{src}: already holds adapter_model.safetensors; nothing to convert")
        return [src / ADAPTER_BIN], True
    raise InputError(f"{src}: no {BIN_SINGLE}, {BIN_INDEX} or {ADAPTER_BIN} to convert")


@contextmanager
def _loaded(path: Path) -> Iterator[dict[str, torch.Tensor]]:
    """One ``.bin`` as a name -> tensor mapping, its tensors mapped from the file, with
    torch's restricted unpickler; the mapping is dropped when the block ends."""
    try:
        try:
            obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # the legacy (pre-zip) format cannot be mapped: read whole (still one file)
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(e).splitlines()]
        detail = " ".join(ln for ln in lines if ln and not ln.startswith(boiler))[:200]
        if "GLOBAL" not in detail.upper():
            raise InputError(f"{path}: not a readable torch checkpoint ({detail})") from None
        raise InputError(
            f"{path}: refused: torch's safe loader (weights_only=True) found more than tensors "
            f"in this pickle ({detail}); streammerge never unpickles arbitrary objects (they "
            "can run code). Convert it yourself only if you trust its source"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(
            f"{path}: not a readable torch checkpoint ({str(e).strip()[:200]})"
        ) from None
    try:
        if not isinstance(obj, Mapping):
            raise InputError(
                f"{path}: holds a {type(obj).__name__}, not a mapping of tensor names to tensors"
            )
        for name, t in obj.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise InputError(
                    f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor (a training "
                    "checkpoint? save the model's state_dict alone)"
                )
            if t.dtype not in SAFETENSORS_DTYPES:
                raise InputError(f"{path}: tensor {name!r} has dtype {t.dtype}, which "
                                 "safetensors cannot store")  # fmt: skip
            if t.is_sparse or t.layout != torch.strided or t.is_quantized:
                raise InputError(f"{path}: tensor {name!r} is not a dense tensor")
        yield dict(obj)
    finally:
        del obj


def _alias_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], str]:
    """Equal for two names holding the very same tensor (a tie)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            str(t.dtype))  # fmt: skip


def _ties(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{dropped: kept}`` for names that are the same tensor as another name."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, t in tensors.items():
        if t.numel():
            groups.setdefault(_alias_key(t), []).append(name)
    out: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            keep = sorted(names, key=lambda n: (bool(_HEAD.search(n)), n))[0]
            out.update({n: keep for n in names if n != keep})
    return out


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, row-major and contiguous (a copy only when it is not)."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _layout(
    specs: list[tuple[str, str, tuple[int, ...]]], adapter: bool, shard_size: int
) -> tuple[ShardPlan, ...]:
    if adapter:
        return (shard_layout(specs, "adapter_model.safetensors"),)
    shards = plan_shards(specs, shard_size)
    if len(shards) == 1:  # transformers' name for an unsharded model
        return (shard_layout(specs, "model.safetensors"),)
    return shards


def convert_checkpoint(
    src: Path | str, out: Path | str, options: ConvertOptions | None = None
) -> ConvertSummary:
    """Convert the pickle checkpoint folder ``src`` into a new safetensors folder ``out``.

    ``out`` must not exist; it appears, complete, only at the end. Raises
    :class:`StreamMergeError` (one line naming the file and tensor) for anything unusable.
    """
    opts = options or ConvertOptions()
    if opts.shard_size < 1:
        raise StreamMergeError("--shard-size must be at least 1 byte")
    src, out = Path(src), Path(out)
    files, adapter = _sources(src)
    if out.exists() or out.is_symlink():
        raise StreamMergeError(f"{out} already exists; give a new folder")
    if out.resolve() == src.resolve():
        raise StreamMergeError(f"{out}: the output must be a new folder, not the source")
    if not out.parent.is_dir():
        raise StreamMergeError(f"{out.parent}: folder not found")

    # pass 1: names, dtypes and shapes only (the pickles' metadata; no tensor data is read)
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    tied: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for path in files:
        with _loaded(path) as tensors:
            ties = _ties(tensors)
            tied.update(ties)
            for name, t in tensors.items():
                if name in origin:
                    raise InputError(f"{path}: tensor {name!r} is also in {origin[name]}")
                origin[name] = path
                if name not in ties:
                    specs.append((name, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)))
        del tensors
    if not specs:
        raise InputError(f"{files[0]}: no tensors to convert")
    shards = _layout(specs, adapter, opts.shard_size)
    shard_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}

    plat = current()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        # pass 2: every file's tensors at their planned offsets, one file mapped at a time
        writers = [ShardWriter(tmp, s) for s in shards]
        left = [len(s.tensors) for s in shards]
        written = 0
        try:
            for path in files:
                with _loaded(path) as tensors:
                    for name, t in tensors.items():
                        if name in tied:
                            continue
                        i = shard_of[name]
                        data = _raw(t)
                        writers[i].write(name, 0, data)
                        written += len(data)
                        del data
                        left[i] -= 1
                        if left[i] == 0:
                            writers[i].finish()
                del tensors  # unmapped before the next file is mapped
        except BaseException:
            for w in writers:
                w.abort()
            raise
        if len(shards) > 1:
            write_index(tmp, shards, {})
        copied, skipped = _copy_files(src, tmp)
        plat.sync_dir(tmp)
        try:
            os.rename(tmp, out)  # fails if OUT appeared meanwhile: never merged into
        except OSError as e:
            raise StreamMergeError(f"{out}: cannot create it ({e.strerror})") from None
        plat.sync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertSummary(
        out_dir=out,
        tensors=len(specs),
        shards=tuple(s.filename for s in shards),
        bytes_written=written,
        tied=tuple(sorted(tied.items())),
        copied=tuple(copied),
        skipped=tuple(skipped),
    )


def _copy_files(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """Copy the folder's other top-level files (a link is copied as the file it points to);
    weights, pickles and subfolders are left out."""
    plat = current()
    copied, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.is_dir():
            skipped.append(p.name + "/")
        elif NOT_COPIED.match(p.name):
            if not p.name.endswith((".safetensors", ".index.json")) and p.name not in (
                BIN_SINGLE, ADAPTER_BIN
            ) and not re.match(r"pytorch_model-.*\.bin$", p.name):  # fmt: skip
                skipped.append(p.name)
        elif p.is_file():
            shutil.copyfile(p, dst / p.name)
            plat.sync_file(dst / p.name)
            copied.append(p.name)
        else:
            skipped.append(p.name)
    return copied, skipped
