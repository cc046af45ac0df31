"""Recipes: mergekit-style YAML in, a validated frozen :class:`Recipe` out.

We accept what mergekit users already write (``merge_method``, ``base_model``,
``models: [{model: PATH, parameters: {weight: ...}}]``, global ``parameters``, ``dtype``,
``out_dtype``) plus CABS's keys (``n_val``/``m_val`` globally or per model, a top-level
``pruning_order``), ``exclude`` (regexes of tensors taken from the base unmerged) and the
tokenizer keys (``tokenizer_source``, ``tokenizer:``, ``chat_template``; see
:mod:`streammerge.tokenizer`). Every numeric parameter may be a scalar, a gradient over layers
or a filter list (mergekit's forms, see :mod:`streammerge.params`), resolved per tensor when
the merge is planned.

Unlike mergekit, unknown keys are reported (mergekit drops them silently, a frequent source of
"my setting did nothing"). Invalid values fail here, before any input is opened, or, for
per-tensor combinations (n > m under some filter), when the plan is built, still before any
tensor data is read.

Relative model paths are resolved against the current directory, as mergekit does, and
failing that against the recipe's folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import RecipeError
from .lora import split_ref
from .methods import MERGEKIT_METHODS, METHODS
from .methods.base import Method, MethodOptions, ModelParams
from .methods.spec import MethodSpec, Param
from .params import Gradient, ParamValue, parse_value, resolve
from .slices import SliceLayout, parse_slices
from .tokenizer import TokenizerConfig, parse_tokenizer

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

TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
             "out_dtype", "compute_dtype", "pruning_order", "exclude", "tokenizer_source",
             "tokenizer", "chat_template"}  # fmt: skip
IGNORED_MERGEKIT = {"name"}
UNSUPPORTED_MERGEKIT = {"modules"}


def _method(name: object) -> Method:
    from difflib import get_close_matches

    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    ours = ", ".join(sorted(METHODS))
    if not isinstance(name, str):
        raise RecipeError(f"merge_method must be a method name (one of {ours}), got {name!r}")
    if name in MERGEKIT_METHODS:
        raise RecipeError(
            f"merge_method {name!r} is a mergekit method that streammerge does not implement"
            f" (streammerge has: {ours})"
        )
    known = sorted(set(METHODS) | MERGEKIT_METHODS)
    folded = name.strip().lower().replace("-", "_").replace(" ", "_")  # "TIES", "Dare-Ties"
    if folded in known:
        close = [folded]
    else:
        close = get_close_matches(name, known, n=3) or get_close_matches(folded, known, n=3)
    hints = [repr(m) if m in METHODS else f"{m!r} (mergekit's, not in streammerge)" for m in close]
    guess = f"; did you mean {' or '.join(hints)}?" if hints else ""
    raise RecipeError(
        f"merge_method {name!r} is neither a streammerge nor a mergekit method{guess}"
        f" (streammerge has: {ours})"
    )


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One task model of the recipe."""

    name: str
    """The model reference as written in the recipe."""
    path: Path
    """Resolved folder."""
    settings: Mapping[str, ParamValue] = field(default_factory=dict)
    """The model's own parameters (scalars, gradients or filter lists)."""
    adapter: Path | None = None
    """Resolved LoRA adapter folder (``model: MODEL+ADAPTER``, :mod:`streammerge.lora`)."""


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
    """Compute dtype (``compute_dtype``; see :func:`dtypes`), not the YAML's ``dtype``."""
    out_dtype: torch.dtype | None = None
    """Output dtype (``out_dtype``, else ``dtype``); None keeps each tensor's base dtype."""
    exclude: tuple[str, ...] = ()
    """Regexes (``re.search``) of tensor names copied from the base instead of merged."""
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """The recipe as parsed from YAML, for provenance (stored in the occupancy store)."""
    warnings: tuple[str, ...] = ()
    text: str = field(default="", compare=False)
    """The recipe file's text as written ("" when parsed from a mapping), for the model card."""
    tokenizer: TokenizerConfig | None = None
    """``tokenizer_source`` / ``tokenizer:`` / ``chat_template`` (None: the base's files)."""
    slices: SliceLayout | None = None
    """A ``slices:`` recipe's layout (:mod:`streammerge.slices`); then ``models`` holds one
    entry per model slot and ``base`` is the folder giving config.json and tokenizer."""
    base_adapter: Path | None = None
    """The base's LoRA adapter folder (``base_model: MODEL+ADAPTER``), if any."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"unknown merge_method {self.method!r}")
        if not self.models:
            raise RecipeError("the recipe needs at least one model besides the base")

    def excluded(self, tensor: str) -> bool:
        return any(re.search(p, tensor) for p in self.exclude)

    @property
    def impl(self) -> Method:
        """The merge method (its spec and its math)."""
        return METHODS[self.method]

    def model_params(self, k: int, tensor: str, t: float) -> ModelParams:
        """Model k's parameters for one tensor at layer position ``t`` (mergekit's rules).

        ValueError for a combination the method refuses (n > m under some filter)."""
        if self.slices is not None:  # the slot's source and slice decide, not one model entry
            raise RecipeError("slices: parameters come from streammerge.slices.tensor_params")
        e = self.models[k]
        values: dict[str, float | str | None] = {}
        for p in self.impl.spec.params:
            if not p.per_model:
                continue
            x = resolve(p.name, e.settings, self.settings, tensor, t)
            for alias in p.aliases:
                if x is None:
                    x = resolve(alias, {}, self.settings, tensor, t)
            if x is None and p.required:
                raise RecipeError(
                    f"missing parameter {p.name!r} for model {e.name}, tensor {tensor}"
                )
            values[p.name] = p.default if x is None else x
        try:
            return self.impl.model_params(values)
        except ValueError as err:
            raise RecipeError(f"model {e.name}, tensor {tensor}: {err}") from None

    def options(self, tensor: str, t: float) -> MethodOptions:
        """Method-level options for one tensor."""
        values: dict[str, float | str | None] = {}
        for p in self.impl.spec.params:
            if p.per_model:
                continue
            if p.kind == "choice":
                values[p.name] = self.strings.get(p.name, p.default)
                continue
            x = resolve(p.name, {}, self.settings, tensor, t, global_only=True)
            if x is None and p.required:
                raise RecipeError(f"missing parameter {p.name!r} for tensor {tensor}")
            values[p.name] = p.default if x is None else x
        return self.impl.options(values)

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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: ``line L, column C: invalid YAML: what (while what)``, 1-based as editors
    count (PyYAML's message spreads over several lines, the position on the last ones)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    what = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"invalid YAML: {what}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {what}"


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
        raise RecipeError(f"{path}: {_yaml_problem(e)}") from e
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    try:
        recipe = parse_recipe(doc, path.parent)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    warnings = tuple(_with_line(w, path, text) for w in recipe.warnings)
    return replace(recipe, text=text, warnings=warnings)


_IGNORED_RULE_KEY = re.compile(r"mergekit ignores '(\w+): (.*?)' in a filter rule")


def _with_line(warning: str, path: Path, text: str) -> str:
    """Prefix a warning about a filter-rule key mergekit ignores with the file and the line
    that key is on, when exactly one line of ``text`` holds that key and value."""
    m = _IGNORED_RULE_KEY.search(warning)
    if m is None:
        return warning
    key, value = (re.escape(g) for g in m.groups())
    line = re.compile(rf"^\s*(?:-\s+)?{key}\s*:\s*(['\"]?){value}\1\s*(?:#.*)?$")
    hits = [i for i, t in enumerate(text.splitlines(), 1) if line.match(t)]
    return f"{path}: line {hits[0]}: {warning}" if len(hits) == 1 else warning


def parse_recipe(
    doc: Mapping[str, Any], recipe_dir: Path = Path("."), *, require_models: bool = True
) -> Recipe:
    """Validate a parsed recipe mapping; ``recipe_dir`` anchors relative paths as a fallback.

    ``require_models=False`` accepts task-model folders that do not exist (absolute paths are
    taken as they are): ``streammerge add`` replays a merge whose fine-tunes it never reads.
    """
    warnings: list[str] = []
    _string_keys(doc, "the recipe")
    for key in UNSUPPORTED_MERGEKIT & set(doc):
        raise RecipeError(f"'{key}:' recipes are not supported; use 'models:' or 'slices:'")
    if "slices" in doc and "models" in doc:
        raise RecipeError("give either 'models:' or 'slices:', not both (as mergekit requires)")
    unknown = sorted(set(doc) - TOP_LEVEL - IGNORED_MERGEKIT)
    if unknown:
        warnings.append(f"unknown recipe keys ignored: {', '.join(unknown)}")
    ignored = sorted(set(doc) & IGNORED_MERGEKIT)
    if ignored:
        warnings.append(f"keys ignored: {', '.join(ignored)}")

    impl = _method(doc.get("merge_method"))
    spec = impl.spec
    method = spec.name
    per_model, global_only = spec.per_model, spec.global_only
    gparams = doc.get("parameters") or {}
    if not isinstance(gparams, dict):
        raise RecipeError("'parameters' must be a mapping")
    _string_keys(gparams, "parameters")
    unknown = sorted(set(gparams) - per_model - global_only)
    if unknown:
        warnings.append(f"parameters not used by {method}, ignored: {', '.join(unknown)}")
    strings = {}
    settings = {}
    for key, value in gparams.items():
        param = spec.param(key)
        if param is None:
            continue
        if param.kind == "choice":
            if value not in param.choices:
                raise RecipeError(
                    f"parameters.{key} must be one of {list(param.choices)}, got {value!r}"
                )
            strings[key] = value
        else:
            settings[key] = _setting(param, key, value, "parameters", warnings)
    if "slices" in doc:
        return _sliced_recipe(doc, impl, recipe_dir, settings, strings, warnings)
    # mergekit's optional base (nuslerp, multislerp): without base_model the models themselves
    # are interpolated, which is streammerge's ignore_base with the first model for the layout
    baseless = "base_model" not in doc and spec.param("ignore_base") is not None
    if baseless:
        settings["ignore_base"] = 1.0
    if "base_model" not in doc and not ((baseless or not spec.needs_base) and doc.get("models")):
        raise RecipeError(f"{method} needs a base_model")
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise RecipeError("'models' must be a non-empty list")
    # without a base (linear) the first model provides the config and the tensor layout
    first = raw_models[0].get("model") if isinstance(raw_models[0], dict) else raw_models[0]
    base_ref = _model_ref(doc.get("base_model", first), "base_model")
    base, base_adapter = _resolve_model(base_ref, recipe_dir, "base_model")
    for param in spec.params:
        if param.required and not param.per_model and param.name not in settings:
            raise RecipeError(
                f"{method} needs a '{param.name}' under parameters (a number or a gradient)"
            )

    entries: list[ModelEntry] = []
    for i, item in enumerate(raw_models):
        where = f"models[{i}]"
        if isinstance(item, dict):
            _string_keys(item, where)
            extra = sorted(set(item) - {"model", "parameters"})
            if extra:
                warnings.append(f"{where}: unknown keys ignored: {', '.join(extra)}")
            ref = _model_ref(item.get("model"), f"{where}.model")
            mparams = item.get("parameters") or {}
        else:
            ref, mparams = _model_ref(item, where), {}
        if not isinstance(mparams, dict):
            raise RecipeError(f"{where}.parameters must be a mapping")
        _string_keys(mparams, f"{where}.parameters")
        adapter = None
        if require_models or not Path(ref).expanduser().is_absolute():
            path, adapter = _resolve_model(ref, recipe_dir, f"{where}.model")
        else:
            path = Path(ref).expanduser().resolve()
        if (path, adapter) == (base, base_adapter) and spec.needs_base and not baseless:
            continue  # mergekit habit: the base listed among the models is the base, not a task
        unknown = sorted(set(mparams) - per_model)
        if unknown:
            warnings.append(
                f"{where} ({ref}): parameters not used by {method}, ignored: {', '.join(unknown)}"
            )
        own = {
            k: _setting(spec.param(k), k, v, f"{where} ({ref})", warnings)  # type: ignore[arg-type]
            for k, v in mparams.items()
            if k in per_model
        }
        for param in spec.params:
            if param.required and param.per_model and param.name not in own | settings:
                raise RecipeError(f"{where} ({ref}): {method} needs a '{param.name}'")
        entries.append(ModelEntry(ref, path, own, adapter))
    key = [(e.path, e.adapter) for e in entries]
    if spec.base_as_model and "base_model" in doc and (base, base_adapter) not in key:
        # mergekit adds the base to the inputs, last
        entries.append(ModelEntry(base_ref, base, {}, base_adapter))
        key.append((base, base_adapter))
    if any(key[i] == key[j] for i in range(len(entries)) for j in range(i)):
        raise RecipeError("a model is listed twice under 'models'")
    _check_model_count(spec, len(entries))
    for e in entries:
        _check_scalar_params(impl, e, settings)

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

    def model_index(ref: Any, where: str) -> int:
        """Input index of a model reference (0: the base) for the tokenizer keys."""
        got = _resolve_model(_model_ref(ref, where), recipe_dir, where)
        if got == (base, base_adapter):
            return 0
        for k, e in enumerate(entries):
            if (e.path, e.adapter) == got:
                return k + 1
        raise RecipeError(f"{where}: {ref!r} is not the base_model or one of the models")

    tokenizer = parse_tokenizer(doc, model_index)
    compute, out_dtype = dtypes(doc)
    return Recipe(
        method=method,
        base=base,
        models=tuple(entries),
        tokenizer=tokenizer,
        settings=settings,
        strings=strings,
        dtype=compute,
        out_dtype=out_dtype,
        exclude=tuple(exclude),
        source=dict(doc),
        warnings=tuple(warnings),
        base_adapter=base_adapter,
    )


def _sliced_recipe(
    doc: Mapping[str, Any],
    impl: Method,
    recipe_dir: Path,
    settings: dict[str, ParamValue],
    strings: dict[str, str],
    warnings: list[str],
) -> Recipe:
    """A ``slices:`` recipe (:mod:`streammerge.slices`): ``models`` are the model slots, the
    base is the top-level ``base_model`` or else the first slice's first source."""
    for key in ("pruning_order", "exclude", "tokenizer_source", "tokenizer", "chat_template"):
        if doc.get(key):
            raise RecipeError(f"'{key}' is not supported with 'slices:' yet")
    base_ref = doc.get("base_model")
    base_ref = None if base_ref is None else _model_ref(base_ref, "base_model")
    layout = parse_slices(
        doc["slices"],
        base_ref,
        impl.spec,
        resolve_model=lambda ref, where: _resolve(ref, recipe_dir, where),
        model_ref=_model_ref,
        setting=partial(_setting, notes=warnings),
        check_count=_check_model_count,
        global_settings=settings,
        warnings=warnings,
    )
    if base_ref is not None:
        base = _resolve(base_ref, recipe_dir, "base_model")
    else:
        base = layout.slices[0].sources[0].path
    slots = tuple(
        ModelEntry(name, layout.slices[0].models()[k].path)
        for k, name in enumerate(layout.slot_names())
    )
    compute, out_dtype = dtypes(doc)
    recipe = Recipe(
        method=impl.spec.name,
        base=base,
        models=slots,
        settings=settings,
        strings=strings,
        dtype=compute,
        out_dtype=out_dtype,
        source=dict(doc),
        warnings=tuple(warnings),
        slices=layout,
    )
    if recipe.tadrop:
        raise RecipeError("TADrop ('tadrop') is not supported with 'slices:'")
    return recipe


