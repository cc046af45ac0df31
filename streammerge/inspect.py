"""What a finished merge kept: densities and overlaps per layer and per tensor, from its store.

:func:`inspect_merge` reads the occupancy store of an output folder and reports, per tensor
and per layer, each model's kept density, the overlap CABS actually has (positions kept by two
or more models: 0 under ``strict``) and, for CABS, the overlap that *independent* n:m pruning
would have had: every model's own, unconstrained n:m mask on its task vector (same n:m, ties
to the lower index, same tail policy, only non-zero entries). That needs the task vectors, so
the inputs are streamed chunk by chunk (paths from the store's attributes); without them the
independent overlap is skipped and the report says why. TADrop's per-tensor densities are
read from the mask arrays' attributes.

:func:`format_report` renders tables, :func:`plot_report` a PNG (matplotlib, optional extra).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import lora, tokenizer
from .errors import StreamMergeError
from .mask_store import STORE_NAME, ZarrMaskStore
from .methods import METHODS
from .methods.nm import magnitude_key, nm_select
from .model import ModelFolder, read_chunks
from .recipe import Recipe, parse_recipe

CHUNK_ELEMS = 1 << 22
"""Elements per chunk when streaming masks and inputs (rounded to the n:m alignment)."""
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
OTHER = "other"
"""The group of tensors outside numbered layers (embeddings, final norm, head)."""


@dataclass(frozen=True, slots=True)
class TensorStats:
    """One merged tensor."""

    name: str
    layer: str
    """``"0"``, ``"1"``, ... for numbered layers, else ``"other"``."""
    numel: int
    kept: tuple[int, ...]
    """Kept elements per model (pruning order)."""
    overlap: int
    """Elements kept by two or more models in the merge."""
    overlap_independent: int | None
    """Elements two or more models' own unconstrained n:m masks keep (None: not computed)."""
    tadrop_density: tuple[float, ...] | None = None
    """TADrop's density per model for this tensor (None when TADrop was off)."""

    @property
    def density(self) -> tuple[float, ...]:
        return tuple(k / self.numel if self.numel else 0.0 for k in self.kept)


@dataclass(frozen=True, slots=True)
class LayerStats:
    """The tensors of one layer (or of ``other``) together."""

    layer: str
    numel: int
    kept: tuple[int, ...]
    overlap: int
    overlap_independent: int | None

    @property
    def density(self) -> tuple[float, ...]:
        return tuple(k / self.numel if self.numel else 0.0 for k in self.kept)


