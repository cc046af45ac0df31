"""streammerge: out-of-core streaming model merging (task arithmetic, CABS) in a memory budget.

Library entry points (the CLI is a thin layer over these)::

    from streammerge import run_merge, read_mask
    summary = run_merge("recipe.yaml", "out/", max_memory=2**30)
    mask = read_mask("out/", "ft1", "model.layers.0.mlp.up_proj.weight")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .engine import RunSummary, run_merge
from .errors import InputError, RecipeError, StreamMergeError
from .mask_store import read_mask
from .recipe import Recipe, load_recipe, parse_recipe

__all__ = [
    "InputError",
    "Recipe",
    "RecipeError",
    "RunSummary",
    "StreamMergeError",
    "__version__",
    "load_recipe",
    "parse_recipe",
    "read_mask",
    "run_merge",
]
