"""Recipes: mergekit-style YAML in, a validated frozen :class:`Recipe` out.

We accept what mergekit users already write (``merge_method``, ``base_model``,
``models: [{model: PATH, parameters: {weight: ...}}]``, global ``parameters``, ``dtype``,
``out_dtype``) plus CABS's keys (``n_val``/``m_val`` globally or per model, a top-level
``pruning_order``). Unlike mergekit, unknown keys are reported (mergekit drops them silently,
a frequent source of "my setting did nothing"), and every invalid value fails here, before
any input is opened.

Relative model paths are resolved against the current directory, as mergekit does, and
failing that against the recipe's folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import RecipeError
from .methods import METHODS
from .methods.base import OVERLAP_POLICIES, TAIL_POLICIES, MethodOptions, ModelParams

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "half": "float16",
    "float": "float32",
    "double": "float64",
}

TOP_LEVEL = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "pruning_order",
}
IGNORED_MERGEKIT = {"tokenizer_source", "tokenizer", "chat_template", "name"}
UNSUPPORTED_MERGEKIT = {"slices", "modules"}

# Parameters each method understands: (per-model, global-only).
METHOD_PARAMS: dict[str, tuple[set[str], set[str]]] = {
    "task_arithmetic": ({"weight"}, set()),
    "cabs": (
        {"weight", "n_val", "m_val"},
        {"default_n_val", "default_m_val", "tail_policy", "overlap_policy"},
    ),
}
WEIGHT_REQUIRED = {"task_arithmetic"}  # as in mergekit; CABS defaults to 1.0 (author's PR)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One task model of the recipe."""

    name: str
    """The model reference as written in the recipe."""
    path: Path
    """Resolved folder."""
    params: ModelParams


