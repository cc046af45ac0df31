"""The in-memory reference merge: whole tensors, the official safetensors reader, the methods'
``reference`` functions. It shares no chunking, reading or writing code with the engine, so
comparing the two checks the streaming path byte for byte. Memory: one tensor of every model
at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import ExitStack

import torch
from safetensors import safe_open

from .errors import StreamMergeError
from .lora import open_inputs, reference_apply
from .methods import TensorId
from .plan import Densities, layer_positions, tensor_params
from .recipe import Recipe
from .tokenizer import plan_vocab, remap_full


def reference_merge(
    recipe: Recipe, densities: Densities | None = None, only: Collection[str] | None = None
) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor] | None]]:
    """Yield ``(name, merged tensor in its output dtype, masks or None)`` for every tensor
    (or for the names in ``only``: a sample of a model too large to merge whole in RAM).

    ``densities``: TADrop's per-(model, tensor) densities, as the engine computed them.
    """
    if recipe.slices is not None:  # its tests build their references from the inputs
        raise StreamMergeError("reference_merge does not cover 'slices:' recipes")
    method = recipe.impl
    folders = open_inputs(recipe)  # LoRA inputs: the adapter's index, applied below
    with ExitStack() as stack:
        handles = [
            {
                f.path.name: stack.enter_context(safe_open(f.path, framework="pt"))
                for f in folder.files.values()
            }
            for folder in folders
        ]

        def raw(i: int, name: str) -> torch.Tensor:
            w = handles[i][folders[i].file_of(name).name].get_tensor(name)
            return reference_apply(folders[i], name, w)

        # token-indexed tensors: every input's whole tensor remapped onto the output vocabulary
        vmap = plan_vocab(recipe, folders[0], folders[1:])

        def get(i: int, name: str) -> torch.Tensor:
            if vmap is None or name not in vmap.names:
                return raw(i, name)
            return remap_full(vmap, i, [raw(j, name) for j in range(len(folders))])

        names = folders[0].names()
        positions = layer_positions(names)
        for name in names:
            if only is not None and name not in only:
                continue
            b = get(0, name)
            if not b.is_floating_point() or recipe.excluded(name):
                yield name, b, None
                continue
            params, options = tensor_params(recipe, name, positions[name])
            if densities is not None:
                params = tuple(
                    method.with_density(p, densities[(k, name)])
                    if (k, name) in densities else p
                    for k, p in enumerate(params)
                )  # fmt: skip
            fts = [get(i, name) for i in range(1, len(folders))]
            tid = TensorId(name, b.numel(), tuple(b.shape))
            r = method.reference(tid, b, fts, params, options, recipe.dtype)
            out = r.out.to(recipe.out_dtype or b.dtype).reshape(b.shape)
            masks = None if r.masks is None else [m.reshape(b.shape) for m in r.masks]
            yield name, out, masks
    for f in folders:
        f.close()
