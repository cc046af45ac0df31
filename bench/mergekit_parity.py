"""Compare streammerge with mergekit on the same YAML, element by element, for every method.

Usage::

    python bench/mergekit_parity.py [--mergekit /path/to/mergekit-yaml] [--out table.md]

For every method of streammerge's registry that is a mergekit method (``MERGEKIT_METHODS``) and
each family dtype (bf16 and float32 by default), it writes a tiny Llama-shaped family with
:func:`streammerge.synth.generate_family` (offline), one YAML both tools accept (mergekit syntax,
models by local path, the method's ``MethodSpec.example`` as parameters, no ``dtype`` key so
each tool uses its own default: mergekit computes in the models' dtype, streammerge in float32,
and both write the models' dtype), runs ``mergekit-yaml`` and ``streammerge run`` as
subprocesses (CPU), and compares every tensor in the output dtype:

* equal (the same value), within 1 ulp, beyond 1 ulp;
* the beyond-1-ulp elements are classified, first match wins:

  1. *random stream*: the method draws random masks (it has a ``random_seed`` parameter:
     DARE, DELLA); mergekit's stream is unseeded ``torch.bernoulli``, ours is seeded per block
     (documented in ``methods/gta.py`` and ``methods/della.py``), so masks cannot agree;
  2. *tie*: the element's selection key equals the key at a selection boundary with equal keys
     on both sides of it (magnitude ranks of ``ties``/``breadcrumbs*``, variance ranks of
     ``sce``), computed here from the inputs; mergekit's sort leaves such ties in an undefined
     order, ours go to the lower index (documented in each method's docstring);
  3. *mergekit further from f64*: a float64 evaluation of the method (streammerge's in-memory
     ``reference`` with ``dtype: float64``) is strictly closer to ours than to mergekit's;
  4. *both within float32 rounding*: neither is closer, and both lie within a few float32
     roundings of the inputs' magnitude (:data:`ROUNDING_ULPS`) of the float64 value: the two
     tools evaluate the same formula in a different order, which near a cancellation is many
     ulps of the result (mostly float32 families, where neither tool computes in bf16);
  5. *unexplained*: anything else.

The table has one row per (method, dtype); the exit status is 1 when any row has unexplained
elements above 1e-4 of its elements (or a run failed, or the outputs' tensors differ), 0
otherwise, and 0 with a message when mergekit is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from streammerge.methods import MERGEKIT_METHODS, METHODS  # noqa: E402
from streammerge.recipe import parse_recipe  # noqa: E402
from streammerge.reference import reference_merge  # noqa: E402
from streammerge.synth import generate_family  # noqa: E402

DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
UNEXPLAINED_LIMIT = 1e-4
"""Largest allowed fraction of a row's elements in the *unexplained* class."""
CLASSES = ("mergekit_lowp", "rounding", "tie", "random", "unexplained")
ROUNDING_ULPS = 4
"""The *rounding order* class: both results within this many float32 half-ulps of the sum of
the inputs' magnitudes (``|base| + sum_k |ft_k|``) from the float64 value."""
MK_DEFAULT = "/work/mk-venv/bin/mergekit-yaml"
TASK_MODELS = 3
"""Fine-tunes in each family; a method gets as many as its spec allows, at most this."""


# --------------------------------------------------------------------------------------------
# Recipes


DETERMINISTIC_VARIANTS = {"dare_ties": {"density": 1.0}, "dare_linear": {"density": 1.0}}
"""Extra rows without the random drop (density 1), to compare the rest of the arithmetic of
methods whose random stream cannot agree with mergekit's. (DELLA refuses density 1.)"""


def recipe_doc(method: str, base: Path, fts: Sequence[Path], overrides: dict | None = None) -> dict:
    """One mergekit-syntax recipe for ``method`` on the family (``base``, ``fts``), with
    ``overrides`` of the example's parameters."""
    spec = METHODS[method].spec
    hi = TASK_MODELS if spec.max_models is None else min(spec.max_models, TASK_MODELS)
    k = max(spec.min_models, min(2, hi)) if method not in GRAM_METHODS else hi
    per_model = spec.per_model
    example = {**spec.example, **(overrides or {})}
    globals_ = {n: v for n, v in example.items() if n not in per_model}
    models = []
    for i, ft in enumerate(fts[:k]):
        params = {n: v for n, v in example.items() if n in per_model}
        if "weight" in params:
            # Unequal weights, so that a swapped pair of models or a normalisation shows.
            params["weight"] = round(float(params["weight"]) * (1.0 - 0.3 * i), 4)
        entry: dict = {"model": str(ft)}
        if params:
            entry["parameters"] = params
        models.append(entry)
    doc: dict = {"merge_method": method}
    if spec.needs_base:
        doc["base_model"] = str(base)
    doc["models"] = models
    if globals_:
        doc["parameters"] = globals_
    return doc


