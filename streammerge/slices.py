"""mergekit's ``slices:`` recipes: the output's layers as a concatenation of input layer ranges.

A ``slices:`` recipe lists output slices; each has ``sources`` (a ``model`` and a
``layer_range: [start, end)`` each, all of the same length), optionally its own ``base_model``
and ``parameters``. Output layer ``j`` is the ``j``-th layer of the concatenation: its tensors
are read from every source's layer ``start + i`` (``i``: ``j``'s position in its slice) and
merged by the recipe's method. ``passthrough`` with one source per slice stacks layers
(a "frankenmerge").

The engine is not told about slices. :func:`open_inputs` gives it one :class:`SlicedFolder`
per input role (the base, then each task-model slot): a read-only view that answers an
*output* tensor name with the input file and tensor the slices name. So the plan is still a
deterministic function of headers, recipe and budget, and chunking, the journal, resume and
checksums work unchanged.

mergekit's rules (0.1.5: ``plan.py``, ``config.py``, ``merge.py``), kept here:

- output layers are numbered by their position in the concatenation;
- gradients restart in each slice: a layer's ``t`` is ``i / (n - 1)`` in a slice of ``n``
  layers (1 in a one-layer slice); embeddings, final norm and lm_head sit at ``t = 0``;
- embeddings (pre-weights) come from the first slice's sources, with that slice's parameters;
  the final norm and lm_head (post-weights) from the last slice's;
- parameters: the source's own, then the slice's, then the top level (method-level parameters
  skip the source level). Per-model filters match the *input* tensor name (the source's
  ``model.layers.23.mlp...``), method-level filters the output name;
- the base of a slice is its ``base_model``, else the top-level one; a method that needs a
  base needs it among the slice's sources; other methods (linear, karcher, passthrough) use
  every source as a model and ignore the base;
- ``config.json`` is the top-level ``base_model``'s, else (mergekit takes one from a set, so
  varies between runs) the first slice's first source's; its layer count becomes the sum of
  the slice lengths.

streammerge's own rules: every slice has the same number of task models (the engine's model
slots; the card and the summary name slot ``k`` after the model(s) that fill it); a model may
appear once per slice; a non-layer tensor is a pre-weight when its name has an embedding
segment (``embed_tokens``, ``wte``, ``word_embeddings``...), else a post-weight; per-layer
lists in ``config.json`` (``layer_types``) follow the slices. TADrop, ``pruning_order`` and
remix/add are not supported with slices.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError, RecipeError
from .methods.base import MethodOptions, ModelParams
from .methods.spec import MethodSpec, Param
from .model import ModelFolder
from .params import ParamValue, evaluate, layer_index, num_layers, with_layer_index
from .safetensors_io import SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    from .recipe import Recipe

SLICE_KEYS = frozenset({"sources", "base_model", "parameters", "residual_weight"})
SOURCE_KEYS = frozenset({"model", "layer_range", "parameters"})

_PRE = re.compile(
    r"(?:^|\.)(?:embed_tokens|embed_positions|embed_in|embeddings|word_embeddings"
    r"|tok_embeddings|wte|wpe)(?:\.|$)"
)
"""A non-layer tensor read with the first slice (mergekit's pre-weights); the others (final
norm, lm_head) are read with the last slice."""

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""config.json keys that hold the layer count (the first present is rewritten)."""


@dataclass(frozen=True, slots=True)
class SliceSource:
    """One source of a slice: layers ``[start, end)`` of one model."""

    name: str
    """The model reference as written in the recipe."""
    path: Path
    start: int
    end: int
    settings: Mapping[str, ParamValue] = field(default_factory=dict)
    """The source's own per-model parameters."""

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"layer_range [{self.start}, {self.end}] is empty or negative")

    def label(self) -> str:
        return f"{self.name}[{self.start}:{self.end}]"