def _string_keys(mapping: Mapping[Any, Any], where: str) -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{where}: keys must be names, got {bad[0]!r}")


def _setting(
    param: Param, name: str, value: Any, where: str, notes: list[str] | None = None
) -> ParamValue:
    """Parse one numeric parameter (written as ``name``, the parameter or one of its aliases)
    and check every value it can take against the method's declared range; warnings go to
    ``notes``."""
    parsed = parse_value(value, name, where, notes)
    if not param.gradient and _has_gradient(parsed):
        kind = "an integer" if param.kind == "int" else "a number"
        raise RecipeError(f"{where}: '{name}' must be {kind}, not a gradient")
    for x in _values(parsed):
        why = param.check(x)
        if why is not None:
            raise RecipeError(f"{where}: {why.replace(repr(param.name), repr(name), 1)}")
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


def _check_model_count(spec: MethodSpec, k: int) -> None:
    lo, hi = spec.min_models, spec.max_models
    if lo <= k and (hi is None or k <= hi):
        return
    words = {1: "one", 2: "two", 3: "three"}

    def models(n: int) -> str:
        return f"{words.get(n, n)} model{'s' if n > 1 else ''}"

    if hi == lo:
        want = f"exactly {models(lo)}"
    elif hi is None:
        want = f"at least {models(lo)}"
    else:
        want = f"{lo} to {hi} models"
    besides = " besides the base_model" if spec.needs_base else ""
    raise RecipeError(f"{spec.name} takes {want}{besides}, got {k}")


