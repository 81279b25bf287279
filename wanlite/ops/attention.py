"""Attention backends, resolved once by name.

``attention(q, k, v)`` takes ``[B, heads, L, head_dim]`` tensors and returns the same layout.
The default backend is PyTorch SDPA (flash / memory-efficient kernels on CUDA, a fused kernel
on CPU).  Optional CUDA-only libraries (flash-attn, SageAttention, xformers) can be asked for by
name.  Whether a backend can run is decided from what the call will run on -- the device, the
compute dtype and, on CUDA, the GPU's compute capability (``unusable``, a pure function of
those, so the decision is tested without a GPU):

==============  ====================================================  ===================
backend         runs on                                               extra (package)
==============  ====================================================  ===================
sdpa, math      any device, any dtype                                 (torch)
flash_attn      CUDA, fp16/bf16, sm80+ (flash-attn 2: none older)     flash-attn
sage            CUDA, fp16/bf16, sm80+                                sage (sageattention)
xformers        CUDA (any dtype)                                      xformers
radial          any device, any dtype                                 on CUDA: triton
==============  ====================================================  ===================

``radial`` is Radial Attention's static block-sparse mask (``wanlite.ops.radial``; its CUDA
kernel is Triton's, ``wanlite.kernels``).  The mask depends on the token grid, the denoising
step and the block index, so the DiT picks the function per block (``radial.Radial``):
``function("radial")`` is its dense part (SDPA: the first steps and blocks), and
``resolve("radial")`` is an error (no grid there).  Not exact, so "auto" never picks it.

The optional packages are extras (none is needed: SDPA is always there):
``pip install 'wanlite[xformers]'``, ``pip install 'wanlite[sage]'`` and
``pip install --no-build-isolation 'wanlite[flash-attn]'`` (flash-attn compiles against the
installed torch).  A backend asked for by name that cannot run there is an error saying why,
never a silent fallback: ``RuntimeError`` when the device, dtype or GPU cannot run it (checked
first: installing the package would not help), ``ImportError`` naming the extra when only its
package is missing.  ``"auto"`` picks once, at load: the first of flash_attn, xformers that can
run the call, else SDPA; the choice and the reasons the others were passed over are logged.
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
    """What a backend needs: its package (and the pip command installing it as an extra), a
    CUDA device, half precision, a minimum GPU."""

    module: str | None = None
    cuda: bool = False
    half: bool = False  # fp16 / bf16 only
    min_capability: tuple[int, int] | None = None
    install: str | None = None
    cuda_module: str | None = None  # a package needed only on CUDA (radial's Triton kernel)


_NEEDS = {
    "sdpa": Needs(),
    "math": Needs(),
    # flash-attn builds against the installed torch: pip must not isolate the build
    "flash_attn": Needs(
        "flash_attn",
        cuda=True,
        half=True,
        min_capability=(8, 0),
        install="pip install --no-build-isolation 'wanlite[flash-attn]'",
    ),
    "sage": Needs(
        "sageattention",
        cuda=True,
        half=True,
        min_capability=(8, 0),
        install="pip install 'wanlite[sage]'",
    ),
    "xformers": Needs("xformers", cuda=True, install="pip install 'wanlite[xformers]'"),
    "radial": Needs(cuda_module="triton", install="pip install triton"),
}
AUTO_ORDER = ("flash_attn", "xformers")  # exact backends only
NAMES = ("auto", *_BACKENDS, "radial")
_HALF = (torch.float16, torch.bfloat16)
CPU, FP32 = torch.device("cpu"), torch.float32


def unusable(name: str, device_type: str, dtype, capability, installed: bool) -> str | None:
    """Why backend ``name`` cannot run a call on ``device_type`` ("cpu", "cuda", ...) in
    ``dtype`` on a GPU of ``capability`` ((major, minor), None off CUDA) with its package
    ``installed`` -- or None if it can.  Pure: no hardware is asked.  What the call runs on is
    checked before the package: where the backend cannot run, installing it would not help."""
    needs = _NEEDS[name]
    if needs.cuda and device_type != "cuda":
        return f"needs a CUDA device (the call runs on {device_type})"
    if needs.half and dtype is not None and dtype not in _HALF:
        return f"needs float16 or bfloat16 (the call runs in {str(dtype).removeprefix('torch.')})"
    low = needs.min_capability
    if low is not None and capability is not None and tuple(capability) < low:
        have = "sm{}{}".format(*capability)
        return f"needs a GPU of compute capability {low[0]}.{low[1]}+ (this one is {have})"
    if needs.module is not None and not installed:
        return missing_package(name)
    if needs.cuda_module is not None and device_type == "cuda" and not installed:
        return missing_package(name)
    return None


def missing_package(name: str) -> str:
    """The reason given when backend ``name``'s package is not installed (with its extra)."""
    needs = _NEEDS[name]
    return f"needs the {needs.module or needs.cuda_module!r} package: {needs.install}"


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
    needs = _NEEDS[name]
    installed = _installed(needs.cuda_module if device.type == "cuda" else None) and _installed(
        needs.module
    )
    return unusable(name, device.type, dtype, _cuda_capability(device), installed)


def resolve_name(name: str = "sdpa", device=CPU, dtype=FP32) -> str:
    """The backend that ``name`` stands for on ``device`` in ``dtype`` ("auto" picks here,
    once, and logs why); raise if the one asked for cannot run there."""
    if name not in NAMES:
        raise ValueError(f"attention backend must be one of {list(NAMES)}, got {name!r}")
    device = torch.device(device)
    if name != "auto":
        reason = available(name, device, dtype)
        if reason is not None:  # a missing package is an ImportError naming its extra
            error = ImportError if reason == missing_package(name) else RuntimeError
            raise error(f"attention backend {name!r} {reason}")
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
    name = resolve_name(name, device, dtype)
    if name == "radial":
        raise ValueError("attention 'radial' needs the token grid: the DiT applies it (ops.radial)")
    return _BACKENDS[name]


def function(name: str) -> AttnFn:
    """The attention function of a backend already resolved by ``resolve_name`` (a model
    built before its device is known takes the name, not "auto")."""
    if name == "radial":  # its dense part; the DiT switches to the sparse mask (ops.radial)
        return _sdpa
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
