"""What a merge method declares about itself (mergekit's registry idea, typed).

A method's :class:`MethodSpec` is the only place that says which recipe parameters it takes
(per model or global, type, default, range, required), which statistics passes it runs and what
they reduce, what it can do (GPU, remix from stored masks, extension by one model, run without
a base) and what the model card shows. Recipe validation, ``plan``, the card, the device check,
remix/add and kernel warm-up read the spec; nothing outside ``methods/`` tests a method's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .base import MethodOptions, ModelParams

Kind = Literal["float", "int", "bool", "choice"]


@dataclass(frozen=True, slots=True)
class Param:
    """One recipe parameter of a method.

    ``per_model`` parameters are set under a model's ``parameters`` or, as the default of every
    model, under the top-level ``parameters`` (mergekit's precedence); the others are top-level
    only. Numeric values may be scalars, gradients or filter lists unless ``gradient`` is False.
    """

    name: str
    kind: Kind = "float"
    default: float | str | None = None
    """Used when the recipe gives no value; None: absent (the method decides)."""
    required: bool = False
    per_model: bool = True
    low: float | None = None
    """Smallest allowed value (inclusive)."""
    high: float | None = None
    """Largest allowed value (inclusive)."""
    choices: tuple[str, ...] = ()
    """Allowed strings (``kind="choice"``)."""
    aliases: tuple[str, ...] = ()
    """Top-level names that also set it (the CABS PR's ``default_n_val`` for ``n_val``)."""
    gradient: bool = True
    """Whether it may vary per layer (gradient or filter list)."""
    doc: str = ""

    def __post_init__(self) -> None:
        choices = (None, *self.choices)
        if self.kind == "choice" and (not self.choices or self.default not in choices):
            raise ValueError(f"parameter {self.name}: bad choices/default")
        if self.required and self.default is not None:
            raise ValueError(f"parameter {self.name}: required parameters take no default")

    def check(self, x: float) -> str | None:
        """Why the number ``x`` is not a valid value, or None."""
        if not math.isfinite(x):
            return f"'{self.name}' must be a finite number, got {x}"
        if self.kind == "int" and x != int(x):
            return f"'{self.name}' must be an integer, got {x:g}"
        if self.low is not None and self.high is not None and not self.low <= x <= self.high:
            return f"'{self.name}' must be between {self.low:g} and {self.high:g}, got {x:g}"
        if self.low is not None and x < self.low:
            return f"'{self.name}' must be >= {self.low:g}, got {x:g}"
        if self.high is not None and x > self.high:
            return f"'{self.name}' must be <= {self.high:g}, got {x:g}"
        return None


@dataclass(frozen=True, slots=True)
class CardColumn:
    """One per-model column of the model card's table."""

    header: str
    value: Callable[[ModelParams, MethodOptions], str]


def number(x: float) -> str:
    return f"{x:g}"


WEIGHT_COLUMN = CardColumn("weight", lambda p, o: number(p.weight))
DENSITY_COLUMN = CardColumn("density", lambda p, o: number(p.density))

Values = Mapping[str, float | str | None]
"""Resolved parameter values of one tensor: name -> number (or string for choices)."""


NO_MASKS = "it keeps no masks"


def no_masks(params: Values) -> str | None:
    """``extend`` of a method whose merges cannot be extended: they keep no masks."""
    return NO_MASKS


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """Everything about a method that is not per-tensor math."""

    name: str
    summary: str
    """One line for ``--help``-style listings and the card."""
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    """False: the base is not part of the arithmetic; without ``base_model`` the first model
    provides the config and layout (``linear``, ``passthrough``)."""
    base_as_model: bool = False
    """mergekit 0.1.5 takes a ``base_model`` not listed under ``models:`` as one more model,
    after the listed ones (``karcher``: its merge ignores the base role but not the input)."""
    min_models: int = 1
    max_models: int | None = None
    """Task models (besides the base) the method accepts; None: any number."""
    stats: tuple[str, ...] = ()
    """What each kind of statistics pass reduces, for ``plan`` (empty: chunk-local)."""
    cuda: bool = False
    """Its merge runs on a GPU (device-agnostic torch code, same bytes as the CPU)."""
    mps: bool = False
    """Its merge also runs on Apple's Metal GPU (``cuda`` code without float64, which Metal
    lacks, and without CUDA streams)."""
    writes_masks: bool = False
    """It produces per-model kept masks, stored in the occupancy store."""
    nm_blocks: bool = False
    """It keeps n of every m elements per model (``inspect`` compares with independent n:m)."""
    tadrop: bool = False
    """It accepts TADrop's per-tensor densities (``tadrop: true``)."""
    remix: str | None = NO_MASKS
    """None: ``remix`` can re-weight it from its stored masks; otherwise why not."""
    extend: Callable[[Values], str | None] = no_masks
    """Given the recipe's global parameters: None if ``add`` can append a model, else why not."""
    kernel: str | None = None
    """Compiled kernel family its CPU path uses (warmed up before a merge), if any."""
    card: tuple[CardColumn, ...] = (WEIGHT_COLUMN, DENSITY_COLUMN)
    """Per-model columns of the model card."""
    order_note: str = "In processing order (sums are taken in this order):"
    """What the card says about the order of the models."""
    example: Mapping[str, Any] = field(default_factory=dict)
    """A valid top-level ``parameters:`` mapping (documentation, and the contract tests run
    every registered method with it)."""

    def __post_init__(self) -> None:
        names = [p.name for p in self.params] + [a for p in self.params for a in p.aliases]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name}: a parameter is declared twice")
        if self.max_models is not None and self.max_models < self.min_models:
            raise ValueError(f"method {self.name}: max_models < min_models")

    def param(self, name: str) -> Param | None:
        """The parameter ``name`` (or the one it is an alias of)."""
        return next((p for p in self.params if name == p.name or name in p.aliases), None)

    @property
    def per_model(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params if p.per_model)

    @property
    def global_only(self) -> frozenset[str]:
        names = {p.name for p in self.params if not p.per_model}
        return frozenset(names | {a for p in self.params for a in p.aliases})


# -- parameters shared by several methods ----------------------------------------------------

TADROP_PARAMS = (
    Param("tadrop", "bool", per_model=False, doc="per-tensor densities from kurtosis"),
    # ranges are checked with the densities, by streammerge.tadrop.TadropConfig
    Param("tadrop_alpha", per_model=False, gradient=False, doc="TADrop's strength"),
    Param("tadrop_d_min", per_model=False, gradient=False),
    Param("tadrop_d_max", per_model=False, gradient=False),
)
