"""Recipes: mergekit-style YAML in, a validated frozen :class:`Recipe` out.

We accept what mergekit users already write (``merge_method``, ``base_model``,
``models: [{model: PATH, parameters: {weight: ...}}]``, global ``parameters``, ``dtype``,
``out_dtype``) plus CABS's keys (``n_val``/``m_val`` globally or per model, a top-level
``pruning_order``) and ``exclude`` (regexes of tensors taken from the base unmerged). Every
numeric parameter may be a scalar, a gradient over layers or a filter list (mergekit's forms,
see :mod:`streammerge.params`), resolved per tensor when the merge is planned.

Unlike mergekit, unknown keys are reported (mergekit drops them silently, a frequent source of
"my setting did nothing"). Invalid values fail here, before any input is opened, or, for
per-tensor combinations (n > m under some filter), when the plan is built, still before any
tensor data is read.

Relative model paths are resolved against the current directory, as mergekit does, and
failing that against the recipe's folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import RecipeError
from .methods import METHODS
from .methods.base import OVERLAP_POLICIES, TAIL_POLICIES, MethodOptions, ModelParams
from .params import Gradient, ParamValue, parse_value, resolve

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

TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "pruning_order", "exclude"}  # fmt: skip
IGNORED_MERGEKIT = {"tokenizer_source", "tokenizer", "chat_template", "name"}
UNSUPPORTED_MERGEKIT = {"slices", "modules"}

_GTA_GLOBALS = {"lambda", "normalize", "rescale", "int8_mask"}
_TADROP = {"tadrop", "tadrop_alpha", "tadrop_d_min", "tadrop_d_max"}
PER_MODEL: dict[str, set[str]] = {
    "task_arithmetic": {"weight", "density"},
    "ties": {"weight", "density"},
    "dare_ties": {"weight", "density"},
    "dare_linear": {"weight", "density"},
    "magnitude": {"weight", "density"},
    "linear": {"weight"},
    "cabs": {"weight", "n_val", "m_val"},
    "slerp": set(),
    "passthrough": {"scale"},
}
"""Parameters set per model (a global value is the default for every model)."""
GLOBAL_ONLY: dict[str, set[str]] = {
    "task_arithmetic": _GTA_GLOBALS,
    "ties": _GTA_GLOBALS | _TADROP,
    "dare_ties": _GTA_GLOBALS | _TADROP | {"random_seed"},
    "dare_linear": _GTA_GLOBALS | _TADROP | {"random_seed"},
    "magnitude": _GTA_GLOBALS | _TADROP | {"conflict_aware"},
    "linear": {"normalize"},
    "cabs": {"default_n_val", "default_m_val", "tail_policy", "overlap_policy"} | _TADROP,
    "slerp": {"t"},
    "passthrough": set(),
}
"""Method-level parameters: read from the top-level ``parameters`` only."""
REQUIRED = {"weight": {"task_arithmetic", "ties", "dare_ties", "dare_linear", "magnitude",
                       "linear"},
            "density": {"dare_ties", "dare_linear", "magnitude"}}  # fmt: skip
"""As in mergekit: these must be given (per model or globally). CABS weights default to 1.0."""
_NO_BASE = ("linear", "passthrough")
"""Methods without a base: the first model provides the config and the tensor layout."""
DEFAULTS = {"weight": 1.0, "density": 1.0}
STRING_PARAMS = {"tail_policy": TAIL_POLICIES, "overlap_policy": OVERLAP_POLICIES}
ALIASES = {"n_val": "default_n_val", "m_val": "default_m_val"}  # the CABS PR's global names


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One task model of the recipe."""

    name: str
    """The model reference as written in the recipe."""
    path: Path
    """Resolved folder."""
    settings: Mapping[str, ParamValue] = field(default_factory=dict)
    """The model's own parameters (scalars, gradients or filter lists)."""


