"""Spatially tiled VAE decode, streamed frame chunk by frame chunk.

The latent [B, z, T', h, w] is cut into overlapping spatial tiles (in latent pixels).  Every tile
is decoded by its own ``vae.iter_decode`` generator, so each keeps its own causal temporal cache;
the generators are advanced in lockstep, one latent frame at a time, and the decoded tiles of
that chunk are blended into the full frame: inside an overlap the weights ramp linearly from one
tile to the next (a partition of unity, so flat regions stay flat and seams fade over the whole
overlap).  Peak memory is set by one tile's decode instead of the full frame's.

Tiling changes what convolutions near a tile border see (the neighbour tile's content is replaced
by padding), so tiled output is close to, not bit-equal with, the untiled decode; the overlap
hides the difference.  ``benchmarks/bench_memory.py`` reports the PSNR between the two.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = -(-(size - tile) // stride) + 1
    # Spread the tiles evenly so every overlap is at least ``overlap`` wide.
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, start: int, prev_end: int | None, next_start: int | None, scale: int):
    """1-D blend weights (in output pixels) of a tile spanning [start, start+length)."""
    w = torch.ones(length * scale)
    if prev_end is not None and prev_end > start:  # overlap with the previous tile
        n = (prev_end - start) * scale
        w[:n] = torch.linspace(0, 1, n + 2)[1:-1]
    if next_start is not None and next_start < start + length:
        n = (start + length - next_start) * scale
        w[-n:] = torch.minimum(w[-n:], torch.linspace(1, 0, n + 2)[1:-1])
    return w


def _weights(starts: list[int], tile: int, size: int, scale: int) -> list[torch.Tensor]:
    out = []
    for i, s in enumerate(starts):
        length = min(tile, size - s)
        prev_end = starts[i - 1] + tile if i > 0 else None
        nxt = starts[i + 1] if i + 1 < len(starts) else None
        out.append(_ramp(length, s, prev_end, nxt, scale))
    return out


@torch.inference_mode()
def iter_decode_tiled(
    vae, z: torch.Tensor, tile: int = 32, overlap: int = 8
) -> Iterator[torch.Tensor]:
    """Like ``vae.iter_decode(z)`` but decoding ``tile`` x ``tile`` latent-pixel tiles."""
    h, w = z.shape[-2:]
    scale = vae.cfg.spatial_stride
    hs, ws = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wh, ww = _weights(hs, tile, h, scale), _weights(ws, tile, w, scale)
    gens = [[vae.iter_decode(z[..., y : y + tile, x : x + tile]) for x in ws] for y in hs]
    while True:
        out = norm = None
        for iy, (y, row) in enumerate(zip(hs, gens)):
            for ix, (x, gen) in enumerate(zip(ws, row)):
                chunk = next(gen, None)
                if chunk is None:
                    return
                if out is None:
                    b, c, t = chunk.shape[:3]
                    out = chunk.new_zeros(b, c, t, h * scale, w * scale)
                    norm = chunk.new_zeros(h * scale, w * scale)
                wt = (wh[iy][:, None] * ww[ix][None, :]).to(chunk)
                ys, xs = (
                    slice(y * scale, y * scale + wt.shape[0]),
                    slice(x * scale, x * scale + wt.shape[1]),
                )
                out[..., ys, xs] += chunk * wt
                norm[ys, xs] += wt
        yield out / norm
