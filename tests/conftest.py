"""Shared fixtures: small random model families written with the official safetensors writer.

These are deliberately independent of ``streammerge.synth`` (tested on its own) so the engine
is checked against inputs it did not produce. Values are quantised so ``|tau|`` ties are common.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SLOW = os.environ.get("STREAMMERGE_SLOW", "") not in ("", "0")
"""``STREAMMERGE_SLOW=1`` runs the long cases at full size (every kill point, chunk length and
model count); without it, as in CI, they run on fewer points of the same kinds."""


def thin(full: list, ci: list) -> list:
    """``full`` under ``STREAMMERGE_SLOW=1``, else ``ci`` (a subset of the same cases)."""
    return full if SLOW else ci


SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (37, 24),  # 888 elements: not a multiple of 64
    "layer.0.attn.weight": (24, 24),
    "layer.0.mlp.weight": (50, 24),
    "layer.0.norm.weight": (24,),
    "odd.weight": (7, 13),  # 91 elements: partial n:m blocks
    "scalar": (),
    "position_ids": (1, 10),  # int64: copied from the base
}


def write_model(
    path: Path,
    tensors: dict[str, torch.Tensor],
    shards: int = 1,
    config: dict | None = None,
) -> Path:
    """Write a HF-style folder; with ``shards > 1`` also an index."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, path / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return path


def make_family(
    root: Path,
    k: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    shapes: dict[str, tuple[int, ...]] = SHAPES,
    seed: int = 0,
    levels: int = 16,
    shards: Sequence[int] = (1,),
) -> tuple[Path, list[Path]]:
    """Base + k fine-tunes whose deltas take few distinct magnitudes (many ties)."""
    g = torch.Generator().manual_seed(seed)
    base_t, fts_t = {}, [dict() for _ in range(k)]
    for name, shape in shapes.items():
        if name == "position_ids":
            base_t[name] = torch.arange(10).reshape(shape)
            for ft in fts_t:
                ft[name] = base_t[name].clone()
            continue
        b = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        base_t[name] = b
        for ft in fts_t:
            q = torch.randint(-levels, levels + 1, shape, generator=g).float() / (levels * 64)
            ft[name] = (b.float() + q).to(dtype)
    base = write_model(root / "base", base_t, shards[0])
    fts = [
        write_model(root / f"ft{i + 1}", t, shards[(i + 1) % len(shards)])
        for i, t in enumerate(fts_t)
    ]
    return base, fts


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path / "models")
