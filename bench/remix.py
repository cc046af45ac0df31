"""remix and add against full runs, side by side, with the bytes checked.

Usage::

    python bench/remix.py [--preset 1b] [--max-memory 1GiB] [--root /tmp/sm-bench]
                          [--code DIR ...] [--out /tmp/sm-bench/remix]

For each ``--code`` checkout (default: this one; pass an older worktree too to compare
versions in one sitting) it runs, each command as its own process under ``/usr/bin/time``:

1. ``run`` of CABS 16:64 with ft1/ft2 at weights 1.0 / 0.8 (the source merge);
2. ``run`` at 0.5 / 1.2, then ``remix`` of the source to 0.5 / 1.2;
3. ``run`` with ft3 appended at weight 0.6, then ``add`` of ft3 to the source.

Prints one JSON line per command (wall, user and system CPU seconds, peak RSS, the load
average when it started) and one per checkout with the ratios remix / run and add / run and
whether remix and add wrote the same shard bytes (SHA-256) as their full runs. When several
checkouts are given, also whether every checkout wrote the same shards for the same command.
Needs ``ft3`` in the family (``bench/generate.py PRESET DIR --finetunes 3``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RECIPE = (
    "merge_method: cabs\nbase_model: {fam}/base\nmodels:\n{models}"
    "parameters: {{n_val: 16, m_val: 64}}\ndtype: float32\n"
)


def recipe(fam: Path, weights: list[float]) -> str:
    models = "".join(
        f"  - model: {fam}/ft{i + 1}\n    parameters: {{weight: {w}}}\n"
        for i, w in enumerate(weights)
    )
    return RECIPE.format(fam=fam, models=models)


def timed(cmd: list[str], code: Path) -> dict[str, object]:
    """Run ``cmd`` with ``code`` first on the import path; wall, CPU (s) and peak RSS (MiB)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    fmt = "%e %U %S %M"
    load = os.getloadavg()[0]
    res = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], env=env, capture_output=True,
                         text=True)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    wall, user, sys_, rss = res.stderr.strip().splitlines()[-1].split()
    return {"wall_s": float(wall), "user_s": float(user), "sys_s": float(sys_),
            "peak_rss_mib": round(int(rss) / 1024), "load_avg_1m": load}  # fmt: skip


def shards(out: Path) -> dict[str, str]:
    """SHA-256 of every output shard."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("model-*.safetensors"))}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    ap.add_argument("--code", type=Path, action="append", help="checkout(s) to run")
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (removed first)")
    args = ap.parse_args()
    fam = args.root / args.preset
    if not (fam / "ft3").is_dir():
        raise SystemExit(f"{fam}/ft3 missing: bench/generate.py {args.preset} {fam} --finetunes 3")
    codes = [c.resolve() for c in args.code or [HERE.parent]]
    work = args.out or args.root / f"{args.preset}-remix"
    py = [sys.executable, "-m", "streammerge"]
    common = ["--max-memory", args.max_memory, "--no-progress"]
    digests: dict[str, list[dict[str, str]]] = {}
    for ci, code in enumerate(codes):
        d = work / f"code{ci}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, w in (("src", [1.0, 0.8]), ("full2", [0.5, 1.2]), ("full3", [1.0, 0.8, 0.6])):
            (d / f"{name}.yaml").write_text(recipe(fam, w))
        cmds = {
            "run source 1.0/0.8": [*py, "run", str(d / "src.yaml"), str(d / "src"), *common],
            "run 0.5/1.2": [*py, "run", str(d / "full2.yaml"), str(d / "full2"), *common],
            "remix to 0.5/1.2": [*py, "remix", str(d / "src"), str(d / "remix"), "--weight",
                                 "ft1=0.5", "--weight", "ft2=1.2", *common],
            "run + ft3 0.6": [*py, "run", str(d / "full3.yaml"), str(d / "full3"), *common],
            "add ft3 0.6": [*py, "add", str(d / "src"), str(d / "add"), "--model",
                            str(fam / "ft3"), "--weight", "0.6", *common],
        }  # fmt: skip
        res = {}
        for label, cmd in cmds.items():
            res[label] = timed(cmd, code)
            print(json.dumps({"code": str(code), "command": label, **res[label]}), flush=True)
        same_remix = shards(d / "remix") == shards(d / "full2")
        same_add = shards(d / "add") == shards(d / "full3")
        for label, folder in (("full2", "full2"), ("full3", "full3"), ("remix", "remix")):
            digests.setdefault(label, []).append(shards(d / folder))
        walls = {label: float(r["wall_s"]) for label, r in res.items()}  # type: ignore[arg-type]
        summary = {
            "code": str(code),
            "remix_vs_run_wall": round(walls["remix to 0.5/1.2"] / walls["run 0.5/1.2"], 3),
            "add_vs_run_wall": round(walls["add ft3 0.6"] / walls["run + ft3 0.6"], 3),
            "remix_bytes_equal_run": same_remix,
            "add_bytes_equal_run": same_add,
        }
        print(json.dumps(summary), flush=True)
    if len(codes) > 1:
        same = {k: all(v == vs[0] for v in vs) for k, vs in digests.items()}
        print(json.dumps({"same_shards_across_checkouts": same}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
