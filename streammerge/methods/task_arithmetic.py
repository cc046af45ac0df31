"""Task arithmetic: ``W = base + sum_k w_k * (W_k - base)``, summed in model order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import MergeResult, MethodOptions, ModelParams, scalar


class TaskArithmetic:
    name = "task_arithmetic"
    sparsifies = False

    def alignment(self, params: Sequence[ModelParams]) -> int:
        return 8

    def merge(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        b = base.to(dtype)
        acc = b.clone()
        for ft, p in zip(fts, params, strict=True):
            tau = ft.to(dtype, copy=True).sub_(b)
            acc.add_(tau.mul_(scalar(p.weight, dtype)))
        return MergeResult(acc, None)

    def reference(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        b = base.to(dtype).flatten()
        out = b
        for ft, p in zip(fts, params, strict=True):
            out = out + scalar(p.weight, dtype) * (ft.to(dtype).flatten() - b)
        return MergeResult(out, None)
