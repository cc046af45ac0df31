"""The GPU check, one script for a lent CUDA machine: generate, merge on the GPU, verify, measure.

Usage (on the GPU machine, from the repository root)::

    python bench/gpu.py [--preset 3b] [--methods cabs,ties,task_arithmetic] \\
        [--max-memory 1GiB] [--max-vram 8GiB] [--sample 12] [--root /tmp/sm-bench] [--out F.json]

Steps: generate the synthetic family (``bench/generate.py``, skipped when complete); measure
the machine's cold I/O floor (read every input, write the output's size with fsync:
``bench/compare.py``'s floor); then for each method merge with ``--device cuda`` in a child
process that reports its wall time, peak VRAM (``torch.cuda.max_memory_reserved``) and peak
RSS (VmHWM), and compare ``--sample`` tensors (embedding, head, and evenly spaced others) with
the in-memory reference on the CPU, byte for byte. Prints one JSON line per method and a
summary; exit status 1 when a sample differs, a budget is exceeded, or the merge fails.

Targets (issue 14): 3b CABS within 1.2x of the floor, peak VRAM below ``--max-vram``, peak RSS
below ``--max-memory``. Nothing here runs without a CUDA device: the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from compare import Cache, floor_for, io_floor, shards  # noqa: E402
from run import ensure_family, write_recipe  # noqa: E402

from streammerge.memory import parse_size  # noqa: E402

CHILD = """
import json, sys, torch
from streammerge import run_merge
recipe, out, max_memory, max_vram = sys.argv[1:5]
s = run_merge(recipe, out, max_memory=int(max_memory), max_vram=int(max_vram), device="cuda",
              progress=False)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"merge_s": round(s.seconds, 2), "peak_vram": torch.cuda.max_memory_reserved(),
                  "peak_rss": hwm, "bytes_read": s.bytes_read}))
"""


def sample_names(names: list[str], n: int) -> list[str]:
    """The embedding and head (the largest tensors) and ``n`` evenly spaced others."""
    big = [x for x in names if "embed_tokens" in x or x.startswith("lm_head")]
    rest = [x for x in names if x not in big]
    step = max(1, len(rest) // max(1, n))
    return big + rest[::step][:n]


def check_sample(recipe: Path, out: Path, n: int) -> tuple[int, list[str]]:
    """Compare ``n`` sampled output tensors with the CPU reference: (checked, mismatches)."""
    import torch
    from safetensors import safe_open

    from streammerge.model import ModelFolder
    from streammerge.recipe import load_recipe
    from streammerge.reference import reference_merge

    r = load_recipe(recipe)
    base = ModelFolder(r.base)
    names = sample_names(base.names(), n)
    base.close()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    bad, checked = [], 0
    for name, want, _ in reference_merge(r, only=set(names)):
        with safe_open(out / index[name], framework="pt") as f:
            got = f.get_tensor(name)
        checked += 1
        if got.dtype != want.dtype or not torch.equal(
            got.flatten().view(torch.uint8), want.flatten().view(torch.uint8)
        ):
            bad.append(name)
    return checked, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="3b")
    ap.add_argument("--methods", default="cabs,ties,task_arithmetic")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--max-vram", default="8GiB")
    ap.add_argument("--sample", type=int, default=12)
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on the GPU machine", file=sys.stderr)
        return 2
    family = ensure_family(args.preset, args.root)
    models = [family / d for d in ("base", "ft1", "ft2")]
    out_bytes = sum(p.stat().st_size for p in shards(models[0]))
    floor = io_floor(models, Cache([p for m in models for p in shards(m)]), args.root, out_bytes)
    floor_s = floor_for(floor, models)
    mem, vram = parse_size(args.max_memory), parse_size(args.max_vram)
    results, ok = [], True
    for method in args.methods.split(","):
        recipe = write_recipe(args.preset, method, args.root)
        out = args.root / f"{args.preset}-{method}-gpu"
        shutil.rmtree(out, ignore_errors=True)
        Cache([p for m in models for p in shards(m)]).cold()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(recipe), str(out), str(mem), str(vram)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            results.append({"method": method, "error": proc.stderr.strip().splitlines()[-1:]})
            ok = False
            continue
        row = {"method": method, **json.loads(proc.stdout.strip().splitlines()[-1])}
        checked, bad = check_sample(recipe, out, args.sample)
        row.update(
            floor_s=round(floor_s, 2),
            vs_floor=round(row["merge_s"] / floor_s, 2),
            sampled=checked,
            mismatches=bad,
            vram_ok=row["peak_vram"] <= vram,
            rss_ok=row["peak_rss"] <= mem,
        )
        ok &= not bad and row["vram_ok"] and row["rss_ok"]
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    report = {"device": torch.cuda.get_device_name(0), "floor": floor, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ok": ok, "device": report["device"], "floor_s": round(floor_s, 2)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