@dataclass(frozen=True, slots=True)
class Recipe:
    """A validated merge recipe. ``models`` is in processing (pruning) order."""

    method: str
    base: Path
    models: tuple[ModelEntry, ...]
    options: MethodOptions
    dtype: torch.dtype
    """Compute dtype."""
    out_dtype: torch.dtype | None
    """Output dtype; None keeps each tensor's base dtype."""
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The recipe as parsed from YAML, for provenance (stored in the occupancy store)."""
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"unknown merge_method {self.method!r}")
        if not self.models:
            raise RecipeError("the recipe needs at least one model besides the base")


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    try:
        return parse_recipe(doc, path.parent)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def parse_recipe(doc: Mapping[str, Any], recipe_dir: Path = Path(".")) -> Recipe:
    """Validate a parsed recipe mapping; ``recipe_dir`` anchors relative paths as a fallback."""
    warnings: list[str] = []
    for key in UNSUPPORTED_MERGEKIT & set(doc):
        raise RecipeError(f"'{key}:' recipes are not supported; use 'models:'")
    unknown = sorted(set(doc) - TOP_LEVEL - IGNORED_MERGEKIT)
    if unknown:
        warnings.append(f"unknown recipe keys ignored: {', '.join(unknown)}")
    ignored = sorted(set(doc) & IGNORED_MERGEKIT)
    if ignored:
        warnings.append(
            f"keys ignored (tokenizer and config come from the base): {', '.join(ignored)}"
        )

    method = doc.get("merge_method")
    if method not in METHODS:
        raise RecipeError(f"merge_method must be one of {sorted(METHODS)}, got {method!r}")
    per_model_keys, global_keys = METHOD_PARAMS[method]
    if "base_model" not in doc:
        raise RecipeError(f"{method} needs a base_model")
    base_ref = _model_ref(doc["base_model"], "base_model")
    base = _resolve(base_ref, recipe_dir, "base_model")

    gparams = doc.get("parameters") or {}
    if not isinstance(gparams, dict):
        raise RecipeError("'parameters' must be a mapping")
    unknown = sorted(set(gparams) - per_model_keys - global_keys)
    if unknown:
        warnings.append(f"parameters not used by {method}, ignored: {', '.join(unknown)}")

    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise RecipeError("'models' must be a non-empty list")
    entries: list[ModelEntry] = []
    for i, item in enumerate(raw_models):
        where = f"models[{i}]"
        if isinstance(item, dict):
            extra = sorted(set(item) - {"model", "parameters"})
            if extra:
                warnings.append(f"{where}: unknown keys ignored: {', '.join(extra)}")
            ref = _model_ref(item.get("model"), f"{where}.model")
            mparams = item.get("parameters") or {}
        else:
            ref, mparams = _model_ref(item, where), {}
        if not isinstance(mparams, dict):
            raise RecipeError(f"{where}.parameters must be a mapping")
        path = _resolve(ref, recipe_dir, f"{where}.model")
        if path == base:
            continue  # mergekit habit: the base listed among the models is the base, not a task
        unknown = sorted(set(mparams) - per_model_keys)
        if unknown:
            warnings.append(
                f"{where} ({ref}): parameters not used by {method}, ignored: {', '.join(unknown)}"
            )
        entries.append(
            ModelEntry(ref, path, _model_params(method, mparams, gparams, f"{where} ({ref})"))
        )
    if any(entries[i].path == entries[j].path for i in range(len(entries)) for j in range(i)):
        raise RecipeError("a model is listed twice under 'models'")

    order = doc.get("pruning_order")
    if order is not None:
        entries = _apply_order(entries, order, {base_ref, str(base), base.name})
    options = _method_options(gparams)
    return Recipe(
        method=method,
        base=base,
        models=tuple(entries),
        options=options,
        dtype=_dtype(doc.get("dtype", "float32"), "dtype"),
        out_dtype=None if doc.get("out_dtype") is None else _dtype(doc["out_dtype"], "out_dtype"),
        source=dict(doc),
        warnings=tuple(warnings),
    )


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and "path" in value:  # mergekit's object form {path, revision}
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where} must be a path to a model folder, got {value!r}")
    return value


def _resolve(ref: str, recipe_dir: Path, where: str) -> Path:
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, recipe_dir / p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    looked = " or ".join(str(c) for c in candidates)
    hint = ""
    if "+" in ref or "@" in ref:
        hint = "; LoRA ('+') and revision ('@') references are not supported, give a local folder"
    raise RecipeError(f"{where}: model folder {ref!r} not found (looked in {looked}){hint}")


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool):  # mergekit coerces booleans to floats
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, list | dict):
        raise RecipeError(
            f"{where}: '{name}': lists and filters are not supported yet; use a number"
        )
    raise RecipeError(f"{where}: '{name}' must be a number, got {value!r}")


def _integer(value: Any, name: str, where: str) -> int:
    x = _number(value, name, where)
    if x != int(x):
        raise RecipeError(f"{where}: '{name}' must be an integer, got {value!r}")
    return int(x)


def _model_params(
    method: str, mp: Mapping[str, Any], gp: Mapping[str, Any], where: str
) -> ModelParams:
    def get(key: str, *fallbacks: str) -> Any:
        # precedence as in mergekit: the model's own parameters, then the global ones
        if key in mp:
            return mp[key]
        for k in (key, *fallbacks):
            if k in gp:
                return gp[k]
        return None

    w = get("weight")
    if w is None:
        if method in WEIGHT_REQUIRED:
            raise RecipeError(f"{where}: {method} needs a 'weight'")
        w = 1.0
    weight = _number(w, "weight", where)
    if method != "cabs":
        return ModelParams(weight)
    n, m = get("n_val", "default_n_val"), get("m_val", "default_m_val")
    if n is None or m is None:
        raise RecipeError(f"{where}: cabs needs n_val and m_val (per model or under parameters)")
    n, m = _integer(n, "n_val", where), _integer(m, "m_val", where)
    if m < 1:
        raise RecipeError(f"{where}: m_val must be >= 1, got {m}")
    if not 0 <= n <= m:
        raise RecipeError(f"{where}: n_val must be between 0 and m_val ({m}), got {n}")
    return ModelParams(weight, n, m)


def _method_options(gp: Mapping[str, Any]) -> MethodOptions:
    tail = gp.get("tail_policy", "keep_topn_padded")
    overlap = gp.get("overlap_policy", "strict")
    if tail not in TAIL_POLICIES:
        raise RecipeError(
            f"parameters.tail_policy must be one of {list(TAIL_POLICIES)}, got {tail!r}"
        )
    if overlap not in OVERLAP_POLICIES:
        raise RecipeError(
            f"parameters.overlap_policy must be one of {list(OVERLAP_POLICIES)}, got {overlap!r}"
        )
    return MethodOptions(tail_policy=tail, overlap_policy=overlap)


def _apply_order(entries: list[ModelEntry], order: Any, base_refs: set[str]) -> list[ModelEntry]:
    if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
        raise RecipeError("pruning_order must be a list of model references")
    by_key: dict[str, list[ModelEntry]] = {}
    for e in entries:
        for key in {e.name, str(e.path), e.path.name}:
            by_key.setdefault(key, []).append(e)
    picked: list[ModelEntry] = []
    for ref in order:
        if ref in base_refs and ref not in by_key:
            continue  # the base has no task vector to prune
        found = by_key.get(ref, [])
        if len(found) != 1:
            problem = "is ambiguous (several models match)" if found else "is not one of the models"
            raise RecipeError(f"pruning_order: {ref!r} {problem}")
        e = found[0]
        if e in picked:
            raise RecipeError(f"pruning_order: {ref!r} is listed twice")
        picked.append(e)
    missing = [e.name for e in entries if e not in picked]
    if missing:
        raise RecipeError(f"pruning_order must list every model; missing: {', '.join(missing)}")
    return picked


def _dtype(value: Any, where: str) -> torch.dtype:
    name = _DTYPE_ALIASES.get(str(value), str(value))
    if name not in DTYPES:
        raise RecipeError(f"{where} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[name]
