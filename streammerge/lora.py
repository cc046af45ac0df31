"""LoRA inputs: a model reference ``MODEL+ADAPTER`` reads as ``W + scale * B @ A``.

mergekit's syntax: a model folder, ``+``, a PEFT adapter folder holding ``adapter_config.json``
and ``adapter_model.safetensors``. The adapter is applied by the read layer, chunk by chunk as
a tensor streams (:class:`AdaptedFolder`), so no merged copy of the model ever exists on disk or
in RAM, and every method, statistics pass and resume check sees the adapted weights.

The arithmetic (:func:`lora_rows`) is defined per row so that any element range gives the same
bytes: row ``i`` of the update is ``scale * sum_k left[i, k] * right[k, :]``, accumulated in
float32 for ``k = 0 .. r-1`` in that order (one IEEE multiply and one add per term, no BLAS,
whose summation order may depend on the matrix shape), then ``W`` is upcast to float32, the
update added, and the sum rounded once to ``W``'s dtype (round to nearest even). PEFT's
``merge_and_unload`` computes ``B @ A`` with BLAS and adds it in ``W``'s dtype, so for 16-bit
weights it rounds twice: the two differ by at most an ulp or so of the output dtype.

Key names (PEFT's ``get_peft_model_state_dict``, adapter name stripped): ``base_model.model.
<module>.lora_A.weight`` (``r x in``) and ``.lora_B.weight`` (``out x r``) update
``<module>.weight`` by ``B @ A`` (``(B @ A).T`` with ``fan_in_fan_out``, GPT-2's Conv1D);
embeddings store ``<module>.lora_embedding_A`` (``r x num_embeddings``) and
``lora_embedding_B`` (``dim x r``), updating by ``(B @ A).T``. Any other
``base_model.model.<name>`` entry (``modules_to_save``, trained biases) replaces tensor
``<name>``. The scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``),
with ``rank_pattern`` / ``alpha_pattern`` matched against the module name as PEFT does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from .errors import InputError, RecipeError
from .model import ModelFolder
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    from .recipe import Recipe

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
BLOCK_ELEMS = 1 << 15
"""Elements of float32 scratch per step of :func:`apply_rows` (three buffers: 384 KiB). At
most torch's grain size (32768), so each operation runs on the calling thread: larger blocks
run on torch's thread pool, whose spinning threads cost 9x the CPU time (measured with r = 64
on the 2-core development machine under load: 708 against 78 ns per element)."""

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora) adapters are not supported",
    "lora_bias": "adapters with a LoRA bias (lora_bias) are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "target_parameters": "adapters with target_parameters are not supported",
    "trainable_token_indices": "adapters with trainable_token_indices are not supported",
}


@dataclass(frozen=True, slots=True)
class LowRank:
    """One base tensor's update ``W[i, :] += scale * left[i, :] @ right``.

    ``transposed``: the stored factors give ``(B @ A).T`` (embeddings, ``fan_in_fan_out``), so
    ``left = A.T`` and ``right = B.T``; otherwise ``left = B`` and ``right = A``.
    """

    key_a: str
    key_b: str
    rank: int
    scale: float
    transposed: bool


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the update."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]

    def scale(self, module: str) -> tuple[int, float]:
        """(rank, scale) of ``module`` (its name in the base model, without ``.weight``)."""
        r = self.rank_pattern[k] if (k := _pattern_key(self.rank_pattern, module)) else self.r
        a = self.alpha_pattern[k] if (k := _pattern_key(self.alpha_pattern, module)) else self.alpha
        return r, (a / math.sqrt(r) if self.rslora else a / r)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def split_ref(ref: str) -> tuple[str, str | None]:
    """``'model+adapter'`` -> ``('model', 'adapter')``; a reference without ``+`` -> (ref, None).

    As mergekit: exactly one ``+``. (A folder whose own name holds a ``+`` is taken whole by
    the recipe before this is asked.)
    """
    if "+" not in ref:
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"{ref!r}: a LoRA reference is MODEL+ADAPTER (one '+', both given)")
    return parts[0], parts[1]


def join_ref(path: Path, adapter: Path | None) -> str:
    """The reference naming a model with its adapter (what plan digests and cards record)."""
    return str(path) if adapter is None else f"{path}+{adapter}"


def _number(cfg: Mapping[str, Any], key: str, where: Path) -> float:
    x = cfg.get(key)
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x <= 0:
        raise InputError(f"{where}: {key!r} must be a positive number, got {x!r}")
    return float(x)


def read_config(folder: Path) -> AdapterConfig:
    """Parse and check ``folder/adapter_config.json`` (InputError naming the file)."""
    path = folder / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found; a LoRA adapter folder needs {CONFIG_NAME}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: the adapter config must be a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise InputError(f"{path}: peft_type {kind!r} is not supported (only LORA)")
    for flag, why in _REFUSED_FLAGS.items():
        if cfg.get(flag):
            raise InputError(f"{path}: {why}")
    r = _number(cfg, "r", path)
    if r != int(r):
        raise InputError(f"{path}: 'r' must be an integer, got {cfg['r']!r}")
    patterns: list[dict[str, float]] = []
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise InputError(f"{path}: {key!r} must be an object")
        patterns.append({str(k): _number(pat, k, path) for k in pat})
    for k, v in patterns[0].items():
        if v != int(v):
            raise InputError(f"{path}: rank_pattern {k!r} must be an integer, got {v!r}")
    return AdapterConfig(
        r=int(r),
        alpha=_number(cfg, "lora_alpha", path) if "lora_alpha" in cfg else 8.0,  # PEFT default
        rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        rank_pattern={k: int(v) for k, v in patterns[0].items()},
        alpha_pattern=patterns[1],
    )


class Adapter:
    """A PEFT LoRA adapter folder, checked against the model it applies to.

    Only headers and the config are read here; factors are read when a tensor streams.
    """

    def __init__(self, folder: Path, base: ModelFolder) -> None:
        self.path = folder
        if not folder.is_dir():
            raise InputError(f"{folder}: LoRA adapter folder not found")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            pickles = [n for n in PICKLE_NAMES if (folder / n).is_file()]
            if pickles:
                raise InputError(
                    f"{folder / pickles[0]}: pickle adapters are not read (they can run "
                    f"arbitrary code); convert it first: streammerge convert {folder} NEW_FOLDER"
                )
            raise InputError(f"{weights}: not found; a LoRA adapter folder needs {WEIGHTS_NAME}")
        self.config = read_config(folder)
        self.file = SafetensorsFile(weights)
        self.low_rank: dict[str, LowRank] = {}
        self.replaced: dict[str, str] = {}
        self._index(base)

    def _error(self, key: str, problem: str) -> InputError:
        return InputError(f"{self.file.path}: tensor {key!r}: {problem}")

    def _index(self, base: ModelFolder) -> None:
        """Map every adapter tensor onto a base tensor; refuse what does not fit."""
        pairs: dict[str, dict[str, str]] = {}
        for key in sorted(self.file.tensors):
            name = key.removeprefix(PREFIX)
            m = _LORA_KEY.match(name) or _EMBED_KEY.match(name)
            if m is not None:
                pairs.setdefault(m["module"], {})[m["kind"]] = key
                continue
            if ".lora_" in name or ".modules_to_save." in name:
                raise self._error(key, "not a LoRA factor streammerge understands")
            if name not in base.where:  # modules_to_save, trained biases: replace the tensor
                raise self._error(key, f"no tensor {name!r} in {base.path} to replace")
            b, t = base.info(name), self.file.tensors[key]
            if (
                b.shape != t.shape
                or b.is_float != t.is_float
                or (not b.is_float and b.dtype != t.dtype)
            ):
                raise self._error(
                    key, f"{t.dtype} {list(t.shape)} cannot replace {name!r} "
                    f"({b.dtype} {list(b.shape)} in {base.file_of(name)})"
                )  # fmt: skip
            self.replaced[name] = key
        for module, kinds in pairs.items():
            embed = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            ka, kb = ("lora_embedding_A", "lora_embedding_B") if embed else ("lora_A", "lora_B")
            if set(kinds) != {ka, kb}:
                only = next(iter(kinds.values()))
                raise self._error(only, f"has no matching {kb if ka in kinds else ka}")
            target = f"{module}.weight"
            key_a, key_b = kinds[ka], kinds[kb]
            if target not in base.where:
                raise self._error(key_a, f"its target {target!r} is not in {base.path}")
            if target in self.replaced:
                raise self._error(key_a, f"{target!r} is also replaced by {self.replaced[target]}")
            w = base.info(target)
            a, b = self.file.tensors[key_a], self.file.tensors[key_b]
            if not (w.is_float and a.is_float and b.is_float):
                raise self._error(key_a, "LoRA factors and their target must be float tensors")
            rank, scale = self.config.scale(module)
            transposed = embed or self.config.fan_in_fan_out
            # (B @ A) is out x in; W is that, or its transpose
            want = (b.shape[0], a.shape[-1]) if len(a.shape) == 2 else None
            if transposed and want is not None:
                want = (want[1], want[0])
            if (
                len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != rank
                or b.shape[1] != rank or tuple(w.shape) != want
            ):  # fmt: skip
                raise self._error(
                    key_a, f"shapes A {list(a.shape)}, B {list(b.shape)} (rank {rank} from "
                    f"{CONFIG_NAME}) do not fit {target!r} {list(w.shape)} in "
                    f"{base.file_of(target)}"
                )  # fmt: skip
            self.low_rank[target] = LowRank(key_a, key_b, rank, scale, transposed)
        if not self.low_rank and not self.replaced:
            raise InputError(f"{self.file.path}: the adapter has no tensors")

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` of tensor ``name`` in float32: ``rows x r`` and ``r x cols``."""
        lr = self.low_rank[name]
        a, b = (self._full(lr.key_a), self._full(lr.key_b))
        if lr.transposed:
            return a.t().contiguous(), b.t().contiguous()
        return b, a

    def _full(self, key: str) -> torch.Tensor:
        t = self.file.tensors[key]
        try:
            view = self.file.read(key, 0, t.numel)
            return view.to(torch.float32, copy=True).reshape(t.shape)
        finally:
            self.file.release(key, 0, t.numel)

    def fingerprint(self) -> list[tuple[str, int, int, str]]:
        """(file, size, mtime_ns, sha256 of the whole file) of the config and the weights.

        The whole adapter is hashed (once per run; adapters are small next to the model), so
        a resume catches any change to it, in place or not, not only the sampled chunks."""
        out = []
        for path in (self.path / CONFIG_NAME, self.file.path):
            st, h = path.stat(), hashlib.sha256()
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            out.append((f"adapter:{path.name}", st.st_size, st.st_mtime_ns, h.hexdigest()))
        return out

    def close(self) -> None:
        self.file.close()


