"""Several processes on one generation: CFG-parallel and Ulysses sequence parallel.

``wanlite.load(model, parallel="cfg=2,ulysses=2")`` run under ``torchrun --nproc-per-node 4``
(or ``torchrun ... -m wanlite generate ... --parallel cfg=2,ulysses=2``).  torch.distributed is
initialised from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...) unless
the caller did it already; the backend is NCCL on CUDA and gloo on the CPU, and nothing below
depends on which (plain ``torch.distributed`` collectives).  The world size must be
``cfg x ulysses``; the names are those of diffusers (``ContextParallelConfig``) and SGLang
(``--cfg-parallel-size``, ``--ulysses-degree``).

Rank layout: ``rank = cfg_rank * ulysses + ulysses_rank``: a Ulysses group is ``ulysses``
consecutive ranks (on one machine they share the fastest links: their all-to-all runs in every
block), and the CFG groups pair rank r with r + ulysses.

- **CFG-parallel** (cfg=2): CFG group 0 runs the conditional pass, group 1 the unconditional
  one; after each step the two predictions are all-gathered (one latent-sized tensor each) and
  every rank combines ``u + g (c - u)`` and steps the sampler itself, so every rank holds the
  same latents.  Steps without the unconditional pass (guidance <= 1, ``cfg_skip_last``) run
  the conditional pass on both groups (no gain there, no communication either).  It
  corresponds to the single-process *batched* CFG (``cfg_batch="on"``): one step-cache decision
  for the pair.
- **Ulysses** (ulysses=u): each rank keeps L/u tokens of the residual stream (patch embedding
  and RoPE table sliced, every per-token layer on its slice); in self-attention one all-to-all
  trades q, k, v [B, L/u, heads, d] for [B, heads/u, L, d] (the whole sequence, a share of the
  heads), attention runs, and one all-to-all trades the output back.  The ulysses degree must
  divide the head count (12 for the 1.3B: 2, 3, 4, 6, 12).  Cross-attention, FFN and head are
  per token: no communication.  The head's output (out_channels x patch = 64 values per token)
  is all-gathered at the end of each forward.
- **Token padding**: L = f*h*w need not divide by u.  The sequence is padded with zero tokens to
  a multiple of u; after the all-to-all every rank holds the whole (padded) sequence, so the
  padding is cut off before attention and zeros are put back after it: attention never sees a
  padding token, no mask is needed, and the result is exact.  Padding tokens ride along in the
  per-token layers and are dropped at the final gather (and left out of the step-cache signal).
- **Step caches**: the skip decision must be the same on every rank.  TeaCache's signal is the
  time embedding, computed identically on every rank from the same schedule and weights.  The
  first-block cache's signal (relative L1 of block 0's residual) is summed over all ranks
  (numerator and denominator all-reduced; padding excluded), which equals the single-process
  value over the whole sequence and both CFG passes (the batched pair's decision).
- **Weights**: every rank reads the DiT (all of it: Ulysses splits tokens, not weights).  Only
  rank 0 reads the umT5 (it encodes the prompts and broadcasts the embeddings, a few MB) and the
  VAE (it decodes and broadcasts the uint8 frames; with ``save_to`` only rank 0 writes the file
  and the other ranks' ``Video`` names it).  Every rank's ``generate`` returns the same video.

Communication sent per rank and DiT forward (b bytes per value of the DiT dtype, B the batch
of the forward, L tokens padded, D the model width): Ulysses 4 B (L/u) D b (u-1)/u per block
(the other ranks' heads of this rank's q, k, v, and their tokens of its attention output),
plus the head's gather B (L/u) 64 b (u-1); CFG one latent per step (fp32, C*F*H*W*4 bytes).
1.3B at 832x480x81 (L = 32,760, D = 1536, 30 blocks, bf16), u = 2: 3.0 GB per forward and rank.
Counted as it happens in ``ParallelState.sent`` (``video.stats["comm_bytes"]``).
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..options import parse_parallel
from . import stepcache

log = logging.getLogger(__name__)

__all__ = ["ParallelState", "SequenceParallel", "init_parallel"]


@dataclass
class ParallelState:
    """This process's place in the grid and its process groups."""

    cfg: int
    ulysses: int
    rank: int
    world: int
    device: torch.device  # where collectives' tensors live (the CUDA device for NCCL)
    cfg_group: object = None  # ranks holding the same tokens, one per CFG pass
    ulysses_group: object = None  # ranks sharing one forward's tokens
    sent: int = 0  # bytes this rank sent in collectives (all-to-all, gathers, reduces)

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"cfg={self.cfg},ulysses={self.ulysses}"

    # -- collectives ----------------------------------------------------------------------
    def all_gather(self, t: Tensor, group, size: int) -> list[Tensor]:
        if size == 1:
            return [t]
        x = t.contiguous().to(self.device)
        out = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(out, x, group=group)
        self.sent += x.numel() * x.element_size() * (size - 1)
        return [o.to(t.device) for o in out]

    def gather_cfg(self, t: Tensor) -> Tensor:
        """[1, ...] of this CFG group's pass -> [2, ...] (cond, uncond) on every rank."""
        return torch.cat(self.all_gather(t, self.cfg_group, self.cfg))

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over every rank (float64), in one collective."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
            self.sent += t.numel() * 8
        return t.tolist()

    def broadcast_tensor(self, t: Tensor | None, src: int = 0) -> Tensor:
        """Rank ``src``'s tensor on every rank (any shape and dtype; others pass None)."""
        meta = [None if t is None else (tuple(t.shape), t.dtype)] if self.rank == src else [None]
        dist.broadcast_object_list(meta, src=src, device=self.device)
        shape, dtype = meta[0]
        if self.rank == src:
            buf = t.contiguous().to(self.device)
            self.sent += buf.numel() * buf.element_size() * (self.world - 1)
        else:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(buf, src=src)
        return buf

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def share_frames(self, frames: np.ndarray | None) -> np.ndarray:
        """Rank 0's uint8 frames [T, H, W, 3] on every rank."""
        t = None if frames is None else torch.from_numpy(np.ascontiguousarray(frames))
        return self.broadcast_tensor(t).cpu().numpy()

    # -- hooks into the pipeline ----------------------------------------------------------
    def attach(self, dit) -> None:
        """Give the DiT module (made anew at each load) its sequence-parallel hook."""
        if self.ulysses > 1 and not isinstance(dit.sp, SequenceParallel):
            dit.sp = SequenceParallel(self)

    def make_cache(self, mode: str, threshold: float | None):
        """A step-cache policy whose decision is the same on every rank."""
        policy = stepcache.make(mode, threshold)
        if isinstance(policy, stepcache.FirstBlockCache):
            return AgreedFirstBlockCache(policy.threshold, self)
        return policy  # TeaCache: its signal (the time embedding) is identical on every rank


