"""Video Sparse Attention (VSA; FastVideo, arXiv 2505.13389): the attention FastWan was trained
with.  A torch implementation of the published equations, for any device; our code.

Tiling (FastVideo ``fastvideo/attention/backends/video_sparse_attn.py``,
``get_tile_partition_indices`` / ``construct_variable_block_sizes`` / ``get_non_pad_index``):
the token grid (f, h, w) (RoPE already applied) is cut into cubes of 4x4x4 tokens, ordered
t-cube, h-cube, w-cube; inside a cube its tokens in (t, h, w) row-major order.  Each cube takes
64 slots, its valid tokens first, zeros after (edge cubes are partial): q, k, v, gate
``[B, H, L, d]`` -> ``[B, H, n, 64, d]``.

Per head (FastVideo ``fastvideo-kernel/python/fastvideo_kernel/ops.py::video_sparse_attn``)::

    q_c, k_c, v_c [n, d]  = mean over each cube's valid tokens          (the coarse tokens)
    S      = q_c k_c^T / sqrt(d)                                           [n, n], all cubes
    out_c  = softmax(S) v_c, broadcast to every token of its query cube   (coarse branch)
    sel(i) = the top-k key cubes of row i of S, exactly k                  (block selection)
    out_s  = softmax over the valid tokens of the k selected cubes only    (fine branch)
    out    = out_s + gate * out_c   (gate = to_gate_compress(x), per head; without one: + out_c)

k = clamp(ceil((1 - sparsity) n), 1, n) (``compute_topk``), the same in every block and step;
FastWan runs at sparsity 0.8.

The fine branch gathers, for a chunk of query cubes, the k selected key cubes (k x 64 slots)
and calls SDPA with pad slots masked out: it computes (k/n) of dense attention's pairs, so it
is a real saving on any device.  With k = n (sparsity 0) it is exactly dense attention; with
that and a zero gate the whole op is (tests/test_vsa.py).  Untiling is the inverse permutation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TILE = (4, 4, 4)
SPARSITY = 0.8  # FastWan's (FastVideo scripts/inference/inference_wan_VSA_DMD_1_3B.yaml)
GATHER_BYTES = 64 * 2**20  # gathered K and V per fine-branch chunk
FINE_KERNEL = "bmm"  # the fine branch on CPU: "bmm" (two batched GEMMs) or "sdpa"


def topk_for(sparsity: float, cubes: int) -> int:
    """Key cubes kept per query cube: ``clamp(ceil((1 - sparsity) * cubes), 1, cubes)``."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"VSA sparsity must be in [0, 1), got {sparsity}")
    return max(1, min(math.ceil((1 - sparsity) * cubes), cubes))


@dataclass(frozen=True)
class Tiling:
    """Where each token of a grid goes among the cubes' slots."""

    grid: tuple[int, int, int]
    cubes: int  # n
    volume: int  # slots per cube (64)
    sizes: Tensor  # [n] valid tokens per cube
    order: Tensor  # [L] token index at each position of the cube order
    slots: Tensor  # [L] the slot (cube * volume + j) of each position of the cube order
    untile: Tensor  # [L] slot of each token in (f, h, w) order

    def valid(self) -> Tensor:
        """[n, volume] bool: which slots hold a token."""
        return torch.arange(self.volume)[None] < self.sizes[:, None]


