"""streammerge vs mergekit vs the machine's I/O floor, side by side, in one run.

Usage::

    python bench/compare.py --preset 1b --methods cabs,ties,task_arithmetic \\
        [--max-memory 1GiB] [--root /tmp/sm-bench] [--mergekit CMD] [--warm] \\
        [--check-values] [--out FILE.md] [--json]

For each method it runs ``python -m streammerge run RECIPE OUT --max-memory SIZE --no-progress``
and, when mergekit is found, ``mergekit-yaml CFG OUT --no-copy-tokenizer --out-shard-size 2B
--quiet`` on the same inputs (the flags of ``shared/reference/baselines.md``). Both read the
recipe of ``run.py``'s ``RECIPES`` (mergekit's baseline weights and densities, else the method's
registry example). Both tools compute in float32 and write the family's dtype: streammerge by
default, mergekit with ``dtype: float32`` (cast every input to float32 and compute in it) and
``out_dtype`` set to the family's dtype, which its copy of the recipe gets. ``--methods all``
runs every method. Methods mergekit lacks (``cabs``, ``magnitude``) get a dash in the mergekit
row, and their streammerge wall is compared with mergekit's ``task_arithmetic`` (the target of
issue 5: "1b CABS wall <= mergekit task arithmetic's wall"), which is run for that purpose if it
is not in ``--methods``.

Every run is cold unless ``--warm``: dirty pages are flushed and the page cache is dropped
(``/proc/sys/vm/drop_caches``, root only), or, where that is refused, the input files are
evicted with ``posix_fadvise(DONTNEED)``; residency after eviction is checked with ``fincore``
where available. "wall s" is the process's wall time plus an ``fsync`` of every output file
after it exits (mergekit does not fsync, streammerge does), so both mean "until the output is
on disk", like the floor. Peak RSS is the kernel's high-water mark (``ru_maxrss``) of the
largest process; peak anon is the sampled anonymous RSS of the process tree (see measure.py).

The I/O floor of a method is: the cold sequential read of the safetensors of the models its
recipe names (64 MiB ``read()`` calls, timed per model) plus writing as many bytes as the
output has (the base's safetensors size) to a temp file on the output filesystem with
``fsync``. Each output folder is deleted once measured (the tensor names, dtypes and shapes of
the two tools' outputs are compared first; ``--check-values`` also compares the values).

Installing mergekit for the comparison, in its own venv, with the CPU torch (not the project's
dependency, not in CI)::

    python3.11 -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0      # the CPU wheel; install it first
    /tmp/mk-venv/bin/pip install mergekit==0.1.5    # keeps that torch (it asks torch>=2.0)

(About 1.6 GB with transformers, datasets and pyarrow; no CUDA.) ``--mergekit`` defaults to
``mergekit-yaml`` on PATH, else ``/tmp/mk-venv/bin/mergekit-yaml``; ``--mergekit none`` skips
it. Timings on a shared or small machine are noisy: the header line records the load average
at the start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from measure import drop_caches, evict, measure  # noqa: E402
from run import RECIPES, ensure_family, merge_cmd, write_recipe  # noqa: E402

from streammerge.methods import MERGEKIT_METHODS  # noqa: E402  (mergekit 0.1.5's names)

MERGEKIT_REFERENCE = "task_arithmetic"
"""What methods mergekit lacks are compared with."""
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--out-shard-size", "2B", "--quiet"]
FAMILY_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_BLOCK = 64 << 20
_GB = 1e9
DASH = "\u2013"  # en dash: "no such run"


# ---------------------------------------------------------------- machine and inputs


def machine_info() -> dict[str, Any]:
    """Cores, RAM, CPU model, Python and torch versions, UTC date and the load average."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "?"
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch_version,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def recipe_models(recipe: Path) -> list[Path]:
    """The model folders a recipe reads: ``base_model`` (if any), then ``models:``."""
    import yaml

    doc = yaml.safe_load(recipe.read_text())
    paths = [doc["base_model"]] if doc.get("base_model") else []
    paths += [m["model"] for m in doc["models"] if m["model"] not in paths]
    return [Path(p) for p in paths]


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the bytes of ``files`` in the page cache (``fincore``), or None."""
    if not shutil.which("fincore") or not files:
        return None
    cmd = ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, files)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    resident = total = 0
    for line in res.stdout.splitlines():
        r, s = line.split()[:2]
        resident, total = resident + int(r), total + int(s)
    return resident / total if total else 0.0


class Cache:
    """Makes the inputs cold: drop_caches while it works, else posix_fadvise per file."""

    def __init__(self, inputs: list[Path]):
        self.inputs = inputs
        self.drop_ok: bool | None = None

    def cold(self) -> float | None:
        """Evict; return the fraction of the inputs still resident afterwards (or None)."""
        if self.drop_ok is not False:
            self.drop_ok = drop_caches()
        evict(self.inputs)  # also after drop_caches: cheap, and covers a refused drop
        return resident_fraction(self.inputs)

    @property
    def how(self) -> str:
        return "drop_caches" if self.drop_ok else "posix_fadvise(DONTNEED) per input file"


# ---------------------------------------------------------------- the I/O floor


def read_file(path: Path, buf: bytearray) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            n += got
    return n


def write_floor(directory: Path, size: int) -> float:
    """Seconds to write ``size`` bytes to a temp file in ``directory`` and fsync it."""
    block = os.urandom(_BLOCK)  # not zeros, in case the storage compresses
    fd, name = tempfile.mkstemp(prefix=".floor-", dir=directory)
    try:
        t0 = time.perf_counter()
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, _BLOCK)])
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(name)


def io_floor(models: list[Path], cache: Cache, out_dir: Path, out_bytes: int) -> dict[str, Any]:
    """Cold read of every model's shards (timed per model) and the output write with fsync."""
    residual = cache.cold()
    buf = bytearray(_BLOCK)
    reads = {}
    for model in models:
        t0 = time.perf_counter()
        n = sum(read_file(f, buf) for f in shards(model))
        reads[str(model)] = {"bytes": n, "s": round(time.perf_counter() - t0, 3)}
    write_s = write_floor(out_dir, out_bytes)
    return {
        "evicted_with": cache.how,
        "resident_after_evict": residual,
        "reads": reads,
        "write": {"bytes": out_bytes, "s": round(write_s, 3)},
    }


