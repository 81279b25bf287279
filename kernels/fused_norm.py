"""Fused normalisation kernels of the DiT block in Triton (CUDA; the interpreter on CPU for tests).

Each replaces a chain of torch element-wise ops that reads and writes the [B, L, D] activations
several times (upcast, statistics, scale, shift, downcast) by one read and one write per row.
One program per token row (B * L rows); the row (D = 1536 for the 1.3B) fits one block.

- ``qk_norm_rope``: RMSNorm over the whole D with weight (``x * rsqrt(mean(x^2) + eps) * w``),
  then RoPE on the interleaved pairs (2i, 2i+1) of each head with the head's cos / sin
  ([L, 1, d/2] fp32, ``wanlite.models.dit.rope_tables``).  The row is loaded as its even and
  odd elements, so each pair is rotated in registers.  x [B, L, D] with unit last stride and a
  uniform row stride (the q / k slices of a fused qkv output qualify) -> [B, L, heads, d]
  contiguous in x's dtype.  The model's path rounds the norm's output to x's dtype before RoPE;
  this kernel rounds once, at the end (a difference within that rounding).
- ``layernorm_modulate``: LayerNorm without affine, then ``* (1 + scale) + shift`` with shift /
  scale [B|1, 1, D] fp32 (views of the modulation chunks: any batch stride, unit last stride);
  fp32 math, result in ``dtype``.

``fused_reference`` has the torch equivalents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_rope(X, W, COS, SIN, OUT, sx_row, L, eps,
              D: tl.constexpr, HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    pos = row % L  # the token's position in the sequence: its cos / sin row
    i = tl.arange(0, BLOCK)  # pair index over the whole width
    mask = i < D // 2
    x_row = X + row.to(tl.int64) * sx_row
    xe = tl.load(x_row + 2 * i, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_row + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / D + eps)
    xe = xe * r * tl.load(W + 2 * i, mask=mask, other=0.0).to(tl.float32)
    xo = xo * r * tl.load(W + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    j = pos * HALF_HEAD + i % HALF_HEAD  # the pair's index within its head
    c = tl.load(COS + j, mask=mask, other=0.0)
    s = tl.load(SIN + j, mask=mask, other=0.0)
    o_row = OUT + row.to(tl.int64) * D
    tl.store(o_row + 2 * i, (xe * c - xo * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_row + 2 * i + 1, (xe * s + xo * c).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _ln_modulate(X, SHIFT, SCALE, OUT, sx_row, L, s_shift, s_scale, eps,
                 D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    b = row // L
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row.to(tl.int64) * sx_row + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    shift = tl.load(SHIFT + b * s_shift + cols, mask=mask, other=0.0)
    scale = tl.load(SCALE + b * s_scale + cols, mask=mask, other=0.0)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(OUT + row.to(tl.int64) * D + cols, y.to(OUT.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """x [B, L, D] as rows with one stride: (x, row stride), copied only when the batch stride
    is not L row strides or the last stride is not 1."""
    b, length, _ = x.shape
    if x.stride(-1) != 1 or (b > 1 and x.stride(0) != x.stride(1) * length):
        x = x.contiguous()
    return x, x.stride(1)


def _batch_stride(t: Tensor, d: int) -> int:
    """Batch stride of a [B|1, 1, D] fp32 modulation view (0 when it broadcasts)."""
    if t.dtype != torch.float32 or t.shape[-1] != d or t.stride(-1) != 1:
        raise ValueError(f"shift / scale must be fp32 [B|1, 1, {d}] with unit last stride")
    return t.stride(0) if t.shape[0] > 1 else 0


def qk_norm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, heads: int, eps: float):
    """RMSNorm(x) * weight, then RoPE per head (see the module docstring) -> [B, L, heads, d]."""
    b, length, d = x.shape
    half = d // heads // 2
    if d % (2 * heads) or cos.shape[0] != length or cos.shape[-1] != half:
        raise ValueError(f"x {tuple(x.shape)}, heads {heads} and cos {tuple(cos.shape)} disagree")
    x, sx = _rows(x)
    out = torch.empty(b, length, heads, d // heads, dtype=x.dtype, device=x.device)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    block = triton.next_power_of_2(d // 2)
    _rms_rope[(b * length,)](x, weight.contiguous(), cos, sin, out, sx, length, eps,
                             D=d, HALF_HEAD=half, BLOCK=block)  # fmt: skip
    return out


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype=None):
    """LayerNorm (no affine) * (1 + scale) + shift in fp32 -> [B, L, D] in ``dtype``."""
    b, length, d = x.shape
    x, sx = _rows(x)
    out = torch.empty(b, length, d, dtype=dtype or x.dtype, device=x.device)
    ss, sc = _batch_stride(shift, d), _batch_stride(scale, d)
    _ln_modulate[(b * length,)](x, shift, scale, out, sx, length, ss, sc, eps,
                                D=d, BLOCK=triton.next_power_of_2(d))  # fmt: skip
    return out


def modulate(norm, x: Tensor, shift: Tensor, scale: Tensor, dtype=None) -> Tensor:
    """``wanlite.models.dit._modulate``'s signature, for a LayerNorm without affine."""
    if getattr(norm, "weight", None) is not None or not hasattr(norm, "eps"):
        raise ValueError("the fused adaLN kernel takes a LayerNorm without affine")
    return layernorm_modulate(x, shift, scale, norm.eps, dtype)