@functools.lru_cache(maxsize=16)
def tiling(grid: tuple[int, int, int], tile: tuple[int, int, int] = TILE) -> Tiling:
    """The cube tiling of ``grid`` (CPU tensors; cached per grid)."""
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"VSA needs a token grid (f, h, w) of positive sizes, got {grid}")
    index = torch.arange(math.prod(grid)).view(grid)
    counts = [-(-g // t) for g, t in zip(grid, tile, strict=True)]
    volume, parts, sizes = math.prod(tile), [], []
    for a in range(counts[0]):
        for b in range(counts[1]):
            for c in range(counts[2]):
                cube = index[
                    a * tile[0] : (a + 1) * tile[0],
                    b * tile[1] : (b + 1) * tile[1],
                    c * tile[2] : (c + 1) * tile[2],
                ].flatten()
                parts.append(cube)
                sizes.append(cube.numel())
    order = torch.cat(parts)
    sizes_t = torch.tensor(sizes)
    slots = torch.cat([i * volume + torch.arange(s) for i, s in enumerate(sizes)])
    untile = torch.empty_like(slots)
    untile[order] = slots
    return Tiling(tuple(grid), len(sizes), volume, sizes_t, order, slots, untile)


def tile(x: Tensor, t: Tiling) -> Tensor:
    """[B, H, L, d] in (f, h, w) order -> [B, H, n, volume, d], zero pads."""
    b, h, _, d = x.shape
    out = x.new_zeros(b, h, t.cubes * t.volume, d)
    out[:, :, t.slots.to(x.device)] = x[:, :, t.order.to(x.device)]
    return out.view(b, h, t.cubes, t.volume, d)


def untile(x: Tensor, t: Tiling) -> Tensor:
    """[B, H, n, volume, d] -> [B, H, L, d] in (f, h, w) order (pads dropped)."""
    return x.flatten(2, 3)[:, :, t.untile.to(x.device)]


def coarse(qp: Tensor, kp: Tensor, vp: Tensor, t: Tiling) -> tuple[Tensor, Tensor]:
    """(scores S [B, H, n, n], out_c [B, H, n, d]), fp32, from tiled q, k, v (pads are zeros,
    so a cube's sum over its slots is the sum over its tokens)."""
    count = t.sizes.to(qp.device, torch.float32)[:, None]
    qc, kc, vc = (x.float().sum(3) / count for x in (qp, kp, vp))
    scores = qc @ kc.transpose(-1, -2) * qp.shape[-1] ** -0.5
    return scores, scores.softmax(-1) @ vc


def fine(qp: Tensor, kp: Tensor, vp: Tensor, selected: Tensor, t: Tiling) -> Tensor:
    """Each query cube's attention over the valid tokens of its selected key cubes:
    qp/kp/vp [B, H, n, V, d], selected [B, H, n, k] -> [B, H, n, V, d] (pad rows: anything)."""
    b, h, n, vol, d = qp.shape
    k = selected.shape[-1]
    # additive key bias per cube slot: 0 on tokens, -inf on pads (None: no partial cube)
    valid = t.valid().to(qp.device)
    bias = None
    if not bool(valid.all()):
        bias = torch.zeros(valid.shape, dtype=qp.dtype, device=qp.device)
        bias.masked_fill_(~valid, float("-inf"))
    step = max(1, GATHER_BYTES // (2 * k * vol * d * qp.element_size()))
    out = torch.empty_like(qp)
    for i in range(b):
        for j in range(h):
            keys_all, values_all = kp[i, j].flatten(1), vp[i, j].flatten(1)  # [n, V*d] rows
            for s in range(0, n, step):
                sel = selected[i, j, s : s + step].reshape(-1)  # [c*k] cube rows to gather
                c = sel.numel() // k
                keys = keys_all.index_select(0, sel).view(c, k * vol, d)
                values = values_all.index_select(0, sel).view(c, k * vol, d)
                mask = None if bias is None else bias.index_select(0, sel).view(c, 1, k * vol)
                out[i, j, s : s + step] = _attend(qp[i, j, s : s + step], keys, values, mask)
    return out


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q [c, V, d], k/v [c, k*V, d].  On CPU as two
    batched GEMMs (softmax in fp32): measured 1.6x faster here than SDPA at these shapes (64
    queries against ~6k keys per cube, where SDPA's CPU kernel is slow); SDPA elsewhere."""
    if not q.is_cpu or FINE_KERNEL == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scale = q.shape[-1] ** -0.5
    if mask is None:
        s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # [c, V, k*V]
    else:
        s = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
    p = s.softmax(-1) if s.dtype == torch.float32 else s.float().softmax(-1).to(s.dtype)
    return torch.bmm(p, v)


def video_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int, int],
    topk: int,
    gate: Tensor | None = None,
    tile_size: tuple[int, int, int] = TILE,
) -> Tensor:
    """VSA of q, k, v [B, H, L, d] (tokens in (f, h, w) order of ``grid``) keeping ``topk`` key
    cubes per query cube; ``gate`` [B, H, L, d] weights the coarse branch (None: weight 1).
    Returns [B, H, L, d] in q's dtype."""
    t = tiling(tuple(grid), tuple(tile_size))
    if q.shape[2] != math.prod(grid) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, {math.prod(grid)}, d] for grid {tuple(grid)}")
    if not 1 <= topk <= t.cubes:
        raise ValueError(f"topk must be in [1, {t.cubes}] (the grid's cubes), got {topk}")
    qp, kp, vp = tile(q, t), tile(k, t), tile(v, t)
    scores, out_c = coarse(qp, kp, vp, t)
    selected = scores.topk(topk, dim=-1).indices  # [B, H, n, k]
    out = fine(qp, kp, vp, selected, t).float()
    coarse_part = out_c[:, :, :, None]  # broadcast over the cube's slots
    if gate is not None:
        coarse_part = tile(gate, t).float() * coarse_part
    return untile(out.add_(coarse_part), t).to(q.dtype)


class VSA:
    """The DiT's self-attention function for one token grid (``gated``: it takes the gate)."""

    gated = True

    def __init__(self, grid: tuple[int, int, int], sparsity: float = SPARSITY):
        self.grid, self.sparsity = tuple(grid), sparsity
        self.topk = topk_for(sparsity, tiling(self.grid).cubes)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None = None) -> Tensor:
        return video_sparse_attention(q, k, v, self.grid, self.topk, gate)


def choose_sparsity(has_gates: bool, attention: str, sparsity: float | None) -> float | None:
    """The VSA sparsity a load runs with, or None (dense): a checkpoint trained with VSA (it has
    the gate projections) runs VSA unless a dense backend is named; ``sparsity`` None = the
    published 0.8.  Asking for a sparsity on a checkpoint without gates is an error."""
    if sparsity is not None:
        topk_for(sparsity, 1)  # range check
        if not has_gates:
            raise ValueError(
                "vsa_sparsity needs a checkpoint trained with VSA (with to_gate_compress "
                "weights, e.g. FastWan2.1-T2V-1.3B-Diffusers)"
            )
        if attention != "auto":
            raise ValueError(f"vsa_sparsity is VSA's; attention {attention!r} runs dense")
    if not has_gates or attention != "auto":
        return None
    return SPARSITY if sparsity is None else sparsity