GRAM_METHODS = frozenset({"multislerp", "karcher", "model_stock"})
"""Methods that get every fine-tune (the Gram statistics are more telling with three)."""


# --------------------------------------------------------------------------------------------
# Running the tools


def run_tool(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd``; its output goes to ``log``. Returns the wall time; raises on failure."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{Path(cmd[0]).name} exited {rc}: " + " | ".join(tail))
    return wall


def mergekit_cmd(exe: str, recipe: Path, out: Path) -> list[str]:
    return [exe, str(recipe), str(out), "--no-copy-tokenizer", "--quiet", "-j", "1"]


def streammerge_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "streammerge", "run", str(recipe), str(out), "--quiet"]


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = h.get_tensor(name)
    return out


# --------------------------------------------------------------------------------------------
# Comparing


def ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to int64 integers that are consecutive for consecutive floats (the
    two zeros both map to 0), so ``|ordered(a) - ordered(b)|`` is the distance in ulps."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    i = x.contiguous().view(bits).to(torch.int64)
    sign = 1 << (8 * x.element_size() - 1)
    return torch.where(i < 0, -(i + sign), i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in ulps of their dtype between ``a`` and ``b`` (NaN anywhere: a huge number)."""
    d = (ordered(a) - ordered(b)).abs()
    nan = a.isnan() | b.isnan()
    return torch.where(nan & ~(a.isnan() & b.isnan()), torch.iinfo(torch.int64).max, d)


def tie_keys(
    method: str, name: str, base: torch.Tensor, fts: Sequence[torch.Tensor], doc: dict
) -> torch.Tensor | None:
    """Bool mask of the elements whose selection key is tied across a selection boundary
    (float32 arithmetic, as streammerge's), or None for methods without such a selection."""
    x = base.float().flatten()
    taus = [f.float().flatten() - x for f in fts]
    n = x.numel()
    params = [m.get("parameters", {}) for m in doc["models"]]
    glob = doc.get("parameters", {})
    tied = torch.zeros(n, dtype=torch.bool)
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        for tau, p in zip(taus, params, strict=False):
            setting = p.get("density", glob.get("density", 1.0))
            if isinstance(setting, list):  # per-layer or filtered: not classified here
                continue
            density = float(setting)
            if density >= 1.0:
                continue
            target = int(density * n)
            if method == "ties":
                lo = 0
            else:
                gamma = float(p.get("gamma", glob.get("gamma", 0.01)))
                lo = min(int(gamma * n), n - target)
            tied |= boundary_ties(tau.abs(), lo, lo + target)
        return tied
    if method == "sce":
        topk = float(glob.get("select_topk", 1.0))
        if topk >= 1.0:
            return tied
        mean = sum(taus) / len(taus)
        var = sum((tau - mean) ** 2 for tau in taus) / len(taus)
        k = int(torch.tensor(float(int((var != 0).sum()))) * torch.tensor(topk))
        return boundary_ties(var, 0, k)
    return None


def below_one(setting: object) -> bool:
    """Whether a density setting (a number, a gradient or a filter list) is below 1 anywhere."""
    if isinstance(setting, list):
        return any(below_one(v.get("value", 1.0) if isinstance(v, dict) else v) for v in setting)
    return float(setting) < 1.0  # type: ignore[arg-type]


def boundary_ties(key: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements whose ``key`` equals a key that sits both inside and outside the kept ranks
    ``[lo, hi)`` of the descending order (which of them is kept is a matter of tie order)."""
    s = key.sort(descending=True, stable=True).values
    n = s.numel()
    values = []
    if 0 < lo < n and s[lo - 1] == s[lo]:
        values.append(s[lo])
    if 0 < hi < n and s[hi - 1] == s[hi]:
        values.append(s[hi - 1])
    tied = torch.zeros(n, dtype=torch.bool)
    for v in values:
        tied |= key == v
    return tied


@dataclasses.dataclass
class Row:
    method: str
    dtype: str
    elements: int = 0
    equal: int = 0
    ulp1: int = 0
    beyond: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    max_abs: float = 0.0
    error: str = ""
    notes: set[str] = dataclasses.field(default_factory=set)
    mk_s: float = 0.0
    sm_s: float = 0.0

    @property
    def bad(self) -> bool:
        return bool(self.error) or self.beyond["unexplained"] > UNEXPLAINED_LIMIT * max(
            self.elements, 1
        )


def compare(
    row: Row,
    method: str,
    doc: dict,
    mk: dict[str, torch.Tensor],
    sm: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor] | None,
    inputs: list[dict[str, torch.Tensor]],
) -> None:
    """Fill ``row`` from the two outputs (``ref``: float64 outputs, None if unavailable;
    ``inputs``: base then the recipe's models, for the tie classification)."""
    if set(mk) != set(sm):
        only_mk, only_sm = sorted(set(mk) - set(sm)), sorted(set(sm) - set(mk))
        row.error = f"tensors differ: only mergekit {only_mk[:3]}, only streammerge {only_sm[:3]}"
        return
    glob = doc.get("parameters") or {}
    draws = [
        below_one((m.get("parameters") or {}).get("density", glob.get("density", 1.0)))
        for m in doc["models"]
    ]
    random = METHODS[method].spec.param("random_seed") is not None and any(draws)
    for name in sorted(mk):
        a, b = mk[name], sm[name]
        if a.dtype != b.dtype and a.dtype.itemsize > b.dtype.itemsize:
            # mergekit 0.1.5 returns some merges (arcee_fusion) in its float32 compute dtype;
            # out_dtype would cast it with round-to-nearest-even, as this does.
            row.notes.add(f"mergekit wrote {a.dtype} (rounded to {b.dtype} here)")
            a = a.to(b.dtype)
        if a.dtype != b.dtype or a.shape != b.shape:
            row.error = (
                f"{name}: mergekit {a.dtype} {tuple(a.shape)}, ours {b.dtype} {tuple(b.shape)}"
            )
            return
        a, b = a.flatten(), b.flatten()
        d = ulps(a, b)
        row.elements += a.numel()
        row.equal += int((d == 0).sum())
        row.ulp1 += int((d == 1).sum())
        row.max_abs = max(row.max_abs, float((a.double() - b.double()).abs().max()))
        far = d > 1
        if not bool(far.any()):
            continue
        left = far.clone()
        if random:
            row.beyond["random"] += int(left.sum())
            continue
        if inputs and name in inputs[0]:
            tied = tie_keys(method, name, inputs[0][name], [m[name] for m in inputs[1:]], doc)
            if tied is not None:
                row.beyond["tie"] += int((left & tied).sum())
                left &= ~tied
        if ref is not None and name in ref:
            r = ref[name].flatten().double()
            err_mk, err_sm = (a.double() - r).abs(), (b.double() - r).abs()
            closer = err_sm < err_mk
            row.beyond["mergekit_lowp"] += int((left & closer).sum())
            left &= ~closer
            if inputs and name in inputs[0]:
                # Both within float32 evaluation error of the float64 value: a few roundings
                # of the inputs' magnitude, many ulps of a result that cancels (the two tools
                # evaluate the same formula in a different order).
                scale = sum(m[name].flatten().double().abs() for m in inputs)
                bound = ROUNDING_ULPS * 2.0**-24 * scale
                both = (err_mk <= bound) & (err_sm <= bound)
                row.beyond["rounding"] += int((left & both).sum())
                left &= ~both
        row.beyond["unexplained"] += int(left.sum())


def float64_reference(doc: dict) -> dict[str, torch.Tensor]:
    """streammerge's in-memory reference of the recipe, computed and kept in float64."""
    recipe = parse_recipe(doc)
    recipe = dataclasses.replace(recipe, dtype=torch.float64, out_dtype=torch.float64)
    return {name: t for name, t, _ in reference_merge(recipe)}


# --------------------------------------------------------------------------------------------
# Report


def table(rows: Sequence[Row]) -> str:
    head = (
        "| method | dtype | elements | equal | 1 ulp | >1 ulp: mergekit further from f64 "
        "| >1 ulp: both within f32 rounding of f64 | >1 ulp: tie order | >1 ulp: random stream "
        "| >1 ulp: unexplained | max abs diff |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(f"| `{r.method}` | {r.dtype} | error: {r.error} |||||||| |")
            continue
        b = r.beyond
        lines.append(
            f"| `{r.method}` | {r.dtype} | {r.elements:,} | {r.equal:,} | {r.ulp1:,} | "
            f"{b['mergekit_lowp']:,} | {b['rounding']:,} | {b['tie']:,} | {b['random']:,} | "
            f"{b['unexplained']:,} | {r.max_abs:.3g} |"
        )
    notes = sorted({f"`{r.method}` ({r.dtype}): {n}" for r in rows for n in r.notes})
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return head + "\n".join(lines) + "\n"


def find_mergekit(given: str | None) -> str | None:
    for candidate in (given, shutil.which("mergekit-yaml"), MK_DEFAULT):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", help=f"mergekit-yaml executable (default: PATH, {MK_DEFAULT})")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--methods", help="comma-separated subset (default: every mergekit method)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="family dtypes")
    ap.add_argument("--preset", default="tiny", help="streammerge.synth preset (default tiny)")
    ap.add_argument("--work", type=Path, help="keep families and outputs here")
    ap.add_argument(
        "--reuse", action="store_true", help="with --work: compare the outputs already there"
    )
    args = ap.parse_args(argv)

    if args.mergekit and find_mergekit(args.mergekit) != args.mergekit:
        print(f"error: --mergekit {args.mergekit}: not an executable file", file=sys.stderr)
        return 2
    exe = find_mergekit(args.mergekit)
    if exe is None:
        print("mergekit is not installed (no mergekit-yaml); skipping the parity comparison.")
        return 0
    methods = sorted(MERGEKIT_METHODS & set(METHODS))
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            ap.error(f"not a mergekit method streammerge has: {', '.join(unknown)}")
        methods = [m for m in methods if m in wanted]
    dtypes = args.dtypes.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="mk-parity-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    rows: list[Row] = []
    for dtype in dtypes:
        fam = work / f"family-{dtype}"
        base, fts = fam / "base", [fam / f"ft{k}" for k in range(1, TASK_MODELS + 1)]
        if not (args.reuse and all((p / "config.json").is_file() for p in (base, *fts))):
            base, fts = generate_family(fam, args.preset, TASK_MODELS, dtype=DTYPES[dtype])
        folders = [base, *fts]
        tensors = {p: load_folder(p) for p in folders}
        cases = [(m, m, {}) for m in methods]
        cases += [(f"{m} (density 1)", m, o) for m, o in DETERMINISTIC_VARIANTS.items()
                  if m in methods]  # fmt: skip
        for label, method, overrides in cases:
            row = Row(label, dtype)
            rows.append(row)
            doc = recipe_doc(method, base, fts, overrides)
            d = work / dtype / label.replace(" (density 1)", "-density1")
            done = (d / "mk").is_dir() and (d / "sm" / "streammerge.json").is_file()
            if not (args.reuse and done):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                recipe = d / "recipe.yaml"
                recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
                try:
                    row.mk_s = run_tool(mergekit_cmd(exe, recipe, d / "mk"), d / "mk.log")
                    row.sm_s = run_tool(streammerge_cmd(recipe, d / "sm"), d / "sm.log", env)
                except RuntimeError as e:
                    row.error = str(e)
                    print(f"{method} {dtype}: {e}", file=sys.stderr)
                    continue
            try:
                ref = float64_reference(doc)
            except Exception as e:  # a method without a float64 path: no such class
                print(f"{method} {dtype}: no float64 reference ({e})", file=sys.stderr)
                ref = None
            # The base first even where the method ignores it: tie keys are deltas from it.
            used = [base, *(Path(m["model"]) for m in doc["models"])]
            compare(row, method, doc, load_folder(d / "mk"), load_folder(d / "sm"), ref,
                    [tensors[p] for p in used])  # fmt: skip
            print(
                f"{label} {dtype}: {row.elements} elements, {row.equal} equal, {row.ulp1} "
                f"within 1 ulp, beyond: {row.beyond} {row.error} "
                f"(mergekit {row.mk_s:.1f}s, streammerge {row.sm_s:.1f}s)",
                file=sys.stderr,
            )

    text = table(rows)
    cpu = platform.processor() or platform.machine()
    text += (
        f"\n{args.preset} preset, {TASK_MODELS} fine-tunes generated by streammerge.synth; "
        f"mergekit-yaml {exe}; {platform.system()} {cpu}, torch {torch.__version__}.\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    bad = [f"{r.method} ({r.dtype})" for r in rows if r.bad]
    if bad:
        print(f"unexplained differences or failures: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
