"""The DiT's gated residual add in Triton (CUDA; the interpreter on CPU for tests).

``gated_residual(x, y, gate)``: ``x + y * gate`` in fp32, stored in x's dtype -- in place into
x when x is fp32 (as ``wanlite.models.dit._gated_add`` does), else into a new tensor.  x, y
[B, L, D] (y's rows may have any uniform stride), gate [B|1, 1, D] fp32 (a view of the
modulation chunk).  One read of x and y and one write, where the torch path reads and writes
an fp32 copy of x in between when x is bf16.  Grid: (B * L rows, D / BLOCK column tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _gated(X, Y, G, OUT, sy_row, L, s_gate, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    b = row // L
    x = tl.load(X + row.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row.to(tl.int64) * sy_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * s_gate + cols, mask=mask, other=0.0)
    tl.store(OUT + row.to(tl.int64) * D + cols, (x + y * g).to(OUT.dtype.element_ty), mask=mask)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """(See the module docstring.)"""
    b, length, d = x.shape
    if y.shape != x.shape or gate.shape[-1] != d or gate.dtype != torch.float32:
        raise ValueError(f"x {tuple(x.shape)}, y {tuple(y.shape)}, gate {tuple(gate.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    if y.stride(-1) != 1 or (b > 1 and y.stride(0) != y.stride(1) * length):
        y = y.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    out = x if x.dtype == torch.float32 else torch.empty_like(x)
    s_gate = gate.stride(0) if gate.shape[0] > 1 else 0
    grid = (b * length, triton.cdiv(d, BLOCK))
    _gated[grid](x, y, gate, out, y.stride(1), length, s_gate, d, BLOCK=BLOCK)
    return out
