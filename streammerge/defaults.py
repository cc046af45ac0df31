"""Constants the command line needs before anything heavy (torch, numba) is imported."""

from __future__ import annotations

DEFAULT_SHARD_SIZE = 5_000_000_000
"""Maximum bytes of one output shard (mergekit's default)."""
DEFAULT_SHARD_SIZE_TEXT = "5GB"
"""The same, as ``--shard-size`` shows and parses it."""
DEVICES = ("auto", "cpu", "cuda", "mps")
"""Values of ``--device``."""
EXECUTORS = ("local", "ray")
"""Values of ``--executor``."""
