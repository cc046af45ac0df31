"""Per-element cost of CABS's per-chunk step: the torch formulation vs the numba kernel.

Usage: ``python bench/kernels.py [--elems 16Mi] [--repeat 3]``. Merges one synthetic bf16
chunk (base + 2 fine-tunes, 16:64, strict) with each path, checks the bytes agree, and prints
milliseconds and million elements per second, so the choice of kernel rests on numbers
measured on the machine at hand. ``torch.set_num_threads`` / ``NUMBA_NUM_THREADS`` set the
thread counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streammerge.memory import parse_size
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId, kernels


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    fn()  # warm-up (and numba compilation)
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elems", default="16Mi", help="chunk length in elements (e.g. 16Mi)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = parse_size(args.elems.replace("Mi", "MiB").replace("Ki", "KiB"))
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16() for _ in range(2)]
    cabs = METHODS["cabs"]
    params = (ModelParams(1.0, 16, 64), ModelParams(0.8, 16, 64))
    state = cabs.new_state(TensorId("x", n), params, MethodOptions(), torch.float32)

    rows: list[tuple[str, float]] = []
    outs = {}
    for label, compiled in (("torch (abs-key, topk, scatter)", False), ("numba kernel", True)):
        saved, kernels.HAVE_NUMBA = kernels.HAVE_NUMBA, compiled and kernels.HAVE_NUMBA
        try:
            dt, outs[label] = _time(lambda: cabs.merge(state, 0, base, fts), args.repeat)
        finally:
            kernels.HAVE_NUMBA = saved
        rows.append((label, dt))
    dt, _ = _time(lambda: [x.to(torch.float32) for x in (base, *fts)], args.repeat)
    rows.append(("for scale: bf16 -> float32 of the 3 inputs (torch)", dt))
    a, b = outs.values()
    same = torch.equal(a.out.view(torch.int32), b.out.view(torch.int32)) and all(
        torch.equal(x, y) for x, y in zip(a.masks, b.masks, strict=True)
    )
    print(f"CABS 16:64, K=2, bf16 inputs, {n} elements per chunk, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| step | ms | M elements/s |\n|---|---|---|")
    for label, dt in rows:
        print(f"| {label} | {dt * 1e3:.0f} | {n / dt / 1e6:.0f} |")
    print(f"outputs and masks identical: {same}")


if __name__ == "__main__":
    main()
