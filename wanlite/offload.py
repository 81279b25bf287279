"""Weights that are not resident: blocks materialized just in time, embedding rows on demand.

A *weight source* maps one of our parameter names to a tensor: either a ``TensorStore`` over the
checkpoint files (plain reads, no mmap: only what is asked for enters RAM) or a dict of compact
tensors already in RAM (e.g. int8 weights quantized at load time).

``BlockStreamer`` hooks a ``ModuleList`` of blocks (the DiT's 30, the umT5's 24): before block
``i`` runs, its parameters are assigned from the source (cast to the compute dtype; quantized
tensors stay quantized), and the read of block ``i + 1`` is started on a background thread so
I/O overlaps compute; after it runs, its parameters go back to the meta device (freed).  So only
~2 blocks are resident.  On CUDA the next block is copied from pinned host memory on a side
stream and the compute stream waits on that copy's event.  The model's own ``forward`` is
unchanged: this is done with forward pre/post hooks.

``RowEmbedding`` replaces an ``nn.Embedding`` whose table is too big to hold (umT5's 256k x 4096
token embedding is ~1 B parameters): it reads only the rows of the tokens asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

log = logging.getLogger(__name__)

Source = Callable[[str], torch.Tensor]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating weights to the compute dtype; quantized (int8 / fp8) stay as stored."""
    if dtype is not None and t.dtype in FLOAT_DTYPES:
        return t.to(dtype)
    return t


def hand_over(tensors, stream) -> None:
    """Tensors allocated on the prefetch stream, now used by ``stream``: record that use, so
    the caching allocator reuses their memory (when the block is released) only once the work
    queued on ``stream`` so far has finished -- not as soon as the prefetch of the next block
    asks the side stream for memory while the compute stream may still be reading them."""
    for t in tensors:
        t.record_stream(stream)


def release(module: nn.Module) -> None:
    """Drop a module's parameters (back to the meta device, shapes kept)."""
    module.to("meta")


class BlockStreamer:
    """Keep the blocks of ``blocks`` off-device; materialize each one just before it runs."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        prefix: str,
        source: Source,
        device: torch.device,
    ):
        self.blocks, self.source, self.device = blocks, source, torch.device(device)
        self.names = [
            {rel: f"{prefix}.{i}.{rel}" for rel, _ in block.named_parameters()}
            for i, block in enumerate(blocks)
        ]
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="wanlite-prefetch")
        self.pending: dict[int, Future] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            release(block)
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    def _read(self, i: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Block ``i``'s tensors on the compute device (runs on the prefetch thread)."""
        state = {rel: self.source(full) for rel, full in self.names[i].items()}
        if not self.cuda:
            return state, None
        with torch.cuda.stream(self.stream):
            state = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in state.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return state, event

    def _prefetch(self, i: int) -> None:
        if i not in self.pending:
            self.pending[i] = self.pool.submit(self._read, i)

    def _before(self, i: int):
        def hook(block, args):
            self._prefetch(i)
            state, event = self.pending.pop(i).result()
            if event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                hand_over(state.values(), compute)
            block.load_state_dict(state, strict=True, assign=True)
            self._prefetch((i + 1) % len(self.blocks))  # the next forward starts at block 0

        return hook

    def _after(self, i: int):
        def hook(block, args, output):
            release(block)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


class RowEmbedding(nn.Module):
    """``nn.Embedding`` look-alike that reads only the rows it is asked for from ``source``."""

    def __init__(self, read_rows: Callable[[list[int]], torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.read_rows, self.dtype = read_rows, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = self.read_rows(unique.tolist()).to(self.dtype)  # [U, D]
        return rows[inverse].to(ids.device)
