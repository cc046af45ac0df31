"""Where the per-chunk math runs: the CPU, or one CUDA GPU behind pinned staging buffers.

On a GPU the chunk loop becomes a pipeline (``torch.cuda`` streams and events):

* host -> device: each input chunk is copied from the mapped file into one of two pinned
  staging slots, then sent on a copy stream; the compute stream waits for that copy only,
  so the copy of chunk i + 1 overlaps the math of chunk i;
* device -> host: the output bytes and masks go back on a second copy stream into one of two
  pinned slots; the write lane waits for their event before writing them to disk.

The math is the methods' torch code, the same IEEE float32 operations as on the CPU (the
compiled CPU kernel is the CPU's shortcut to the same bytes), so a GPU merge is byte-identical
to a CPU merge. Methods whose statistics or random streams live on the CPU (TIES, DARE,
magnitude) run on the CPU only, for now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .defaults import DEVICES
from .errors import StreamMergeError
from .methods import METHODS
from .methods.spec import MethodSpec


def mps_available() -> bool:
    """Whether torch can use Apple's Metal GPU here (Apple silicon, macOS 12.3+)."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str, method: str | MethodSpec) -> torch.device:
    """``auto`` is ``cuda`` when a CUDA GPU is usable, else ``mps`` on Apple silicon, when the
    method runs there (its spec says ``cuda`` / ``mps``); otherwise ``cpu``."""
    spec = METHODS[method].spec if isinstance(method, str) else method
    if name not in DEVICES:
        raise StreamMergeError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda" if spec.cuda else "cpu")
        return torch.device("mps" if spec.mps and mps_available() else "cpu")
    if name == "mps":
        if not mps_available():
            raise StreamMergeError(
                "--device mps was asked for, but torch sees no Metal GPU here (MPS needs Apple "
                "silicon and macOS 12.3 or later); use --device cpu"
            )
        if not spec.mps:
            on_mps = ", ".join(sorted(m.name for m in METHODS.values() if m.spec.mps))
            raise StreamMergeError(
                f"merge_method {spec.name} does not run on the Metal GPU (it needs float64 or "
                f"a CPU kernel; MPS: {on_mps}); use --device cpu"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        )
        raise StreamMergeError(f"--device cuda was asked for, but {why}; use --device cpu")
    if not spec.cuda:
        on_gpu = ", ".join(sorted(m.name for m in METHODS.values() if m.spec.cuda))
        raise StreamMergeError(
            f"merge_method {spec.name} runs on the CPU only (GPU: {on_gpu}); use --device cpu"
        )
    return torch.device("cuda")


def default_max_vram(device: torch.device) -> int:
    """90% of the GPU memory free now."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.9)


@dataclass
class _Slot:
    inputs: list[torch.Tensor]
    """Pinned uint8 staging buffers, one per source (base first)."""
    out: torch.Tensor
    """Pinned uint8 buffer for the output bytes and then the masks."""
    h2d_done: torch.cuda.Event | None = None


class CudaStager:
    """Double-buffered pinned staging between mapped input chunks, the GPU and the writer.

    A slot is reused two chunks later. Its host -> device copies are then long finished (we
    wait on their event), and so is the write of its outputs: the write lane runs one job at
    a time, and chunk i's job has finished before chunk i + 2 is staged.
    """

    def __init__(self, device: torch.device, chunk_elems: int, sources: int, k: int) -> None:
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        in_bytes, out_bytes = chunk_elems * 4, chunk_elems * (4 + k)  # up to float32 in/out

        def pinned(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.uint8, pin_memory=True)

        self.slots = [_Slot([pinned(in_bytes) for _ in range(sources)], pinned(out_bytes))
                      for _ in range(2)]  # fmt: skip
        self.turn = 0

    def to_device(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Stage one chunk of every source and start its copy; returns device tensors that
        the current (compute) stream may use at once."""
        slot = self.slots[self.turn]
        self.turn ^= 1
        if slot.h2d_done is not None:
            slot.h2d_done.synchronize()
        compute = torch.cuda.current_stream(self.device)
        out = []
        with torch.cuda.stream(self.h2d):
            for v, buf in zip(views, slot.inputs, strict=True):
                host = buf[: v.numel() * v.element_size()].view(v.dtype)
                host.copy_(v)  # reads the mapped file: the disk work happens here
                dev = host.to(self.device, non_blocking=True)
                dev.record_stream(compute)
                out.append(dev)
            slot.h2d_done = torch.cuda.Event()
            slot.h2d_done.record(self.h2d)
        compute.wait_event(slot.h2d_done)
        return out

    def to_host(
        self, out: torch.Tensor, masks: Sequence[torch.Tensor], total: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.cuda.Event]:
        """Start copying a chunk's output, masks and sum back; wait on the event before use."""
        slot = self.slots[self.turn ^ 1]  # the slot whose inputs this chunk came from
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(computed)
            n = out.numel() * out.element_size()
            host_out = slot.out[:n].view(out.dtype)
            host_out.copy_(out, non_blocking=True)
            host_masks = []
            for i, m in enumerate(masks):
                buf = slot.out[n + i * m.numel() : n + (i + 1) * m.numel()].view(torch.bool)
                buf.copy_(m, non_blocking=True)
                host_masks.append(buf)
            host_total = total.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        for t in (out, *masks, total):
            t.record_stream(self.d2h)
        return host_out, host_masks, host_total, done


class DeviceStager:
    """Staging for a GPU without CUDA streams (Apple's MPS): copy a chunk in, compute, copy
    the result out, one after the other. Metal shares the machine's memory, so the device
    copies count against the same RAM the ``--max-memory`` budget describes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def to_device(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [v.to(self.device) for v in views]

    def to_host(
        self, out: torch.Tensor, masks: Sequence[torch.Tensor], total: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, None]:
        """The chunk's output, masks and sum on the CPU (the copies are synchronous)."""
        return out.cpu(), [m.cpu() for m in masks], total.cpu(), None
