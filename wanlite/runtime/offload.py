"""Weights that are not resident: blocks materialized just in time, embedding rows on demand.

A *weight source* maps one of our parameter names to a tensor: either a ``TensorStore`` over the
checkpoint files (plain reads, no mmap: only what is asked for enters RAM) or a dict of compact
tensors already in RAM (e.g. int8 weights quantized at load time).

``BlockStreamer`` hooks a ``ModuleList`` of blocks (the DiT's 30, the umT5's 24): before block
``i`` runs, its parameters are assigned from the source (cast to the compute dtype; quantized
tensors stay quantized), and the read of block ``i + 1`` is started on a background thread so
I/O overlaps compute; after it runs, its parameters go back to the meta device (freed).  So only
~2 blocks are resident on the device.  On CUDA the next block is copied from pinned host memory
on a side stream and the compute stream waits on that copy's event (the copy overlaps the
running block).  Host copies are *kept* up to ``keep_bytes`` (on CUDA: a share of the host's
available RAM, ``host_keep_bytes``): a kept tensor is read (and LoRA-merged) once and pinned
once, and every later forward only queues its device copy.  Tensors that arrive pinned (int8 /
fp8 weights quantized in RAM, pinned once at load) are used as they are.  Past the budget (and on
the CPU, where offload is asked for to save that very RAM) a block is read again each forward.
The model's own ``forward`` is unchanged: this is done with forward pre/post hooks.

``to_device`` moves a resident module's weights to the GPU in a few large copies: tensors are
packed into a pinned staging buffer (two, alternating, so packing one chunk overlaps the copy of
the previous one) and each chunk crosses in one asynchronous copy; the tensors are views of
their chunk on the device.

``RowEmbedding`` replaces an ``nn.Embedding`` whose table is too big to hold (umT5's 256k x 4096
token embedding is ~1 B parameters): it reads only the rows of the tokens asked for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .memory import trim

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
    """Keep the blocks of ``blocks`` off-device; materialize each one just before it runs.
    ``keep_bytes``: host copies kept (pinned on CUDA) across forwards, at most this many bytes;
    ``wrap``: prefetch block 0 after the last one (for a next forward); ``reads`` counts the
    tensors read from ``source`` (a kept one is read once)."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        prefix: str,
        source: Source,
        device: torch.device,
        keep_bytes: int = 0,
        wrap: bool = True,
    ):
        self.blocks, self.source, self.device = blocks, source, torch.device(device)
        # After the last block, prefetch block 0 for a next forward: the DiT's dozens of
        # forwards per call; not the umT5 (one forward per new prompt, often the call's last:
        # that read, a whole layer, would be wasted).
        self.wrap = wrap
        self.names = [
            {rel: f"{prefix}.{i}.{rel}" for rel, _ in block.named_parameters()}
            for i, block in enumerate(blocks)
        ]
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="wanlite-prefetch")
        self.pending: dict[int, Future] = {}
        self.handles = []
        self.kept: dict[str, torch.Tensor] = {}
        self.keep_bytes, self.kept_bytes, self.reads = keep_bytes, 0, 0
        # Seconds the prefetch thread spent reading (overlapping compute), and seconds the
        # compute waited for a block that was not ready yet (on the critical path).
        self.read_seconds = self.wait_seconds = 0.0
        for i, block in enumerate(blocks):
            release(block)
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    def _host(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the host (pinned on CUDA): kept, or read now (and kept if the
        budget allows).  Runs on the prefetch thread only."""
        t = self.kept.get(name)
        if t is not None:
            return t
        t = self.source(name)
        self.reads += 1
        new_bytes = 0
        if self.cuda and not t.is_pinned():
            t, new_bytes = t.pin_memory(), t.numel() * t.element_size()
        elif not self.cuda:
            new_bytes = t.numel() * t.element_size()
        if self.kept_bytes + new_bytes <= self.keep_bytes:  # (pinned at load: costs nothing)
            self.kept[name] = t
            self.kept_bytes += new_bytes
        return t

    def _read(self, i: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Block ``i``'s tensors on the compute device (runs on the prefetch thread)."""
        t0 = time.perf_counter()
        state = {rel: self._host(full) for rel, full in self.names[i].items()}
        event = None
        if self.cuda:
            with torch.cuda.stream(self.stream):  # queued behind nothing: overlaps the compute
                state = {k: v.to(self.device, non_blocking=True) for k, v in state.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
        self.read_seconds += time.perf_counter() - t0  # (the device copy only queued)
        return state, event

    def _prefetch(self, i: int) -> None:
        if i not in self.pending:
            self.pending[i] = self.pool.submit(self._read, i)

    def _before(self, i: int):
        def hook(block, args):
            self._prefetch(i)
            t0 = time.perf_counter()
            state, event = self.pending.pop(i).result()
            self.wait_seconds += time.perf_counter() - t0
            if event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                hand_over(state.values(), compute)
            block.load_state_dict(state, strict=True, assign=True)
            if self.wrap or i + 1 < len(self.blocks):  # the next forward starts at block 0
                self._prefetch((i + 1) % len(self.blocks))

        return hook

    def _after(self, i: int):
        def hook(block, args, output):
            release(block)
            if not self.cuda:  # else glibc keeps each freed block (measured: +70 MB a block)
                trim()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)
        self.kept.clear()


def host_keep_bytes(device: torch.device, share: float = 0.5) -> int:
    """How many bytes of streamed blocks to keep on the host: on CUDA ``share`` of the RAM
    available now (pinned memory cannot be swapped: leave the rest to the system); on the CPU
    none (blocks are streamed there to save that RAM)."""
    if torch.device(device).type != "cuda":
        return 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * share)
    except OSError:
        pass
    return 0


