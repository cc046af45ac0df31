"""Merge methods by name. A new method is one small file plus a line here."""

from __future__ import annotations

from .base import MergeResult, Method, MethodOptions, ModelParams, TensorId
from .cabs import Cabs
from .gta import DARE_LINEAR, DARE_TIES, MAGNITUDE, TASK_ARITHMETIC, TIES
from .linear import Linear
from .passthrough import Passthrough
from .slerp import Slerp

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        TASK_ARITHMETIC,
        TIES,
        DARE_TIES,
        DARE_LINEAR,
        MAGNITUDE,
        Cabs(),
        Linear(),
        Slerp(),
        Passthrough(),
    )
}

__all__ = ["METHODS", "MergeResult", "Method", "MethodOptions", "ModelParams", "TensorId"]
