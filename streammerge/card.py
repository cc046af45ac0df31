"""The model card: ``OUT_DIR/README.md`` in Hugging Face style, written after a merge.

YAML front matter (``base_model``, ``library_name``, ``tags``) that the Hub reads, then what
was merged and how, and the recipe verbatim. The text is a pure function of the recipe, the
plan, TADrop's report and the date passed in, so a resumed run writes the same card as an
uninterrupted one started the same day.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import yaml

from . import __version__

if TYPE_CHECKING:
    from .plan import MergePlan, TensorTask
    from .recipe import Recipe

CARD_NAME = "README.md"


def model_card(recipe: Recipe, plan: MergePlan, tadrop: Mapping[str, object], date: str) -> str:
    """The card's text; ``date`` is ``YYYY-MM-DD`` (the day the run started)."""
    has_base = "base_model" in recipe.source
    base_ref = recipe.source.get("base_model")
    base_name = base_ref if isinstance(base_ref, str) else str(recipe.base)
    # A base-less merge (linear) has no base to name: the Hub reads a list of the merged models.
    hub_base: str | list[str] = base_name if has_base else [m.name for m in recipe.models]
    front = yaml.safe_dump(
        {"base_model": hub_base, "library_name": "transformers", "tags": ["merge", "streammerge"]},
        sort_keys=False,
    )
    with_base = (
        f"with `{base_name}` as the base"
        if has_base
        else f"without a base model (`{recipe.models[0].name}` gives the config and layout)"
    )
    merged = [t for t in plan.tensors if t.merged]
    first = merged[0] if merged else None
    lines = [
        f"---\n{front}---",
        "",
        "# Merged model",
        "",
        f"This model was merged with streammerge {__version__} on {date} using the "
        f"`{recipe.method}` method, {with_base}.",
        "",
        f"- tensors: {len(merged)} merged, {len(plan.tensors) - len(merged)} copied from the base",
        f"- compute dtype: `{_dtype(recipe.dtype)}`; output dtype: "
        + (f"`{_dtype(recipe.out_dtype)}`" if recipe.out_dtype else "as in the base"),
    ]
    if recipe.exclude:
        excluded = ", ".join(f"`{p}`" for p in recipe.exclude)
        lines.append(f"- excluded (copied from the base): {excluded}")
    lines += ["", "## Models", ""]
    if recipe.method == "cabs":
        lines += ["Pruning order (earlier models claim their positions first):", ""]
    else:
        lines += ["In processing order (sums are taken in this order):", ""]
    no_weights = recipe.method in ("slerp", "passthrough")
    if no_weights:
        # no weight/density: slerp's t is global, passthrough's weight is its scale
        col = "scale" if recipe.method == "passthrough" else "t"
        lines += [f"| # | model | {col} |", "|---|---|---|"]
        for k, m in enumerate(recipe.models):
            if first is None:
                value = "-"
            elif recipe.method == "passthrough":
                value = _num(first.params[k].weight)
            else:
                value = "-" if first.options.t is None else _num(first.options.t)
            lines.append(f"| {k + 1} | `{m.name}` | {value} |")
    else:
        lines += ["| # | model | weight | " + ("n:m |" if recipe.method == "cabs" else "density |"),
                  "|---|---|---|---|"]  # fmt: skip
    for k, m in enumerate(() if no_weights else recipe.models):
        p = first.params[k] if first is not None else None
        weight = _num(p.weight) if p else "-"
        if recipe.method == "cabs":
            extra = f"{p.n}:{p.m}" if p else "-"
        else:
            extra = _num(p.density) if p else "-"
        lines.append(f"| {k + 1} | `{m.name}` | {weight} | {extra} |")
    if first is not None and _varies(merged):
        lines += ["", f"Values shown are those of the first merged tensor (`{first.name}`); the "
                  "recipe sets some per tensor."]  # fmt: skip
    densities = tadrop.get("densities") if tadrop else None
    if isinstance(densities, Mapping) and densities:
        lines += ["", "## TADrop", "",
                  "Per-tensor densities from each task vector's kurtosis (streammerge's "
                  "formulation; parameter-weighted mean kept at the recipe's density):", "",
                  "| model | mean | min | max |", "|---|---|---|---|"]  # fmt: skip
        numel = {t.name: t.numel for t in merged}
        for k, m in enumerate(recipe.models):
            ds = [(float(v[k]), numel.get(name, 0)) for name, v in densities.items()]
            total = sum(n for _, n in ds) or 1
            mean = sum(d * n for d, n in ds) / total
            lo, hi = min(d for d, _ in ds), max(d for d, _ in ds)
            lines.append(f"| `{m.name}` | {mean:.4f} | {lo:.4f} | {hi:.4f} |")
    text = recipe.text or yaml.safe_dump(dict(recipe.source), sort_keys=False)
    lines += ["", "## Recipe", "", "```yaml", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def _dtype(d: object) -> str:
    return str(d).removeprefix("torch.")


def _num(x: float) -> str:
    return f"{x:g}"


def _varies(tasks: Sequence[TensorTask]) -> bool:
    """Whether the per-model parameters differ between merged tensors (gradients, filters)."""
    return len({t.params for t in tasks}) > 1
