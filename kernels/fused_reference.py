"""Torch references for the fused DiT kernels (``fused_norm``, ``gated``): what each computes,
plainly, in fp32.  The model's own functions (``wanlite.models.dit``) compute the same; the tests
hold both the kernels and the model's functions to these.

- ``qk_norm_rope``: RMSNorm over the whole width D (with weight, eps), then RoPE on the
  interleaved pairs (2i, 2i+1) of each head: x [B, L, D] -> [B, L, heads, d], cos / sin
  [L, 1, d/2] fp32.  One rounding, at the end, to x's dtype.
- ``layernorm_modulate``: LayerNorm without affine over D, then ``* (1 + scale) + shift``
  (adaLN), shift / scale [B|1, 1, D] fp32; fp32 math, result in ``dtype``.
- ``gated_residual``: ``x + y * gate`` in fp32, gate [B|1, 1, D] fp32; result in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def qk_norm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, heads: int, eps: float):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    x1, x2 = xf.unflatten(-1, (heads, -1, 2)).unbind(-1)  # [B, L, heads, d/2] each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype=None):
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (y * (1 + scale) + shift).to(dtype or x.dtype)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return (x.float() + y.float() * gate).to(x.dtype)