def _check_scalar_params(impl: Method, e: ModelEntry, settings: Mapping[str, ParamValue]) -> None:
    """Where every per-model value is one number, ask the method now whether it accepts them
    (n_val > m_val); per-tensor forms are checked per tensor when the plan is built."""
    values: dict[str, float | str | None] = {}
    for p in impl.spec.params:
        if not p.per_model:
            continue
        v = e.settings.get(p.name, settings.get(p.name))
        for alias in p.aliases:
            v = settings.get(alias) if v is None else v
        if v is not None and not isinstance(v, float):
            return
        values[p.name] = p.default if v is None else v
    try:
        impl.model_params(values)
    except ValueError as err:
        raise RecipeError(f"{e.name}: {err}") from None


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and "path" in value:  # mergekit's object form {path, revision}
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where} must be a path to a model folder, got {value!r}")
    return value


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""``owner/name``: how a hub model is named (a relative path of two parts looks the same, so
this only adds a hint to a folder that was not found)."""


def _resolve_model(ref: str, recipe_dir: Path, where: str) -> tuple[Path, Path | None]:
    """A ``models:``/``base_model:`` reference: a folder, or ``MODEL+ADAPTER`` (a PEFT LoRA
    adapter folder applied as the model streams, :mod:`streammerge.lora`)."""
    if "+" not in ref or _candidates(ref, recipe_dir)[1] is not None:
        return _resolve(ref, recipe_dir, where), None
    model, adapter = split_ref(ref)
    return (
        _resolve(model, recipe_dir, where),
        _resolve(adapter, recipe_dir, f"{where} (LoRA adapter of {model})"),
    )


def _candidates(ref: str, recipe_dir: Path) -> tuple[list[Path], Path | None]:
    """Where a relative reference may be (the current directory, then the recipe's folder),
    and the first that is a folder."""
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, recipe_dir / p]
    return candidates, next((c.resolve() for c in candidates if c.is_dir()), None)


def _resolve(ref: str, recipe_dir: Path, where: str) -> Path:
    p = Path(ref).expanduser()
    candidates, found = _candidates(ref, recipe_dir)
    if found is not None:
        return found
    looked = " or ".join(str(c) for c in candidates)
    hint = ""
    if "+" in ref or "@" in ref:
        hint = (
            "; revision ('@') references are not supported, and LoRA ('MODEL+ADAPTER') only "
            "under models: and base_model:; give a local folder"
        )
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


def dtypes(doc: Mapping[str, Any]) -> tuple[torch.dtype, torch.dtype | None]:
    """``(compute dtype, output dtype or None)`` of a recipe mapping.

    Output: mergekit's rule, ``out_dtype``, else ``dtype``, else (None) each tensor's dtype in
    the base. Compute: ``compute_dtype`` (streammerge's key) when written, else float64 if
    ``dtype`` asks for it (mergekit computes in ``dtype``), else float32: the arithmetic
    accumulates in float32 and rounds once to the output dtype, never in a 16-bit ``dtype``
    unless ``compute_dtype`` asks for that explicitly.
    """
    out_key = "out_dtype" if doc.get("out_dtype") is not None else "dtype"
    out = None if doc.get(out_key) is None else _dtype(doc[out_key], out_key)
    if doc.get("compute_dtype") is not None:
        return _dtype(doc["compute_dtype"], "compute_dtype"), out
    if doc.get("dtype") is not None and _dtype(doc["dtype"], "dtype") == torch.float64:
        return torch.float64, out
    return torch.float32, out


def _dtype(value: Any, where: str) -> torch.dtype:
    name = _DTYPE_ALIASES.get(str(value), str(value))
    if name not in DTYPES:
        raise RecipeError(f"{where} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[name]
