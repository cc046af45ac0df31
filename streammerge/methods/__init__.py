"""Merge methods by name. A new method is one small file plus a line here."""

from __future__ import annotations

from .base import MergeResult, Method, MethodOptions, ModelParams
from .cabs import Cabs
from .task_arithmetic import TaskArithmetic

METHODS: dict[str, Method] = {m.name: m for m in (TaskArithmetic(), Cabs())}

__all__ = ["METHODS", "MergeResult", "Method", "MethodOptions", "ModelParams"]