CHUNK_BYTES = 64 * 2**20  # one host-to-device copy: large enough to run at full bus speed
ALIGN = 256  # each tensor's offset in its chunk (any dtype's alignment; CUDA's allocation unit)


def to_device(
    items: Iterable[tuple[str, torch.Tensor]], device: torch.device, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, torch.Tensor]:
    """{name: tensor on ``device``} from (name, host tensor) pairs, read lazily (a generator:
    each host tensor can be freed once packed).  On CUDA they cross in one copy per chunk of up
    to ``chunk_bytes`` through pinned staging buffers; on the CPU they are returned as they are.
    ``_batched`` itself runs on any device (unpinned on the CPU: how the tests exercise it)."""
    device = torch.device(device)
    if device.type == "cpu":
        return dict(items)
    return _batched(items, device, chunk_bytes, pin=device.type == "cuda")


def _batched(items, device, chunk_bytes: int, pin: bool) -> dict[str, torch.Tensor]:
    """Pack tensors into a staging buffer (two, alternating: one is filled while the other's
    copy runs), copy each full chunk in one call, and view the tensors out of the device chunk
    (they share its memory).  A tensor bigger than a chunk crosses alone."""
    stages = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
    events: list = [None, None]  # the last copy out of each staging buffer
    out: dict[str, torch.Tensor] = {}
    pending: list = []  # (name, offset, nbytes, dtype, shape) packed in the current stage
    k = used = 0

    def flush() -> None:
        nonlocal pending, k, used
        if pending:
            dev = torch.empty(used, dtype=torch.uint8, device=device)
            dev.copy_(stages[k % 2][:used], non_blocking=pin)
            if pin:
                events[k % 2] = torch.cuda.Event()
                events[k % 2].record()
            for name, offset, n, dtype, shape in pending:
                out[name] = dev[offset : offset + n].view(dtype).view(shape)
            pending, k, used = [], k + 1, 0
            if events[k % 2] is not None:
                events[k % 2].synchronize()  # the next stage's previous copy has left it

    for name, t in items:
        n = t.numel() * t.element_size()
        if n > chunk_bytes:
            out[name] = t.to(device)
            continue
        offset = -(-used // ALIGN) * ALIGN
        if offset + n > chunk_bytes:
            flush()
            offset = 0
        stages[k % 2][offset : offset + n].view(t.dtype).view(t.shape).copy_(t)
        pending.append((name, offset, n, t.dtype, t.shape))
        used = offset + n
    flush()
    return out


class RowEmbedding(nn.Module):
    """``nn.Embedding`` look-alike that reads only the rows it is asked for from ``source``."""

    def __init__(self, read_rows: Callable[[list[int]], torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.read_rows, self.dtype = read_rows, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = self.read_rows(unique.tolist()).to(self.dtype)  # [U, D]
        return rows[inverse].to(ids.device)
