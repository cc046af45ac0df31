"""Merge methods by name. A new method is one small file plus a line here."""

from __future__ import annotations

from .base import Method, MethodOptions, MergeResult, ModelParams
from .cabs import Cabs
from .task_arithmetic import TaskArithmetic

METHODS: dict[str, Method] = {m.name: m for m in (TaskArithmetic(), Cabs())}

__all__ = ["METHODS", "Method", "MergeResult", "MethodOptions", "ModelParams"]
