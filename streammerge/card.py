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
from .plan import dtype_summary

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
    names = [m.name for m in recipe.models]
    if recipe.slices is not None:  # the models themselves, not the slots they fill
        names = list(dict.fromkeys(x.name for s in recipe.slices.slices for x in s.sources))
    hub_base: str | list[str] = base_name if has_base else names
    front = yaml.safe_dump(
        {"base_model": hub_base, "library_name": "transformers", "tags": ["merge", "streammerge"]},
        sort_keys=False,
    )
    with_base = (
        f"with `{base_name}` as the base"
        if has_base
        else f"without a base model (`{names[0]}` gives the config and layout)"
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
        f"- dtypes: {dtype_summary(plan)}",
    ]
    if recipe.exclude:
        excluded = ", ".join(f"`{p}`" for p in recipe.exclude)
        lines.append(f"- excluded (copied from the base): {excluded}")
    lines += ["", "## Models", ""]
    spec = recipe.impl.spec
    lines += [spec.order_note, ""]
    columns = spec.card
    lines += ["| # | model | " + "".join(f"{c.header} | " for c in columns).rstrip(),
              "|---|---|" + "---|" * len(columns)]  # fmt: skip
    for k, m in enumerate(recipe.models):
        cells = [c.value(first.params[k], first.options) if first else "-" for c in columns]
        lines.append(f"| {k + 1} | `{m.name}` | " + " | ".join(cells) + " |")
    if first is not None and _varies(merged):
        lines += ["", f"Values shown are those of the first merged tensor (`{first.name}`); the "
                  "recipe sets some per tensor."]  # fmt: skip
    if recipe.slices is not None:
        lines += [
            "",
            "## Slices",
            "",
            "Output layers are numbered in slice order; embeddings "
            "come with the first slice, the final norm and lm_head with the last.",
            "",
        ]
        lines += [f"- {line}" for line in recipe.slices.describe()]
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


def _varies(tasks: Sequence[TensorTask]) -> bool:
    """Whether the per-model parameters differ between merged tensors (gradients, filters)."""
    return len({t.params for t in tasks}) > 1
