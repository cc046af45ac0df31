"""What a merge reports: per tensor as it finishes, and in total at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    """What a finished merge reports."""

    out_dir: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    """Wall time of the merge, kernel compilation excluded."""
    peak_rss: int
    """Peak RSS of the process (kernel high-water mark), bytes; includes mapped input pages."""
    peak_anon_rss: int
    """Peak anonymous RSS (sampled every 50 ms), bytes."""
    chunk_elems: int
    warnings: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    """Model names in processing order."""
    kept: dict[str, list[int]] = field(default_factory=dict)
    """Kept element counts per tensor, per model (sparsifying methods only)."""
    merged_elems: int = 0
    """Elements of the merged (floating-point) tensors, per model."""
    resumed_chunks: int = 0
    """Chunks an interrupted run had finished and this run skipped."""
    total_chunks: int = 0
    """Chunks in the plan (merge pass only)."""
    up_to_date: bool = False
    """OUT_DIR already held this exact merge, complete; nothing was done."""
    repaired: tuple[str, ...] = ()
    """What a resume found changed since the interruption, and redid."""
    files: tuple[str, ...] = ()
    """Files copied from the base (config, code, processor and tokenizer files), by name."""
    compile_seconds: float = 0.0
    """Time spent compiling kernels before the merge (not part of ``seconds``)."""


@dataclass(frozen=True, slots=True)
class TensorReport:
    """One finished tensor, as passed to ``run_merge``'s ``on_tensor`` hook."""

    name: str
    merged: bool
    """False: copied byte for byte from the base."""
    chunks: int
    bytes_read: int
    """Input bytes its passes read (all models, all passes)."""
    bytes_written: int
    """Output bytes of the tensor."""
    seconds: float
    """Wall time spent on it in this run."""
    kept: tuple[int, ...] | None
    """Kept elements per model in processing order (sparsifying methods), else None."""
    skipped: bool = False
    """Done by an interrupted run; this run only skipped it."""
