"""CABS: conflict-aware sequential n:m sparsification (ICML 2025), K >= 2 models.

Semantics (``cabs_spec.md`` §3, settled as streammerge defines them):

* models are pruned one after another in pruning order; ``tau_k = ft_k - base`` in the
  compute dtype;
* ``strict``: only positions not claimed by earlier models are eligible; in every block the n
  eligible positions with the largest ``|tau_k|`` are selected (ties to the lower index);
* ``fill``: the free positions rank first, then claimed ones, each by ``|tau_k|``, so a model
  keeps its full quota of n even when fewer than n positions are free (the paper's
  low-sparsity rule); overlapping positions are summed;
* a model's mask, and its claim, is the selected positions whose tau is non-zero;
* ``out = base + sum_k w_k * tau_k * mask_k`` in pruning order; no rescaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..tadrop import nm_from_density
from . import kernels
from .base import (
    OVERLAP_POLICIES,
    TAIL_POLICIES,
    ChunkLocal,
    ChunkLocalMethod,
    MergeResult,
    MethodOptions,
    ModelParams,
    TensorId,
    scalar,
)
from .kernels import kernel_input
from .nm import magnitude_key, nm_select
from .spec import TADROP_PARAMS, WEIGHT_COLUMN, CardColumn, MethodSpec, Param, Values


def _extend(params: Values) -> str | None:
    if params.get("overlap_policy", "strict") != "strict":
        return (
            "under overlap_policy: fill a new model may top up from claimed positions, whose "
            "earlier task vectors the output no longer separates; rerun the full recipe instead"
        )
    if params.get("tadrop"):
        return (
            "TADrop rebalances every model's densities together, so adding a model changes the "
            "earlier masks"
        )
    return None


SPEC = MethodSpec(
    name="cabs",
    summary="conflict-aware sequential n:m sparsification (ICML 2025)",
    params=(
        Param("weight", default=1.0),
        Param("n_val", "int", low=0, aliases=("default_n_val",), gradient=False,
              doc="elements kept per block"),
        Param("m_val", "int", low=1, aliases=("default_m_val",), gradient=False,
              doc="block length"),
        Param("tail_policy", "choice", per_model=False, choices=TAIL_POLICIES),
        Param("overlap_policy", "choice", per_model=False, choices=OVERLAP_POLICIES),
        *TADROP_PARAMS,
    ),
    cuda=True,
    mps=True,
    writes_masks=True,
    nm_blocks=True,
    tadrop=True,
    remix=None,
    extend=_extend,
    kernel="cabs",
    card=(WEIGHT_COLUMN, CardColumn("n:m", lambda p, o: f"{p.n}:{p.m}")),
    order_note="Pruning order (earlier models claim their positions first):",
    example={"n_val": 2, "m_val": 4},
)  # fmt: skip


class Cabs(ChunkLocalMethod):
    spec = SPEC

    def model_params(self, values: Values) -> ModelParams:
        n, m, weight = values.get("n_val"), values.get("m_val"), values.get("weight")
        if n is None or m is None:
            raise ValueError("cabs needs n_val and m_val (per model or global)")
        if not 0 <= float(n) <= float(m):
            raise ValueError(f"n_val {float(n):g} > m_val {float(m):g}")
        w = 1.0 if weight is None else float(weight)
        return ModelParams(w, int(n), int(m), density=float(n) / float(m))

    def with_density(self, params: ModelParams, density: float) -> ModelParams:
        n = nm_from_density(density, params.m)
        return ModelParams(params.weight, n, params.m, density=n / params.m)

    def alignment(self, params: Sequence[ModelParams], shape: tuple[int, ...] = ()) -> int:
        # Chunks must start on a block boundary of every model and on a byte of packed bits.
        return math.lcm(8, *(p.m for p in params))

    def work_bytes(self, k: int, itemsize: int) -> int:
        if itemsize == 4 and kernels.enabled():
            # the kernel reads the mapped inputs in place: accumulator, claimed flags, masks
            return 4 + 1 + k
        # torch: base, accumulator, tau and int key (itemsize each), plus bool masks, top-k
        # values and comparison temporaries
        return 3 * itemsize + 4 + 12

    def resident_bytes(self, k: int, itemsize: int) -> int:
        if itemsize == 4 and kernels.enabled():
            return self.work_bytes(k, itemsize)  # what the kernel holds is all there is
        # the torch path: base, accumulator and one model's values in the compute dtype, one
        # bool mask per model and the claimed positions
        return 3 * itemsize + k + 1

    def merge(
        self, state: ChunkLocal, start: int, base: torch.Tensor, fts: Sequence[torch.Tensor]
    ) -> MergeResult:
        params, options, dtype = state.params, state.options, state.dtype
        strict = options.overlap_policy == "strict"
        if dtype == torch.float32 and kernels.enabled() and base.device.type == "cpu":
            return _merge_compiled(base, fts, params, options)
        b = base.to(dtype)
        acc = b.clone()
        claimed: torch.Tensor | None = None
        masks = []
        for ft, p in zip(fts, params, strict=True):
            tau = ft.to(dtype, copy=True).sub_(b)
            key = magnitude_key(tau)
            if claimed is not None:
                if strict:
                    key.masked_fill_(claimed, -1)  # below every magnitude key (>= 0)
                else:
                    key = torch.where(claimed, key + torch.iinfo(key.dtype).min, key)
            mask = nm_select(key, p.n, p.m, options.tail_policy)
            mask &= tau != 0
            if strict and claimed is not None:
                mask &= ~claimed  # a block with fewer than n free positions
            acc.add_(tau.mul_(scalar(p.weight, dtype)).mul_(mask))
            claimed = mask.clone() if claimed is None else claimed.logical_or_(mask)
            masks.append(mask)
        return MergeResult(acc, masks)

    def reference(
        self,
        tensor: TensorId,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MethodOptions,
        dtype: torch.dtype,
    ) -> MergeResult:
        b = base.to(dtype).flatten()
        out = b
        claimed = torch.zeros(b.numel(), dtype=torch.bool)
        masks = []
        for ft, p in zip(fts, params, strict=True):
            tau = ft.to(dtype).flatten() - b
            # tier: 1 = free, 0 = claimed but may fill, -1 = never eligible
            tier = torch.where(claimed, -1 if options.overlap_policy == "strict" else 0, 1)
            sel = reference_nm(tau.abs().double(), tier, p.n, p.m, options.tail_policy)
            mask = sel & (tau != 0)
            out = out + scalar(p.weight, dtype) * tau * mask
            claimed = claimed | mask
            masks.append(mask)
        return MergeResult(out, masks)


def _merge_compiled(
    base: torch.Tensor,
    fts: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: MethodOptions,
) -> MergeResult:
    """The same computation as the torch path, one fused numba pass per model."""
    b = kernel_input(base)
    acc = np.empty(b.size, dtype=np.float32)
    claimed = np.zeros(b.size, dtype=np.bool_)
    masks = []
    for k, (ft, p) in enumerate(zip(fts, params, strict=True)):
        mask = np.empty(b.size, dtype=np.bool_)
        kernels.cabs_step(b, kernel_input(ft), claimed, mask, acc, k == 0, p.n, p.m,
                          np.float32(p.weight), options.overlap_policy == "strict",
                          options.tail_policy == "keep_topn_padded")  # fmt: skip
        masks.append(torch.from_numpy(mask))
    if not fts:
        acc[:] = base.to(torch.float32).numpy()
    return MergeResult(torch.from_numpy(acc), masks)


def reference_nm(
    mag: torch.Tensor, tier: torch.Tensor, n: int, m: int, tail_policy: str
) -> torch.Tensor:
    """Plain n:m: per block, rank by (tier desc, magnitude desc, index asc); keep rank < n.

    Positions with ``tier < 0`` are never selected. The last block of ``r < m`` real elements
    has a quota of ``min(n, r)`` (``keep_topn_padded``) or 0 (``zero``).
    """
    size = mag.numel()
    nb = -(-size // m)
    pad = nb * m - size
    mag = torch.cat([mag, torch.zeros(pad, dtype=mag.dtype)]).view(nb, m)
    tier = torch.cat([tier, torch.full((pad,), -2)]).view(nb, m)
    by_mag = torch.sort(mag, dim=1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(1, by_mag), dim=1, descending=True, stable=True).indices
    order = by_mag.gather(1, by_tier)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m).expand(nb, m).contiguous())
    quota = torch.full((nb, 1), n)
    if pad:
        quota[-1] = min(n, m - pad) if tail_policy == "keep_topn_padded" else 0
    return ((rank < quota) & (tier >= 0)).view(-1)[:size]
