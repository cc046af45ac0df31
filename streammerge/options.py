"""The options of a merge run, shared by the CLI, ``run_merge``, ``remix_merge``, ``add_model``
and ``describe_plan`` (each takes the subset it uses from the same object)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .defaults import DEFAULT_SHARD_SIZE, DEVICES, EXECUTORS
from .errors import StreamMergeError


@dataclass(frozen=True, slots=True)
class MergeOptions:
    """How to run a merge (the recipe says what to merge). Sizes in bytes."""

    max_memory: int | None = None
    """Peak RSS budget; None: half the available RAM."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Largest output shard."""
    chunk_elems: int | None = None
    """Force the chunk length in elements (tests); None: derived from the budget."""
    progress: bool = False
    """Draw a progress bar on stderr."""
    restart: bool = False
    """Discard an interrupted run in the output folder and start over."""
    force: bool = False
    """Replace a finished merge in the output folder."""
    allow_nonfinite: bool = False
    """Let NaN/Inf input values through instead of failing."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``auto``; the bytes are the same either way."""
    max_vram: int | None = None
    """Peak GPU memory budget; None: 90% of the free VRAM."""
    executor: str = "local"
    """``local`` (this process) or ``ray`` (work units as Ray tasks; same bytes)."""
    ray_address: str | None = None
    """The Ray cluster to join (``HOST:PORT`` or ``auto``); None: ``RAY_ADDRESS`` or a new
    local instance."""
    copy_tokenizer: bool = True
    """Copy the base's tokenizer files (and chat template) into the output."""
    quiet: bool = False
    """No notices on stderr (the kernel-compile notice); warnings and errors still go there."""

    def __post_init__(self) -> None:
        for name in ("max_memory", "max_vram", "chunk_elems"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise StreamMergeError(f"{name} must be a positive number, got {value!r}")
        if self.shard_size <= 0:
            raise StreamMergeError(f"shard_size must be positive, got {self.shard_size!r}")
        if self.device not in DEVICES:
            raise StreamMergeError(
                f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}"
            )
        if self.executor not in EXECUTORS:
            raise StreamMergeError(
                f"--executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}"
            )
        if self.ray_address is not None and self.executor != "ray":
            raise StreamMergeError("--ray-address needs --executor ray")

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def build(cls, options: MergeOptions | None, overrides: dict[str, object]) -> MergeOptions:
        """``options`` (default: all defaults) with keyword ``overrides`` applied; an unknown
        keyword is a TypeError, as for any function."""
        unknown = sorted(set(overrides) - cls.names())
        if unknown:
            raise TypeError(f"unexpected merge option(s): {', '.join(unknown)}")
        base = options if options is not None else cls()
        values = {f.name: getattr(base, f.name) for f in fields(cls)}
        return cls(**{**values, **overrides})  # type: ignore[arg-type]
