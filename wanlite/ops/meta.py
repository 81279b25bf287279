"""Meta-device construction: modules built with shapes only, no memory and no initializers, so
that loading can assign each parameter straight from the checkpoint (gpt-fast's pattern)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Random initializers on meta tensors do nothing (they have no values to fill): the first
    ``normal_`` on a meta tensor (``nn.Embedding``'s init) imports torch's Python meta kernels
    and torch._dynamo, ~2.7 s of a one-shot CLI call (so do out-of-place arithmetic ops on meta
    tensors: module constructors use in-place ones)."""

    SKIPPED = frozenset({torch.nn.init.normal_, torch.Tensor.normal_, torch.nn.init.uniform_,
                         torch.Tensor.uniform_, torch.nn.init.trunc_normal_})  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:  # nn.init passes the tensor as a keyword
            t = args[0] if args else kwargs.get("tensor")
            if getattr(t, "is_meta", False):
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device (shapes only, no memory), skipping their initializers."""
    with torch.device("meta"), _SkipInit():
        yield
