"""Generate a synthetic model family for benchmarks, unless it is already there.

Usage: ``python bench/generate.py PRESET OUT_DIR [--finetunes K] [--seed S] [--shard-size B]``

``OUT_DIR/family.json`` is written last, so its presence (with matching parameters) means a
complete family; an interrupted or differently parameterized one is regenerated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from streammerge.safetensors_io import atomic_write_text
from streammerge.synth import PRESETS, SYNTH_VERSION, generate_family

MARKER = "family.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate a synthetic Llama model family.")
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--finetunes", type=int, default=2, help="number of fine-tunes (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32"])
    ap.add_argument("--shard-size", type=int, default=2_000_000_000, help="max shard size in bytes")
    ap.add_argument("--quiet", action="store_true", help="no per-layer progress on stderr")
    args = ap.parse_args(argv)

    wanted = {
        "synth_version": SYNTH_VERSION,
        "preset": args.preset,
        "shape": asdict(PRESETS[args.preset]),
        "finetunes": args.finetunes,
        "seed": args.seed,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
    }
    marker = args.out_dir / MARKER
    try:
        have = json.loads(marker.read_text())
    except (OSError, ValueError):
        have = None
    if isinstance(have, dict) and {k: have.get(k) for k in wanted} == wanted:
        print(f"{args.out_dir}: family already complete, skipping", file=sys.stderr)
        return 0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # the folders are about to change
    t0 = time.perf_counter()
    base, fts = generate_family(
        args.out_dir,
        args.preset,
        n_finetunes=args.finetunes,
        seed=args.seed,
        dtype=args.dtype,
        shard_size=args.shard_size,
        verbose=not args.quiet,
    )
    seconds = time.perf_counter() - t0
    done = {**wanted, "models": [p.name for p in [base, *fts]], "seconds": round(seconds, 1)}
    atomic_write_text(marker, json.dumps(done, indent=2) + "\n")
    print(f"{args.out_dir}: generated {1 + len(fts)} models in {seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
