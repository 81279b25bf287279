"""Radial Attention: a static block-sparse mask for video self-attention, and its CPU path.

Radial Attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay
for Long Video Generation", NeurIPS 2025; mit-han-lab/radial-attention) keeps, for each query
token, the keys that are spatially near it, within a window that halves as the temporal
distance doubles, plus every key of the first frame (an attention sink).  It is training-free
at the default length.  The published mask (``radial_attn/attn_mask.py::gen_log_mask_shrinked``
with ``get_window_width``, ``get_diagonal_split_mask`` and ``shrinkMaskStrict``), for tokens in
(frame, h, w) order, T tokens per frame, frame i = tokens [i*T, (i+1)*T):

- query frame i, key frame j, distance d = |i - j|; a T x T token mask over the in-frame
  raster index (a 1-D band over h*w order, not a 2-D window):
  j == 0: all true (the sink);  d <= 1: all true;
  d >= 2: g = bit_length(d), D = 2^bit_length(T) / 2^g, w = max(D * decay, block):
  true where |r - c| <= w;  and if D < 128 (without decay) the pair is kept only when
  d % int(128 / D) == 0, else it is empty (fewer, not thinner, diagonals far away);
- each pair's mask is placed on a canvas at offset (i*T mod block, j*T mod block), cut into
  block x block tiles; a tile is kept when more than 60% of its non-empty columns are more than
  a third full; kept tiles are OR-ed into the global block mask at
  (i*T // block, j*T // block).

Here the sequence is padded to whole blocks (ceil(N / block)); a partial last block row and
column are dense (upstream marks rows/columns >= N // block dense; it does not cover N not a
multiple of the block for Wan, e.g. 832x480x81 = 32,760 tokens).  Any grid works; 1 frame is
dense.  Under 256 tokens per frame (below 256x256 pixels) the published split rule drops even
neighbouring frames (D = 2^bit_length(T) / 2 < 128): kept as published.

Schedule (``radial_attn/models/wan/attention.py::WanSparseAttnProcessor.__call__``): a forward
is dense when its step index < ``dense_steps`` or its block index < ``dense_blocks``; the
defaults are the repository's 1x-length Wan2.1 T2V setting (``scripts/wan_t2v_inference.sh``:
dense_layers 1, dense_timesteps 12, decay_factor 0.2; the argparse help of
``wan_t2v_inference.py`` says "set to 1 / 12 for 1x length video").

CPU paths, both exact (the result equals SDPA with the token-level mask; tests):
- "flex": ``torch.compile(flex_attention)`` with the mask as a ``BlockMask``: its kernel walks
  each query block's kept key blocks in place (one compile per shape, tens of seconds);
- "gather": query blocks with the same kept key blocks are grouped; each group gathers its
  keys and values (``index_select``) and calls SDPA (no compiler needed; the copies cost).
``RadialConfig.cpu_kernel`` picks one; "auto" (the default) takes flex where a C++ compiler
is on PATH, else gather.  On this host (2-core AVX2, fp32, loaded by other jobs) flex was the
faster in 5 of 7 paired rounds and in the medians of 2 of 3 runs (benchmarks/bench_attention.py);
gather needs no compile (flex: 1-1.5 min per new shape here, then cached on disk by inductor),
no compiler, and has no head-size limit.  On CUDA the Triton kernel of ``wanlite.kernels``
runs the same block lists.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

BLOCK = 128  # the published block size (128 or 64 upstream)
SPLIT_THRESHOLD = 128  # get_diagonal_split_mask's threshold: hard-coded 128 upstream


@dataclass(frozen=True)
class RadialConfig:
    """Radial attention's options (defaults: the published 1x-length Wan2.1 T2V setting)."""

    dense_steps: int = 12  # the first denoising steps run dense attention
    dense_blocks: int = 1  # the first DiT blocks always run dense attention
    decay: float = 0.2  # scales the window width (decay_factor upstream)
    block: int = BLOCK  # mask granularity in tokens
    cpu_kernel: str = "auto"  # "auto" | "flex" | "gather" (see the module docstring)

    def __post_init__(self):
        for name in ("dense_steps", "dense_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"radial {name} must be an integer >= 0, got {v!r}")
        d = self.decay
        if not isinstance(d, int | float) or isinstance(d, bool) or not 0 < d < math.inf:
            raise ValueError(f"radial decay must be a number > 0, got {d!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"radial block must be an integer >= 1, got {self.block!r}")
        if self.cpu_kernel not in ("auto", "flex", "gather"):
            raise ValueError(f"radial cpu_kernel must be auto, flex or gather: {self.cpu_kernel!r}")

    @classmethod
    def of(cls, options) -> RadialConfig:
        """From ``Options`` (its ``radial_*`` fields)."""
        o = options
        steps, blocks, decay = o.radial_dense_steps, o.radial_dense_blocks, float(o.radial_decay)
        return cls(steps, blocks, decay, cpu_kernel=o.radial_cpu_kernel)

    def sparse(self, step: int, block_index: int) -> bool:
        """Whether block ``block_index`` at denoising step ``step`` runs the sparse mask."""
        return step >= self.dense_steps and block_index >= self.dense_blocks


# --- the mask ---------------------------------------------------------------------------------


def window(dist: int, tokens: int, decay: float, block: int) -> int | None:
    """Band half-width of a frame pair at temporal distance ``dist`` (None: the whole pair);
    ``get_window_width`` for Wan.  The band is |r - c| <= w over integers, so w is floored."""
    if dist <= 1:
        return None
    width = 2 ** tokens.bit_length() / 2 ** dist.bit_length() * decay
    return math.floor(max(width, block))


def pair_kept(dist: int, tokens: int) -> bool:
    """``get_diagonal_split_mask``: far pairs whose undecayed window is under 128 tokens are
    kept only every int(128 / D) frames of distance."""
    width = 2 ** tokens.bit_length() / 2 ** dist.bit_length()
    return width >= SPLIT_THRESHOLD or dist % int(SPLIT_THRESHOLD / width) == 0


def _pair_tiles(i: int, j: int, tokens: int, decay: float, block: int) -> Tensor:
    """The [n, n] tiles (n = ceil(T / block)) kept for query frame i, key frame j.

    Counts, without building the T x T mask, how many rows of each tile hit each canvas column
    (the band |r - c| <= w is an interval of rows per column), then applies the density rule:
    column density count / block > 1/3 on more than 60% of the non-empty columns (in integers:
    3 * count > block, 5 * high > 3 * nonzero, which is what the float comparisons decide)."""
    n = -(-tokens // block)
    side = n * block  # canvas, truncated to whole tiles as shrinkMaskStrict does
    if j != 0 and not pair_kept(abs(i - j), tokens):
        return torch.zeros(n, n, dtype=torch.bool)
    w = None if j == 0 else window(abs(i - j), tokens, decay, block)
    w = tokens if w is None else w
    ro, co = (i * tokens) % block, (j * tokens) % block
    col = torch.arange(side) - co  # in-frame key index of each canvas column
    top = torch.arange(n)[:, None] * block - ro  # in-frame query index of each tile's first row
    lo = torch.maximum(torch.maximum(top, col - w), torch.zeros(()))
    hi = torch.minimum(torch.minimum(top + block, col + w + 1), torch.full((), tokens))
    count = (hi - lo).clamp_(min=0)
    count[:, (col < 0) | (col >= tokens)] = 0  # [n, side]: rows of tile a on column C
    count = count.view(n, n, block)
    high = (3 * count > block).sum(-1)
    nonzero = (count > 0).sum(-1)
    return 5 * high > 3 * nonzero


@lru_cache(maxsize=16)
def block_mask(frames: int, tokens: int, decay: float = 0.2, block: int = BLOCK) -> Tensor:
    """The [nb, nb] bool block mask (nb = ceil(frames * tokens / block)) of a video of
    ``frames`` latent frames of ``tokens`` tokens each.  Cached; do not modify it."""
    if frames < 1 or tokens < 1:
        raise ValueError(f"radial mask needs frames >= 1 and tokens >= 1, got {frames}, {tokens}")
    total = frames * tokens
    nb = -(-total // block)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    mask[total // block :] = True  # a partial last block: dense
    mask[:, total // block :] = True
    for i in range(frames):
        for j in range(frames):
            tiles = _pair_tiles(i, j, tokens, decay, block)
            r, c = (i * tokens) // block, (j * tokens) // block
            tiles = tiles[: nb - r, : nb - c]
            mask[r : r + tiles.shape[0], c : c + tiles.shape[1]] |= tiles
    return mask


def grid_mask(grid: tuple[int, int, int], decay: float = 0.2, block: int = BLOCK) -> Tensor:
    """``block_mask`` of a token grid (f, h, w): f frames of h * w tokens."""
    f, h, w = grid
    return block_mask(f, h * w, float(decay), block)


def token_mask(mask: Tensor, length: int, block: int = BLOCK) -> Tensor:
    """The [length, length] token mask a block mask stands for."""
    full = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[:length, :length]


def kept_fraction(mask: Tensor, length: int | None = None, block: int = BLOCK) -> float:
    """Fraction of key blocks kept (of query-key token pairs when ``length`` is given)."""
    if length is None:
        return mask.float().mean().item()
    sizes = torch.full((mask.shape[0],), block, dtype=torch.float64)
    sizes[-1] = length - block * (mask.shape[0] - 1)
    return (sizes @ mask.double() @ sizes / length**2).item()


# --- the CPU path -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Query tokens [start, stop) and the key token indices they attend to (None: all)."""

    start: int
    stop: int
    keys: Tensor | None


def plan(mask: Tensor, length: int, block: int = BLOCK) -> tuple[Group, ...]:
    """Query groups of a block mask: runs of query blocks with the same kept key blocks, each
    with the token indices of its keys (None where it keeps them all)."""
    groups, rows = [], mask.shape[0]
    start = 0
    while start < rows:
        stop = start + 1
        while stop < rows and torch.equal(mask[stop], mask[start]):
            stop += 1
        cols = mask[start].nonzero().flatten()
        keys = None
        if len(cols) < mask.shape[1]:
            keys = (cols[:, None] * block + torch.arange(block)).flatten()
            keys = keys[keys < length]
        groups.append(Group(start * block, min(stop * block, length), keys))
        start = stop
    return tuple(groups)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """t[:, :, idx] of t [B, H, L, d]; on the [B, L, H, d] layout the DiT's views come from,
    whole rows of H * d are copied (about 2x faster than gathering along dim 2)."""
    base = t.transpose(1, 2)
    if base.is_contiguous():
        return base.index_select(1, idx).transpose(1, 2)
    return t.index_select(2, idx)


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block: int = BLOCK, groups=None
) -> Tensor:
    """Attention of q [B, H, L, d] on k, v [B, H, L, d] restricted to the block mask
    [ceil(L / block)]^2: each query group's kept keys are gathered and SDPA runs on them, so
    masked blocks are skipped.  Equals SDPA with ``token_mask(mask, L)``.  ``groups``:
    ``plan(mask, L, block)``, made once per mask by callers that repeat it."""
    length = q.shape[2]
    if k.shape[2] != length or v.shape[2] != length:
        raise ValueError(f"radial self-attention needs as many keys as queries, got {k.shape}")
    if mask.shape[0] != -(-length // block):
        raise ValueError(f"radial mask {tuple(mask.shape)} does not fit {length} tokens")
    out = torch.empty_like(q)
    for g in groups or plan(mask, length, block):
        idx = None if g.keys is None else g.keys.to(k.device)
        kk = k if idx is None else _gather(k, idx)
        vv = v if idx is None else _gather(v, idx)
        out[:, :, g.start : g.stop] = F.scaled_dot_product_attention(
            q[:, :, g.start : g.stop], kk, vv
        )
    return out


# --- the schedule, for the DiT ----------------------------------------------------------------

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Radial:
    """The attention functions of a radial DiT: dense (SDPA) for the first steps and blocks,
    the sparse mask of the current grid otherwise.  ``function(grid, step, block_index)``
    returns one of a few function objects (one per grid), so wrappers that cache by function
    (sequence parallel) stay bounded."""

    def __init__(self, config: RadialConfig, dense: AttnFn):
        self.config = config
        self.dense = dense
        self._sparse: dict[tuple, AttnFn] = {}

    def function(self, grid: tuple[int, int, int], step: int, block_index: int) -> AttnFn:
        if not self.config.sparse(step, block_index):
            return self.dense
        fn = self._sparse.get(grid)
        if fn is None:
            if len(self._sparse) >= 8:
                self._sparse.clear()
            fn = self._sparse[grid] = self._make(grid)
        return fn

    def _make(self, grid: tuple[int, int, int]) -> AttnFn:
        c = self.config
        mask = grid_mask(grid, c.decay, c.block)
        length = math.prod(grid)
        log.info(
            "radial attention on grid %s: %d tokens, %.1f%% of key blocks kept (block %d)",
            grid, length, 100 * kept_fraction(mask), c.block,
        )  # fmt: skip
        if bool(mask.all()):
            return self.dense
        kernels: dict[str, AttnFn] = {}

        def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            kind = "cuda" if q.device.type == "cuda" else cpu_kernel(c.cpu_kernel)
            fn = kernels.get(kind)
            if fn is None:
                fn = kernels[kind] = _KERNELS[kind](mask, length, c.block)
            return fn(q, k, v)

        return run


def cpu_kernel(choice: str = "auto") -> str:
    """The CPU path "auto" stands for: flex where torch.compile can build C++ (a compiler is
    on PATH), else gather."""
    if choice != "auto":
        return choice
    found = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    return "flex" if found else "gather"


def gather_function(mask: Tensor, length: int, block: int = BLOCK) -> AttnFn:
    groups = plan(mask, length, block)
    return lambda q, k, v: sparse_attention(q, k, v, mask, block, groups)


# Compiled flex_attention on CPU gave wrong results (NaN, errors ~1) at head_dim 16 and right
# ones at 32, 64 (torch 2.13, this host; the 1.3B's heads are 128): smaller heads take gather.
FLEX_MIN_HEAD_DIM = 32


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_function(mask: Tensor, length: int, block: int = BLOCK) -> AttnFn:
    """Compiled ``flex_attention`` over the block mask (a ``BlockMask`` of the kept key blocks
    of each query block, shared by batch rows and heads; no mask_mod: whole blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = mask.sum(-1, dtype=torch.int32)
    cols = torch.arange(mask.shape[1])
    order = torch.argsort((~mask).int() * mask.shape[1] + cols, dim=-1, stable=True).int()
    base = BlockMask.from_kv_blocks(
        counts[None, None], order[None, None], BLOCK_SIZE=block, seq_lengths=(length, length)
    )
    on_device: dict[torch.device, object] = {}
    gather = gather_function(mask, length, block)

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.shape[-1] < FLEX_MIN_HEAD_DIM:
            return gather(q, k, v)
        bm = on_device.get(q.device)
        if bm is None:
            bm = on_device[q.device] = base.to(q.device)
        return _compiled_flex()(q, k, v, block_mask=bm)

    log.info("radial attention on CPU: flex_attention (compiled once per shape)")
    return run


def _cuda_kernel(mask: Tensor, length: int, block: int) -> AttnFn:
    try:
        from ..kernels import block_sparse
    except ImportError as e:
        msg = f"attention 'radial' on CUDA needs triton: pip install triton ({e})"
        raise ImportError(msg) from e
    return block_sparse.function(mask, block)


_KERNELS = {"flex": flex_function, "gather": gather_function, "cuda": _cuda_kernel}
