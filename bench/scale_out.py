"""Local run vs ``--executor ray`` with 1 and 2 workers on one machine, same recipe; checks
that every output is byte-identical to the local one.

Usage: ``python bench/scale_out.py FAMILY_DIR WORK_DIR [--method cabs] [--max-memory 1GiB]
[--workers 1,2]``. FAMILY_DIR holds ``base``, ``ft1``, ``ft2`` (``bench/generate.py``). Each
Ray run starts its own local instance (``ray.init(num_cpus=N)``) in a child process; the wall
includes that start-up, as a user's command would. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time, logging
from streammerge import run_merge
from streammerge.memory import parse_size
recipe, out, mem, workers = sys.argv[1], sys.argv[2], parse_size(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
kw = {}
if workers:
    import ray
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    kw = {"executor": "ray"}
s = run_merge(recipe, out, max_memory=mem, **kw)
print(json.dumps({"wall": time.perf_counter() - t0, "chunk_elems": s.chunk_elems}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--method", default="cabs")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    params = {"n_val": 16, "m_val": 64} if args.method == "cabs" else {}
    recipe = {
        "merge_method": args.method,
        "base_model": str(args.family / "base"),
        "models": [
            {"model": str(args.family / "ft1"), "parameters": {"weight": 1.0}},
            {"model": str(args.family / "ft2"), "parameters": {"weight": 0.8}},
        ],
        "parameters": params,
    }
    path = args.work / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    rows = []
    ref = args.work / "local"
    for workers in [0, *(int(w) for w in args.workers.split(","))]:
        out = ref if workers == 0 else args.work / f"ray{workers}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), args.max_memory,
                            str(workers)], capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - t0
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        same = "reference"
        if workers:
            shards = sorted(p.name for p in ref.glob("model-*.safetensors"))
            _, bad, err = filecmp.cmpfiles(ref, out, shards, shallow=False)
            same = "identical" if not bad and not err else f"DIFFER: {bad + err}"
            shutil.rmtree(out)
        rows.append((workers or "local", wall, load, same))
        print(rows[-1], file=sys.stderr, flush=True)
    shutil.rmtree(ref)
    print("| executor | workers | wall s (process) | load avg at start | shards vs local |")
    print("|---|---|---|---|---|")
    for w, wall, load, same in rows:
        kind = "local" if w == "local" else "ray"
        print(f"| {kind} | {1 if w == 'local' else w} | {wall:.1f} | {load:.1f} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