def lora_rows(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * left @ right`` in float32 with a fixed order: row ``i`` depends on
    ``left[i]`` and ``right`` only, whatever rows are computed with it."""
    acc = torch.zeros(left.shape[0], right.shape[1], dtype=torch.float32)
    tmp = torch.empty_like(acc)
    for k in range(left.shape[1]):
        torch.mul(left[:, k : k + 1], right[k : k + 1, :], out=tmp)
        acc.add_(tmp)
    return acc.mul_(scale)


def apply_rows(
    w: torch.Tensor, start: int, cols: int, left: torch.Tensor, right: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """Adapted elements ``[start, start + w.numel())`` of a row-major ``rows x cols`` tensor
    whose flat elements there are ``w`` (1-D, any float dtype): a new tensor of ``w``'s dtype.

    Chunk boundaries need not fall on rows: the partial first and last rows are computed
    whole and sliced. Scratch is at most :data:`BLOCK_ELEMS` float32 elements per buffer.
    """
    end = start + w.numel()
    out = torch.empty_like(w)
    if end == start:
        return out
    step = max(1, BLOCK_ELEMS // cols)
    r0, r1 = start // cols, -(-end // cols)
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        lo, hi = max(start, a * cols), min(end, b * cols)
        delta = lora_rows(left[a:b], right, scale).reshape(-1)[lo - a * cols : hi - a * cols]
        # a new float32 tensor: w may be float32 already, and a view of the mapped input
        seg = torch.add(w[lo - start : hi - start].to(torch.float32), delta)
        out[lo - start : hi - start] = seg.to(w.dtype)
    return out


def apply_full(
    w: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float
) -> torch.Tensor:
    """The whole adapted tensor (the in-memory reference: no chunks, no blocks)."""
    delta = lora_rows(left, right, scale)
    return (w.to(torch.float32) + delta.reshape(w.shape)).to(w.dtype)


class AdaptedFolder(ModelFolder):
    """A model folder read through a LoRA adapter: adapted tensors come back as computed
    copies of the chunk (the base's mapped pages released at once), others as the base's
    zero-copy views."""

    def __init__(self, path: Path, adapter: Path) -> None:
        super().__init__(path)
        try:
            self.adapter = Adapter(adapter, self)
        except BaseException:
            super().close()
            raise
        self._cached: tuple[str, torch.Tensor, torch.Tensor] | None = None

    @property
    def ref(self) -> str:
        return join_ref(self.path, self.adapter.path)

    def fingerprint(self) -> list[tuple[str, int, int, str]]:
        return super().fingerprint() + self.adapter.fingerprint()

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None or self._cached[0] != name:  # one tensor's factors at a time
            self._cached = (name, *self.adapter.factors(name))
        return self._cached[1], self._cached[2]

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        if name in self.adapter.replaced:
            return self._replacement(name, start, end)
        if name not in self.adapter.low_rank:
            return super().read(name, start, end)
        cols = self.info(name).shape[1]
        left, right = self._factors(name)
        try:
            w = super().read(name, start, end)
            return apply_rows(w, start, cols, left, right, self.adapter.low_rank[name].scale)
        finally:
            super().release(name, start, end)

    def _replacement(self, name: str, start: int, end: int) -> torch.Tensor:
        key, f = self.adapter.replaced[name], self.adapter.file
        dtype = FLOAT_DTYPES[self.info(name).dtype]
        try:
            return f.read(key, start, end).to(dtype, copy=True)
        finally:
            f.release(key, start, end)

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        if name in self.adapter.low_rank or (
            name in self.adapter.replaced and self.info(name).is_float
        ):
            t = self.read(name, start, end)
            return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        if name in self.adapter.replaced:  # an integer tensor: the adapter's bytes as they are
            return self.adapter.file.read_bytes(self.adapter.replaced[name], start, end)
        return super().read_bytes(name, start, end)

    def release(self, name: str, start: int, end: int) -> None:
        if name not in self.adapter.low_rank and name not in self.adapter.replaced:
            super().release(name, start, end)  # (adapted reads released their pages)

    def close(self) -> None:
        self._cached = None
        self.adapter.close()
        super().close()


def open_model(path: Path, adapter: Path | None = None) -> ModelFolder:
    """The folder ``path``, read through ``adapter`` when one is given."""
    return ModelFolder(path) if adapter is None else AdaptedFolder(path, adapter)


def adapter_paths(recipe: Recipe) -> list[Path]:
    """Every LoRA adapter folder a recipe reads (base first, then models)."""
    found = [recipe.base_adapter, *(m.adapter for m in recipe.models)]
    return [a for a in found if a is not None]


def lora_refs(doc: Mapping[str, Any]) -> list[str]:
    """The ``MODEL+ADAPTER`` references of a parsed recipe mapping (``models:`` recipes): a
    stored recipe's models are kept as folders only, so what replays them needs this."""
    refs: list[Any] = [doc.get("base_model")]
    refs += [i.get("model") if isinstance(i, dict) else i for i in doc.get("models") or []]
    return [r for r in refs if isinstance(r, str) and "+" in r]


def open_inputs(recipe: Recipe) -> list[ModelFolder]:
    """The recipe's base and models, each with its adapter (close them when done)."""
    out: list[ModelFolder] = []
    try:
        for path, adapter in [(recipe.base, recipe.base_adapter),
                              *((m.path, m.adapter) for m in recipe.models)]:  # fmt: skip
            out.append(open_model(path, adapter))
    except BaseException:
        for f in out:
            f.close()
        raise
    return out


def reference_apply(folder: ModelFolder, name: str, w: torch.Tensor) -> torch.Tensor:
    """Whole tensor ``name`` of ``folder`` as adapted, given the base's whole tensor ``w``;
    the factors are read with the official safetensors reader (the in-memory reference)."""
    if not isinstance(folder, AdaptedFolder):
        return w
    adapter = folder.adapter
    with safe_open(adapter.file.path, framework="pt") as f:
        if name in adapter.replaced:
            t = f.get_tensor(adapter.replaced[name])
            return t.to(w.dtype) if w.is_floating_point() else t
        lr = adapter.low_rank.get(name)
        if lr is None:
            return w
        a, b = f.get_tensor(lr.key_a).float(), f.get_tensor(lr.key_b).float()
    left, right = (a.t(), b.t()) if lr.transposed else (b, a)
    return apply_full(w, left.contiguous(), right.contiguous(), lr.scale)


def open_ref(ref: str) -> ModelFolder:
    """Open a reference as :func:`join_ref` writes it (``verify --inputs``)."""
    if Path(ref).is_dir():
        return ModelFolder(Path(ref))
    model, adapter = split_ref(ref)
    return open_model(Path(model), None if adapter is None else Path(adapter))


__all__ = [
    "AdaptedFolder",
    "Adapter",
    "AdapterConfig",
    "TensorInfo",
    "adapter_paths",
    "apply_full",
    "apply_rows",
    "join_ref",
    "lora_refs",
    "lora_rows",
    "open_inputs",
    "open_model",
    "open_ref",
    "read_config",
    "reference_apply",
    "split_ref",
]
