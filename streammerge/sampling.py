"""TADrop's sampling pass: each merged tensor's task-vector kurtosis, read chunk by chunk,
turned into per-(model, tensor) densities by :mod:`streammerge.tadrop` (the pure math).

Runs before the merge when a recipe says ``tadrop: true``; a replay (remix/add) takes the
densities the finished merge recorded instead of sampling again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError, StreamMergeError
from .model import ModelFolder, read_chunks
from .tadrop import TadropConfig, allocate, chunk_sample_slice, kurtosis

if TYPE_CHECKING:
    from .plan import Densities, MergePlan

Report = dict[str, object]
"""What TADrop records (rule, configuration, achieved means; ``densities`` per tensor)."""


def tadrop_densities(
    plan: MergePlan, base: ModelFolder, models: list[ModelFolder], allow_nonfinite: bool = False
) -> tuple[Densities, Report]:
    """streammerge's TADrop (see :mod:`streammerge.tadrop`): per-(model, tensor) densities.

    Reads each merged tensor's deterministic strided sample of every task vector, chunk by
    chunk (pages released as it goes), then allocates densities per model so that its
    parameter-weighted mean density (the recipe's) is preserved.
    """
    recipe = plan.recipe
    tasks = [t for t in plan.tensors if t.merged]
    cfg_args = {
        "alpha": recipe.settings.get("tadrop_alpha", 0.5),
        "d_min": recipe.settings.get("tadrop_d_min"),
        "d_max": recipe.settings.get("tadrop_d_max"),
    }
    kappas: list[list[float | None]] = [[] for _ in models]
    for task in tasks:
        samples: list[list[torch.Tensor]] = [[] for _ in models]
        for s, e, views in read_chunks([base, *models], task.name, task.chunks()):
            b = views[0].to(recipe.dtype)
            cut = chunk_sample_slice(s, e - s, task.numel, TadropConfig(0.5).max_sample)
            for k, m in enumerate(views[1:]):
                x = (m.to(recipe.dtype) - b)[cut].double()
                if not bool(torch.isfinite(x).all()):
                    if not allow_nonfinite:
                        bad = models[k] if bool(torch.isfinite(b[cut]).all()) else base
                        raise InputError(
                            f"{bad.file_of(task.name)}: tensor {task.name!r} contains NaN "
                            "or Inf values; pass --allow-nonfinite to merge it anyway"
                        )
                    x = x[torch.isfinite(x)]  # TADrop's statistics skip them
                samples[k].append(x)
            del b, views
        for k in range(len(models)):
            kappas[k].append(kurtosis(torch.cat(samples[k])))
    densities: dict[tuple[int, str], float] = {}
    report: Report = {"rule": "streammerge TADrop formulation (cabs_spec.md 10.3)", **cfg_args,
                      "achieved": []}  # fmt: skip
    numels = [t.numel for t in tasks]
    for k in range(len(models)):
        d_bar = sum(t.numel * t.params[k].density for t in tasks) / max(1, sum(numels))
        if d_bar <= 0:
            continue
        try:
            cfg = TadropConfig(d_bar, **cfg_args)  # type: ignore[arg-type]
        except ValueError as e:
            raise StreamMergeError(f"tadrop: {e}") from e
        alloc = allocate(numels, kappas[k], cfg)
        densities.update({(k, t.name): d for t, d in zip(tasks, alloc.densities, strict=True)})
        report["achieved"].append(alloc.achieved)  # type: ignore[attr-defined]
    return densities, report


def stored_densities(attrs: Mapping[str, Any]) -> tuple[Densities, Report]:
    """TADrop's densities as a finished merge recorded them in its store's attributes."""
    report = dict(attrs.get("tadrop") or {})
    stored = report.pop("densities", {})
    densities = {(k, name): d for name, ds in stored.items() for k, d in enumerate(ds)}
    return densities, report
