"""Weight-only quantization by module swap (in the spirit of gpt-fast).

``quantize(model, mode, keep=...)`` replaces the ``nn.Linear`` layers of a model by
``QLinear`` layers that *store* their weight compactly and *compute* in the activation dtype:

- ``"int8"``: symmetric, per output channel: ``w ~= q * s`` with ``q`` int8 in [-127, 127] and
  ``s = max|w_row| / 127`` (fp32).  Forward: ``(x @ q.T) * s`` -- the scale is applied to the
  output, which is exact for a per-output-channel scale and saves a full-size multiply.
- ``"fp8"``: float8 e4m3 storage with a per-output-channel scale ``s = max|w_row| / 448``,
  upcast per layer to the compute dtype; works on any device (no fp8 matmul needed).
- ``"bf16"``: plain bf16 storage, upcast per layer (lossless for bf16 checkpoints).

On CPU the int8 path casts the int8 weight to fp32 and uses the ordinary fp32 GEMM: measured on
this project's 2-core CI machine, ``torch._weight_int8pack_mm`` takes 55x longer than that with
fp32 activations (and bf16 activations are themselves ~6x slower than fp32 there).

Layers that stay in full precision (the ``keep`` predicate; see ``dit.QUANT_KEEP`` and
``t5.QUANT_KEEP``): embeddings, norms, modulation tables, the time/text embedders and the output
head -- all small, and the ones whose errors are amplified through every block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "fp8", "bf16")
FP8 = torch.float8_e4m3fn
_QMAX = {"int8": 127.0, "fp8": 448.0}


def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, per-row fp32 scale or None) for a float weight ``[out, in]``."""
    if mode == "bf16":
        return w.to(torch.bfloat16), None
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / _QMAX[mode]
    q = w / scale[:, None]
    q = q.round().clamp_(-127, 127).to(torch.int8) if mode == "int8" else q.to(FP8)
    return q, scale


class QLinear(nn.Module):
    """A linear layer whose weight is stored quantized; the matmul runs in ``x.dtype``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str):
        super().__init__()
        if mode not in _QMAX and mode != "bf16":
            raise ValueError(f"quantization mode must be one of {MODES[1:]}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        dtype = {"int8": torch.int8, "fp8": FP8, "bf16": torch.bfloat16}[mode]
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), False)
        self.weight_scale = (
            nn.Parameter(torch.empty(out_features), False) if mode in _QMAX else None
        )
        self.bias = nn.Parameter(torch.empty(out_features), False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, mode: str) -> QLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, mode)
        w, s = quantize_weight(lin.weight.data, mode)
        q.weight = nn.Parameter(w, False)
        if s is not None:
            q.weight_scale = nn.Parameter(s, False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.float(), False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast one layer's weight at a time: the transient is [out, in] in x.dtype.
        y = F.linear(x, self.weight.to(x.dtype))
        if self.weight_scale is not None:
            y = y * self.weight_scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}"


def quantize(
    model: nn.Module, mode: str, keep: Callable[[str], bool] = lambda name: False
) -> nn.Module:
    """Swap every ``nn.Linear`` whose name is not kept for a ``QLinear`` (in place).

    On a meta-device model this only changes the structure (for loading a quantized
    checkpoint); on a loaded model it quantizes the weights."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return model
    for name, child in list(model.named_modules()):
        if not isinstance(child, nn.Linear) or keep(name):
            continue
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if child.weight.is_meta:
            new = QLinear(child.in_features, child.out_features, child.bias is not None, mode)
            new = new.to("meta")
        else:
            new = QLinear.from_linear(child, mode)
        setattr(holder, attr, new)
    return model


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QLinear)]


# --- fused projections ------------------------------------------------------------------------
# Layers that read the same input (q/k/v) run as one GEMM when their weights are consecutive rows
# of one buffer.  ``fuse_linears`` moves them there once, at load time, and returns the buffers;
# the layers keep their own parameters as views into them, so names, state dicts and memory are
# unchanged.  ``fused_linear`` then runs the one GEMM on those buffers.

_FUSED_ATTRS = ("weight", "weight_scale", "bias")


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The [sum of rows, ...] tensor over ``tensors`` if they are consecutive rows of one
    buffer, else None (no copy)."""
    first = tensors[0]
    if first.is_meta or any(not t.is_contiguous() for t in tensors):
        return None
    storage, offset = first.untyped_storage(), first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.new_empty(0).set_(storage, first.storage_offset(), shape)


def fuse_linears(layers) -> dict[str, torch.Tensor | None]:
    """Put the weights (and scales, biases) of same-kind linear layers into one buffer each
    (once: already fused layers are left as they are).  Returns {attr: buffer or None}."""
    if len({(type(m), getattr(m, "mode", None), m.in_features) for m in layers}) != 1:
        raise ValueError("only linear layers of one kind and input width can be fused")
    fused = {}
    for attr in _FUSED_ATTRS:
        ts = [getattr(m, attr, None) for m in layers]
        if any(t is None for t in ts):
            fused[attr] = None
            continue
        buffer = _joined(ts)
        if buffer is None:
            buffer, row = torch.cat([t.detach() for t in ts]), 0
            for m, t in zip(layers, ts):
                setattr(m, attr, nn.Parameter(buffer[row : row + t.shape[0]], requires_grad=False))
                row += t.shape[0]
        fused[attr] = buffer
    return fused


def fused_linear(x, weight, scale, bias, sizes: list[int]) -> list[torch.Tensor]:
    """The outputs of fused layers (buffers from ``fuse_linears``), split per layer: one GEMM,
    with ``QLinear``'s arithmetic when there is a scale."""
    if scale is None:
        b = None if bias is None else bias.to(x.dtype)
        return list(F.linear(x, weight.to(x.dtype), b).split(sizes, dim=-1))
    y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return list(y.split(sizes, dim=-1))