@dataclass(frozen=True, slots=True)
class Recipe:
    """A validated merge recipe. ``models`` is in processing (pruning) order."""

    method: str
    base: Path
    models: tuple[ModelEntry, ...]
    settings: Mapping[str, ParamValue] = field(default_factory=dict)
    """Top-level numeric ``parameters``."""
    strings: Mapping[str, str] = field(default_factory=dict)
    """Top-level string parameters (``tail_policy``, ``overlap_policy``)."""
    dtype: torch.dtype = torch.float32
    """Compute dtype."""
    out_dtype: torch.dtype | None = None
    """Output dtype; None keeps each tensor's base dtype."""
    exclude: tuple[str, ...] = ()
    """Regexes (``re.search``) of tensor names copied from the base instead of merged."""
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The recipe as parsed from YAML, for provenance (stored in the occupancy store)."""
    warnings: tuple[str, ...] = ()
    text: str = field(default="", compare=False)
    """The recipe file's text as written ("" when parsed from a mapping), for the model card."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"unknown merge_method {self.method!r}")
        if not self.models:
            raise RecipeError("the recipe needs at least one model besides the base")

    def excluded(self, tensor: str) -> bool:
        return any(re.search(p, tensor) for p in self.exclude)

    def model_params(self, k: int, tensor: str, t: float) -> ModelParams:
        """Model k's parameters for one tensor at layer position ``t`` (mergekit's rules)."""
        e = self.models[k]

        def get(name: str) -> float | None:
            x = resolve(name, e.settings, self.settings, tensor, t)
            if x is None and name in ALIASES:
                x = resolve(ALIASES[name], {}, self.settings, tensor, t)
            if x is None and self.method in REQUIRED.get(name, ()):
                raise RecipeError(f"missing parameter {name!r} for model {e.name}, tensor {tensor}")
            return DEFAULTS.get(name) if x is None else x

        if self.method == "passthrough":
            scale = get("scale")
            return ModelParams(1.0 if scale is None else scale)
        weight, density = get("weight"), get("density")
        assert weight is not None and density is not None
        if self.method != "cabs":
            return ModelParams(weight, density=density)
        n, m = get("n_val"), get("m_val")
        if n is None or m is None:
            raise RecipeError(f"model {e.name}: cabs needs n_val and m_val (per model or global)")
        if not 0 <= n <= m:
            raise RecipeError(f"model {e.name}, tensor {tensor}: n_val {n:g} > m_val {m:g}")
        return ModelParams(weight, int(n), int(m), density=n / m)

    def options(self, tensor: str, t: float) -> MethodOptions:
        """Method-level options for one tensor."""

        def get(name: str) -> float | None:
            return resolve(name, {}, self.settings, tensor, t, global_only=True)

        def flag(name: str) -> bool | None:
            x = get(name)
            return None if x is None else bool(x)

        return MethodOptions(
            tail_policy=self.strings.get("tail_policy", "keep_topn_padded"),
            overlap_policy=self.strings.get("overlap_policy", "strict"),
            normalize=flag("normalize"),
            rescale=flag("rescale"),
            lambda_=1.0 if get("lambda") is None else float(get("lambda") or 0.0),
            seed=int(get("random_seed") or 0),
            conflict_aware=bool(flag("conflict_aware")),
            t=get("t"),
        )

    @property
    def tadrop(self) -> bool:
        x = self.settings.get("tadrop")
        return bool(x) if isinstance(x, float) else False


MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file accepted (bytes)."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of YAML collections accepted."""
MAX_YAML_ALIASES = 100
"""Most YAML aliases (``*name``) accepted: bounds alias-bomb expansion."""