def floor_for(floor: dict[str, Any], models: list[Path]) -> float:
    return sum(floor["reads"][str(m)]["s"] for m in models) + floor["write"]["s"]


def _size(n: int) -> str:
    return f"{n / _GB:.2f} GB" if n >= _GB / 10 else f"{n / 1e6:.2f} MB"


def floor_line(floor: dict[str, Any]) -> str:
    read_b = sum(r["bytes"] for r in floor["reads"].values())
    read_s = sum(r["s"] for r in floor["reads"].values())
    w = floor["write"]
    parts = ", ".join(f"{Path(m).name} {r['s']:.2f} s" for m, r in floor["reads"].items())
    res = floor["resident_after_evict"]
    res_txt = "" if res is None else f"; {100 * res:.1f}% of inputs resident after eviction"
    return (
        f"I/O floor: cold read {_size(read_b)} in {read_s:.2f} s "
        f"({read_b / _GB / max(read_s, 1e-9):.2f} GB/s; {parts}) + write {_size(w['bytes'])} "
        f"with fsync in {w['s']:.2f} s ({w['bytes'] / _GB / max(w['s'], 1e-9):.2f} GB/s); "
        f"evicted with {floor['evicted_with']}{res_txt}"
    )


# ---------------------------------------------------------------- outputs