@dataclass(frozen=True, slots=True)
class Slice:
    """One output slice: sources of equal length, the base among them or None (method
    without a base), and the slice's parameters."""

    sources: tuple[SliceSource, ...]
    base: int | None
    """Index into ``sources`` of the base; None when the method takes no base."""
    settings: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        if len({s.end - s.start for s in self.sources}) != 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        if self.base is not None and not 0 <= self.base < len(self.sources):
            raise ValueError(f"base index {self.base} is not a source")

    @property
    def length(self) -> int:
        """Layers this slice contributes to the output."""
        return self.sources[0].end - self.sources[0].start

    def models(self) -> tuple[SliceSource, ...]:
        """The task models in source order (every source when the method takes no base)."""
        return tuple(s for i, s in enumerate(self.sources) if i != self.base)

    def roles(self) -> tuple[SliceSource, ...]:
        """The base role (the first source when there is no base), then each model slot."""
        return (self.sources[0 if self.base is None else self.base], *self.models())


@dataclass(frozen=True, slots=True)
class SliceLayout:
    """The validated ``slices:`` of a recipe."""

    slices: tuple[Slice, ...]

    def __post_init__(self) -> None:
        if not self.slices:
            raise ValueError("'slices' needs at least one slice")
        if len({len(s.models()) for s in self.slices}) != 1:
            raise ValueError("every slice must have the same number of models")

    @property
    def num_layers(self) -> int:
        """Layers of the output: the sum of the slice lengths."""
        return sum(s.length for s in self.slices)

    @property
    def slots(self) -> int:
        """Task models per slice."""
        return len(self.slices[0].models())

    def slot_names(self) -> list[str]:
        """A name per model slot: the model that fills it, or the models joined by ``+``."""
        out = []
        for k in range(self.slots):
            names = list(dict.fromkeys(s.models()[k].name for s in self.slices))
            out.append(" + ".join(names))
        return out

    def describe(self) -> list[str]:
        """One line per slice: the output layers and where they come from."""
        lines, j = [], 0
        for i, s in enumerate(self.slices):
            srcs = ", ".join(
                src.label() + (" (base)" if n == s.base else "") for n, src in enumerate(s.sources)
            )
            lines.append(f"slice {i}: output layers {j}-{j + s.length - 1} <- {srcs}")
            j += s.length
        return lines


# --------------------------------------------------------------------------------------------
# Parsing


def parse_slices(
    raw: Any,
    base_ref: str | None,
    spec: MethodSpec,
    *,
    resolve_model: Callable[[str, str], Path],
    model_ref: Callable[[Any, str], str],
    setting: Callable[[Param, str, Any, str], ParamValue],
    check_count: Callable[[MethodSpec, int], None],
    global_settings: Mapping[str, ParamValue],
    warnings: list[str],
) -> SliceLayout:
    """Validate a recipe's ``slices:`` (the YAML value) for method ``spec``.

    ``base_ref`` is the top-level ``base_model`` as written; the callables are the recipe
    module's (model paths, references, parameter values and model counts are checked as for
    ``models:``). Layer ranges are checked against the models' headers when they are opened.
    """
    if not isinstance(raw, list) or not raw:
        raise RecipeError("'slices' must be a non-empty list")
    out = []
    for i, item in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{where} must be a mapping with 'sources'")
        _string_keys(item, where)
        extra = sorted(set(item) - SLICE_KEYS)
        if extra:
            warnings.append(f"{where}: unknown keys ignored: {', '.join(extra)}")
        if "residual_weight" in item:
            warnings.append(f"{where}: residual_weight ignored (mergekit does not use it either)")
        own = _slice_settings(item.get("parameters"), spec, setting, where, warnings)
        sources = _sources(item.get("sources"), spec, where, resolve_model, model_ref, setting,
                           warnings)  # fmt: skip
        lengths = {s.end - s.start for s in sources}
        if len(lengths) > 1:
            spans = ", ".join(f"{s.name} {s.end - s.start}" for s in sources)
            raise RecipeError(
                f"{where}: all sources of a slice must span the same number of layers ({spans})"
            )
        paths = [s.path for s in sources]
        for a in range(len(paths)):
            if paths[a] in paths[:a]:
                raise RecipeError(f"{where}: model {sources[a].name} is listed twice")
        base = None
        ref = item.get("base_model", base_ref)
        if spec.needs_base:
            if ref is None:
                raise RecipeError(f"{where}: {spec.name} needs a base_model (top level or slice)")
            path = resolve_model(model_ref(ref, f"{where}.base_model"), f"{where}.base_model")
            if path not in paths:
                raise RecipeError(
                    f"{where}: base_model {ref} must be one of the slice's sources "
                    "(as in mergekit), with its layer_range"
                )
            base = paths.index(path)
        elif "base_model" in item:
            warnings.append(f"{where}: base_model ignored ({spec.name} takes no base)")
        s = Slice(sources, base, own)
        try:
            check_count(spec, len(s.models()))
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
        for src in s.models():
            for p in spec.params:
                if p.required and p.per_model and not _has(p, src.settings, own, global_settings):
                    raise RecipeError(f"{where} ({src.name}): {spec.name} needs a '{p.name}'")
        for p in spec.params:
            if p.required and not p.per_model and not _has(p, own, global_settings):
                raise RecipeError(
                    f"{where}: {spec.name} needs a '{p.name}' under the slice's or the "
                    "top-level parameters (a number or a gradient)"
                )
        out.append(s)
    counts = [len(s.models()) for s in out]
    if len(set(counts)) > 1:
        raise RecipeError(
            "every slice must have the same number of models besides its base "
            f"(streammerge merges a fixed set of model slots), got {counts}"
        )
    return SliceLayout(tuple(out))


