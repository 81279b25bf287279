"""Attention backends, resolved once by name.

``attention(q, k, v)`` takes ``[B, heads, L, head_dim]`` tensors and returns the same layout.
The default backend is PyTorch SDPA (flash / memory-efficient kernels on CUDA, a fused kernel
on CPU).  Optional CUDA-only libraries (flash-attn, SageAttention) can be asked for by name; a
backend that is asked for and missing is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Reference implementation; softmax in fp32 whatever the input dtype.
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func  # layout [B, L, heads, d]

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


_BACKENDS: dict[str, tuple[AttnFn, str | None]] = {
    "sdpa": (_sdpa, None),
    "math": (_math, None),
    "flash_attn": (_flash_attn, "flash_attn"),
    "sage": (_sage, "sageattention"),
}


def resolve(name: str = "sdpa") -> AttnFn:
    """Return the attention function for ``name``; raise if it cannot run here."""
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    fn, module = _BACKENDS[name]
    if module is not None and importlib.util.find_spec(module) is None:
        raise RuntimeError(f"attention backend {name!r} needs the {module!r} package")
    if module is not None and not torch.cuda.is_available():
        raise RuntimeError(f"attention backend {name!r} needs a CUDA device")
    log.debug("attention backend: %s", name)
    return fn


def chunked(fn: AttnFn, chunk: int) -> AttnFn:
    """``fn`` over chunks of the queries: softmax is per query row, so this is exact; it bounds
    the memory of backends whose workspace grows with L_q x L_k (``math``)."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] <= chunk:
            return fn(q, k, v)
        return torch.cat([fn(q[:, :, s : s + chunk], k, v) for s in range(0, q.shape[2], chunk)], 2)

    return run
