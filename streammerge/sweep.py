"""Weight sweeps: many merges of the same models, one per point of a grid of weights.

For a method whose masks do not depend on the weights (``MethodSpec.remix is None``, e.g.
CABS) the first grid point is a full ``run`` and every other point a replay of its stored
masks (:func:`streammerge.remix.remix_merge`: no selection work); otherwise every point is a
full run. The points after the first run in parallel: local worker processes, or one Ray task
per point (each requesting one CPU and ``--max-memory``). Every output folder is a normal
finished merge (card, occupancy store, ``verify``), named ``point-NNN`` under ``OUT_ROOT``,
and byte-identical to a ``run`` of the recipe with that point's weights.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .engine import run_merge
from .errors import RecipeError, StreamMergeError
from .lora import adapter_paths
from .options import MergeOptions
from .recipe import Recipe, load_recipe, parse_recipe
from .results import RunSummary


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One merge of a sweep."""

    index: int
    weights: tuple[tuple[str, float], ...]
    """(model name as in the recipe, weight) for every model, in processing order."""
    out_dir: Path
    replayed: bool
    """True: replayed from the first point's masks; False: a full run."""


def grid_points(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the grid's values, the last key varying fastest."""
    if not grid or any(not v for v in grid.values()):
        raise StreamMergeError("sweep needs --grid MODEL=V1,V2,... with at least one value")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _model_index(recipe: Recipe, ref: str) -> int:
    hits = [
        k for k, m in enumerate(recipe.models) if ref in (m.name, str(m.path), m.path.name, str(k))
    ]
    if len(hits) != 1:
        names = ", ".join(m.name for m in recipe.models)
        problem = "matches several models" if hits else "is not a model of the recipe"
        raise StreamMergeError(f"--grid {ref!r} {problem} (models: {names})")
    return hits[0]


def with_weights(recipe: Recipe, weights: Mapping[int, float]) -> Recipe:
    """The recipe with the weights of models ``k`` (processing order) set; models as
    resolved paths in processing order, their names and other parameters kept."""
    source = dict(recipe.source)
    own: dict[str, dict[str, Any]] = {}
    for item in source.get("models") or []:
        ref = item.get("model") if isinstance(item, Mapping) else item
        params = item.get("parameters") if isinstance(item, Mapping) else None
        own[str(ref)] = dict(params or {})
    doc = {k: v for k, v in source.items() if k not in ("models", "base_model", "pruning_order")}
    doc["base_model"] = str(recipe.base)
    doc["models"] = [
        {"model": str(m.path), "parameters": {**own.get(m.name, {}),
                                              **({"weight": weights[k]} if k in weights else {})}}
        for k, m in enumerate(recipe.models)
    ]  # fmt: skip
    try:
        parsed = parse_recipe(doc)
    except RecipeError as e:
        raise StreamMergeError(f"sweep: {e}") from None
    models = tuple(replace(e, name=m.name) for e, m in zip(parsed.models, recipe.models,
                                                            strict=True))  # fmt: skip
    return replace(parsed, models=models)


def _point(
    recipe: Recipe, first: Path | None, point: SweepPoint, options: MergeOptions
) -> RunSummary:
    """One grid point: a replay of ``first``'s masks, or a full run."""
    if first is not None and point.replayed:
        from .remix import remix_merge

        return remix_merge(first, point.out_dir, dict(point.weights), options)
    k_of = {name: k for k, (name, _) in enumerate(point.weights)}
    weights = {k_of[name]: w for name, w in point.weights}
    return run_merge(with_weights(recipe, weights), point.out_dir, options)


def _remote_point() -> Any:
    import ray

    return ray.remote(_point)


def sweep(
    recipe: Recipe | Path | str,
    out_root: Path | str,
    grid: Mapping[str, Sequence[float]],
    options: MergeOptions | None = None,
    *,
    jobs: int = 2,
    on_point: Callable[[SweepPoint, RunSummary], None] | None = None,
    **overrides: object,
) -> list[tuple[SweepPoint, RunSummary]]:
    """Merge ``recipe`` once per grid point into ``out_root/point-NNN``.

    Args:
        recipe: a validated :class:`Recipe` or a YAML recipe's path.
        grid: model reference (as in the recipe, its folder name or path) to the weights to
            try; several models give their cartesian product.
        options: as for :func:`streammerge.run_merge`; ``executor="ray"`` runs the points
            after the first as Ray tasks (``ray_address`` to join a cluster), else ``jobs``
            local processes. ``max_memory`` is per merge.
        on_point: called as each merge finishes (for progress lines).
        overrides: fields of ``options`` (``max_memory=2**30``), as for ``run_merge``.
    """
    opts = MergeOptions.build(options, overrides)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(Path(recipe))
    if recipe.slices is None and (adapters := adapter_paths(recipe)):
        raise StreamMergeError(f"sweep does not take LoRA inputs ({adapters[0]}) yet")
    out_root = Path(out_root).resolve()  # workers elsewhere need absolute paths
    by_index = {_model_index(recipe, ref): values for ref, values in grid.items()}
    combos = grid_points({str(k): v for k, v in by_index.items()})
    replay = recipe.impl.spec.remix is None
    points = []
    for i, combo in enumerate(combos):
        w = {int(k): float(v) for k, v in combo.items()}
        weights = tuple((m.name, w.get(k, _weight(recipe, k))) for k, m in enumerate(recipe.models))
        points.append(SweepPoint(i, weights, out_root / f"point-{i:03d}", replay and i > 0))
    for p in points:  # every weight a usable recipe, before any work
        with_weights(recipe, {k: w for k, (_, w) in enumerate(p.weights)})
    out_root.mkdir(parents=True, exist_ok=True)
    local_opts = replace(opts, executor="local", ray_address=None, progress=False)
    results = []
    first = points[0]
    # the first point selects the masks the others replay (with the executor asked for)
    summary = _point(recipe, None, first, replace(opts, progress=False))
    results.append((first, summary))
    if on_point:
        on_point(first, summary)
    rest = points[1:]
    if opts.executor == "ray" and rest:
        results += _on_ray(recipe, first.out_dir, rest, local_opts, opts, on_point)
    elif rest:
        ctx = multiprocessing.get_context("spawn")  # no forked lanes or locks
        with ProcessPoolExecutor(max(1, jobs), mp_context=ctx) as pool:
            futures = [(p, pool.submit(_point, recipe, first.out_dir, p, local_opts))
                       for p in rest]  # fmt: skip
            for p, fut in futures:
                summary = fut.result()
                results.append((p, summary))
                if on_point:
                    on_point(p, summary)
    return results


def _weight(recipe: Recipe, k: int) -> float:
    """Model k's recipe weight (its first merged tensor's; 1.0 if it has none)."""
    value = recipe.models[k].settings.get("weight", recipe.settings.get("weight"))
    if value is None:
        param = recipe.impl.spec.param("weight")
        value = param.default if param is not None else None
    if isinstance(value, int | float):
        return float(value)
    raise StreamMergeError(
        f"sweep: model {recipe.models[k].name!r} has no plain weight; put it on the grid"
    )


def _on_ray(
    recipe: Recipe,
    first: Path,
    points: Sequence[SweepPoint],
    local_opts: MergeOptions,
    opts: MergeOptions,
    on_point: Callable[[SweepPoint, RunSummary], None] | None,
) -> list[tuple[SweepPoint, RunSummary]]:
    import logging

    import ray

    from .memory import default_max_memory

    owned = not ray.is_initialized()
    if owned:
        ray.init(address=opts.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)  # fmt: skip
    try:
        mem = opts.max_memory or default_max_memory()
        remote = _remote_point().options(num_cpus=1, memory=mem, max_retries=1)
        refs = {remote.remote(recipe, first.resolve(), p, local_opts): p for p in points}
        out = []
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            p = refs[ready[0]]
            try:
                summary = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, StreamMergeError):
                    raise e.cause from None
                raise
            out.append((p, summary))
            if on_point:
                on_point(p, summary)
        return sorted(out, key=lambda r: r[0].index)
    finally:
        if owned:
            ray.shutdown()