@dataclass(frozen=True, slots=True)
class MergeReport:
    out_dir: Path
    method: str
    overlap_policy: str | None
    """CABS's overlap policy (None for other methods)."""
    models: tuple[str, ...]
    """Model folder names in pruning order."""
    tensors: tuple[TensorStats, ...]
    layers: tuple[LayerStats, ...]
    """Numbered layers in order, then ``other``."""
    total: LayerStats
    independent_note: str
    """How the independent n:m overlap was obtained, or why it is missing."""
    tadrop: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, densities and rates included."""

        def row(s: TensorStats | LayerStats) -> dict[str, Any]:
            d = asdict(s)
            d["density"] = list(s.density)
            d["overlap_rate"] = s.overlap / s.numel if s.numel else 0.0
            ind = s.overlap_independent
            d["overlap_independent_rate"] = None if ind is None else ind / max(1, s.numel)
            return d

        return {
            "out_dir": str(self.out_dir),
            "method": self.method,
            "overlap_policy": self.overlap_policy,
            "models": list(self.models),
            "tadrop": self.tadrop,
            "independent_note": self.independent_note,
            "total": row(self.total),
            "layers": [row(s) for s in self.layers],
            "tensors": [row(s) for s in self.tensors],
        }


def layer_of(name: str) -> str:
    m = _LAYER.search(name)
    return m.group(1) if m else OTHER


def inspect_merge(out_dir: Path | str, *, use_inputs: bool = True) -> MergeReport:
    """Report a merge's kept densities and overlaps (see the module docstring).

    Args:
        out_dir: an output folder holding ``occupancy.zarr``.
        use_inputs: stream the base and fine-tunes to compute the independent n:m overlap
            (CABS only; skipped with a note when an input folder is missing).
    """
    out_dir = Path(out_dir)
    if not (out_dir / STORE_NAME).is_dir():
        raise StreamMergeError(
            f"{out_dir}: no occupancy store ({STORE_NAME}); only sparsifying merges keep masks"
        )
    store = ZarrMaskStore(out_dir / STORE_NAME)
    attrs = store.attrs()
    if not {"method", "models"} <= set(attrs):
        raise StreamMergeError(f"{out_dir / STORE_NAME}: attributes incomplete (not a merge?)")
    method = attrs["method"]
    models = attrs["models"]
    k = len(models)
    names = _mask_names(store, out_dir)
    if not names:  # a dense method: a table of zeros would read as "nothing was kept"
        raise StreamMergeError(
            f"{out_dir}: the {method} merge stored no masks (only sparsifying methods keep "
            "them); nothing to inspect"
        )
    recipe, note = _inputs_recipe(attrs, use_inputs)
    inputs = None
    if recipe is not None:
        try:
            inputs = lora.open_inputs(recipe)
            # the masks cover the merge's (remapped) token rows
            b, ms, _ = tokenizer.prepare(recipe, inputs[0], inputs[1:])
            inputs = [b, *ms]
        except StreamMergeError as e:
            note = f"skipped: {e}"
    tadrop = bool(attrs.get("tadrop"))
    rows = []
    try:
        for name in names:
            infos = [store.info(i, name) for i in range(k)]
            numel = int(infos[0]["numel"])
            kept = tuple(int(info.get("kept") or 0) for info in infos)
            nm = [(int(info.get("n") or 0), int(info.get("m") or 1)) for info in infos]
            align = math.lcm(8, *(m for _, m in nm))
            chunk = max(align, CHUNK_ELEMS // align * align)
            overlap = 0
            for s, e in _ranges(numel, chunk):
                count = torch.zeros(e - s, dtype=torch.int8)
                for i in range(k):
                    count += store.read_range(i, name, s, e)
                overlap += int(torch.count_nonzero(count >= 2))
            ind = None
            if inputs is not None and recipe is not None:
                ind = _independent_overlap(recipe, inputs, name, numel, nm, chunk)
            td = tuple(float(info["density"]) for info in infos) if tadrop else None
            rows.append(TensorStats(name, layer_of(name), numel, kept, overlap, ind, td))
    finally:
        for f in inputs or []:
            f.close()
    if inputs is not None:
        note = "computed from the inputs (each model's own n:m on its task vector)"
    layers = _group(rows, k)
    total = _sum("total", rows, k)
    policy = None
    spec = METHODS[method].spec if method in METHODS else None
    if spec is not None and (param := spec.param("overlap_policy")) is not None:
        stored = attrs.get("recipe", {}).get("parameters") or {}
        policy = stored.get("overlap_policy", param.default)
    return MergeReport(
        out_dir=out_dir,
        method=method,
        overlap_policy=policy,
        models=tuple(_model_label(m, "slices" in (attrs.get("recipe") or {})) for m in models),
        tensors=tuple(rows),
        layers=layers,
        total=total,
        independent_note=note,
        tadrop=tadrop,
    )


def _mask_names(store: ZarrMaskStore, out_dir: Path) -> list[str]:
    """Tensors with masks, in the output's on-disk order when the output can be read."""
    stored = set(store.names())
    if not stored:
        return []
    try:
        out = ModelFolder(out_dir)
        order = [n for n in out.names() if n in stored]
        out.close()
        if set(order) == stored:
            return order
    except StreamMergeError:
        pass
    return sorted(stored)


def _model_label(model: dict[str, Any], sliced: bool) -> str:
    """A model's folder name; a slices merge's slot: the folder names of the models in it."""
    if sliced:
        return " + ".join(Path(x).name for x in str(model["name"]).split(" + "))
    return Path(model["path"]).name


def _inputs_recipe(attrs: dict[str, Any], use_inputs: bool) -> tuple[Recipe | None, str]:
    """The merge's recipe when the independent overlap can be computed, else why not."""
    method = METHODS.get(attrs["method"])
    if method is None or not method.spec.nm_blocks:
        return None, "not applicable: independent n:m overlap is defined for n:m merges (CABS)"
    if not use_inputs:
        return None, "skipped (--no-inputs)"
    if "slices" in (attrs.get("recipe") or {}):
        return None, "not available for 'slices:' merges"
    from .remix import stored_recipe_doc

    paths = [attrs.get("base", ""), *(m["path"] for m in attrs["models"])]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        return None, f"skipped: input folder {missing[0]} not found"
    try:
        return parse_recipe(stored_recipe_doc(attrs)), ""
    except StreamMergeError as e:
        return None, f"skipped: {e}"


