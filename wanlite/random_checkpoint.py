"""Deterministic random weights in the exact layout of the real checkpoint.

Used by tests (``tiny``) and benchmarks (``full``): it proves the loading and compute paths,
not the picture.  Every tensor gets its own generator seeded from (seed, component, name), so a
tensor's values do not depend on which other tensors were generated or in what order, and the
full-size text encoder can be written one tensor at a time.
"""

from __future__ import annotations

import zlib

import torch


def tensor_seed(seed: int, component: str, name: str) -> int:
    return zlib.crc32(f"{seed}:{component}:{name}".encode())


def random_tensor(
    component: str, name: str, shape: tuple[int, ...], seed: int = 0
) -> torch.Tensor:
    """A float32 tensor for parameter ``name`` (our Wan key) with a scale that keeps
    activations O(1) through the network: norms near 1, small biases, fan-in scaled weights."""
    g = torch.Generator().manual_seed(tensor_seed(seed, component, name))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("bias"):
        return x.mul_(0.02)
    if len(shape) == 1 or name.endswith("gamma"):
        return x.mul_(0.1).add_(1.0)
    if name.endswith("modulation"):
        return x.mul_(shape[-1] ** -0.5)
    if "token_embedding" in name:
        return x
    if "pos_embedding" in name:
        return x.mul_(0.5)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return x.mul_(fan_in**-0.5)


def random_state_dict(
    module: torch.nn.Module, component: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random values for every parameter of ``module`` (which may live on the meta device).

    Buffers are not included: they are derived (RoPE tables), never stored in checkpoints."""
    return {
        name: random_tensor(component, name, tuple(p.shape), seed).to(dtype)
        for name, p in module.named_parameters()
    }
