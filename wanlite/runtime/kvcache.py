"""The self-attention KV cache of causal (frame-autoregressive) generation.

A causal Wan DiT (Self-Forcing, CausVid) makes the video chunk by chunk (3 latent frames by
default).  Each chunk's tokens attend to each other and to the keys and values of every earlier
frame, which are kept here per block, after RoPE (positions are absolute: a chunk starting at
latent frame s rotates its frames as positions s, s+1, ...).  The protocol of one chunk, as in
Self-Forcing's ``pipeline/causal_inference.py`` (``CausalInferencePipeline.inference``):

    kv.begin_chunk(frames)                   # evict old frames if a window is set
    for each denoising step: dit.step(x_t, ..., kv=kv)   # attends [cached | this chunk]
    dit.step(x0, t=context_noise, kv=kv)     # the clean rerun: its K/V are what later chunks see
    kv.commit()                              # this chunk's K/V become context

Every forward writes the chunk's K/V into the slots after the cached ones and attends over
``buf[:, :, :cached + new]``, so the denoising steps and the rerun overwrite the same slots and
only the rerun's survive ``commit`` (the original does the same with its global/local end
indices).

Rolling window and attention sinks (``window`` and ``sink`` in latent frames; Self-Forcing's
``local_attn_size`` / ``sink_size`` in ``wan/modules/causal_model.py``,
``CausalWanSelfAttention.forward``): a chunk ending at frame e attends to frames
f < e with f < sink or f >= e - (window - sink), the chunk itself included.  The buffer then
never holds more than ``window`` frames, so memory stays flat however long the video.  Without a
window every frame is kept (capacity: the video's length).

Shapes: buffers are [B, heads, capacity tokens, head_dim] in the DiT's dtype, allocated on the
first write; a frame is ``frame_tokens`` = h * w tokens of the chunk's grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class KVCache:
    def __init__(
        self,
        blocks: int,
        frame_tokens: int,
        total_frames: int,
        window: int | None = None,
        sink: int = 0,
    ):
        if window is not None and not 0 <= sink < window:
            raise ValueError(f"sink frames must be in [0, window={window}), got {sink}")
        self.blocks, self.frame_tokens = blocks, frame_tokens
        self.window, self.sink = window, sink
        frames = total_frames if window is None else min(window, total_frames)
        self.capacity = frames * frame_tokens
        self.k: list[Tensor | None] = [None] * blocks
        self.v: list[Tensor | None] = [None] * blocks
        self.cached = 0  # tokens of committed frames in the buffers
        self.start_frame = 0  # absolute latent frame of the chunk being made
        self.chunk_frames = 0

    def begin_chunk(self, frames: int) -> None:
        """Make room for a chunk of ``frames`` latent frames (evicting the oldest non-sink
        frames when a window is set), and start it at ``start_frame``."""
        if self.window is not None and frames > self.window - self.sink:
            raise ValueError(f"a chunk of {frames} frames does not fit window - sink frames")
        need = (self.cached // self.frame_tokens) + frames
        limit = self.capacity // self.frame_tokens
        if need > limit:
            self._evict((need - limit) * self.frame_tokens)
        self.chunk_frames = frames

    def _evict(self, tokens: int) -> None:
        """Drop the ``tokens`` oldest tokens after the sink frames, moving the rest left."""
        s = self.sink * self.frame_tokens
        keep = self.cached - s - tokens
        for buf in (*self.k, *self.v):
            if buf is not None:  # clone: source and destination overlap
                buf[:, :, s : s + keep] = buf[:, :, s + tokens : s + tokens + keep].clone()
        self.cached -= tokens

    def commit(self) -> None:
        """The chunk's keys and values (the last forward's) become context for later chunks."""
        self.cached += self.chunk_frames * self.frame_tokens
        self.start_frame += self.chunk_frames
        self.chunk_frames = 0

    def attention(self, block: int, attn: AttnFn) -> AttnFn:
        """Self-attention of ``block`` for the current chunk: q, k, v [B, heads, L, d] of the
        chunk; attends over the cached keys and values followed by the chunk's."""

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = self._write(block, k, v)
            return attn(q, keys, values)

        return attend

    def _write(self, block: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n, end = k.shape[2], self.cached + k.shape[2]
        if n != self.chunk_frames * self.frame_tokens:
            raise ValueError(f"{n} tokens in a chunk of {self.chunk_frames} frames")
        if self.k[block] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.k[block] = k.new_empty(shape)
            self.v[block] = v.new_empty(shape)
        kb, vb = self.k[block], self.v[block]
        kb[:, :, self.cached : end] = k
        vb[:, :, self.cached : end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v) if t is not None)


def block_causal_mask(
    chunks: list[int], frame_tokens: int, window: int | None = None, sink: int = 0
) -> Tensor:
    """The token mask [L, L] (True: attend) that a single pass over all frames needs to equal
    chunk-by-chunk generation with a ``KVCache``: chunk c (frames [s, e)) attends to frames f < e
    (and, with a window, only f < sink or f >= e - (window - sink)).  Self-Forcing builds the
    same rule as a flex-attention block mask
    (``CausalWanModel._prepare_blockwise_causal_attn_mask``)."""
    total = sum(chunks)
    frame_of = torch.arange(total).repeat_interleave(frame_tokens)
    ends = torch.tensor([sum(chunks[: i + 1]) for i, c in enumerate(chunks) for _ in range(c)])
    end_q = ends.repeat_interleave(frame_tokens)[:, None]  # [L, 1]: each query's chunk end
    f = frame_of[None, :]
    mask = f < end_q
    if window is not None:
        mask &= (f < sink) | (f >= end_q - (window - sink))
    return mask
