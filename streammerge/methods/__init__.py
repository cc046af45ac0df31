"""Merge methods by name. A new method is one small file plus a line here.

Each method carries a :class:`~streammerge.methods.spec.MethodSpec` (parameters, statistics,
capabilities, card columns); everything outside ``methods/`` reads the spec, never the name.
"""

from __future__ import annotations

from .arcee_fusion import ArceeFusion
from .base import MergeResult, Method, MethodOptions, ModelParams, TensorId
from .breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from .cabs import Cabs
from .della import DELLA, DELLA_LINEAR
from .gta import DARE_LINEAR, DARE_TIES, MAGNITUDE, TASK_ARITHMETIC, TIES
from .karcher import Karcher
from .linear import Linear
from .model_stock import ModelStock
from .multislerp import Multislerp
from .nearswap import Nearswap
from .nuslerp import Nuslerp
from .passthrough import Passthrough
from .ram import Ram, RamPlus
from .sce import SCE
from .slerp import Slerp

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        TASK_ARITHMETIC,
        TIES,
        DARE_TIES,
        DARE_LINEAR,
        MAGNITUDE,
        BREADCRUMBS,
        BREADCRUMBS_TIES,
        SCE,
        DELLA,
        DELLA_LINEAR,
        Cabs(),
        Linear(),
        Slerp(),
        Nuslerp(),
        Multislerp(),
        Karcher(),
        ModelStock(),
        Passthrough(),
        Nearswap(),
        ArceeFusion(),
        Ram(),
        RamPlus(),
    )
}

MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties",
    "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "sce", "ram", "ramplus_tl", "model_stock", "nearswap", "arcee_fusion", "passthrough",
})  # fmt: skip
"""mergekit 0.1.5's merge method names (its registry), to tell a method streammerge lacks from
a typo."""


def register(method: Method) -> None:
    """Add a method to the registry (a plugin, or a test's toy method); its name must be new."""
    name = method.spec.name
    if name in METHODS:
        raise ValueError(f"merge method {name!r} is already registered")
    if method.spec.kernel not in (None, "cabs", "gta"):
        raise ValueError(f"merge method {name!r}: unknown kernel {method.spec.kernel!r}")
    METHODS[name] = method


__all__ = [
    "MERGEKIT_METHODS",
    "METHODS",
    "MergeResult",
    "Method",
    "MethodOptions",
    "ModelParams",
    "TensorId",
    "register",
]