class SequenceParallel:
    """Ulysses sequence parallel for ``WanDiT`` (its ``sp`` hook): shard the tokens, all-to-all
    around self-attention, gather the head's output."""

    def __init__(self, state: ParallelState):
        self.state, self.u, self.r = state, state.ulysses, state.ulysses_rank
        self.length = 0  # tokens of the current forward (unpadded)
        self._rope: dict = {}
        self._attn: dict = {}

    @property
    def local(self) -> int:
        """Tokens per rank (padded)."""
        return -(-self.length // self.u)

    def valid(self, h: Tensor) -> Tensor:
        """This rank's real (not padding) tokens of a stream h [B, local, ...]."""
        n = min(max(self.length - self.r * self.local, 0), self.local)
        return h[:, :n]

    def _slice(self, t: Tensor, dim: int) -> Tensor:
        pad = self.local * self.u - t.shape[dim]
        if pad:
            widths = [0, 0] * (t.dim() - 1 - dim) + [0, pad]
            t = F.pad(t, widths)
        return t.narrow(dim, self.r * self.local, self.local)

    def shard(self, h: Tensor) -> Tensor:
        """[B, L, D] -> this rank's [B, ceil(L/u), D] (zero tokens past the end)."""
        self.length = h.shape[1]
        return self._slice(h, 1).contiguous()

    def shard_rope(self, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The RoPE tables [L, 1, d/2] at this rank's token positions."""
        cos, sin = rope
        key = (cos.data_ptr(), cos.shape[0])
        if key not in self._rope:
            if len(self._rope) >= 8:
                self._rope.clear()
            self._rope[key] = (self._slice(cos, 0).contiguous(), self._slice(sin, 0).contiguous())
        return self._rope[key]

    def gather(self, out: Tensor) -> Tensor:
        """[B, local, C] on each rank -> [B, L, C] on every rank (padding dropped)."""
        parts = self.state.all_gather(out, self.state.ulysses_group, self.u)
        return torch.cat(parts, dim=1)[:, : self.length]

    def attention(self, fn):
        """(self-attention function, cross-attention function) for ``Block``: self-attention
        runs ``fn`` on all tokens for heads/u heads between two all-to-alls; cross-attention
        is per token and runs ``fn`` as it is."""
        if fn not in self._attn:
            self._attn[fn] = (lambda q, k, v: self._self_attention(fn, q, k, v), fn)
        return self._attn[fn]

    def _all_to_all(self, x: Tensor) -> Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.state.ulysses_group)
        self.state.sent += x.numel() * x.element_size() * (self.u - 1) // self.u
        return out

    def _self_attention(self, fn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [B, heads, local, d] (this rank's tokens) -> [B, heads, local, d]."""
        b, heads, n, d = q.shape
        u, share = self.u, heads // self.u
        # [3, B, n, heads, d] -> [u, 3, B, n, heads/u, d]: block j goes to rank j
        qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)])
        qkv = qkv.view(3, b, n, u, share, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        qkv = self._all_to_all(qkv)  # block j: rank j's tokens, this rank's heads
        # [u, 3, B, n, share, d] -> [3, B, share, u*n, d], padding cut off
        qkv = qkv.permute(1, 2, 4, 0, 3, 5).reshape(3, b, share, u * n, d)[..., : self.length, :]
        out = fn(qkv[0], qkv[1], qkv[2])  # [B, share, L, d]
        out = F.pad(out, (0, 0, 0, u * n - self.length))
        # [B, share, u*n, d] -> [u, B, n, share, d]: block j (rank j's tokens) goes to rank j
        out = out.view(b, share, u, n, d).permute(2, 0, 3, 1, 4).contiguous()
        out = self._all_to_all(out)  # block j: this rank's tokens, rank j's heads
        return out.permute(1, 2, 0, 3, 4).reshape(b, n, heads, d).transpose(1, 2)


class AgreedFirstBlockCache(stepcache.FirstBlockCache):
    """``stepcache.FirstBlockCache`` with its signal summed over every rank (padding tokens
    left out), so that every rank takes the same decision: the single-process decision over the
    whole sequence and the batched CFG pair.  Same steps as the base class otherwise (it calls
    ``_distance``)."""

    def __init__(self, threshold: float, state: ParallelState):
        super().__init__(threshold)
        self.state = state

    def _distance(self, dit, first: Tensor) -> float:
        sp = dit.sp
        now, before = (first, self.first) if sp is None else (sp.valid(first), sp.valid(self.first))
        num, den = self.state.all_reduce_sum(
            [float((now - before).abs().sum()), float(before.abs().sum())]
        )
        return num / max(den, 1e-30)


def init_parallel(spec: str | None, device: torch.device, heads: int) -> ParallelState | None:
    """The process groups for ``spec`` ("cfg=C,ulysses=U"; None or 1 x 1: None), with
    torch.distributed initialised from the torchrun environment if it is not yet.  ``device``
    "cuda" (no index) becomes this process's ``cuda:LOCAL_RANK``.  Checks the world size and
    that the ulysses degree divides ``heads``."""
    if spec is None:
        return None
    cfg, ulysses = parse_parallel(spec)
    if cfg * ulysses == 1:
        return None
    if heads % ulysses:
        raise ValueError(f"parallel ulysses={ulysses} must divide the DiT's {heads} heads")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"parallel={spec!r} needs {cfg * ulysses} processes: run under torchrun "
                f"(torchrun --nproc-per-node {cfg * ulysses} ...)"
            )
        if device.type == "cuda":
            torch.cuda.set_device(rank_device(device))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != cfg * ulysses:
        raise ValueError(
            f"parallel={spec!r} needs a world of cfg x ulysses = {cfg * ulysses} processes, "
            f"torch.distributed has {world}"
        )
    if device.type == "cuda":
        device = rank_device(device)
    state = ParallelState(cfg, ulysses, rank, world, device)
    # Every rank creates every group, in the same order (torch.distributed's rule).
    for c in range(cfg):
        ranks = list(range(c * ulysses, (c + 1) * ulysses))
        group = dist.new_group(ranks) if ulysses > 1 else None
        if rank in ranks:
            state.ulysses_group = group
    for s in range(ulysses):
        ranks = list(range(s, world, ulysses))
        group = dist.new_group(ranks) if cfg > 1 else None
        if rank in ranks:
            state.cfg_group = group
    log.info("parallel %s: rank %d of %d (%s)", state.describe(), rank, world, dist.get_backend())
    return state


def rank_device(device: torch.device, env=os.environ) -> torch.device:
    """This rank's CUDA device: ``cuda:LOCAL_RANK`` under torchrun, whatever index was asked
    for (an explicit ``cuda:N`` would put every rank on GPU N; pick the GPUs with
    ``CUDA_VISIBLE_DEVICES``); without LOCAL_RANK, the index asked for, else the current one."""
    if "LOCAL_RANK" in env:
        local = int(env["LOCAL_RANK"])
        if device.index is not None and device.index != local:
            log.warning(
                "device %s under torchrun: this rank (LOCAL_RANK=%d) uses cuda:%d",
                device,
                local,
                local,
            )
        return torch.device("cuda", local)
    if device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