def _has(p: Param, *levels: Mapping[str, ParamValue]) -> bool:
    return any(n in lv for lv in levels for n in (p.name, *p.aliases))


def _string_keys(mapping: Mapping[Any, Any], where: str) -> None:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{where}: keys must be names, got {bad[0]!r}")


def _slice_settings(
    raw: Any,
    spec: MethodSpec,
    setting: Callable[[Param, str, Any, str], ParamValue],
    where: str,
    warnings: list[str],
) -> dict[str, ParamValue]:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}.parameters must be a mapping")
    _string_keys(raw, f"{where}.parameters")
    unknown = sorted(k for k in raw if spec.param(k) is None)
    if unknown:
        warnings.append(
            f"{where}: parameters not used by {spec.name}, ignored: {', '.join(unknown)}"
        )
    out = {}
    for key, value in raw.items():
        param = spec.param(key)
        if param is None:
            continue
        if param.kind == "choice":
            raise RecipeError(
                f"{where}.parameters.{key}: set it under the top-level parameters "
                "(it applies to the whole merge)"
            )
        out[key] = setting(param, key, value, f"{where}.parameters")
    return out


def _sources(
    raw: Any,
    spec: MethodSpec,
    where: str,
    resolve_model: Callable[[str, str], Path],
    model_ref: Callable[[Any, str], str],
    setting: Callable[[Param, str, Any, str], ParamValue],
    warnings: list[str],
) -> tuple[SliceSource, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{where}.sources must be a non-empty list")
    out = []
    for j, item in enumerate(raw):
        at = f"{where}.sources[{j}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{at} must be a mapping with 'model' and 'layer_range'")
        _string_keys(item, at)
        extra = sorted(set(item) - SOURCE_KEYS)
        if extra:
            warnings.append(f"{at}: unknown keys ignored: {', '.join(extra)}")
        ref = model_ref(item.get("model"), f"{at}.model")
        start, end = _layer_range(item.get("layer_range"), f"{at} ({ref})")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{at}.parameters must be a mapping")
        _string_keys(params, f"{at}.parameters")
        per_model = spec.per_model
        ignored = sorted(set(params) - per_model)
        if ignored:
            warnings.append(
                f"{at} ({ref}): parameters not read per model by {spec.name}, ignored: "
                f"{', '.join(ignored)} (mergekit reads them from the slice or the top level)"
            )
        own = {
            k: setting(spec.param(k), k, v, f"{at} ({ref})")  # type: ignore[arg-type]
            for k, v in params.items()
            if k in per_model
        }
        path = resolve_model(ref, f"{at}.model")
        out.append(SliceSource(ref, path, start, end, own))
    return tuple(out)


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise RecipeError(
            f"{where}: layer_range must be two integers [start, end) (end excluded), got {value!r}"
        )
    start, end = value
    if not 0 <= start < end:
        raise RecipeError(
            f"{where}: layer_range [{start}, {end}] must satisfy 0 <= start < end (end excluded)"
        )
    return start, end


