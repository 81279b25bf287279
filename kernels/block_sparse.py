"""Block-sparse attention forward in Triton (CUDA; the interpreter on CPU for tests).

One program per (query tile, batch x head).  A query tile of BLOCK_M rows lies inside one
query block of the mask (MASK_BLOCK tokens, a multiple of BLOCK_M); it walks that block's
kept key blocks (``indices`` / ``counts``, see ``reference``), each in MASK_BLOCK / BLOCK_N
key tiles, with the online softmax of FlashAttention (running max m, running sum l, output
accumulated in fp32 and rescaled by exp2(m_old - m_new)); keys past the sequence end are
masked to -inf.  Forward only, no dropout, scale d^-0.5, head_dim a power of two (>= 16).

Shapes: q, k, v, out [B, H, L, d] (any strides; the model passes transposed views);
indices [B|1, H|1, nq, max_kept] int32, counts [B|1, H|1, nq] int32 (1 broadcasts: stride 0).

fp32 inputs multiply in IEEE fp32 (not TF32), so the kernel matches the reference closely;
bf16 / fp16 multiply in half precision with fp32 accumulation, as flash attention does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import block_lists


@triton.jit
def _forward(
    Q, K, V, O, IDX, CNT, scale,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    sib, sih, siq, sik, scb, sch, scq,
    H, L,
    MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sql + dims[None, :] * sqd
    q = tl.load(q_ptrs, mask=rows[:, None] < L, other=0.0)
    qb = (pid_m * BLOCK_M) // MASK_BLOCK  # the mask row this tile lies in
    n_kept = tl.load(CNT + b * scb + h * sch + qb * scq)
    idx_row = IDX + b * sib + h * sih + qb * siq
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for t in range(0, n_kept):
        kb = tl.load(idx_row + t * sik)
        for s in tl.static_range(MASK_BLOCK // BLOCK_N):
            cols = kb * MASK_BLOCK + s * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = cols < L
            k = tl.load(k_base + cols[None, :] * skl + dims[:, None] * skd,
                        mask=valid[None, :], other=0.0)  # fmt: skip  # [d, BLOCK_N]
            qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            qk = tl.where(valid[None, :], qk, float("-inf"))
            # The first tile of a kept block always holds a valid key (block start < L), so
            # m_new is finite from the first tile on: no -inf - -inf.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * svl + dims[None, :] * svd,
                        mask=valid[:, None], other=0.0)  # fmt: skip  # [BLOCK_N, d]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + rows[:, None] * sol + dims[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows[:, None] < L)


def _broadcast(t: Tensor, b: int, h: int) -> Tensor:
    """Lists [nq, w] or [B|1, H|1, nq, w] -> [B, H, nq, w] (stride 0 where broadcast)."""
    if t.dim() == 2:
        t = t[None, None]
    return t.expand(b, h, *t.shape[2:])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor,
    block: int,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """Block-sparse attention of q [B, H, L, d] on k, v (same L): query block m of ``block``
    tokens sees the key blocks ``indices[..., m, :counts[..., m]]``.  Tile sizes default to
    what suits the dtype (smaller for fp32); they must divide ``block``."""
    bsz, heads, length, dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {dim}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    block_m = block_m or min(block, 128 if half else 64)
    block_n = block_n or min(block, 64 if half else 32)
    if block % block_m or block % block_n:
        raise ValueError(f"tiles {block_m}, {block_n} must divide the mask block {block}")
    nq = -(-length // block)
    idx, cnt = _broadcast(indices, bsz, heads), _broadcast(counts[..., None], bsz, heads)[..., 0]
    if idx.shape[2] != nq or cnt.shape[2] != nq:
        raise ValueError(
            f"block lists cover {idx.shape[2]} query blocks, {length} tokens need {nq}"
        )
    out = torch.empty_like(q)
    grid = (triton.cdiv(length, block_m), bsz * heads)
    # 8 warps for 128-row tiles (as flash attention's Triton kernels); the GPU check times it
    options = {"num_warps": num_warps or (8 if block_m >= 128 else 4)}
    if num_stages is not None:
        options["num_stages"] = num_stages
    _forward[grid](
        q, k, v, out, idx, cnt, 1.0 / math.sqrt(dim),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *idx.stride(), *cnt.stride(),
        heads, length,
        MASK_BLOCK=block, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
        PRECISION="tf32" if half else "ieee", **options,
    )  # fmt: skip
    return out


def function(mask: Tensor, block: int):
    """An attention function ``fn(q, k, v)`` for the bool block mask [nq, nq] (the same for
    every batch row and head); the block lists are moved to each device once."""
    indices, counts = block_lists(mask.cpu())
    on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lists = on_device.get(q.device)
        if lists is None:
            lists = on_device[q.device] = (indices.to(q.device), counts.to(q.device))
        return attention(q, k, v, *lists, block)

    return run
