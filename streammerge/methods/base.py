"""The seam between the scheduler and the per-tensor math.

A method is a pair of pure functions on tensors: ``merge`` works on one chunk (a flat element
range whose start is a multiple of :meth:`Method.alignment`, so n:m blocks never straddle two
chunks) and ``reference`` on a whole tensor, written as plainly as possible. Tests assert that
the two agree byte for byte; the scheduler only ever calls ``merge``.

Inputs arrive in *processing order* (for CABS: the pruning order), and sums are taken in that
order, because float addition is not associative and output bytes must be reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

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

    def __post_init__(self) -> None:
        if not 0 <= self.n <= self.m or self.m < 1:
            raise ValueError(f"invalid n:m {self.n}:{self.m} (need 0 <= n <= m, m >= 1)")


@dataclass(frozen=True, slots=True)
class MethodOptions:
    """Global (per-recipe) options of a method."""

    tail_policy: str = "keep_topn_padded"
    """What the last, partial n:m block keeps: its top min(n, r) elements, or nothing."""
    overlap_policy: str = "strict"
    """``strict``: only unclaimed positions are eligible. ``fill``: top up from claimed ones."""

    def __post_init__(self) -> None:
        if self.tail_policy not in TAIL_POLICIES:
            raise ValueError(
                f"tail_policy must be one of {TAIL_POLICIES}, got {self.tail_policy!r}"
            )
        if self.overlap_policy not in OVERLAP_POLICIES:
            raise ValueError(
                f"overlap_policy must be one of {OVERLAP_POLICIES}, got {self.overlap_policy!r}"
            )


@dataclass(slots=True)
class MergeResult:
    """What a method returns for a chunk or a whole tensor."""

    out: torch.Tensor
    """Merged values, 1-D, in the compute dtype (the caller casts to the output dtype)."""
    masks: list[torch.Tensor] | None
    """Per-model kept masks (1-D bool, processing order), or None for dense methods."""


class Method(Protocol):
    """A merge method: a chunk-exact fast path plus an in-memory reference."""

    name: str
    sparsifies: bool
    """Whether the method produces masks (stored in the occupancy store)."""

    def alignment(self, params: Sequence[ModelParams]) -> int:
        """Chunk starts must be multiples of this many elements."""
        ...

    def merge(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        """Merge one chunk; ``base`` and ``fts`` are 1-D and may be any float dtype."""
        ...

    def reference(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        """Merge a whole tensor in memory, written for obviousness rather than speed."""
        ...


def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim tensor of ``dtype``: multiplying by it rounds the weight to dtype first."""
    return torch.tensor(value, dtype=dtype)
