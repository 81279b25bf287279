"""Attention backends, resolved once by name.

``attention(q, k, v)`` takes ``[B, heads, L, head_dim]`` tensors and returns the same layout.
The default backend is PyTorch SDPA (flash / memory-efficient kernels on CUDA, a fused kernel
on CPU).  Optional CUDA-only libraries (flash-attn, SageAttention, xformers) can be asked for by
name.  Whether a backend can run is decided from what the call will run on -- the device, the
compute dtype and, on CUDA, the GPU's compute capability (``unusable``, a pure function of
those, so the decision is tested without a GPU):

==============  =================================================================
backend         runs on
==============  =================================================================
sdpa, math      any device, any dtype
flash_attn      CUDA, fp16/bf16, sm80+ (flash-attn 2 has no kernels for older GPUs)
sage            CUDA, fp16/bf16, sm80+
xformers        CUDA (any dtype)
==============  =================================================================

A backend asked for by name that cannot run there is an error saying why, never a silent
fallback.  ``"auto"`` picks once, at load: the first of flash_attn, xformers that can run the
call, else SDPA; the choice and the reasons the others were passed over are logged.
SageAttention quantizes q/k to int8 (faster, not exact), so "auto" never picks it: it is used
only when asked for by name.

The cross-attention with a merged padding key (``dit.TextState``) needs an additive mask and
always runs through SDPA; the backends here serve the self-attention, where the time goes.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

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


_BACKENDS: dict[str, AttnFn] = {
    "sdpa": _sdpa,
    "math": _math,
    "flash_attn": _flash_attn,
    "sage": _sage,
    "xformers": _xformers,
}


@dataclass(frozen=True)
class Needs:
    """What a backend needs: its package, a CUDA device, half precision, a minimum GPU."""

    module: str | None = None
    cuda: bool = False
    half: bool = False  # fp16 / bf16 only
    min_capability: tuple[int, int] | None = None


_NEEDS = {
    "sdpa": Needs(),
    "math": Needs(),
    "flash_attn": Needs("flash_attn", cuda=True, half=True, min_capability=(8, 0)),
    "sage": Needs("sageattention", cuda=True, half=True, min_capability=(8, 0)),
    "xformers": Needs("xformers", cuda=True),
}
AUTO_ORDER = ("flash_attn", "xformers")  # exact backends only
NAMES = ("auto", *_BACKENDS)
_HALF = (torch.float16, torch.bfloat16)
CPU, FP32 = torch.device("cpu"), torch.float32


def unusable(name: str, device_type: str, dtype, capability, installed: bool) -> str | None:
    """Why backend ``name`` cannot run a call on ``device_type`` ("cpu", "cuda", ...) in
    ``dtype`` on a GPU of ``capability`` ((major, minor), None off CUDA) with its package
    ``installed`` -- or None if it can.  Pure: no hardware is asked."""
    needs = _NEEDS[name]
    if needs.module is not None and not installed:
        return f"needs the {needs.module!r} package"
    if needs.cuda and device_type != "cuda":
        return f"needs a CUDA device (the call runs on {device_type})"
    if needs.half and dtype is not None and dtype not in _HALF:
        return f"needs float16 or bfloat16 (the call runs in {str(dtype).removeprefix('torch.')})"
    low = needs.min_capability
    if low is not None and capability is not None and tuple(capability) < low:
        have = "sm{}{}".format(*capability)
        return f"needs a GPU of compute capability {low[0]}.{low[1]}+ (this one is {have})"
    return None


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def available(name: str, device=None, dtype=None) -> str | None:
    """None if backend ``name`` can run on ``device`` in ``dtype``, else the reason it cannot.
    ``device`` None: this machine's CUDA device if it has one, else the CPU; ``dtype`` None:
    any dtype the backend accepts (not checked)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device (CUDA is not available here)"
    installed = _installed(_NEEDS[name].module)
    return unusable(name, device.type, dtype, _cuda_capability(device), installed)


def resolve_name(name: str = "sdpa", device=CPU, dtype=FP32) -> str:
    """The backend that ``name`` stands for on ``device`` in ``dtype`` ("auto" picks here,
    once, and logs why); raise if the one asked for cannot run there."""
    if name not in NAMES:
        raise ValueError(f"attention backend must be one of {list(NAMES)}, got {name!r}")
    device = torch.device(device)
    if name != "auto":
        reason = available(name, device, dtype)
        if reason is not None:
            raise RuntimeError(f"attention backend {name!r} {reason}")
        return name
    passed = {n: available(n, device, dtype) for n in AUTO_ORDER}
    chosen = next((n for n, reason in passed.items() if reason is None), "sdpa")
    why = "; ".join(f"{n} {r}" for n, r in passed.items() if r is not None)
    where = f"{device}, {str(dtype).removeprefix('torch.')}"
    log.info("attention backend (auto) on %s: %s%s", where, chosen, f" ({why})" if why else "")
    return chosen


def resolve(name: str = "sdpa", device=CPU, dtype=FP32) -> AttnFn:
    """Return the attention function for ``name``; raise if it cannot run on ``device`` in
    ``dtype``."""
    return _BACKENDS[resolve_name(name, device, dtype)]


def function(name: str) -> AttnFn:
    """The attention function of a backend already resolved by ``resolve_name`` (a model
    built before its device is known takes the name, not "auto")."""
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {list(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]


def chunked(fn: AttnFn, chunk: int) -> AttnFn:
    """``fn`` over chunks of the queries: softmax is per query row, so this is exact; it bounds
    the memory of backends whose workspace grows with L_q x L_k (``math``)."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] <= chunk:
            return fn(q, k, v)
        return torch.cat([fn(q[:, :, s : s + chunk], k, v) for s in range(0, q.shape[2], chunk)], 2)

    return run
