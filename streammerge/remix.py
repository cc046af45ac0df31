"""Re-merge from a finished CABS merge's occupancy store: new weights (remix), one more model (add).

Both rebuild the merge's recipe from the store's attributes (base, models in pruning order with
their resolved paths, the recipe as parsed), change it (weights, or a model appended last), and
run the engine with the replay method (:class:`streammerge.methods.replay.Replay`): the masks
come from the store instead of being selected, and the output is byte-identical to a full
``run`` of the changed recipe. Journal, resume, ``INCOMPLETE`` and the completion marker work
as for ``run``; the new folder gets its own occupancy store, so it can be remixed, extended or
inspected again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .engine import Replay, run_merge
from .errors import RecipeError, StreamMergeError
from .lora import lora_refs
from .mask_store import STORE_NAME, ZarrMaskStore, model_index
from .methods import METHODS
from .methods.spec import MethodSpec
from .options import MergeOptions
from .output import COMPLETE_MARKER
from .recipe import Recipe, parse_recipe
from .results import RunSummary
from .verify import verify_output


def _method_spec(out_dir: Path, attrs: Mapping[str, Any]) -> MethodSpec:
    method = attrs["method"]
    if method not in METHODS:
        raise StreamMergeError(f"{out_dir}: merged with an unknown method {method!r}")
    return METHODS[method].spec


def _finished_store(out_dir: Path, shards: bool) -> ZarrMaskStore:
    """The occupancy store of a finished merge, verified against its marker's digests (and
    the shards too when they are read as a model: ``add``), or a clear error."""
    if not out_dir.is_dir():
        raise StreamMergeError(f"{out_dir}: no such merge output folder")
    if not (out_dir / COMPLETE_MARKER).is_file():
        raise StreamMergeError(
            f"{out_dir}: not a finished merge (no {COMPLETE_MARKER}); finish or resume it first"
        )
    if not (out_dir / STORE_NAME).is_dir():
        raise StreamMergeError(
            f"{out_dir}: no occupancy store ({STORE_NAME}); only sparsifying merges keep masks"
        )
    report = verify_output(out_dir, shards=shards)
    if not report.ok:  # a damaged store would silently give other masks
        raise StreamMergeError(
            f"{out_dir}: not what its merge wrote ({'; '.join(report.problems)}); "
            "rerun that merge to rebuild it"
        )
    store = ZarrMaskStore(out_dir / STORE_NAME)
    attrs = store.attrs()
    if not {"method", "recipe", "models", "base"} <= set(attrs):
        raise StreamMergeError(f"{out_dir / STORE_NAME}: attributes incomplete (not a merge?)")
    return store


def _global_params(attrs: Mapping[str, Any]) -> dict[str, Any]:
    params = attrs["recipe"].get("parameters")
    return dict(params) if isinstance(params, Mapping) else {}


def stored_recipe_doc(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe of a finished merge, rewritten with resolved paths in pruning order.

    Every task model appears once, as its absolute path with its own parameters; the base is
    the resolved base; ``pruning_order`` is dropped (``models`` is already in that order).
    """
    source = dict(attrs["recipe"])
    if "slices" in source:  # the store's model slots do not say which layers fed them
        raise StreamMergeError("remix and add do not support 'slices:' merges")
    if lora_refs(source):  # the store records each model's folder, not its adapter
        raise StreamMergeError(
            "remix and add do not support merges of LoRA (MODEL+ADAPTER) inputs yet"
        )
    own: dict[str, dict[str, Any]] = {}
    for item in source.get("models") or []:
        ref = item.get("model") if isinstance(item, dict) else item
        if isinstance(ref, dict):
            ref = ref.get("path")
        params = item.get("parameters") if isinstance(item, dict) else None
        own[str(ref)] = dict(params or {})
    doc = {k: v for k, v in source.items() if k not in ("models", "base_model", "pruning_order")}
    doc["base_model"] = attrs["base"]
    doc["models"] = [
        {"model": m["path"], "parameters": own.get(m["name"], {})} for m in attrs["models"]
    ]
    return doc


