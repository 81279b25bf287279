"""Spatially tiled VAE decode: one tile at a time, all of its frames, blended into the video.

The latent [B, z, T', h, w] is cut into overlapping spatial tiles (in latent pixels).  Each tile
is decoded on its own, chunk by chunk through ``vae.iter_decode`` (so with its own causal
temporal cache), and blended into one fp32 output video: inside an overlap the weights ramp
linearly from one tile to the next (a partition of unity, so flat regions stay flat and seams
fade over the whole overlap).

Why tile by tile and not all tiles in lockstep: the causal caches (two frames of every conv's
input) are as large as the decode itself, and in lockstep every tile's cache is alive at once --
together more than the untiled decode's.  One tile at a time, only one tile's cache and
activations exist; the price is the output video held whole in fp32 ([B, 3, T, H, W]: 300 MB at
480x640x81), which is small next to a full-frame decode.  Chunks are yielded at the end.

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
    """Like ``vae.iter_decode(z)`` (the same chunks: 1 frame, then 4 per latent frame) but
    decoding ``tile`` x ``tile`` latent-pixel tiles one after the other."""
    h, w = z.shape[-2:]
    scale, stride = vae.cfg.spatial_stride, vae.cfg.temporal_stride
    hs, ws = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wh, ww = _weights(hs, tile, h, scale), _weights(ws, tile, w, scale)
    frames = 1 + stride * (z.shape[2] - 1)
    out = norm = None
    for iy, y in enumerate(hs):
        for ix, x in enumerate(ws):
            wt = wh[iy][:, None] * ww[ix][None, :]  # [tile_h * scale, tile_w * scale]
            ys = slice(y * scale, y * scale + wt.shape[0])
            xs = slice(x * scale, x * scale + wt.shape[1])
            t = 0
            for chunk in vae.iter_decode(z[..., y : y + tile, x : x + tile]):
                if out is None:  # fp32 sums whatever the VAE's dtype
                    shape = (chunk.shape[0], chunk.shape[1], frames, h * scale, w * scale)
                    out = torch.zeros(shape, device=chunk.device)
                    norm = torch.zeros(h * scale, w * scale, device=chunk.device)
                n = chunk.shape[2]
                out[:, :, t : t + n, ys, xs] += chunk.float() * wt.to(out)
                t += n
            norm[ys, xs] += wt.to(norm)
    out /= norm
    yield out[:, :, :1]
    for t in range(1, frames, stride):
        yield out[:, :, t : t + stride]
