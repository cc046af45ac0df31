"""streammerge: out-of-core streaming model merging (task arithmetic, CABS) in a memory budget.

Library entry points (the CLI is a thin layer over these)::

    from streammerge import run_merge, read_mask
    summary = run_merge("recipe.yaml", "out/", max_memory=2**30)
    mask = read_mask("out/", "ft1", "model.layers.0.mlp.up_proj.weight")
    report = inspect_merge("out/")                       # densities and overlaps
    remix_merge("out/", "remixed/", {"ft1": 0.5})        # new weights, stored masks
    add_model("out/", "out-3/", "ft3/", weight=0.7)      # one more model, pruned last
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import InputError, RecipeError, StreamMergeError

__version__ = "0.1.0"

_LAZY = {
    "MergeOptions": "options",
    "RunSummary": "results",
    "run_merge": "engine",
    "MergeReport": "inspect",
    "inspect_merge": "inspect",
    "read_mask": "mask_store",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "parse_recipe": "recipe",
    "add_model": "remix",
    "remix_merge": "remix",
}
"""Entry points imported on first use: they pull in torch (seconds), which ``--help`` and
``--version`` never need."""

if TYPE_CHECKING:
    from .engine import run_merge
    from .inspect import MergeReport, inspect_merge
    from .mask_store import read_mask
    from .options import MergeOptions
    from .recipe import Recipe, load_recipe, parse_recipe
    from .remix import add_model, remix_merge
    from .results import RunSummary


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "InputError",
    "MergeOptions",
    "MergeReport",
    "Recipe",
    "RecipeError",
    "RunSummary",
    "StreamMergeError",
    "__version__",
    "add_model",
    "inspect_merge",
    "load_recipe",
    "parse_recipe",
    "read_mask",
    "remix_merge",
    "run_merge",
]