# --------------------------------------------------------------------------------------------
# Routes: where each output tensor comes from


@dataclass(frozen=True, slots=True)
class Route:
    """Where one output tensor is read: its slice, gradient position, and per role (the base,
    then each model slot) the source and the input tensor name."""

    slice: int
    t: float
    inputs: tuple[tuple[SliceSource, str], ...]


def _routes(
    layout: SliceLayout, folders: Mapping[Path, ModelFolder]
) -> tuple[list[str], dict[str, Route]]:
    """Output tensor names in output order (pre-weights, layers, post-weights) and the route
    of each; InputError naming the file and tensor for every source that cannot supply one."""
    layers: dict[Path, dict[int, list[str]]] = {}
    for path, f in folders.items():
        by_layer: dict[int, list[str]] = {}
        for n in f.names():
            i = layer_index(n)
            if i is not None:
                by_layer.setdefault(i, []).append(n)
        layers[path] = by_layer
    problems: list[str] = []
    for si, s in enumerate(layout.slices):
        for j, src in enumerate(s.sources):
            have = num_layers(folders[src.path].names())
            if src.end > have:
                problems.append(
                    f"slices[{si}].sources[{j}] ({src.name}): layer_range [{src.start}, "
                    f"{src.end}] is outside the model's {have} layers ({src.path})"
                )
    if problems:
        raise InputError("; ".join(problems))

    first, last = layout.slices[0], layout.slices[-1]
    layout_model = folders[first.roles()[0].path]
    outer = [n for n in layout_model.names() if layer_index(n) is None]
    order: list[str] = []
    routes: dict[str, Route] = {}
    for n in outer:
        if _PRE.search(n):
            order.append(n)
            routes[n] = Route(0, 0.0, tuple((src, n) for src in first.roles()))
    j = 0
    for si, s in enumerate(layout.slices):
        roles = s.roles()
        for i in range(s.length):
            t = i / (s.length - 1) if s.length > 1 else 1.0
            lead = roles[0]
            names = layers[lead.path].get(lead.start + i, [])
            want = {with_layer_index(n, 0) for n in names}
            for src in roles[1:]:
                got = {with_layer_index(n, 0) for n in layers[src.path].get(src.start + i, [])}
                if got != want:
                    diff = sorted(want ^ got)[:3]
                    problems.append(
                        f"{src.path}: layer {src.start + i} (slices[{si}], {src.name}) does not "
                        f"have the tensors of layer {lead.start + i} of {lead.name} "
                        f"(differ: {', '.join(diff)})"
                    )
            for n in names:
                out = with_layer_index(n, j)
                inputs = tuple((src, with_layer_index(n, src.start + i)) for src in roles)
                order.append(out)
                routes[out] = Route(si, t, inputs)
            j += 1
    for n in outer:
        if not _PRE.search(n):
            order.append(n)
            routes[n] = Route(len(layout.slices) - 1, 0.0, tuple((src, n) for src in last.roles()))
    for out in order:
        problems += _check_route(out, routes[out], folders)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] * (len(problems) > 20))
        raise InputError(f"slices do not fit the models ({len(problems)} problems): "
                         + "; ".join(shown))  # fmt: skip
    return order, routes


