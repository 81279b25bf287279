"""Attention backends, resolved once by name.

``attention(q, k, v)`` takes ``[B, heads, L, head_dim]`` tensors and returns the same layout.
The default backend is PyTorch SDPA (flash / memory-efficient kernels on CUDA, a fused kernel
on CPU).  Optional CUDA-only libraries (flash-attn, SageAttention, xformers) can be asked for by
name; a backend that is asked for and missing is an error, never a silent fallback.  ``"auto"``
picks once, at load: the first of flash_attn, xformers that is installed and can run on a
CUDA device, else SDPA; the choice is logged.  SageAttention quantizes q/k to int8 (faster, not
exact), so "auto" never picks it: it is used only when asked for by name.

The cross-attention with a merged padding key (``dit.TextState``) needs an additive mask and
always runs through SDPA; the backends here serve the self-attention, where the time goes.
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


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention  # layout [B, L, heads, d]

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS: dict[str, tuple[AttnFn, str | None]] = {
    "sdpa": (_sdpa, None),
    "math": (_math, None),
    "flash_attn": (_flash_attn, "flash_attn"),
    "sage": (_sage, "sageattention"),
    "xformers": (_xformers, "xformers"),
}
AUTO_ORDER = ("flash_attn", "xformers")  # exact backends only
NAMES = ("auto", *_BACKENDS)


def available(name: str) -> str | None:
    """None if backend ``name`` can run here, else the reason it cannot."""
    module = _BACKENDS[name][1]
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"needs the {module!r} package"
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return None


def resolve_name(name: str = "sdpa") -> str:
    """The backend that ``name`` stands for ("auto" picks here, once); raise if unusable."""
    if name not in NAMES:
        raise ValueError(f"attention backend must be one of {list(NAMES)}, got {name!r}")
    if name == "auto":
        name = next((n for n in AUTO_ORDER if available(n) is None), "sdpa")
        log.info("attention backend (auto): %s", name)
        return name
    reason = available(name)
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} {reason}")
    return name


def resolve(name: str = "sdpa") -> AttnFn:
    """Return the attention function for ``name``; raise if it cannot run here."""
    return _BACKENDS[resolve_name(name)][0]


def chunked(fn: AttnFn, chunk: int) -> AttnFn:
    """``fn`` over chunks of the queries: softmax is per query row, so this is exact; it bounds
    the memory of backends whose workspace grows with L_q x L_k (``math``)."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] <= chunk:
            return fn(q, k, v)
        return torch.cat([fn(q[:, :, s : s + chunk], k, v) for s in range(0, q.shape[2], chunk)], 2)

    return run
