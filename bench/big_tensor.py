"""A 70B-sized tensor inside the budget: every method on one 128256 x 8192 embedding.

Usage::

    python bench/big_tensor.py [--methods all|m1,m2] [--max-memory 1GiB] [--root /tmp/sm-bench]

Generates (once) the family ``ROOT/70b-embed``: a base and two fine-tunes, each one bfloat16
tensor of Llama-3-70B's embedding shape (128256 x 8192, 2.1 GB; ``tie_embeddings`` so there is
no second one) plus the final norm. Then runs ``streammerge run`` for each method with
``run.py``'s recipe and ``--max-memory``, and prints a table: wall, peak RSS (the kernel's
high-water mark of the merge process, ``ru_maxrss``), peak anonymous RSS (sampled), and
whether the peak stayed below the budget. Exit status 1 if any run failed or went over.

A 2.1 GB tensor is twice a 1 GiB budget: every method has to stream it in chunks, statistics
passes included. Disk: 6.3 GB of inputs, plus one output at a time (deleted after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from measure import measure  # noqa: E402
from run import RECIPES, merge_cmd  # noqa: E402

from streammerge.memory import parse_size  # noqa: E402
from streammerge.synth import LlamaShape, generate_family  # noqa: E402

SHAPE = LlamaShape(
    hidden=8192, intermediate=28672, layers=0, heads=64, kv_heads=8, vocab=128256,
    tie_embeddings=True,
)  # fmt: skip
FAMILY = "70b-embed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="all")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    args = ap.parse_args(argv)
    methods = list(RECIPES) if args.methods == "all" else args.methods.split(",")
    budget_mib = parse_size(args.max_memory) / 2**20

    family = args.root / FAMILY
    if not (family / "ft2" / "config.json").exists():
        shutil.rmtree(family, ignore_errors=True)
        generate_family(family, SHAPE, n_finetunes=2, seed=0, verbose=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))

    rows = []
    for method in methods:
        recipe = args.root / f"{FAMILY}-{method}.yaml"
        recipe.write_text(RECIPES[method].format(root=family))
        out = args.root / f"{FAMILY}-{method}-out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = merge_cmd(recipe, out, args.max_memory)
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        res = measure(cmd, env=env, stdout=2)
        res["method"] = method
        res["within"] = res["returncode"] == 0 and float(res["maxrss_mib"]) < budget_mib
        rows.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)

    print(f"One {SHAPE.vocab} x {SHAPE.hidden} bfloat16 tensor (2.1 GB) per model, base + 2 "
          f"fine-tunes; streammerge --max-memory {args.max_memory}.\n")  # fmt: skip
    print("| method | wall s | peak RSS MiB | peak anon MiB | below budget |")
    print("|---|---|---|---|---|")
    for r in rows:
        ok = r["returncode"] == 0
        print(
            f"| {r['method']} | {r['wall_s']:.1f} | {r['maxrss_mib']:.0f} | "
            f"{r['peak_anon_mib']:.0f} | "
            + ("yes" if r["within"] else ("NO" if ok else f"FAILED (rc {r['returncode']})"))
            + " |"
        )
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
