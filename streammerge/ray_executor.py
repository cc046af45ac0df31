"""Run one merge's plan on a Ray cluster: work units as Ray tasks, the journal on the driver.

The plan fixes every output byte's position before any math, so workers on different nodes
can fill the same shard files at once. :func:`cut_units` cuts the plan into work units:
runs of whole tensors of one shard, or chunk ranges of one large tensor when the method is
chunk-local with no statistics passes (a tensor with statistics passes is one unit: its
statistics are not reduced across workers). Each unit is a Ray task (:func:`run_unit`) that
requests one CPU and ``--max-memory`` bytes of Ray's ``memory`` resource, reads the inputs
from shared storage, ``pwrite``s its chunks at their planned offsets into the ``.partial``
shards, stores its masks, syncs them, and returns its journal lines (chunk CRCs and kept
counts, exactly as a local run records them). The driver (:class:`RayExecutor`) appends
those lines to the journal, finishes each tensor once all its units are in (mask counts, the
tensor line), renames each shard once all its tensors are, and ``run_merge`` finalizes
through the same :class:`~streammerge.output.OutputFolder` as a local run: same bytes.

Faults: a worker that dies is retried by Ray (:data:`MAX_RETRIES`); a unit that dies again
fails the run with the unit named, the folder resumable. A killed driver loses only the
units in flight: rerunning the command (with Ray or locally) resumes from the journal.
Every node needs the same streammerge installed and the same paths for inputs and output.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from . import __version__
from .engine import Scheduler, UnitClaim, UnitLog, mask_info, seal_shard, tensor_report
from .errors import Interrupted, StreamMergeError
from .journal import Progress
from .mask_store import STORE_NAME, MaskStore, ZarrMaskStore
from .memory import format_size
from .methods import Method
from .model import ModelFolder
from .results import TensorReport
from .runtime import precompile_kernels
from .safetensors_io import ShardWriter

if TYPE_CHECKING:
    from .output import Claim
    from .plan import MergePlan, TensorTask
    from .runtime import StopOnSignals

MAX_RETRIES = 1
"""Ray reruns a unit whose worker died this many times before the run fails."""
UNIT_BYTES = 256 * 2**20
"""Input bytes a work unit reads, at most (fewer when the cluster would otherwise idle)."""
UNITS_PER_CPU = 4
"""Units per cluster CPU at least, so that uneven units still keep every worker busy."""
WAIT_S = 0.2
"""How often the driver checks for a stop signal while waiting on units."""


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """Chunk ranges of tensors of one output shard, run by one Ray task."""

    index: int
    shard: int
    work: tuple[tuple[int, int, int], ...]
    """``(tensor index in the plan, first chunk, end chunk)``, in plan order."""
    bytes_read: int
    """Input bytes its passes read (for progress and sizing)."""

    def label(self, plan: MergePlan) -> str:
        """How an error names the unit: its first tensor and chunks, and how many more."""
        ti, c0, c1 = self.work[0]
        more = f", +{len(self.work) - 1} tensors" if len(self.work) > 1 else ""
        return f"work unit {self.index} ({plan.tensors[ti].name} chunks {c0}-{c1 - 1}{more})"


def splittable(method: Method, task: TensorTask, dtype: torch.dtype) -> bool:
    """Whether the tensor's chunks can go to different workers: copied, or merged by a
    chunk-local method without statistics passes."""
    if not task.merged:
        return True
    return method.stats_passes(
        task.params, task.options, dtype, task.shape
    ) == 0 and method.chunk_local(task.params, task.options)


def cut_units(
    plan: MergePlan, method: Method, done: Progress, target_bytes: int
) -> tuple[WorkUnit, ...]:
    """The work still to do (per ``done``) as units of about ``target_bytes`` of input: whole
    tensors grouped in plan order within a shard, large splittable tensors cut into chunk
    ranges. Deterministic; units never cross shards."""
    units: list[WorkUnit] = []
    by_shard: dict[int, list[int]] = {}
    for ti, t in enumerate(plan.tensors):
        by_shard.setdefault(t.shard, []).append(ti)

    def add(shard: int, work: list[tuple[int, int, int]], nbytes: float) -> None:
        if work:
            units.append(WorkUnit(len(units), shard, tuple(work), int(nbytes)))

    for si in range(len(plan.shards)):
        if si in done.shards:
            continue
        group: list[tuple[int, int, int]] = []
        group_bytes = 0.0
        for ti in by_shard.get(si, []):
            if ti in done.tensors:
                continue
            task = plan.tensors[ti]
            n = len(task.chunks())
            per_chunk = task.bytes_read / max(1, n)
            split = n > 1 and task.bytes_read > target_bytes
            if split and splittable(method, task, plan.recipe.dtype):
                add(si, group, group_bytes)
                group, group_bytes = [], 0.0
                step = max(1, int(target_bytes // max(1.0, per_chunk)))
                for c0 in range(0, n, step):
                    c1 = min(n, c0 + step)
                    add(si, [(ti, c0, c1)], per_chunk * (c1 - c0))
                continue
            group.append((ti, 0, n))
            group_bytes += task.bytes_read
            if group_bytes >= target_bytes:
                add(si, group, group_bytes)
                group, group_bytes = [], 0.0
        add(si, group, group_bytes)
    return tuple(units)


def unit_progress(plan: MergePlan, unit: WorkUnit, done: Progress) -> Progress:
    """What a worker treats as done: the journal's chunks of the unit's tensors, and every
    chunk outside the unit's ranges (kept counts are the driver's to sum, so zeros there)."""
    k = len(plan.recipe.models)
    out = Progress()
    for ti, c0, c1 in unit.work:
        n = len(plan.tensors[ti].chunks())
        skip = {ci for ci in done.chunks.get(ti, ()) if c0 <= ci < c1}
        skip |= set(range(c0)) | set(range(c1, n))
        out.chunks[ti] = skip
        for ci in skip:
            out.kept[(ti, ci)] = [0] * k
    return out


def run_unit(
    plan: MergePlan,
    method: Method,
    sources: Sequence[Path],
    out_dir: Path,
    unit: WorkUnit,
    done: Progress,
    allow_nonfinite: bool,
    version: str,
) -> list[dict[str, object]]:
    """A Ray task: write ``unit``'s chunks (durably) and return their journal lines.

    ``sources``: the base's folder, then the other folders the method reads. Writes only at
    the unit's planned offsets and mask chunks, so a rerun after a crash rewrites the same
    bytes.
    """
    if version != __version__:
        raise StreamMergeError(
            f"the Ray worker runs streammerge {__version__}, the driver {version}: install "
            "the same version on every node"
        )
    with ExitStack() as opened:
        base = opened.enter_context(closing(ModelFolder(sources[0])))
        models = [opened.enter_context(closing(ModelFolder(p))) for p in sources[1:]]
        # loads the cached build (or builds it once, outside this process)
        precompile_kernels(plan, base, models, method=method)
        # mode "a", not "r+": opening with r+ deletes temp files, other workers' writes
        store = ZarrMaskStore(out_dir / STORE_NAME, mode="a")
        log = UnitLog()
        claim = UnitClaim(out_dir, log, done)
        scheduler = Scheduler(plan, method, base, models, claim, store, allow_nonfinite,
                              torch.device("cpu"))  # fmt: skip
        scheduler.execute_unit([ti for ti, _, _ in unit.work])
        return log.entries


@functools.cache
def _remote_unit() -> Any:
    import ray

    return ray.remote(run_unit)


class RayCluster:
    """A connection to a Ray cluster for one run (a context manager): joins ``address``
    (None: ``RAY_ADDRESS``, or a new local instance), checks that some node can grant a
    worker's memory request, and shuts down only what it started."""

    def __init__(self, address: str | None, plan: MergePlan) -> None:
        try:
            import ray
        except ImportError:
            raise StreamMergeError(
                "--executor ray needs Ray: pip install 'streammerge[ray]'"
            ) from None
        self.memory = plan.budget.max_memory
        self.owned = not ray.is_initialized()
        if self.owned:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise StreamMergeError(f"cannot join the Ray cluster at {address}: {e}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        largest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
        self.cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
        if largest < self.memory or self.cpus < 1:
            self.close()
            raise StreamMergeError(
                f"--max-memory {format_size(self.memory)} per worker: no Ray node can grant it "
                f"(largest memory resource {format_size(int(largest))}, {self.cpus} CPUs in "
                "all); pass a smaller --max-memory"
            )

    def unit_bytes(self, plan: MergePlan) -> int:
        """Input bytes per unit: :data:`UNIT_BYTES`, less when the plan is small."""
        return max(1, min(UNIT_BYTES, plan.bytes_read // (UNITS_PER_CPU * self.cpus)))

    def close(self) -> None:
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()
        self.owned = False

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayExecutor:
    """The driver's side: the :class:`~streammerge.engine.Scheduler` interface (``execute``,
    ``kept``, ``skipped``) over Ray tasks."""

    def __init__(
        self,
        cluster: RayCluster,
        plan: MergePlan,
        method: Method,
        sources: Sequence[Path],
        claim: Claim,
        store: MaskStore,
        allow_nonfinite: bool,
        on_tensor: Callable[[TensorReport], None] | None = None,
    ) -> None:
        self.cluster, self.plan, self.method = cluster, plan, method
        self.sources = [Path(p).resolve() for p in sources]
        self.out_dir = claim.path.resolve()
        self.journal, self.done, self.store = claim.journal, claim.done, store
        self.allow_nonfinite = allow_nonfinite
        self.on_tensor = on_tensor
        self.writes_masks = method.spec.writes_masks
        self.kept: dict[str, list[int]] = {}
        self.skipped = 0

    def execute(self, progress: bool, stop: StopOnSignals) -> None:
        import ray

        plan, done = self.plan, self.done
        units = cut_units(plan, self.method, done, self.cluster.unit_bytes(plan))
        bar = tqdm(total=plan.bytes_read, unit="B", unit_scale=True, unit_divisor=1024,
                   disable=not progress, file=sys.stderr, desc="merging (ray)",
                   dynamic_ncols=True)  # fmt: skip
        t0 = time.perf_counter()
        left: dict[int, int] = {}  # units still out, per tensor
        for u in units:
            for ti, _, _ in u.work:
                left[ti] = left.get(ti, 0) + 1
        shard_left: dict[int, int] = {}  # unfinished tensors, per shard
        for ti, task in enumerate(plan.tensors):
            if task.shard in done.shards or ti in done.tensors:
                self._skip(ti, task, bar)
            else:
                shard_left[task.shard] = shard_left.get(task.shard, 0) + 1
        self._prepare(units)
        for si in range(len(plan.shards)):
            if si not in done.shards and shard_left.get(si, 0) == 0:
                self._seal(si)
        plan_ref, method_ref = ray.put(plan), ray.put(self.method)
        remote = _remote_unit().options(num_cpus=1, memory=self.cluster.memory,
                                        max_retries=MAX_RETRIES)  # fmt: skip
        pending = {}
        for u in units:
            ref = remote.remote(plan_ref, method_ref, self.sources, self.out_dir, u,
                                unit_progress(plan, u, done), self.allow_nonfinite,
                                __version__)  # fmt: skip
            pending[ref] = u
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
                if stop.signum:
                    self._check_stop(stop)
                for ref in ready:
                    unit = pending.pop(ref)
                    for entry in self._result(ref, unit):
                        done.add(entry)
                        self.journal.append(entry)
                    bar.update(unit.bytes_read)
                    for ti, _, _ in unit.work:
                        left[ti] -= 1
                        if left[ti] == 0:
                            self._finish_tensor(ti, t0, shard_left)
        finally:
            bar.close()
            for ref in pending:  # an error or a stop: no worker keeps writing for us
                ray.cancel(ref, force=True)

    def _result(self, ref: Any, unit: WorkUnit) -> list[dict[str, object]]:
        """A unit's journal lines; a worker's user error as itself, a dead worker named."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, StreamMergeError):
                raise e.cause from None
            if not isinstance(e.cause, ray.exceptions.RayError):
                raise
            # a system failure surfaced through the task (e.g. OwnerDiedError: an argument's
            # owner died with the worker): the unit failed as a dead worker's does
            died: Exception = e.cause
        except ray.exceptions.RayError as e:
            died = e
        raise StreamMergeError(
            f"{unit.label(self.plan)} failed: its worker died {MAX_RETRIES + 1} times "
            f"({type(died).__name__}); progress is saved in {self.out_dir}. Run the same "
            "command again to resume."
        ) from None

    def _check_stop(self, stop: StopOnSignals) -> None:
        import signal

        name = signal.Signals(stop.signum).name
        raise Interrupted(
            f"stopped by {name}; progress is saved in {self.out_dir}. Run the same command "
            "again to resume.",
            stop.signum,
        )

    def _prepare(self, units: Sequence[WorkUnit]) -> None:
        """Create the ``.partial`` shards and mask arrays the units write into, so that no
        two workers ever create the same file."""
        for si in sorted({u.shard for u in units}):
            ShardWriter(self.out_dir, self.plan.shards[si], resume=True).abort()
        if not self.writes_masks:
            return
        for u in units:
            for ti, _, _ in u.work:
                task = self.plan.tensors[ti]
                if task.merged:
                    for k in range(len(self.plan.recipe.models)):
                        self.store.create(k, task.name, task.shape, task.chunk_elems)
        self.store.sync(())  # the layout, durable before any worker opens the store

    def _skip(self, ti: int, task: TensorTask, bar: tqdm) -> None:
        """A tensor the journal lists as done (resume)."""
        bar.update(task.bytes_read)
        self.skipped += len(task.chunks())
        if task.merged and self.writes_masks:
            k = len(self.plan.recipe.models)
            self.kept[task.name] = [self.store.kept(m, task.name) or 0 for m in range(k)]
        self._report(task, 0.0, skipped=True)

    def _finish_tensor(self, ti: int, t0: float, shard_left: dict[int, int]) -> None:
        """All of the tensor's chunks are journaled: its mask counts, its line, its shard."""
        task, done = self.plan.tensors[ti], self.done
        if task.merged and self.writes_masks:
            n, k = len(task.chunks()), len(self.plan.recipe.models)
            kept = [sum(done.kept[(ti, ci)][m] for ci in range(n)) for m in range(k)]
            for m in range(k):
                self.store.finish(m, task.name, kept[m], mask_info(task.params[m]))
            self.store.sync(())  # the counts, durable before the journal line
            self.kept[task.name] = kept
        self.journal.append({"tensor": ti})
        done.tensors.add(ti)
        self._report(task, time.perf_counter() - t0)
        shard_left[task.shard] -= 1
        if shard_left[task.shard] == 0:
            self._seal(task.shard)

    def _seal(self, si: int) -> None:
        seal_shard(self.out_dir, self.plan.shards[si], si, self.done, self.journal)
        self.done.shards.add(si)

    def _report(self, task: TensorTask, seconds: float, skipped: bool = False) -> None:
        """As a local run reports, in completion order; ``seconds`` since the run started."""
        if self.on_tensor is not None:
            self.on_tensor(tensor_report(self.plan, task, seconds, self.kept, skipped))
