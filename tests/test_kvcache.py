"""The causal KV cache (wanlite.runtime.kvcache): chunk-by-chunk forwards with the cache equal one
forward over all frames under the equivalent block-causal mask (fp32, tiny DiT, random weights),
with and without a rolling window and sink frames.

The mask rule is Self-Forcing's (guandeh17/Self-Forcing, wan/modules/causal_model.py,
``CausalWanModel._prepare_blockwise_causal_attn_mask``: ``kv_idx < ends[q_idx]`` and, with
``local_attn_size``, ``kv_idx >= ends[q_idx] - local_attn_size * frame_seqlen``); the sink frames
are kept as ``CausalWanSelfAttention.forward`` keeps them when it rolls its cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wanlite.models.configs import TINY
from wanlite.models.dit import WanDiT
from wanlite.runtime.kvcache import KVCache, block_causal_mask
from wanlite.weights.random_checkpoint import random_state_dict

CFG = TINY.dit


@pytest.fixture(scope="module")
def dit() -> WanDiT:
    with torch.device("meta"):
        skeleton = WanDiT(CFG)
    model = WanDiT(CFG).eval()
    model.load_state_dict(random_state_dict(skeleton, "transformer", seed=5), strict=True)
    return model


class _Masked:
    """A single pass over every frame whose self-attention takes a fixed token mask."""

    start_frame = 0

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def attention(self, block, attn):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _inputs(frames: int, h: int = 4, w: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_channels, frames, h, w, generator=g)
    ctx = torch.randn(1, 9, CFG.text_dim, generator=g)
    return x, ctx


def _chunked(dit, x, ctx, chunks, t, window=None, sink=0):
    text = dit.prepare_text(ctx)
    temb = dit.time_embeddings(torch.tensor([t]), 1)
    ft = (x.shape[3] // 2) * (x.shape[4] // 2)
    kv = KVCache(len(dit.blocks), ft, x.shape[2], window, sink)
    outs, s = [], 0
    for c in chunks:
        kv.begin_chunk(c)
        outs.append(dit.step(x[:, :, s : s + c], temb, text, kv=kv))
        kv.commit()
        s += c
    return torch.cat(outs, dim=2), kv


@pytest.mark.parametrize(
    "chunks, window, sink",
    [
        ([3, 3, 3], None, 0),
        ([1, 3, 3, 2], None, 0),  # an uneven first and last chunk
        ([3, 3, 3, 3], 6, 0),  # a rolling window of 6 frames
        ([3, 3, 3, 3, 3], 7, 1),  # one sink frame kept at the front
        ([2, 2, 2, 2], 5, 3),
    ],
)
def test_chunks_with_the_cache_equal_a_masked_single_pass(dit, chunks, window, sink):
    x, ctx = _inputs(sum(chunks))
    ft = (x.shape[3] // 2) * (x.shape[4] // 2)
    got, kv = _chunked(dit, x, ctx, chunks, 500.0, window, sink)
    mask = block_causal_mask(chunks, ft, window, sink)
    text = dit.prepare_text(ctx)
    temb = dit.time_embeddings(torch.tensor([500.0]), 1)
    want = dit.step(x, temb, text, kv=_Masked(mask))
    err = (got - want).abs().max().item()
    print(f"chunks {chunks} window {window} sink {sink}: max abs diff {err:.1e}")
    assert err <= 1e-5
    if window is not None:  # the buffers never held more than the window
        assert kv.capacity == window * ft and kv.cached <= window * ft


def test_the_mask_is_causal_and_the_full_window_is_no_window():
    m = block_causal_mask([2, 2], 1)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(block_causal_mask([3, 3, 3], 4, 9, 0), block_causal_mask([3, 3, 3], 4))
    # a window of 2 frames: the sink (frame 0) and the chunk itself
    w = block_causal_mask([1, 1, 1, 1], 1, window=2, sink=1)
    assert w[3].tolist() == [1, 0, 0, 1]


def test_rerun_overwrites_the_chunk_and_only_the_last_forward_is_kept(dit):
    """The denoising steps of a chunk write its slots; the clean rerun's K/V replace them, so a
    later chunk sees the rerun's K/V only (as Self-Forcing's context-noise rerun)."""
    x, ctx = _inputs(6, seed=1)
    text = dit.prepare_text(ctx)
    t1, t0 = dit.time_embeddings(torch.tensor([800.0]), 1), dit.time_embeddings(torch.zeros(1), 1)
    ft = 4 * 6 // 4
    kv = KVCache(len(dit.blocks), ft, 6)
    kv.begin_chunk(3)
    dit.step(torch.randn_like(x[:, :, :3]), t1, text, kv=kv)  # a noisy step: overwritten
    dit.step(x[:, :, :3], t0, text, kv=kv)
    kv.commit()
    kv.begin_chunk(3)
    got = dit.step(x[:, :, 3:], t1, text, kv=kv)
    ref = KVCache(len(dit.blocks), ft, 6)
    ref.begin_chunk(3)
    dit.step(x[:, :, :3], t0, text, kv=ref)
    ref.commit()
    ref.begin_chunk(3)
    want = dit.step(x[:, :, 3:], t1, text, kv=ref)
    assert torch.equal(got, want)


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="sink"):
        KVCache(2, 4, 9, window=3, sink=3)
    kv = KVCache(2, 4, 9, window=4, sink=2)
    with pytest.raises(ValueError, match="does not fit"):
        kv.begin_chunk(3)
