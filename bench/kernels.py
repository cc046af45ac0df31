"""Per-element cost of the hot per-chunk loops: the torch formulation vs the numba kernels.

Usage: ``python bench/kernels.py [--elems 16Mi] [--repeat 3] [--cabs-kernel]``. Runs one
synthetic bf16 chunk (base + 2 fine-tunes) through CABS 16:64 (strict) and through TIES
(density 0.25: two statistics passes, then the merge) with each path, checks the bytes agree,
and prints milliseconds and million elements per second, so the choice of kernel rests on
numbers measured on the machine at hand. ``OMP_NUM_THREADS`` / ``NUMBA_NUM_THREADS`` set the
threads.

``--cabs-kernel`` instead times the CABS kernel alone, the per-block search (``group=0``)
against the lane-parallel one, on bf16 and float32 inputs, and prints the median over
``--repeat`` runs in nanoseconds per element and model, of wall time and of the process's CPU
time (steadier on a machine shared with other work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streammerge.memory import parse_size
from streammerge.methods import METHODS, MethodOptions, ModelParams, TensorId, kernels
from streammerge.methods.base import MergeResult, Method


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
    ap.add_argument("--cabs-kernel", action="store_true", help="time the CABS kernel alone")
    args = ap.parse_args()
    n = parse_size(args.elems.replace("Mi", "MiB").replace("Ki", "KiB"))
    if args.cabs_kernel:
        cabs_kernel(n, args.repeat)
        return
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16() for _ in range(2)]
    cases = {
        "cabs 16:64": ("cabs", (ModelParams(1.0, 16, 64), ModelParams(0.8, 16, 64))),
        "ties density 0.25": ("ties", (ModelParams(1.0, density=0.25),) * 2),
    }
    print(f"bf16 inputs, base + 2 fine-tunes, {n} elements per chunk, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| loop | path | ms | M elements/s |\n|---|---|---|---|")
    for label, (name, params) in cases.items():
        method = METHODS[name]
        outs = []
        for path, compiled in (("torch", False), ("numba", True)):
            saved, kernels.HAVE_NUMBA = kernels.HAVE_NUMBA, compiled and kernels.HAVE_NUMBA
            try:
                dt, out = _time(lambda m=method, p=params: _merge(m, p, base, fts), args.repeat)
            finally:
                kernels.HAVE_NUMBA = saved
            outs.append(out)
            print(f"| {label} | {path} | {dt * 1e3:.0f} | {n / dt / 1e6:.0f} |")
        a, b = outs
        same = torch.equal(a.out.view(torch.int32), b.out.view(torch.int32)) and all(
            torch.equal(x, y) for x, y in zip(a.masks, b.masks, strict=True)
        )
        print(f"| {label} | identical bytes | {same} | |")
    dt, _ = _time(lambda: [x.to(torch.float32) for x in (base, *fts)], args.repeat)
    print(f"| for scale: bf16 -> float32 of the 3 inputs | torch | {dt * 1e3:.0f} | "
          f"{n / dt / 1e6:.0f} |")  # fmt: skip


def cabs_kernel(n: int, repeat: int, nm: tuple[int, int] = (16, 64)) -> None:
    """ns per element and model of :func:`kernels.cabs_step`, per-block vs lane-parallel search:
    base + 2 fine-tunes (strict, so the second model sees claimed positions), median of
    ``repeat`` runs after a warm-up, the bytes of both checked equal."""
    if not kernels.HAVE_NUMBA:
        raise SystemExit("numba kernel disabled")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g) * 0.02
    fts = [base + torch.randn(n, generator=g) * 1e-3 for _ in range(2)]
    print(f"CABS {nm[0]}:{nm[1]} strict, base + 2 fine-tunes, {n} elements, numba threads "
          f"{kernels.numba.get_num_threads()}, median of {repeat}")  # fmt: skip
    print("| inputs | search | ns/element/model (wall) | CPU ns/element/model (all threads) "
          "| identical bytes |\n|---|---|---|---|---|")  # fmt: skip
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        b = kernels.kernel_input(base.to(dtype))
        f = [kernels.kernel_input(x.to(dtype)) for x in fts]
        outs = {}
        for name, group in (("per block (old)", 0), ("lane-parallel", None)):

            def run(b=b, f=f, group: int | None = group) -> tuple:
                acc = np.empty(n, dtype=np.float32)
                claimed = np.zeros(n, dtype=np.bool_)
                masks = [np.empty(n, dtype=np.bool_) for _ in f]
                t0, c0 = time.perf_counter(), time.process_time()
                for k, (fk, mk) in enumerate(zip(f, masks, strict=True)):
                    kernels.cabs_step(b, fk, claimed, mk, acc, k == 0, nm[0], nm[1],
                                      np.float32(1.0 - 0.2 * k), True, True, group)  # fmt: skip
                return time.perf_counter() - t0, time.process_time() - c0, acc, masks

            run()  # warm-up (and compilation)
            times, cpu = [], []
            for _ in range(repeat):
                dt, dc, acc, masks = run()
                times.append(dt)
                cpu.append(dc)
            outs[name] = (acc.view(np.int32), masks)
            ref = next(iter(outs.values()))
            same = np.array_equal(ref[0], outs[name][0]) and all(
                np.array_equal(x, y) for x, y in zip(ref[1], outs[name][1], strict=True)
            )
            per = 1e9 / (n * len(f))
            print(f"| {label} | {name} | {statistics.median(times) * per:.2f} | "
                  f"{statistics.median(cpu) * per:.2f} | {same} |")  # fmt: skip


def _merge(
    method: Method, params: tuple[ModelParams, ...], base: torch.Tensor, fts: list[torch.Tensor]
) -> MergeResult:
    """One chunk through a method as the engine drives it: statistics passes, then merge."""
    opts = MethodOptions()
    st = method.new_state(TensorId("x", base.numel()), params, opts, torch.float32)
    for p in range(method.stats_passes(params, opts, torch.float32)):
        method.accumulate(st, p, 0, base, fts)
        method.end_pass(st, p)
    return method.merge(st, 0, base, fts)


if __name__ == "__main__":
    main()
