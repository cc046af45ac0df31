"""n:m selection on the row-major flattening, with deterministic ties.

In every block of ``m`` consecutive elements keep the ``n`` with the largest key; equal keys
are broken toward the lower index (``torch.topk`` guarantees no order among equal values, and
bf16 or Adam-trained deltas tie often, so this rule is load-bearing). A final partial block of
``r < m`` elements keeps its top ``min(n, r)`` under ``keep_topn_padded`` and nothing under
``zero``.

Keys are integers: for a float ``x`` the bit pattern of ``|x|`` read as a signed integer
orders exactly like ``|x|``, compares exactly, and leaves the negative range free to rank
positions below every magnitude (claimed positions under CABS).
"""

from __future__ import annotations

import torch

_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """Integer keys ordering like ``|x|`` (NaN above +inf); -0.0 and 0.0 tie."""
    it = _INT_OF[x.dtype]
    return x.view(it) & torch.iinfo(it).max


def nm_select(key: torch.Tensor, n: int, m: int, tail_policy: str) -> torch.Tensor:
    """Boolean selection of the top-``n`` keys in each block of ``m`` (1-D ``key``)."""
    size = key.numel()
    full = size - size % m
    sel = torch.zeros(size, dtype=torch.bool, device=key.device)
    if n >= m:
        sel[:full] = True
    elif n > 0 and full:
        sel[:full] = _select_full_blocks(key[:full].view(-1, m), n).view(-1)
    if full < size and tail_policy == "keep_topn_padded" and n > 0:
        sel[full:] = _select_stable(key[full:], min(n, size - full))
    return sel


def _select_full_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """Top-n per row with ties to the lower column, via the n-th largest value per row."""
    # the n-th and (n+1)-th largest keys per row: equal means a tie at the threshold
    top = blocks.topk(n + 1, dim=1, sorted=True).values
    thr = top[:, n - 1 : n]
    sel = blocks >= thr
    # Rows where more than n keys reach the threshold need the tie rule; usually few.
    rows = torch.nonzero(top[:, n] == top[:, n - 1]).squeeze(1)
    if rows.numel():
        b, t = blocks[rows], thr[rows]
        gt, eq = b > t, b == t
        need = n - torch.count_nonzero(gt, dim=1).unsqueeze(1)
        sel[rows] = gt | (eq & (eq.cumsum(dim=1) <= need))
    return sel


def _select_stable(key: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of a short 1-D key, ties to the lower index (a stable descending sort)."""
    sel = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
    order = torch.sort(key, descending=True, stable=True).indices
    sel[order[:k]] = True
    return sel
