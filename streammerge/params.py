"""mergekit's per-tensor parameter settings, as pure functions.

A recipe parameter (``weight: 0.5``, ``density: [1.0, 0.7, 0.4]``,
``weight: [{filter: mlp, value: 0.5}, {value: 0.3}]``) is a *setting* that yields one float per
output tensor. This module reproduces mergekit's ``evaluate_setting`` and ``ConfigReader``
precedence for ``models:`` recipes (one slice covering every layer):

- **scalar**: a number; YAML booleans and integers become floats (``true`` -> 1.0, ``8`` -> 8.0);
- **gradient**: a list of numbers, sampled at ``t`` in [0, 1] by piecewise-linear interpolation
  over equally spaced knots;
- **filter list**: ``[{filter: <substring>, value: <scalar|gradient>}, ..., {value: <default>}]``;
  the first rule whose filter is a substring of the tensor name wins (``*`` or no filter matches
  everything); when none matches, the next precedence level is consulted.

``t`` is ``layer_index / (num_layers - 1)`` for layer tensors (1 for a one-layer model) and 0 for
everything else (embeddings, final norm, lm_head).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RecipeError

Number = float


@dataclass(frozen=True, slots=True)
class Gradient:
    """A per-layer gradient: ``knots`` equally spaced over t in [0, 1] (first at 0, last at 1)."""

    knots: tuple[float, ...]
    """Values at t = 0, 1/(k-1), ..., 1; non-empty and finite."""

    def __post_init__(self) -> None:
        knots = tuple(float(k) for k in self.knots)
        if not knots:
            raise ValueError("a gradient needs at least one knot")
        if not all(math.isfinite(k) for k in knots):
            raise ValueError(f"gradient knots must be finite, got {list(knots)}")
        object.__setattr__(self, "knots", knots)

    def at(self, t: float) -> float:
        """Linear interpolation at ``t`` in [0, 1]; a one-knot gradient is a constant.

        Written as ``(1 - frac) * a + frac * b``, the form of mergekit's ``evaluate_setting``,
        so the floats should agree exactly rather than only approximately.
        """
        if not 0.0 <= t <= 1.0:  # also rejects NaN
            raise ValueError(f"gradient position t must be in [0, 1], got {t}")
        last = len(self.knots) - 1
        scaled = t * last
        i0 = math.floor(scaled)
        i1 = min(last, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.knots[i0] + frac * self.knots[i1]


@dataclass(frozen=True, slots=True)
class FilterRule:
    """One ``{filter, value}`` entry of a filter list; ``filter`` None or ``*`` matches all."""

    filter: str | None
    """Substring of the tensor name; None (no ``filter`` key) or ``*`` matches every tensor."""
    value: float | Gradient

    def matches(self, tensor: str) -> bool:
        """mergekit's test: a plain substring match (no globs; ``*`` is special only alone).

        So ``layers.1.`` matches only layer 1, but ``layers.1`` also matches layers 10-19.
        """
        return self.filter is None or self.filter == "*" or self.filter in tensor


ParamValue = float | Gradient | tuple[FilterRule, ...]

_RULE_KEYS = frozenset({"filter", "value"})
MERGEKIT_IGNORED_RULE_KEYS = frozenset({"pattern"})
"""Keys of a filter rule that mergekit 0.1.5's schema drops without a word (its examples'
``gradient-slerp.yml`` writes ``pattern:`` for ``filter:``): accepted with a warning, and, as in
mergekit, without effect. Other unknown keys are still refused (a typo such as ``filtr:``)."""


def parse_value(value: Any, name: str, where: str, notes: list[str] | None = None) -> ParamValue:
    """Validate one YAML parameter value (scalar, gradient or filter list) for ``name``.

    ``where`` locates it in the recipe (e.g. ``"models[1] (tuneB)"`` or ``"parameters"``) and
    every error names ``where``, ``name`` and the offending value. Numeric strings (PyYAML reads
    ``1e-3`` as a string) are accepted as numbers; mergekit would carry them as strings.
    Warnings (a rule key mergekit ignores) are appended to ``notes``.
    """
    label = f"{where}: '{name}'"
    if isinstance(value, list | tuple):
        if not value:
            raise RecipeError(f"{label}: an empty list is not a valid setting")
        if all(isinstance(v, dict) for v in value):
            return tuple(_rule(v, f"{label}[{i}]", notes) for i, v in enumerate(value))
        if any(isinstance(v, dict) for v in value):
            raise RecipeError(
                f"{label}: a list must hold either only numbers (a gradient) or only "
                f"{{filter, value}} rules, got {value!r}"
            )
        return _gradient(value, label)
    if isinstance(value, dict):
        # mergekit's schema admits a bare rule but its evaluator then fails at merge time
        raise RecipeError(
            f"{label}: a filter rule must be inside a list, e.g. "
            f"[{{filter: mlp, value: 0.5}}, {{value: 1.0}}], got {value!r}"
        )
    if not isinstance(value, bool | int | float | str):
        raise RecipeError(
            f"{label} must be a number, a list of numbers or a filter list, got {value!r}"
        )
    return _scalar(value, label)


def _scalar(value: Any, label: str) -> float:
    if isinstance(value, bool):  # mergekit coerces booleans to floats (true -> 1.0)
        return float(value)
    if not isinstance(value, int | float | str):
        raise RecipeError(f"{label} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise RecipeError(f"{label} must be a number, got {value!r}") from None
    except OverflowError:  # an integer too large for a float
        x = math.inf
    if not math.isfinite(x):
        raise RecipeError(f"{label} must be a finite number, got {value!r}")
    return x


def _gradient(values: list[Any] | tuple[Any, ...], label: str) -> Gradient:
    knots = []
    for i, v in enumerate(values):
        if isinstance(v, list | tuple | dict):
            raise RecipeError(f"{label}[{i}]: gradient knots must be numbers, got {v!r}")
        knots.append(_scalar(v, f"{label}[{i}]"))
    return Gradient(tuple(knots))


def _rule(rule: dict[Any, Any], label: str, notes: list[str] | None = None) -> FilterRule:
    unknown = sorted(str(k) for k in set(rule) - _RULE_KEYS - MERGEKIT_IGNORED_RULE_KEYS)
    if unknown:
        raise RecipeError(
            f"{label}: unknown key(s) {', '.join(unknown)} in filter rule {rule!r} "
            "(allowed: filter, value)"
        )
    for key in sorted(str(k) for k in set(rule) & MERGEKIT_IGNORED_RULE_KEYS):
        if notes is None:
            continue
        given = rule[key]
        if "filter" in rule:
            effect = f"this entry keeps its filter {rule['filter']!r}"
        else:
            effect = (
                "so this entry applies to every tensor as in mergekit; write "
                f"'filter: {given}' to restrict it"
            )
        notes.append(f"{label}: mergekit ignores '{key}: {given}' in a filter rule, {effect}")
    if rule.get("value") is None:
        raise RecipeError(f"{label}: filter rule {rule!r} has no 'value'")
    flt = rule.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise RecipeError(f"{label}.filter must be a string (a tensor-name substring), got {flt!r}")
    raw = rule["value"]
    if isinstance(raw, dict):  # rules do not nest in mergekit
        raise RecipeError(f"{label}.value must be a number or a list of numbers, got {raw!r}")
    if isinstance(raw, list | tuple):
        if not raw:
            raise RecipeError(f"{label}.value: an empty list is not a valid setting")
        return FilterRule(flt, _gradient(raw, f"{label}.value"))
    return FilterRule(flt, _scalar(raw, f"{label}.value"))


def evaluate(value: ParamValue, tensor: str, t: float) -> float | None:
    """The setting's value for ``tensor`` at gradient position ``t`` in [0, 1].

    None when ``value`` is a filter list none of whose rules matches ``tensor``.
    """
    if isinstance(value, Gradient):
        return value.at(t)
    if isinstance(value, tuple):
        for rule in value:
            if rule.matches(tensor):
                return evaluate(rule.value, tensor, t)  # first match wins, even if later fit
        return None
    return float(value)


# A ``layers.N`` / ``h.N`` / ``blocks.N`` path segment: Llama/Mistral/Qwen (``model.layers.N``),
# OPT (``model.decoder.layers.N``), GPT-2/Falcon/BLOOM (``transformer.h.N``), and ``blocks.N``.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def layer_index(tensor: str) -> int | None:
    """The transformer-layer index in ``tensor``'s name, or None for a non-layer tensor.

    The first ``layers.N`` / ``h.N`` / ``blocks.N`` segment counts, so an MoE expert index
    further along (``model.layers.3.mlp.experts.7.w1.weight``) is not mistaken for a layer.
    """
    m = _LAYER.search(tensor)
    return None if m is None else int(m.group(1))


def with_layer_index(tensor: str, index: int) -> str:
    """``tensor``'s name with its layer index (the segment :func:`layer_index` reads) replaced
    by ``index``; a non-layer name is returned unchanged."""
    m = _LAYER.search(tensor)
    if m is None:
        return tensor
    return f"{tensor[: m.start(1)]}{index}{tensor[m.end(1) :]}"


def num_layers(tensor_names: Iterable[str]) -> int:
    """1 + the largest layer index among ``tensor_names``; 0 when none is a layer tensor."""
    return 1 + max((i for n in tensor_names if (i := layer_index(n)) is not None), default=-1)


def layer_t(tensor: str, n_layers: int) -> float:
    """Gradient position of ``tensor`` in a model of ``n_layers`` layers, in [0, 1].

    Layer ``i`` sits at ``i / (n_layers - 1)``, so the first layer takes the first knot and the
    last layer the last knot; a one-layer model's only layer is at 1, as in mergekit. Embeddings,
    the final norm and lm_head sit at 0 (the first knot): mergekit evaluates every non-layer
    weight at 0 since its multi-module refactor (PR #534); before it, post-weights used 1.
    """
    i = layer_index(tensor)
    if i is None:
        return 0.0
    if not 0 <= i < n_layers:
        raise ValueError(f"{tensor}: layer {i} is outside a {n_layers}-layer model")
    return 1.0 if n_layers == 1 else i / (n_layers - 1)


def resolve(
    name: str,
    model_params: Mapping[str, ParamValue],
    global_params: Mapping[str, ParamValue],
    tensor: str,
    t: float,
    *,
    global_only: bool = False,
) -> float | None:
    """Parameter ``name`` for one model's ``tensor`` at gradient position ``t``.

    mergekit's precedence for ``models:`` recipes: the model's own ``parameters`` first (skipped
    when ``global_only``, i.e. for method-level parameters), then the top-level ``parameters``.
    A filter list with no matching rule falls through to the next level, so a model-level list
    without a default rule inherits the global setting for unmatched tensors. None when no level
    yields a value (mergekit: "Missing required parameter").
    """
    levels = (global_params,) if global_only else (model_params, global_params)
    for params in levels:
        if name in params:
            x = evaluate(params[name], tensor, t)
            if x is not None:
                return x
    return None
