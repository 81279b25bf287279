"""Tests for ``wanlite.ops.radial``: Radial Attention's mask, its CPU path, its schedule, and
``attention="radial"`` in the DiT and the pipeline.

The reference is the published code, mit-han-lab/radial-attention at 72788d4:
``radial_attn/attn_mask.py::gen_log_mask_shrinked`` (the per-frame-pair token masks, their
placement on a canvas and the shrink to blocks), ``get_window_width``,
``get_diagonal_split_mask`` and ``shrinkMaskStrict``; and the schedule of
``radial_attn/models/wan/attention.py::WanSparseAttnProcessor.__call__`` (dense when
``numeral_timestep < dense_timestep or layer_idx < dense_block``).  ``published_mask`` below
follows those equations literally (token-level masks, float densities), and the module's
counting version must give the same block mask on every grid.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from wanlite.ops import radial
from wanlite.ops.radial import Radial, RadialConfig

# --- the published construction, literally ---------------------------------------------------


def published_window(dist: int, tokens: int, decay: float, block: int) -> float:
    """get_window_width (model_type "wan"): the whole frame for d <= 1, else
    max(2^bit_length(T) / 2^bit_length(d) * decay, block)."""
    if dist <= 1:
        return tokens
    return max(2 ** tokens.bit_length() / 2 ** dist.bit_length() * decay, block)


def published_split(dist: int, tokens: int) -> bool:
    """get_diagonal_split_mask: all-true or all-false for the pair (threshold 128)."""
    decay_length = 2 ** tokens.bit_length() / 2 ** dist.bit_length()
    return decay_length >= 128 or dist % int(128 / decay_length) == 0


def published_shrink(mask: torch.Tensor, block: int) -> torch.Tensor:
    """shrinkMaskStrict: tile kept when > 60% of its non-empty columns are > 1/3 full."""
    n = mask.shape[0] // block
    tiles = mask[: n * block, : n * block].view(n, block, n, block)
    density = tiles.sum(1) / block
    frac = (density > 1 / 3).sum(-1) / ((density > 0).sum(-1) + 1e-9)
    return frac > 0.6


def published_mask(frames: int, tokens: int, decay: float, block: int) -> torch.Tensor:
    """gen_log_mask_shrinked for Wan, on a sequence padded to whole blocks (tail dense)."""
    total = frames * tokens
    nb = -(-total // block)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    out[total // block :] = True
    out[:, total // block :] = True
    r, c = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if j == 0:  # attention sink
                local = torch.ones(tokens, tokens, dtype=torch.bool)
            else:
                local = (c - r).abs() <= published_window(d, tokens, decay, block)
                local &= published_split(d, tokens)
            ro, co = (i * tokens) % block, (j * tokens) % block
            n = (tokens - 1) // block + 1
            canvas = torch.zeros(ro + n * block, co + n * block, dtype=torch.bool)
            canvas[ro : ro + tokens, co : co + tokens] = local
            tiles = published_shrink(canvas, block)
            r0, c0 = (i * tokens) // block, (j * tokens) // block
            tiles = tiles[: nb - r0, : nb - c0]
            out[r0 : r0 + tiles.shape[0], c0 : c0 + tiles.shape[1]] |= tiles
    return out


# frames, tokens per frame, decay, block: odd sizes, 1 and 2 frames, T below / above the block,
# T not a multiple of it (frames straddle blocks), the published decays 0.2 and 1.
GRIDS = [
    (1, 45, 0.2, 16),
    (2, 30, 1.0, 16),
    (5, 63, 0.2, 16),
    (9, 33, 0.5, 8),
    (13, 20, 1.0, 16),
    (7, 300, 0.2, 64),
    (6, 260, 1.0, 128),
    (21, 77, 0.2, 32),
]


@pytest.mark.parametrize("frames,tokens,decay,block", GRIDS)
def test_block_mask_equals_the_published_construction(frames, tokens, decay, block):
    ours = radial.block_mask(frames, tokens, decay, block)
    assert ours.shape == (math.ceil(frames * tokens / block),) * 2
    assert torch.equal(ours, published_mask(frames, tokens, decay, block))


def test_mask_at_480x640x81_keeps_the_published_structure():
    # 21 latent frames of 30 x 40 = 1200 tokens; 2^bit_length(1200) = 2048.
    grid = (21, 30, 40)
    mask = radial.grid_mask(grid, 0.2, 128)
    tokens, nb = 1200, math.ceil(21 * 1200 / 128)
    assert mask.shape == (nb, nb)
    assert mask[:, : tokens // 128].all()  # every query sees key frame 0 (the sink)
    for i in range(21):  # frame pairs at distance <= 1 are whole
        for j in range(max(i - 1, 0), min(i + 2, 21)):
            rows = slice(-(-i * tokens // 128), (i + 1) * tokens // 128)
            cols = slice(-(-j * tokens // 128), (j + 1) * tokens // 128)
            assert mask[rows, cols].all()
    assert mask[-1].all() and mask[:, -1].all()  # the partial last block is dense
    assert 0.2 < radial.kept_fraction(mask) < 0.7  # sparse, not empty
    # decay 1 keeps wider windows than 0.2: a superset
    wide = radial.grid_mask(grid, 1.0, 128)
    assert (wide | mask).equal(wide) and wide.sum() > mask.sum()


def test_window_and_split_rules():
    # T = 1200 -> 2048: d = 2-3 -> 512, 4-7 -> 256, 8-15 -> 128 (decay 1); decay 0.2 floors at
    # the block (128); far pairs are thinned: d = 16-31 every 2nd, d = 32-63 every 4th.
    assert [radial.window(d, 1200, 1.0, 128) for d in (2, 3, 4, 7, 8, 15)] == [512] * 2 + [
        256
    ] * 2 + [128] * 2
    assert {radial.window(d, 1200, 0.2, 128) for d in range(2, 40)} == {128}
    assert radial.window(0, 1200, 0.2, 128) is None and radial.window(1, 1200, 0.2, 128) is None
    assert all(radial.pair_kept(d, 1200) for d in range(1, 16))
    assert [d for d in range(16, 32) if radial.pair_kept(d, 1200)] == list(range(16, 32, 2))
    assert [d for d in range(32, 64) if radial.pair_kept(d, 1200)] == list(range(32, 64, 4))
    for d in range(1, 70):
        assert radial.pair_kept(d, 1200) == published_split(d, 1200)
        w = radial.window(d, 1200, 0.2, 128)
        assert (w or 1200) == math.floor(published_window(d, 1200, 0.2, 128))


# --- the CPU path is exact under the mask -----------------------------------------------------


def masked_reference(q, k, v, mask, block):
    """Dense attention in fp64 under the token-level mask the block mask stands for."""
    tok = radial.token_mask(mask, q.shape[2], block)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~tok, float("-inf")).softmax(-1) @ v.double()


def qkv(length: int, heads: int = 3, dim: int = 16, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # [B, L, H, d] transposed to [B, H, L, d]: the strided layout the DiT passes
    return [torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize(
    "grid,block", [((1, 5, 7), 8), ((3, 3, 5), 8), ((5, 4, 5), 8), ((6, 5, 7), 16), ((9, 3, 3), 4)]
)
def test_sparse_attention_equals_dense_attention_under_the_mask(grid, block):
    mask = radial.grid_mask(grid, 0.2, block)
    length = math.prod(grid)
    q, k, v = qkv(length, batch=2)
    out = radial.sparse_attention(q, k, v, mask, block)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=radial.token_mask(mask, length, block))
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, mask, block), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_sparse_attention_skips_masked_keys():
    # Keys in dropped blocks may be anything (even NaN): they are never read.
    grid, block = (6, 5, 7), 8
    mask = radial.grid_mask(grid, 0.2, block)
    assert not mask.all()
    q, k, v = qkv(math.prod(grid))
    k, v = k.clone(), v.clone()
    out = radial.sparse_attention(q, k, v, mask, block)
    never = ~radial.token_mask(mask, q.shape[2], block).any(0)  # keys no query keeps
    dropped = radial.token_mask(mask, q.shape[2], block)[0] == 0  # keys query 0 drops
    k[:, :, never], v[:, :, never] = float("nan"), float("nan")
    assert torch.equal(radial.sparse_attention(q, k, v, mask, block), out)
    assert dropped.any()


def test_flex_path_equals_the_gather_path_and_the_reference():
    # One compile (torch.compile of flex_attention) at one small shape; B = 2 shares the mask.
    grid, block = (6, 5, 7), 8
    mask = radial.grid_mask(grid, 0.2, block)
    q, k, v = qkv(math.prod(grid), heads=2, dim=32, batch=2, seed=1)
    flex = radial.flex_function(mask, q.shape[2], block)(q, k, v)
    gather = radial.gather_function(mask, q.shape[2], block)(q, k, v)
    torch.testing.assert_close(flex, gather, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex.double(), masked_reference(q, k, v, mask, block), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    # Heads under 32 channels (where compiled flex was wrong on CPU) take the gather path.
    q16, k16, v16 = (t[..., :16] for t in (q, k, v))
    torch.testing.assert_close(radial.flex_function(mask, q.shape[2], block)(q16, k16, v16),
                               radial.sparse_attention(q16, k16, v16, mask, block))  # fmt: skip
    assert radial.cpu_kernel("gather") == "gather" and radial.cpu_kernel("flex") == "flex"
    assert radial.cpu_kernel() in ("flex", "gather")


def test_full_mask_equals_sdpa_exactly():
    q, k, v = qkv(100)
    full = torch.ones(13, 13, dtype=torch.bool)
    assert torch.equal(
        radial.sparse_attention(q, k, v, full, 8), F.scaled_dot_product_attention(q, k, v)
    )


def test_plan_groups_rows_with_the_same_keys():
    mask = radial.grid_mask((21, 30, 40), 0.2, 128)
    groups = radial.plan(mask, 25200, 128)
    assert groups[0].start == 0 and groups[-1].stop == 25200
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
    for g in groups:
        row = mask[g.start // 128]
        want = (row.nonzero().flatten()[:, None] * 128 + torch.arange(128)).flatten()
        assert torch.equal(g.keys, want[want < 25200]) if g.keys is not None else row.all()


def test_errors():
    q, k, v = qkv(100)
    with pytest.raises(ValueError, match="does not fit"):
        radial.sparse_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="as many keys"):
        radial.sparse_attention(
            q, k[:, :, :50], v[:, :, :50], torch.ones(13, 13, dtype=torch.bool), 8
        )
    with pytest.raises(ValueError, match="dense_steps"):
        RadialConfig(dense_steps=-1)
    with pytest.raises(ValueError, match="decay"):
        RadialConfig(decay=0)


# --- the schedule -----------------------------------------------------------------------------


def test_schedule_is_dense_for_the_first_steps_and_blocks():
    c = RadialConfig()  # published 1x-length Wan2.1 T2V setting
    assert (c.dense_steps, c.dense_blocks, c.decay, c.block) == (12, 1, 0.2, 128)
    from wanlite.options import Options

    assert RadialConfig.of(Options()) == c
    o = Options(
        radial_dense_steps=1, radial_dense_blocks=2, radial_decay=1, radial_cpu_kernel="flex"
    )
    assert RadialConfig.of(o) == RadialConfig(1, 2, 1.0, cpu_kernel="flex")
    for bad in (dict(radial_dense_steps=-1), dict(radial_decay=0), dict(radial_cpu_kernel="x")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Options(**bad)
    r = Radial(RadialConfig(dense_steps=2, dense_blocks=1, block=8), F.scaled_dot_product_attention)
    grid = (5, 4, 5)
    assert r.function(grid, 0, 3) is r.dense and r.function(grid, 1, 5) is r.dense
    assert r.function(grid, 5, 0) is r.dense  # block 0 is always dense
    sparse = r.function(grid, 2, 1)
    assert sparse is not r.dense and r.function(grid, 9, 4) is sparse  # one function per grid
    assert Radial(RadialConfig(0, 0), F.scaled_dot_product_attention).function((2, 4, 4), 0, 0) \
        is F.scaled_dot_product_attention  # fmt: skip  # 2 frames of 16 tokens: mask all true


# --- in the DiT and the pipeline --------------------------------------------------------------


def test_dit_with_radial_equals_the_dit_with_masked_sdpa():
    from wanlite.models.configs import TINY
    from wanlite.models.dit import WanDiT, unpatchify

    torch.manual_seed(0)
    cfg = RadialConfig(dense_steps=1, dense_blocks=1, decay=0.2, block=8, cpu_kernel="gather")
    model = WanDiT(TINY.dit, attn="radial", radial=cfg).eval()
    ref = WanDiT(TINY.dit).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, TINY.dit.in_channels, 6, 10, 14)  # grid (6, 5, 7): odd sizes
    t, ctx = torch.tensor([700.0]), torch.randn(1, 7, TINY.dit.text_dim)
    grid = (6, 5, 7)
    mask = radial.token_mask(radial.grid_mask(grid, 0.2, 8), 210, 8)
    calls = []

    def masked(q, k, v):
        calls.append(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    model.step_index = 0  # step 0 is dense: SDPA's result, to the bit
    assert torch.equal(model(x, t, ctx), ref(x, t, ctx))
    model.step_index = 1  # block 0 dense, block 1 under the mask
    out = model(x, t, ctx)
    with torch.no_grad():  # the reference: block 1's self-attention is SDPA with the token mask
        sdpa = F.scaled_dot_product_attention
        text, (e, e0) = ref.prepare_text(ctx), ref.time_embeddings(t, 1)
        rope = ref.rope(grid, x.device)
        h = ref.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        h = ref.blocks[0](h, e0, text, 0, rope, sdpa)
        h = ref.blocks[1](h, e0, text, 1, rope, (masked, sdpa))
        expected = unpatchify(ref.head(h, e), grid, TINY.dit.patch_size)
    assert calls == [210]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ref(x, t, ctx), rtol=1e-3, atol=1e-3)  # the mask matters


def test_generate_with_radial(tiny_checkpoint, tiny_pipe):
    import numpy as np

    import wanlite

    # radial_cpu_kernel "gather": no compile here (flex has its own test)
    kw = dict(height=128, width=160, num_frames=17, num_inference_steps=2, guidance_scale=3.0,
              seed=5, progress=False, output_type="latent")  # fmt: skip
    assert not radial.grid_mask((5, 8, 10), 0.2, 128).all()  # grid (5, 8, 10): 400 tokens
    dense = tiny_pipe.generate("a fox", **kw).latents
    opts = dict(device="cpu", dtype="float32", embed_cache=False)
    # Default: the first 12 steps dense, so a 2-step call is SDPA's, to the bit.
    same = wanlite.load(tiny_checkpoint, attention="radial", **opts).generate("a fox", **kw)
    assert torch.equal(same.latents, dense)
    opts.update(radial_dense_steps=0, radial_dense_blocks=0, radial_cpu_kernel="gather")
    sparse_pipe = wanlite.load(tiny_checkpoint, attention="radial", **opts)
    sparse = sparse_pipe.generate("a fox", **kw).latents
    assert torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)  # the mask changed the result
    kw.update(height=48, width=64, num_frames=9, output_type="frames")
    video = sparse_pipe.generate("a fox", **kw)  # decoded end to end
    assert video.frames.shape == (9, 48, 64, 3) and video.frames.dtype == np.uint8