def layout(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` from the headers of every safetensors file in ``out``."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in shards(out):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        found.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return found


def compare_layouts(a: dict, b: dict) -> str:
    if a == b:
        return f"same {len(a)} tensors, dtypes and shapes"
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return f"DIFFERENT: only streammerge {only_a[:3]}, only mergekit {only_b[:3]}, {differ[:3]}"


def compare_values(a: Path, b: Path) -> str:
    """Max abs difference and fraction of differing elements between two merged folders."""
    import torch
    from safetensors import safe_open

    def handles(d: Path) -> dict[str, Any]:
        out = {}
        for f in shards(d):
            h = safe_open(f, framework="pt")
            out.update(dict.fromkeys(h.keys(), h))
        return out

    ha, hb = handles(a), handles(b)
    max_abs, differ, total = 0.0, 0, 0
    for name in sorted(set(ha) & set(hb)):
        x = ha[name].get_tensor(name).float()
        y = hb[name].get_tensor(name).float()
        if x.shape != y.shape:
            continue
        d = (x - y).abs()
        max_abs = max(max_abs, float(d.max())) if d.numel() else max_abs
        differ += int(torch.count_nonzero(d))
        total += d.numel()
    return f"max |diff| {max_abs:.3g}, {differ / max(total, 1):.2%} of elements differ"


def fsync_tree(out: Path) -> float:
    """fsync every file under ``out`` and the folders; return the seconds it took."""
    t0 = time.perf_counter()
    for path in [*sorted(out.rglob("*")), out]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def tree_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------- runs


def find_mergekit(arg: str | None) -> list[str] | None:
    if arg == "none":
        return None
    if arg:
        return shlex.split(arg)
    for cand in (shutil.which("mergekit-yaml"), "/tmp/mk-venv/bin/mergekit-yaml"):
        if cand and Path(cand).exists():
            return [cand]
    return None


def mergekit_versions(cmd: list[str]) -> str:
    """``mergekit X, torch Y`` from the interpreter of the mergekit script, if it is one."""
    try:
        first = Path(cmd[0]).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return "?"
    if not first.startswith("#!"):
        return "?"
    code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
    res = subprocess.run([first[2:].strip(), "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return "?"
    mk, torch_v = res.stdout.split()
    return f"mergekit {mk} (torch {torch_v})"


def mergekit_config(preset: str, method: str, root: Path, out_dtype: str) -> Path:
    """The mergekit copy of the method's recipe, with ``out_dtype`` set."""
    path = root / f"{preset}-{method}-mergekit.yaml"
    text = RECIPES[method].format(root=root / preset)
    path.write_text(text + f"dtype: float32\nout_dtype: {out_dtype}\n")
    return path


def run_one(
    tool: str, cmd: list[str], out: Path, cache: Cache | None, env: dict[str, str]
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    resident = cache.cold() if cache else None
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    res: dict[str, Any] = {"tool": tool, "cmd": shlex.join(cmd), "resident_before": resident}
    res.update(measure(cmd, env=env, stdout=2))  # keep our stdout for the table
    print("row: " + json.dumps(res), file=sys.stderr, flush=True)  # kept if the run is cut short
    if res["returncode"] == 0:
        res["sync_s"] = round(fsync_tree(out), 3)
        res["wall_durable_s"] = round(res["wall_s"] + res["sync_s"], 3)
        res["out_bytes"] = tree_bytes(out)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--methods", default="cabs,ties,task_arithmetic")
    ap.add_argument("--max-memory", default="1GiB", help="streammerge --max-memory")
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    ap.add_argument("--mergekit", help="mergekit-yaml command ('none' to skip)")
    ap.add_argument("--warm", action="store_true", help="do not evict the inputs before runs")
    ap.add_argument("--check-values", action="store_true", help="compare output values too")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == ["all"]:
        methods = list(RECIPES)
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {sorted(RECIPES)}")
    mk_cmd = find_mergekit(args.mergekit)
    if args.mergekit not in (None, "none") and (mk_cmd is None or not shutil.which(mk_cmd[0])):
        ap.error(f"mergekit command not found: {args.mergekit}")

    args.root.mkdir(parents=True, exist_ok=True)
    family = ensure_family(args.preset, args.root)
    fam = json.loads((family / "family.json").read_text())
    out_dtype = FAMILY_DTYPES[fam.get("dtype", "BF16")]
    recipes = {m: write_recipe(args.preset, m, args.root) for m in methods}
    mk_methods = [m for m in methods if m in MERGEKIT_METHODS]
    lacking = any(m not in MERGEKIT_METHODS for m in methods)
    if mk_cmd and lacking and MERGEKIT_REFERENCE not in mk_methods:
        mk_methods.append(MERGEKIT_REFERENCE)  # the reference for cabs / magnitude
        recipes[MERGEKIT_REFERENCE] = write_recipe(args.preset, MERGEKIT_REFERENCE, args.root)
    models = {m: recipe_models(r) for m, r in recipes.items()}
    all_models = list(dict.fromkeys(p for ms in models.values() for p in ms))
    inputs = [f for model in all_models for f in shards(model)]
    out_bytes = sum(f.stat().st_size for f in shards(family / "base"))

    info = machine_info()
    if mk_cmd:
        info["mergekit"] = mergekit_versions(mk_cmd)
    cache = Cache(inputs)
    floor = io_floor(all_models, cache, args.root, out_bytes)
    print(floor_line(floor), file=sys.stderr)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    mk_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_cache = None if args.warm else cache
    rows: list[dict[str, Any]] = []
    for method in [*methods, *(m for m in mk_methods if m not in methods)]:
        sm_layout = None
        sm_out = args.root / f"{args.preset}-{method}-cmp-streammerge"
        mk_out = args.root / f"{args.preset}-{method}-cmp-mergekit"
        if method in methods:
            cmd = merge_cmd(recipes[method], sm_out, args.max_memory)
            row = run_one("streammerge", cmd, sm_out, run_cache, env)
            row["method"] = method
            rows.append(row)
            if row["returncode"] == 0:
                sm_layout = layout(sm_out)
            if not (args.check_values and method in mk_methods):
                shutil.rmtree(sm_out, ignore_errors=True)
        if mk_cmd and method in mk_methods:
            cfg = mergekit_config(args.preset, method, args.root, out_dtype)
            cmd = [*mk_cmd, str(cfg), str(mk_out), *MERGEKIT_FLAGS]
            row = run_one("mergekit", cmd, mk_out, run_cache, mk_env)
            row["method"] = method
            if method not in methods:
                row["reference_only"] = True
            if row["returncode"] == 0 and sm_layout is not None:
                row["layout_vs_streammerge"] = compare_layouts(sm_layout, layout(mk_out))
                if args.check_values:
                    row["values_vs_streammerge"] = compare_values(sm_out, mk_out)
            rows.append(row)
            shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(sm_out, ignore_errors=True)

    for row in rows:
        row["floor_s"] = round(floor_for(floor, models[row["method"]]), 3)
    report = {
        "preset": args.preset,
        "max_memory": args.max_memory,
        "cold": not args.warm,
        "machine": info,
        "floor": floor,
        "rows": rows,
    }
    table = markdown(report)
    if args.out:
        args.out.write_text(table)
    print(json.dumps(report, indent=2) if args.json else table)
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


# ---------------------------------------------------------------- the table


def _ratio(a: float | None, b: float | None) -> str:
    return DASH if a is None or not b else f"{a / b:.2f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    head = (
        f"Machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['cpu']}; Python {m['python']}, "
        f"torch {m['torch']}"
        + (f"; {m['mergekit']}" if "mergekit" in m else "; mergekit not run")
        + f"; {m['date']}; load average at start {m['loadavg'][0]}.\n"
        f"Preset `{report['preset']}`, streammerge `--max-memory {report['max_memory']}`, "
        + ("cold cache before every run" if report["cold"] else "warm cache")
        + ". Wall s = process wall + fsync of its output files after it exits (that fsync in"
        " parentheses).\n" + floor_line(report["floor"]) + ".\n\n"
    )
    rows = report["rows"]
    mk = {r["method"]: r for r in rows if r["tool"] == "mergekit" and r["returncode"] == 0}
    lines = [
        "| method | tool | wall s | peak RSS MiB | peak anon MiB "
        "| streammerge / mergekit | wall / I/O floor |",
        "|---|---|---|---|---|---|---|",
    ]
    have_mk = any(r["tool"] == "mergekit" for r in rows)
    for r in rows:
        ok = r["returncode"] == 0
        wall = r.get("wall_durable_s")
        wall_txt = f"{wall:.1f} ({r['sync_s']:.1f})" if ok else f"FAILED (rc {r['returncode']})"
        vs = ""
        if r["tool"] == "streammerge":
            ref = mk.get(r["method"])
            if ref is None and r["method"] not in MERGEKIT_METHODS:
                ref = mk.get(MERGEKIT_REFERENCE)
                vs = f" (vs mergekit {MERGEKIT_REFERENCE})" if ref else ""
            ratio = _ratio(wall, ref and ref.get("wall_durable_s")) + vs
        else:
            ratio = ""
        method = r["method"] + (" (reference)" if r.get("reference_only") else "")
        lines.append(
            f"| {method} | {r['tool']} | {wall_txt} | {r['maxrss_mib']:.0f} "
            f"| {r['peak_anon_mib']:.0f} | {ratio} | {_ratio(wall, r['floor_s'])} |"
        )
        if (
            r["tool"] == "streammerge"
            and have_mk
            and r["method"] not in MERGEKIT_METHODS
            and r["method"] not in mk
        ):
            lines.append(f"| {r['method']} | mergekit | {DASH} | {DASH} | {DASH} | | |")
    notes = [
        f"- {r['method']}: mergekit output vs streammerge: {r['layout_vs_streammerge']}"
        + (f"; {r['values_vs_streammerge']}" if "values_vs_streammerge" in r else "")
        for r in rows
        if "layout_vs_streammerge" in r
    ]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


if __name__ == "__main__":
    sys.exit(main())