def _check_route(out: str, route: Route, folders: Mapping[Path, ModelFolder]) -> list[str]:
    """Every role has the input tensor, with the first role's shape and kind of dtype."""
    problems = []
    infos: list[TensorInfo] = []
    for src, name in route.inputs:
        f = folders[src.path]
        if name not in f.where:
            problems.append(f"{src.path}: tensor {name!r} is missing (needed for {out!r})")
            continue
        infos.append(f.info(name))
    if problems:
        return problems
    lead = infos[0]
    for (src, name), info in zip(route.inputs[1:], infos[1:], strict=True):
        if info.shape != lead.shape:
            problems.append(
                f"{folders[src.path].file_of(name)}: tensor {name!r} has shape "
                f"{list(info.shape)}, {route.inputs[0][1]!r} of {route.inputs[0][0].name} "
                f"has {list(lead.shape)}"
            )
        elif info.is_float != lead.is_float or (not lead.is_float and info.dtype != lead.dtype):
            problems.append(
                f"{folders[src.path].file_of(name)}: tensor {name!r} has dtype {info.dtype}, "
                f"{route.inputs[0][0].name} has {lead.dtype}"
            )
    return problems


class SlicedFolder:
    """One input role of a slices merge (the base, or model slot ``k``), read by *output*
    tensor name: duck-types :class:`~streammerge.model.ModelFolder` for the engine.

    Nothing is opened here; the underlying folders belong to whoever opened them.
    """

    def __init__(
        self,
        label: str,
        role: int,
        order: Sequence[str],
        routes: Mapping[str, Route],
        folders: Mapping[Path, ModelFolder],
    ) -> None:
        self.path = Path(label)
        self.role = role
        self.routes = routes
        self._order = list(order)
        self._table = {
            out: (folders[r.inputs[role][0].path], r.inputs[role][1]) for out, r in routes.items()
        }
        self.where: dict[str, SafetensorsFile] = {
            out: f.where[n] for out, (f, n) in self._table.items()
        }
        self.real = list({id(f): f for f, _ in self._table.values()}.values())
        """The model folders this role reads."""
        self.files = {str(sf.path): sf for f in self.real for sf in f.files.values()}

    def names(self) -> list[str]:
        """Output tensor names in output order."""
        return list(self._order)

    def source(self, name: str) -> tuple[ModelFolder, str]:
        """The folder and input tensor name behind output tensor ``name``."""
        return self._table[name]

    def info(self, name: str) -> TensorInfo:
        f, n = self._table[name]
        return f.info(n)

    def file_of(self, name: str) -> Path:
        f, n = self._table[name]
        return f.file_of(n)

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        f, n = self._table[name]
        return f.read(n, start, end)

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        f, n = self._table[name]
        return f.read_bytes(n, start, end)

    def preload(self, name: str, start: int, end: int, buf: bytearray) -> None:
        f, n = self._table[name]
        f.preload(n, start, end, buf)

    def release(self, name: str, start: int, end: int) -> None:
        f, n = self._table[name]
        f.release(n, start, end)

    def fingerprint(self) -> list[tuple[str, int, int, str]]:
        return [x for f in self.real for x in f.fingerprint()]

    def close(self) -> None:
        """Nothing to close: the model folders are closed by whoever opened them."""


def open_inputs(recipe: Recipe, stack: ExitStack) -> tuple[SlicedFolder, list[SlicedFolder]]:
    """Open every model the slices read (closed with ``stack``) and return the base role and
    one folder per model slot, all read by output tensor name. Checks every layer range and
    every route against the headers first (InputError naming the file and tensor)."""
    layout = recipe.slices
    assert layout is not None
    folders: dict[Path, ModelFolder] = {}
    for s in layout.slices:
        for src in s.sources:
            if src.path not in folders:
                folders[src.path] = stack.enter_context(closing(ModelFolder(src.path)))
    order, routes = _routes(layout, folders)
    names = ["base", *(f"slot {k + 1}" for k in range(layout.slots))]
    roles = [SlicedFolder(f"slices:{n}", r, order, routes, folders) for r, n in enumerate(names)]
    return roles[0], roles[1:]


