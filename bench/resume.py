"""Cost of an interruption: SIGKILL a merge at a fraction of its wall time, resume it.

Usage::

    python bench/resume.py 1b cabs [--at 0.5] [--max-memory 1GiB] [--root /tmp/sm-bench]

Runs the merge once uninterrupted (wall T), then again into a fresh folder, kills it with
SIGKILL at ``at * T``, reruns the same command, and checks the result is byte-identical to the
uninterrupted output. Prints one JSON line: both walls, the overhead ratio
``(killed + resumed) / T``, and the chunks the journal had kept versus the total (the work lost
is what ran after the last journal flush, at most ``JOURNAL_INTERVAL_S`` plus one tensor for
methods whose merge pass carries state across chunks).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import RECIPES, ensure_family, merge_cmd, write_recipe  # noqa: E402


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    skip = {Path("streammerge.json")}  # records wall times
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a if f not in skip)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset")
    ap.add_argument("method", choices=sorted(RECIPES))
    ap.add_argument("--at", type=float, default=0.5, help="kill point, fraction of the wall")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--root", type=Path, default=Path("/tmp/sm-bench"))
    args = ap.parse_args()

    ensure_family(args.preset, args.root)
    recipe = write_recipe(args.preset, args.method, args.root)
    ref, out = (args.root / f"{args.preset}-{args.method}-{x}" for x in ("ref", "resumed"))
    for d in (ref, out):
        shutil.rmtree(d, ignore_errors=True)

    t0 = time.perf_counter()
    subprocess.run(merge_cmd(recipe, ref, args.max_memory), check=True, capture_output=True)
    wall = time.perf_counter() - t0

    t0 = time.perf_counter()
    proc = subprocess.Popen(merge_cmd(recipe, out, args.max_memory), stdout=subprocess.DEVNULL)
    time.sleep(args.at * wall)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.perf_counter() - t0
    journal = (out / ".streammerge" / "journal.jsonl").read_text()
    kept_chunks = journal.count('"chunk"')

    t0 = time.perf_counter()
    done = subprocess.run(merge_cmd(recipe, out, args.max_memory), capture_output=True, text=True)
    resumed = time.perf_counter() - t0
    skipped = re.search(r"resumed: (\d+) chunks of (\d+)", done.stdout)
    print(json.dumps({
        "preset": args.preset, "method": args.method, "kill_at": args.at,
        "uninterrupted_s": round(wall, 1), "killed_s": round(killed, 1),
        "resumed_s": round(resumed, 1), "overhead": round((killed + resumed) / wall, 3),
        "journaled_chunks_at_kill": kept_chunks,
        "skipped_chunks_on_resume": int(skipped.group(1)) if skipped else 0,
        "total_chunks": int(skipped.group(2)) if skipped else None,
        "identical": done.returncode == 0 and same_tree(ref, out),
    }))  # fmt: skip
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