def _check_yaml_structure(path: Path, text: str) -> None:
    """Refuse YAML nested deeper than MAX_YAML_DEPTH or with more than MAX_YAML_ALIASES aliases.

    Scans parser events only (nothing is built), so a hostile file costs O(size).
    """
    depth = aliases = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RecipeError(f"{path}: recipe is nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(ev, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise RecipeError(f"{path}: recipe uses more than {MAX_YAML_ALIASES} YAML aliases")


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file."""
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: recipe is larger than {MAX_RECIPE_BYTES} bytes")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(
                f"{path}: recipe is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        _check_yaml_structure(path, text)
        doc = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: recipe is nested too deeply") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    try:
        return replace(parse_recipe(doc, path.parent), text=text)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def parse_recipe(
    doc: Mapping[str, Any], recipe_dir: Path = Path("."), *, require_models: bool = True
) -> Recipe:
    """Validate a parsed recipe mapping; ``recipe_dir`` anchors relative paths as a fallback.

    ``require_models=False`` accepts task-model folders that do not exist (absolute paths are
    taken as they are): ``streammerge add`` replays a merge whose fine-tunes it never reads.
    """
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
    per_model, global_only = PER_MODEL[method], GLOBAL_ONLY[method]
    if "base_model" not in doc and not (method in _NO_BASE and doc.get("models")):
        raise RecipeError(f"{method} needs a base_model")
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise RecipeError("'models' must be a non-empty list")
    # linear has no base: the first model provides the config and the tensor layout
    first = raw_models[0].get("model") if isinstance(raw_models[0], dict) else raw_models[0]
    base_ref = _model_ref(doc.get("base_model", first), "base_model")
    base = _resolve(base_ref, recipe_dir, "base_model")

    gparams = doc.get("parameters") or {}
    if not isinstance(gparams, dict):
        raise RecipeError("'parameters' must be a mapping")
    unknown = sorted(set(gparams) - per_model - global_only)
    if unknown:
        warnings.append(f"parameters not used by {method}, ignored: {', '.join(unknown)}")
    strings = {}
    for key, choices in STRING_PARAMS.items():
        if key in gparams and key in global_only:
            if gparams[key] not in choices:
                raise RecipeError(
                    f"parameters.{key} must be one of {list(choices)}, got {gparams[key]!r}"
                )
            strings[key] = gparams[key]
    settings = {
        k: _setting(k, v, "parameters")
        for k, v in gparams.items()
        if k in (per_model | global_only) - set(STRING_PARAMS)
    }

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
        if require_models or not Path(ref).expanduser().is_absolute():
            path = _resolve(ref, recipe_dir, f"{where}.model")
        else:
            path = Path(ref).expanduser().resolve()
        if path == base and method not in _NO_BASE:
            continue  # mergekit habit: the base listed among the models is the base, not a task
        unknown = sorted(set(mparams) - per_model)
        if unknown:
            warnings.append(
                f"{where} ({ref}): parameters not used by {method}, ignored: {', '.join(unknown)}"
            )
        own = {k: _setting(k, v, f"{where} ({ref})") for k, v in mparams.items() if k in per_model}
        for name, methods in REQUIRED.items():
            if method in methods and name not in own and name not in settings:
                raise RecipeError(f"{where} ({ref}): {method} needs a '{name}'")
        entries.append(ModelEntry(ref, path, own))
    if any(entries[i].path == entries[j].path for i in range(len(entries)) for j in range(i)):
        raise RecipeError("a model is listed twice under 'models'")
    if method == "cabs":
        _check_nm(entries, settings)
    if method == "passthrough" and len(entries) != 1:
        raise RecipeError(f"passthrough takes exactly one model, got {len(entries)}")
    if method == "slerp":
        if len(entries) != 1:
            raise RecipeError(
                f"slerp takes exactly one model besides the base_model, got {len(entries)}"
            )
        if "t" not in settings:
            raise RecipeError("slerp needs a 't' under parameters (a number or a gradient)")

    order = doc.get("pruning_order")
    if order is not None:
        entries = _apply_order(entries, order, {base_ref, str(base), base.name})
    exclude = doc.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    for pat in exclude:
        try:
            re.compile(pat)
        except (re.error, TypeError) as e:
            raise RecipeError(f"exclude: {pat!r} is not a valid regular expression ({e})") from e
    return Recipe(
        method=method,
        base=base,
        models=tuple(entries),
        settings=settings,
        strings=strings,
        dtype=_dtype(doc.get("dtype", "float32"), "dtype"),
        out_dtype=None if doc.get("out_dtype") is None else _dtype(doc["out_dtype"], "out_dtype"),
        exclude=tuple(exclude),
        source=dict(doc),
        warnings=tuple(warnings),
    )


def _setting(name: str, value: Any, where: str) -> ParamValue:
    """Parse one numeric parameter and check every value it can take against its range."""
    parsed = parse_value(value, name, where)
    if name in ("n_val", "m_val", "default_n_val", "default_m_val") and _has_gradient(parsed):
        raise RecipeError(f"{where}: '{name}' must be an integer, not a gradient")
    for x in _values(parsed):
        if name == "density" and not 0 <= x <= 1:
            raise RecipeError(f"{where}: 'density' must be between 0 and 1, got {x:g}")
        if name in ("n_val", "m_val", "default_n_val", "default_m_val") and x != int(x):
            raise RecipeError(f"{where}: '{name}' must be an integer, got {x:g}")
        if name in ("m_val", "default_m_val") and x < 1:
            raise RecipeError(f"{where}: m_val must be >= 1, got {x:g}")
        if name in ("n_val", "default_n_val") and x < 0:
            raise RecipeError(f"{where}: n_val must be >= 0, got {x:g}")
    return parsed


def _values(v: ParamValue) -> list[float]:
    """Every number a setting contains (a gradient's values lie between its knots)."""
    if isinstance(v, float):
        return [v]
    if isinstance(v, Gradient):
        return list(v.knots)
    return [x for rule in v for x in _values(rule.value)]


def _has_gradient(v: ParamValue) -> bool:
    if isinstance(v, Gradient):
        return len(v.knots) > 1
    return not isinstance(v, float) and any(_has_gradient(r.value) for r in v)


def _check_nm(entries: Sequence[ModelEntry], settings: Mapping[str, ParamValue]) -> None:
    """Scalar n:m settings can be checked now; filter lists are checked per tensor in the plan."""
    for e in entries:
        n = e.settings.get("n_val", settings.get("n_val", settings.get("default_n_val")))
        m = e.settings.get("m_val", settings.get("m_val", settings.get("default_m_val")))
        if n is None or m is None:
            raise RecipeError(f"{e.name}: cabs needs n_val and m_val (per model or globally)")
        if isinstance(n, float) and isinstance(m, float) and n > m:
            raise RecipeError(f"{e.name}: n_val must be between 0 and m_val ({m:g}), got {n:g}")


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and "path" in value:  # mergekit's object form {path, revision}
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where} must be a path to a model folder, got {value!r}")
    return value


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""``owner/name``: how a hub model is named (a relative path of two parts looks the same, so
this only adds a hint to a folder that was not found)."""


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
    elif _HUB_ID.fullmatch(ref) and not p.exists():
        hint = (
            "; it looks like a Hugging Face hub id, and streammerge reads local folders only "
            f"(it never downloads): fetch it first with `huggingface-cli download {ref} "
            f"--local-dir DIR` and give DIR"
        )
    raise RecipeError(f"{where}: model folder {ref!r} not found (looked in {looked}){hint}")


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
