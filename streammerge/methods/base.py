"""The seam between the scheduler and the per-tensor math.

A method is a set of pure functions on tensors. ``merge`` works on one chunk: a flat element
range ``[start, start + len)`` of the row-major flattening whose start is a multiple of
:meth:`Method.alignment` (so n:m blocks never straddle two chunks). ``reference`` works on a
whole tensor in memory and is written as plainly as possible; tests assert the two agree byte
for byte for any chunking.

Methods that need a whole-tensor quantity (a top-k threshold, an L1 norm) get it exactly from
statistics passes over the same chunks before the merge pass: the scheduler calls
``accumulate`` for every chunk of pass 0, 1, ... ``stats_passes - 1`` in order, then ``merge``
for every chunk in order. All cross-chunk state lives in the object ``new_state`` returns.

Inputs arrive in *processing order* (for CABS: the pruning order) and sums are taken in that
order, because float addition is not associative and output bytes must be reproducible.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .spec import MethodSpec, Values

TAIL_POLICIES = ("keep_topn_padded", "zero")
OVERLAP_POLICIES = ("strict", "fill")


@dataclass(frozen=True, slots=True)
class ModelParams:
    """Per-model parameters of one tensor, already resolved from the recipe."""

    weight: float
    """Merge coefficient lambda_k (mergekit's ``weight``)."""
    n: int = 0
    """Elements kept per block (n:m methods only)."""
    m: int = 1
    """Block length in elements (n:m methods only)."""
    density: float = 1.0
    """Fraction of the tensor kept (magnitude trim) or keep probability (DARE), in [0, 1]."""
    extra: tuple[tuple[str, float], ...] = ()
    """Other per-model parameters a method declares, by name (sorted)."""

    def get(self, name: str, default: float | None = None) -> float | None:
        """A declared per-model parameter from ``extra``."""
        return dict(self.extra).get(name, default)

    def __post_init__(self) -> None:
        if not 0 <= self.n <= self.m or self.m < 1:
            raise ValueError(f"invalid n:m {self.n}:{self.m} (need 0 <= n <= m, m >= 1)")
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {self.density}")


@dataclass(frozen=True, slots=True)
class MethodOptions:
    """Global (per-recipe) options of a method."""

    tail_policy: str = "keep_topn_padded"
    """What the last, partial n:m block keeps: its top min(n, r) elements, or nothing."""
    overlap_policy: str = "strict"
    """``strict``: only unclaimed positions are eligible. ``fill``: top up from claimed ones."""
    normalize: bool | None = None
    """Divide the merged delta by the sum of (agreeing) weights; None = the method's default."""
    rescale: bool | None = None
    """Match each pruned delta's L1 norm to the unpruned one; None = the method's default."""
    lambda_: float = 1.0
    """mergekit's ``lambda``: scales the merged delta before it is added to the base."""
    seed: int = 0
    """Seed of the random streams (DARE)."""
    conflict_aware: bool = False
    """``magnitude`` only: later models select only among positions earlier ones left free."""
    t: float | None = None
    """``slerp`` only: interpolation position, 0 = the base, 1 = the other model."""
    extra: tuple[tuple[str, float | str], ...] = ()
    """Other global parameters a method declares, by name (sorted)."""

    def get(self, name: str, default: float | str | None = None) -> float | str | None:
        """A declared global parameter from ``extra``."""
        return dict(self.extra).get(name, default)

    def __post_init__(self) -> None:
        if self.tail_policy not in TAIL_POLICIES:
            raise ValueError(
                f"tail_policy must be one of {TAIL_POLICIES}, got {self.tail_policy!r}"
            )
        if self.overlap_policy not in OVERLAP_POLICIES:
            raise ValueError(
                f"overlap_policy must be one of {OVERLAP_POLICIES}, got {self.overlap_policy!r}"
            )


@dataclass(frozen=True, slots=True)
class TensorId:
    """What a method may know about the tensor it works on, besides its values."""

    name: str
    numel: int
    shape: tuple[int, ...] = ()
    """The tensor's shape (row-wise statistics need its last dimension); ``()`` if unknown."""

    @property
    def key(self) -> int:
        """A stable 32-bit identity of the tensor (seeds random streams)."""
        return zlib.crc32(self.name.encode())


@dataclass(slots=True)
class MergeResult:
    """What a method returns for a chunk or a whole tensor."""

    out: torch.Tensor
    """Merged values, 1-D, in the compute dtype (the caller casts to the output dtype)."""
    masks: list[torch.Tensor] | None
    """Per-model kept masks (1-D bool, processing order), or None for dense methods."""


class Method(Protocol):
    """A merge method: a chunk-exact fast path plus an in-memory reference."""

    spec: MethodSpec
    """What the method declares: parameters, statistics, capabilities, card columns."""
    releases_heap: bool
    """Hand freed heap back to the kernel after each chunk (temporaries that fragment it)."""

    @property
    def name(self) -> str: ...

    def model_params(self, values: Values) -> ModelParams:
        """One model's parameters for one tensor from its resolved recipe values (declared
        per-model parameters, defaults applied); ValueError on an invalid combination."""
        ...

    def options(self, values: Values) -> MethodOptions:
        """The method's options for one tensor from its resolved global parameters."""
        ...

    def with_density(self, params: ModelParams, density: float) -> ModelParams:
        """``params`` with TADrop's density for the tensor (methods with ``spec.tadrop``)."""
        ...

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        """Chunk starts must be multiples of this many elements; ``shape`` is the tensor's
        (``()`` if unknown: then any tensor of this method may be chunked so)."""
        ...

    def work_bytes(self, k: int, itemsize: int) -> int:
        """Bytes of temporaries per chunk element for k models (sizes chunks to the budget)."""
        ...

    def resident_bytes(self, k: int, itemsize: int) -> int:
        """Bytes of temporaries per chunk element live at the merge's peak, as measured (predicts
        peak RSS for ``streammerge plan``; ``work_bytes`` is the budget's safe upper bound)."""
        ...

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        """Statistics passes needed before the merge pass (0 for chunk-local methods) over a
        tensor of ``shape`` (``()`` if unknown)."""
        ...

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> Any:
        """Cross-chunk state for one tensor (None when there is none)."""
        ...

    def accumulate(
        self,
        state: Any,
        pass_index: int,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> None:
        """Fold one chunk into the statistics of pass ``pass_index``."""
        ...

    def end_pass(self, state: Any, pass_index: int) -> None:
        """Called after the last chunk of each statistics pass."""
        ...

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        """Whether merging a chunk needs nothing from earlier chunks of the merge pass (then a
        resumed run may skip finished chunks; otherwise it redoes the tensor)."""
        ...

    def merge(
        self,
        state: Any,
        start: int,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
    ) -> MergeResult:
        """Merge one chunk starting at element ``start``; inputs are 1-D, any float dtype."""
        ...

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        """Merge a whole tensor in memory, written for obviousness rather than speed."""
        ...


OPTION_NAMES = (
    "tail_policy",
    "overlap_policy",
    "normalize",
    "rescale",
    "lambda",
    "random_seed",
    "conflict_aware",
    "t",
)
"""Global parameters with a field of their own in :class:`MethodOptions`."""
ENGINE_NAMES = ("tadrop", "tadrop_alpha", "tadrop_d_min", "tadrop_d_max", "int8_mask")
"""Global parameters the engine (or nobody: ``int8_mask``) reads, not the method."""


class MethodBase:
    """The spec-driven defaults: parameters by name onto :class:`ModelParams` and
    :class:`MethodOptions`; a method overrides what it interprets differently."""

    spec: MethodSpec
    releases_heap = False

    @property
    def name(self) -> str:
        return self.spec.name

    def model_params(self, values: Values) -> ModelParams:
        weight, density = values.get("weight"), values.get("density")
        extra = tuple(
            sorted(
                (k, float(v))
                for k, v in values.items()
                if k not in ("weight", "density") and v is not None
            )
        )
        return ModelParams(
            1.0 if weight is None else float(weight),
            density=1.0 if density is None else float(density),
            extra=extra,
        )

    def options(self, values: Values) -> MethodOptions:
        def number(name: str) -> float | None:
            x = values.get(name)
            return None if x is None else float(x)

        def flag(name: str) -> bool | None:
            x = values.get(name)
            return None if x is None else bool(x)

        lam = number("lambda")
        extra = tuple(
            sorted(
                (k, v)
                for k, v in values.items()
                if k not in OPTION_NAMES and k not in ENGINE_NAMES and v is not None
            )
        )
        return MethodOptions(
            tail_policy=str(values.get("tail_policy") or "keep_topn_padded"),
            overlap_policy=str(values.get("overlap_policy") or "strict"),
            normalize=flag("normalize"),
            rescale=flag("rescale"),
            lambda_=1.0 if lam is None else lam,
            seed=int(number("random_seed") or 0),
            conflict_aware=bool(flag("conflict_aware")),
            t=number("t"),
            extra=extra,
        )

    def with_density(self, params: ModelParams, density: float) -> ModelParams:
        return ModelParams(params.weight, params.n, params.m, density, params.extra)


@dataclass(slots=True)
class ChunkLocal:
    """State of a method that needs nothing beyond each chunk: just its configuration."""

    tensor: TensorId
    params: Sequence[ModelParams]
    options: MethodOptions
    dtype: torch.dtype


class ChunkLocalMethod(MethodBase):
    """Base of methods without statistics passes."""

    def stats_passes(
        self,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
        shape: tuple[int, ...] = (),
    ) -> int:
        return 0

    def new_state(
        self,
        tensor: TensorId,
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> ChunkLocal:
        return ChunkLocal(tensor, params, options, dtype)

    def accumulate(self, state: Any, pass_index: int, start: int, base: torch.Tensor,
                   fts: Sequence[torch.Tensor]) -> None:  # fmt: skip
        raise AssertionError("chunk-local methods have no statistics passes")

    def end_pass(self, state: Any, pass_index: int) -> None:
        raise AssertionError("chunk-local methods have no statistics passes")

    def chunk_local(self, params: Sequence[ModelParams], options: MethodOptions) -> bool:
        return True


def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim tensor of ``dtype``: multiplying by it rounds the weight to dtype first."""
    return torch.tensor(value, dtype=dtype)


def run_chunked(
    method: Method,
    tensor: TensorId,
    base: torch.Tensor,
    fts: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: MethodOptions,
    dtype: torch.dtype,
    chunk: int | None = None,
) -> MergeResult:
    """Drive the chunked path in memory, as the scheduler does (tests and benchmarks).

    ``chunk`` is rounded up to the method's alignment; None means one chunk.
    """
    flat_b, flat_f = base.flatten(), [f.flatten() for f in fts]
    align = method.alignment(params, tensor.shape)
    step = -(-(chunk or max(1, tensor.numel)) // align) * align
    ranges = [(s, min(s + step, tensor.numel)) for s in range(0, tensor.numel, step)]
    state = method.new_state(tensor, params, options, dtype)
    for p in range(method.stats_passes(params, options, dtype, tensor.shape)):
        for s, e in ranges:
            method.accumulate(state, p, s, flat_b[s:e], [f[s:e] for f in flat_f])
        method.end_pass(state, p)
    parts = [method.merge(state, s, flat_b[s:e], [f[s:e] for f in flat_f]) for s, e in ranges]
    out = torch.cat([r.out for r in parts]) if parts else torch.empty(0, dtype=dtype)
    masks = None
    if parts and parts[0].masks is not None:
        masks = [torch.cat([r.masks[k] for r in parts]) for k in range(len(fts))]  # type: ignore[index]
    return MergeResult(out, masks)