def _ranges(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for s in range(0, numel, chunk):
        yield s, min(s + chunk, numel)


def _independent_overlap(
    recipe: Recipe,
    inputs: list[ModelFolder],
    name: str,
    numel: int,
    nm: list[tuple[int, int]],
    chunk: int,
) -> int:
    """Positions where two or more models' own n:m masks (tau != 0) coincide, streamed."""
    tail = recipe.strings.get("tail_policy", "keep_topn_padded")
    total = 0
    for s, e, views in read_chunks(inputs, name, _ranges(numel, chunk)):
        b = views[0].to(recipe.dtype)
        count = torch.zeros(e - s, dtype=torch.int8)
        for ft, (n, m) in zip(views[1:], nm, strict=True):
            tau = ft.to(recipe.dtype, copy=True).sub_(b)
            count += nm_select(magnitude_key(tau), n, m, tail) & (tau != 0)
        del b, views
        total += int(torch.count_nonzero(count >= 2))
    return total


def _sum(label: str, rows: list[TensorStats], k: int) -> LayerStats:
    ind = [r.overlap_independent for r in rows]
    return LayerStats(
        layer=label,
        numel=sum(r.numel for r in rows),
        kept=tuple(sum(r.kept[i] for r in rows) for i in range(k)),
        overlap=sum(r.overlap for r in rows),
        overlap_independent=None if any(x is None for x in ind) else sum(ind),  # type: ignore[arg-type]
    )


def _group(rows: list[TensorStats], k: int) -> tuple[LayerStats, ...]:
    keys = sorted({r.layer for r in rows}, key=lambda x: (x == OTHER, int(x) if x != OTHER else 0))
    return tuple(_sum(key, [r for r in rows if r.layer == key], k) for key in keys)


def format_report(report: MergeReport, tensors: bool = False) -> str:
    """A readable table: one row per layer (and per tensor with ``tensors``), then the total."""
    policy = f", overlap_policy {report.overlap_policy}" if report.overlap_policy else ""
    lines = [
        f"{report.out_dir}: {report.method}{policy}; models in pruning order: "
        + ", ".join(report.models),
        f"independent n:m overlap: {report.independent_note}",
    ]
    if report.tadrop:
        lines.append("TADrop: on (per-tensor densities used are in the tensor rows)")
    head = ["layer" if not tensors else "tensor", "elements"]
    head += [f"kept {m}" for m in report.models]
    head += ["overlap indep.", f"overlap {report.method}"]
    if tensors and report.tadrop:
        head += [f"tadrop {m}" for m in report.models]

    def cells(s: TensorStats | LayerStats, label: str) -> list[str]:
        c = [label, f"{s.numel:,}"] + [f"{d:.4f}" for d in s.density]
        ind = s.overlap_independent
        c += ["-" if ind is None else f"{ind / max(1, s.numel):.4f}"]
        c += [f"{s.overlap / max(1, s.numel):.4f}"]
        if isinstance(s, TensorStats) and s.tadrop_density is not None:
            c += [f"{d:.4f}" for d in s.tadrop_density]
        return c

    body = []
    if tensors:
        body = [cells(t, t.name) for t in report.tensors]
    else:
        body = [
            cells(s, s.layer if s.layer == OTHER else f"layer {s.layer}") for s in report.layers
        ]
    body.append(cells(report.total, "total"))
    table = [head, *body]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in table) for i in range(len(head))]
    for r in table:
        first = r[0].ljust(widths[0])
        rest = [x.rjust(w) for x, w in zip(r[1:], widths[1:], strict=False)]
        lines.append("  ".join([first, *rest]))
    lines.append(
        "(kept = kept density per model; overlap = fraction of elements kept by >= 2 models)"
    )
    return "\n".join(lines)


def plot_report(report: MergeReport, path: Path | str) -> Path:
    """Per-layer kept density per model (top) and overlap, independent vs actual (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise StreamMergeError(
            "--plot needs matplotlib: pip install 'streammerge[plot]' (or pip install matplotlib)"
        ) from e
    layers = [s for s in report.layers if s.layer != OTHER]
    if not layers:
        layers = list(report.layers)
    xs = list(range(len(layers)))
    labels = [s.layer for s in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, model in enumerate(report.models):  # styles differ: equal densities overlap
        top.plot(xs, [s.density[i] for s in layers], ls=styles[i % 4], marker=markers[i % 6],
                 ms=4, label=model)  # fmt: skip
    top.set_ylabel("kept density")
    top.set_ylim(bottom=0)
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    top.set_title(f"{report.out_dir.name}: {report.method} merge, per layer")
    if all(s.overlap_independent is not None for s in layers):
        ind = [s.overlap_independent / max(1, s.numel) for s in layers]  # type: ignore[operator]
        bottom.plot(xs, ind, marker="o", ms=3, label="independent n:m")
    else:
        bottom.text(0.02, 0.9, f"independent n:m overlap {report.independent_note}",
                    transform=bottom.transAxes, fontsize="small")  # fmt: skip
    actual = [s.overlap / max(1, s.numel) for s in layers]
    bottom.plot(xs, actual, marker="s", ms=3, label=f"{report.method} (actual)")
    bottom.set_ylabel("overlap (kept by >= 2 models)")
    bottom.set_xlabel("layer")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="best", fontsize="small")
    bottom.grid(alpha=0.3)
    step = max(1, len(xs) // 24)
    bottom.set_xticks(xs[::step], labels[::step])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