def real_folders(folders: Sequence[Any]) -> list[ModelFolder]:
    """The model folders behind a list of folders (sliced roles unwrapped; each once, in
    first-use order): what a plan digest fingerprints."""
    out: dict[str, ModelFolder] = {}
    for f in folders:
        for r in f.real if isinstance(f, SlicedFolder) else [f]:
            out.setdefault(r.ref, r)
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Parameters


def _first(name: str, levels: Sequence[Mapping[str, ParamValue]], tensor: str, t: float
           ) -> float | None:  # fmt: skip
    for lv in levels:
        if name in lv:
            x = evaluate(lv[name], tensor, t)
            if x is not None:
                return x
    return None


def tensor_params(
    recipe: Recipe, route: Route, name: str
) -> tuple[tuple[ModelParams, ...], MethodOptions]:
    """Every model slot's parameters and the method options for output tensor ``name``
    (mergekit's precedence: source, slice, top level; see the module docstring)."""
    layout = recipe.slices
    assert layout is not None
    s = layout.slices[route.slice]
    impl, t = recipe.impl, route.t
    params = []
    for src, in_name in route.inputs[1:]:
        values: dict[str, float | str | None] = {}
        for p in impl.spec.params:
            if not p.per_model:
                continue
            x = _first(p.name, (src.settings, s.settings, recipe.settings), in_name, t)
            for alias in p.aliases:
                if x is None:
                    x = _first(alias, (s.settings, recipe.settings), in_name, t)
            if x is None and p.required:
                raise RecipeError(
                    f"missing parameter {p.name!r} for model {src.name}, tensor {in_name}"
                )
            values[p.name] = p.default if x is None else x
        try:
            params.append(impl.model_params(values))
        except ValueError as err:
            raise RecipeError(f"model {src.name}, tensor {in_name}: {err}") from None
    options: dict[str, float | str | None] = {}
    for p in impl.spec.params:
        if p.per_model:
            continue
        if p.kind == "choice":
            options[p.name] = recipe.strings.get(p.name, p.default)
            continue
        x = _first(p.name, (s.settings, recipe.settings), name, t)
        if x is None and p.required:
            raise RecipeError(f"missing parameter {p.name!r} for tensor {name}")
        options[p.name] = p.default if x is None else x
    return tuple(params), impl.options(options)


# --------------------------------------------------------------------------------------------
# config.json


def output_config(recipe: Recipe, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (the base's config.json) with the layer count of the slices, and every
    per-layer list (a list as long as the base's layer count, e.g. ``layer_types``) rebuilt
    from each output layer's source: the source's own config list when it has one of its
    length, else the base's."""
    layout = recipe.slices
    assert layout is not None
    key = next((k for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)), LAYER_COUNT_KEYS[0])
    have = cfg.get(key)
    out = dict(cfg)
    out[key] = layout.num_layers
    if not isinstance(have, int):
        return out
    per_layer = [k for k, v in cfg.items() if isinstance(v, list) and len(v) == have and have]
    own = {p: _config_of(p) for p in {src.path for s in layout.slices for src in s.sources}}
    for k in per_layer:
        values = []
        for s in layout.slices:
            src = s.roles()[0]
            theirs = own[src.path]
            n = theirs.get(key)
            lst = theirs.get(k) if isinstance(n, int) else None
            if not (isinstance(lst, list) and len(lst) == n and src.end <= n):
                lst = cfg[k]
            if src.end > len(lst):
                raise InputError(
                    f"{src.path}: config key {k!r} has no entry for layers {src.start}-"
                    f"{src.end - 1} ({src.name})"
                )
            values += lst[src.start : src.end]
        out[k] = values
    return out


def _config_of(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def input_paths(recipe: Recipe) -> list[Path]:
    """Every folder a merge of ``recipe`` reads, the base (config donor) first."""
    if recipe.slices is None:
        return [recipe.base, *(m.path for m in recipe.models)]
    paths = [recipe.base, *(src.path for s in recipe.slices.slices for src in s.sources)]
    return list(dict.fromkeys(paths))