def _parse(doc: dict[str, Any], names: list[str], require_models: bool, where: Path) -> Recipe:
    """Parse a rewritten recipe; keep the models' names as the original recipe wrote them."""
    try:
        recipe = parse_recipe(doc, require_models=require_models)
    except RecipeError as e:
        raise StreamMergeError(f"{where}: the stored recipe no longer works: {e}") from None
    entries = tuple(replace(e, name=n) for e, n in zip(recipe.models, names, strict=True))
    return replace(recipe, models=entries)


def remix_merge(
    out_dir: Path | str,
    new_out: Path | str,
    weights: Mapping[str, float],
    options: MergeOptions | None = None,
    **overrides: object,
) -> RunSummary:
    """Re-merge a finished CABS merge with new weights, reusing its stored masks.

    Reads the base, the fine-tunes and the masks; no selection work. ``new_out`` is
    byte-identical to a full ``run`` of the recipe with these weights (and the same shard size).

    Args:
        out_dir: the finished merge.
        new_out: the new output folder (new, empty, or an interrupted remix of the same kind).
        weights: model reference (folder name, path as written in the recipe, resolved path, or
            position in pruning order as a string) to its new weight; others keep theirs.
        options, overrides: as for :func:`streammerge.run_merge` (on the CPU).
    """
    out_dir, new_out = Path(out_dir), Path(new_out)
    store = _finished_store(out_dir, shards=False)
    attrs = store.attrs()
    spec = _method_spec(out_dir, attrs)
    if spec.remix is not None:
        raise StreamMergeError(f"{out_dir}: cannot remix a {spec.name} merge: {spec.remix}")
    if not weights:
        raise StreamMergeError("remix needs at least one --weight MODEL=VALUE")
    doc = stored_recipe_doc(attrs)
    for ref, value in weights.items():
        k = model_index(attrs, int(ref) if ref.isdigit() else ref)
        doc["models"][k]["parameters"] = {**doc["models"][k]["parameters"], "weight": value}
    names = [m["name"] for m in attrs["models"]]
    recipe = _parse(doc, names, True, out_dir)
    return run_merge(recipe, new_out, options, replay=Replay(out_dir.resolve()), **overrides)


def add_model(
    out_dir: Path | str,
    new_out: Path | str,
    model: Path | str,
    weight: float,
    options: MergeOptions | None = None,
    *,
    n_val: int | None = None,
    m_val: int | None = None,
    **overrides: object,
) -> RunSummary:
    """Append one fine-tune, last in pruning order, to a finished ``strict`` CABS merge.

    Reads only the base, the new model, the finished output and its occupancy store (the
    earlier fine-tunes need not exist any more). ``new_out`` is byte-identical to a full
    ``run`` of the extended recipe (same shard size), up to the documented subnormal corner
    of :func:`streammerge.methods.replay.add_next`.

    Args:
        out_dir: the finished merge.
        new_out: the new output folder.
        model: the new fine-tune's folder.
        weight: its weight; ``n_val``/``m_val`` its n:m (default: the recipe's global n:m).
        options, overrides: as for :func:`streammerge.run_merge` (on the CPU).
    """
    out_dir, new_out, model = Path(out_dir), Path(new_out), Path(model)
    store = _finished_store(out_dir, shards=True)
    attrs = store.attrs()
    spec = _method_spec(out_dir, attrs)
    why = spec.extend(_global_params(attrs))
    if why is not None:
        raise StreamMergeError(f"{out_dir}: cannot add to a {spec.name} merge: {why}")
    if not model.is_dir():
        raise StreamMergeError(f"{model}: model folder not found")
    path = model.resolve()
    if any(Path(m["path"]) == path for m in attrs["models"]) or Path(attrs["base"]) == path:
        raise StreamMergeError(f"{model}: already part of the merge in {out_dir}")
    doc = stored_recipe_doc(attrs)
    new_params: dict[str, Any] = {"weight": weight}
    if n_val is not None:
        new_params["n_val"] = n_val
    if m_val is not None:
        new_params["m_val"] = m_val
    doc["models"].append({"model": str(path), "parameters": new_params})
    names = [m["name"] for m in attrs["models"]] + [str(model)]
    recipe = _parse(json.loads(json.dumps(doc)), names, False, out_dir)
    replay = Replay(out_dir.resolve(), add=True)
    return run_merge(recipe, new_out, options, replay=replay, **overrides)
