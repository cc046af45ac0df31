"""Fingerprint the outputs of every method on synthetic families, to compare two checkouts.

Usage::

    python bench/same_bytes.py --tree /path/to/old/checkout --presets tiny,odd,1b --out old.json
    python bench/same_bytes.py --presets tiny,odd,1b --out new.json
    python bench/same_bytes.py --compare old.json new.json

Each run merges every recipe of ``RECIPES`` (every method, TADrop, an awkward chunk length)
plus ``remix`` and ``add`` on each preset with the checkout's ``streammerge`` (``--tree``
puts that checkout first on ``PYTHONPATH``), and records the SHA-256 of every file the merge
wrote except the model card and the completion marker (they hold times and versions). Wall
times are recorded too, so the same run compares speed side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

_TWO = (
    "base_model: {root}/base\nmodels:\n"
    "  - model: {root}/ft1\n    parameters: {{weight: %s%s}}\n"
    "  - model: {root}/ft2\n    parameters: {{weight: %s%s}}\n"
)
RECIPES: dict[str, str] = {
    "task_arithmetic": _TWO % ("0.5", "", "0.5", ""),
    "cabs": _TWO % ("1.0", "", "0.8", "") + "parameters: {{n_val: 16, m_val: 64}}\n",
    "cabs_fill": _TWO % ("1.0", "", "0.8", "")
    + "parameters: {{n_val: 3, m_val: 7, overlap_policy: fill, tail_policy: zero}}\n",
    "cabs_tadrop": _TWO % ("1.0", "", "0.8", "")
    + "parameters: {{n_val: 16, m_val: 64, tadrop: true}}\n",
    "ties": _TWO % ("1.0", ", density: 0.25", "1.0", ", density: 0.25"),
    "ties_tadrop": _TWO % ("1.0", ", density: 0.25", "0.7", ", density: 0.5")
    + "parameters: {{tadrop: true, normalize: false}}\n",
    "dare_ties": _TWO % ("0.5", ", density: 0.25", "0.5", ", density: 0.25")
    + "parameters: {{random_seed: 7}}\n",
    "dare_linear": _TWO % ("0.5", ", density: 0.25", "0.5", ", density: 0.25"),
    "magnitude": _TWO % ("1.0", ", density: 0.25", "1.0", ", density: 0.25")
    + "parameters: {{conflict_aware: true, rescale: true}}\n",
    "linear": "models:\n  - model: {root}/ft1\n    parameters: {{weight: 0.5}}\n"
    "  - model: {root}/ft2\n    parameters: {{weight: 0.5}}\n",
    "slerp": "base_model: {root}/base\nmodels:\n  - model: {root}/ft1\n"
    "parameters: {{t: [0.1, 0.5, 0.9]}}\n",
    "passthrough": "models:\n  - model: {root}/ft2\n    parameters: {{scale: 0.5}}\n",
}
METHOD = {"cabs_fill": "cabs", "cabs_tadrop": "cabs", "ties_tadrop": "ties"}
SKIPPED = {"README.md", "streammerge.json"}


def family(preset: str, root: Path) -> Path:
    """The synthetic family ``root/preset`` (``odd``: the test suite's awkward shapes)."""
    out = root / preset
    if preset == "odd":
        if not (out / "done").exists():
            sys.path.insert(0, str(HERE.parent / "tests"))
            from conftest import make_family

            shutil.rmtree(out, ignore_errors=True)
            make_family(out, k=3, shards=(2, 1, 3))
            (out / "done").write_text("")
        return out
    gen = [sys.executable, str(HERE / "generate.py"), preset, str(out), "--quiet"]
    gen += ["--finetunes", "3"]
    subprocess.run(gen, check=True)
    return out


def fingerprint(out: Path) -> dict[str, str]:
    """SHA-256 of every file under ``out`` (relative path -> hex), minus SKIPPED."""
    sums = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in SKIPPED and ".streammerge" not in p.parts:
            h = hashlib.sha256()
            with p.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            sums[str(p.relative_to(out))] = h.hexdigest()
    return sums


def merge(tree: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "streammerge", *args, "--no-progress"]
    t0 = time.perf_counter()
    # run from the tree: ``python -m`` puts the working directory first on sys.path
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tree)
    return time.perf_counter() - t0


def run_all(tree: Path, presets: list[str], root: Path, scratch: Path, only: set[str]) -> dict:
    results: dict[str, dict] = {}
    for preset in presets:
        fam = family(preset, root)
        for name, text in RECIPES.items():
            if only and name not in only:
                continue
            recipe = scratch / f"{preset}-{name}.yaml"
            recipe.write_text(f"merge_method: {METHOD.get(name, name)}\n" + text.format(root=fam)
                              + "dtype: float32\n")  # fmt: skip
            out = scratch / f"{preset}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--chunk-elems", "1000"] if preset != "1b" else ["--max-memory", "1GiB"]
            secs = merge(tree, ["run", str(recipe), str(out), *extra])
            results[f"{preset}/{name}"] = {"seconds": round(secs, 2), "files": fingerprint(out)}
            print(f"{preset}/{name}: {secs:.1f} s", file=sys.stderr)
            if name == "cabs":
                for verb, args in (
                    (
                        "remix",
                        [
                            "remix",
                            str(out),
                            str(scratch / "remix"),
                            "--weight",
                            "ft1=0.6",
                            "--weight",
                            "ft2=1.1",
                        ],
                    ),
                    (
                        "add",
                        [
                            "add",
                            str(out),
                            str(scratch / "add"),
                            "--model",
                            str(fam / "ft3"),
                            "--weight",
                            "0.7",
                        ],
                    ),
                ):
                    shutil.rmtree(scratch / verb, ignore_errors=True)
                    secs = merge(tree, args)
                    key = f"{preset}/cabs+{verb}"
                    results[key] = {"seconds": round(secs, 2), "files": fingerprint(scratch / verb)}
                    print(f"{key}: {secs:.1f} s", file=sys.stderr)
            if preset == "1b":
                shutil.rmtree(out, ignore_errors=True)
    return results


def compare(old: dict, new: dict) -> int:
    bad = 0
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            print(f"{key}: only in {'new' if a is None else 'old'}")
            bad += 1
            continue
        same = a["files"] == b["files"]
        bad += not same
        print(f"{key}: {'same bytes' if same else 'DIFFERENT'} ({len(a['files'])} files), "
              f"{a['seconds']} s -> {b['seconds']} s")  # fmt: skip
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="checkout to run")
    ap.add_argument("--presets", default="tiny,odd")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = ap.parse_args()
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    scratch = args.root / f"same-bytes-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    only = {x for x in args.only.split(",") if x}
    try:
        results = run_all(args.tree.resolve(), args.presets.split(","), args.root, scratch, only)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
