"""The in-memory reference merge: whole tensors, the official safetensors reader, the methods'
``reference`` functions. It shares no chunking, reading or writing code with the engine, so
comparing the two checks the streaming path byte for byte. Memory: one tensor of every model
at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import torch
from safetensors import safe_open

from .methods import METHODS
from .model import ModelFolder
from .recipe import Recipe


def reference_merge(
    recipe: Recipe,
) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor] | None]]:
    """Yield ``(name, merged tensor in its output dtype, masks or None)`` for every tensor."""
    method = METHODS[recipe.method]
    folders = [ModelFolder(recipe.base), *(ModelFolder(m.path) for m in recipe.models)]
    params = [m.params for m in recipe.models]
    with ExitStack() as stack:
        handles = [
            {
                f.path.name: stack.enter_context(safe_open(f.path, framework="pt"))
                for f in folder.files.values()
            }
            for folder in folders
        ]

        def get(i: int, name: str) -> torch.Tensor:
            return handles[i][folders[i].where[name].path.name].get_tensor(name)

        for name in folders[0].names():
            b = get(0, name)
            if not b.is_floating_point():
                yield name, b, None
                continue
            fts = [get(i, name) for i in range(1, len(folders))]
            r = method.reference(b, fts, params, recipe.options, recipe.dtype)
            out = r.out.to(recipe.out_dtype or b.dtype).reshape(b.shape)
            masks = None if r.masks is None else [m.reshape(b.shape) for m in r.masks]
            yield name, out, masks
    for f in folders:
        f.close()
