import numpy as np
import torch

from wanlite.models.configs import TINY
from wanlite.models.vae import WanVAE
from wanlite.runtime.tiling import _weights, iter_decode_tiled, tile_starts
from wanlite.weights.random_checkpoint import random_state_dict


def test_tiles_cover_with_overlap():
    for size in (1, 8, 32, 33, 60, 104):
        starts = tile_starts(size, 16, 4)
        assert starts[0] == 0 and starts[-1] + min(16, size) == size
        assert all(b - a <= 12 for a, b in zip(starts, starts[1:]))


def test_blend_weights_are_a_partition_of_unity():
    size, tile, scale = 60, 16, 8
    starts = tile_starts(size, tile, 4)
    total = torch.zeros(size * scale)
    for s, w in zip(starts, _weights(starts, tile, size, scale)):
        total[s * scale : s * scale + len(w)] += w
    assert torch.allclose(total, torch.ones_like(total))


def _vae():
    vae = WanVAE(TINY.vae)
    vae.load_state_dict(random_state_dict(vae, "vae", 0))
    return vae.eval()


def test_single_tile_is_exactly_the_untiled_decode():
    vae, z = _vae(), torch.randn(1, 16, 2, 6, 5, generator=torch.Generator().manual_seed(0))
    tiled = torch.cat(list(iter_decode_tiled(vae, z, tile=8, overlap=2)), 2)
    assert torch.equal(tiled, vae.decode(z))


def test_tiled_decode_is_close_to_untiled():
    vae, z = _vae(), torch.randn(1, 16, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    ref = vae.decode(z)
    chunks = list(iter_decode_tiled(vae, z, tile=16, overlap=8))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    tiled = torch.cat(chunks, 2)
    assert tiled.shape == ref.shape
    mse = ((tiled - ref) ** 2).mean().item()
    psnr = 10 * np.log10(4.0 / mse)  # range [-1, 1]
    print(f"tiled vs untiled: PSNR {psnr:.1f} dB, max abs diff {(tiled - ref).abs().max():.3f}")
    # Random weights see far across tile borders; the figure is reported in the README.
    assert psnr > 24


def test_one_tile_is_decoded_at_a_time():
    """The causal caches are as big as the decode: tiles decoded in lockstep would hold every
    tile's cache at once (more than the untiled decode).  At most one tile's decode (and so one
    cache) may be alive at any time."""
    vae, z = _vae(), torch.randn(1, 16, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    real, live, most = vae.iter_decode, [0], [0]

    def counted(x):
        live[0] += 1
        most[0] = max(most[0], live[0])
        try:
            yield from real(x)
        finally:
            live[0] -= 1

    vae.iter_decode = counted
    chunks = list(iter_decode_tiled(vae, z, tile=16, overlap=8))
    assert len(tile_starts(24, 16, 8)) * len(tile_starts(32, 16, 8)) > 1
    assert most[0] == 1 and live[0] == 0 and len(chunks) == 3
