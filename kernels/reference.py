"""Torch references for the block-sparse kernels: what ``block_sparse`` computes, plainly.

A block mask [nq, nk] (query block m attends to key block n where true) is carried to a
kernel as lists: ``indices`` [..., nq, max_kept] int32 (the kept key blocks of each query
block, ascending, padded with 0) and ``counts`` [..., nq] int32 (how many are kept).  Leading
dimensions (batch, heads) may be 1 and broadcast: radial attention's mask is the same for
every head; VSA's top-k selection differs per head.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(indices, counts)`` of a bool block mask [..., nq, nk] (see the module docstring)."""
    counts = mask.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    # Kept columns first, in ascending order: sort by (not kept, column).
    cols = torch.arange(mask.shape[-1], device=mask.device)
    order = torch.argsort((~mask).to(torch.int64) * mask.shape[-1] + cols, dim=-1, stable=True)
    indices = torch.where(cols[:width] < counts[..., None], order[..., :width], 0)
    return indices.to(torch.int32).contiguous(), counts.contiguous()


def lists_to_mask(indices: Tensor, counts: Tensor, nk: int) -> Tensor:
    """The bool block mask [..., nq, nk] that ``(indices, counts)`` stand for."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    cols = torch.where(valid, indices.long(), nk)  # padding goes to a spare column, dropped
    mask = torch.zeros(*indices.shape[:-1], nk + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, cols, True)[..., :nk]


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor, block: int
) -> Tensor:
    """Attention of q [B, H, Lq, d] on k, v [B, H, Lk, d] where each query block of ``block``
    tokens sees only its listed key blocks; softmax in fp32, scale d^-0.5; result in q's
    dtype.  A query row with no key left gets NaN (as a kernel would: 0 / 0)."""
    lq, lk = q.shape[2], k.shape[2]
    nk = -(-lk // block)
    mask = lists_to_mask(indices, counts, nk)  # [b|1, h|1, nq, nk]
    tok = mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :lq, :lk]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~tok, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
