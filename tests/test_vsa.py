"""Video Sparse Attention (wanlite.ops.vsa) against an independent dense transcription of the
published equations (hao-ai-lab/FastVideo fastvideo-kernel/python/fastvideo_kernel/ops.py
video_sparse_attn; fastvideo-kernel/tests/test_vsa_forward.py pytorch_forward, the masked dense
reference of the fine branch; fastvideo/attention/backends/video_sparse_attn.py
get_tile_partition_indices, compute_topk), and its self-consistency: k = all cubes is dense
attention, and with a zero gate the whole op is."""

import math

import pytest
import torch
import torch.nn.functional as F

from wanlite.ops.vsa import (
    VSA,
    choose_sparsity,
    tile,
    tiling,
    topk_for,
    untile,
    video_sparse_attention,
)

GRIDS = [(1, 1, 1), (3, 5, 7), (4, 4, 4), (5, 8, 6), (2, 9, 4)]


def _qkv(grid, heads=2, d=16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, math.prod(grid), d)
    return [torch.randn(shape, generator=g) for _ in range(4)]


def cube_of(grid, tile_size=(4, 4, 4)) -> torch.Tensor:
    """[L]: the cube number of each token in (f, h, w) order, cubes ordered t, h, w."""
    f, h, w = grid
    counts = [-(-a // b) for a, b in zip(grid, tile_size)]
    t_i, h_i, w_i = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    c = (t_i // 4) * counts[1] * counts[2] + (h_i // 4) * counts[2] + (w_i // 4)
    return c.flatten()


def reference(q, k, v, grid, topk, gate=None):
    """Dense transcription: token-level means per cube, coarse softmax over all cubes, top-k
    per query cube, a token mask from the selected cubes, masked dense softmax, gated sum."""
    cube = cube_of(grid)
    n = int(cube.max()) + 1
    onehot = F.one_hot(cube, n).float()  # [L, n]
    count = onehot.sum(0)  # tokens per cube
    means = [onehot.T @ x / count[:, None] for x in (q, k, v)]  # [B, H, n, d]
    s = means[0] @ means[1].transpose(-1, -2) / math.sqrt(q.shape[-1])
    out_c = (s.softmax(-1) @ means[2])[:, :, cube]  # broadcast to the query cube's tokens
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(topk, -1).indices, True)
    token_mask = chosen[:, :, cube][:, :, :, cube]  # [B, H, Lq, Lk]
    att = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~token_mask, -math.inf)
    out_s = att.softmax(-1) @ v
    return out_s + (out_c if gate is None else gate * out_c), chosen


@pytest.mark.parametrize("grid", GRIDS)
def test_tiling_is_fastvideos_and_round_trips(grid):
    t = tiling(grid)
    assert t.cubes == math.prod(-(-a // 4) for a in grid)
    assert int(t.sizes.sum()) == math.prod(grid) and int(t.sizes.max()) <= 64
    # cube order: cube number non-decreasing along the order; inside, (t, h, w) row-major
    cube = cube_of(grid)[t.order]
    assert torch.all(cube[1:] >= cube[:-1]) and torch.equal(t.slots // 64, cube)
    for c in range(t.cubes):
        assert torch.all(t.order[cube == c].diff() > 0)
    x = _qkv(grid)[0]
    padded = tile(x, t)
    assert torch.equal(untile(padded, t), x)
    assert torch.all(padded[:, :, ~t.valid()] == 0)  # pads are zeros


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_matches_the_dense_transcription(grid, sparsity):
    q, k, v, gate = _qkv(grid)
    n = tiling(grid).cubes
    kk = topk_for(sparsity, n)
    ref, chosen = reference(q, k, v, grid, kk, gate)
    assert torch.all(chosen.sum(-1) == kk)  # exactly k cubes per query cube
    out = video_sparse_attention(q, k, v, grid, kk, gate)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    ungated, _ = reference(q, k, v, grid, kk)
    torch.testing.assert_close(
        video_sparse_attention(q, k, v, grid, kk), ungated, atol=2e-5, rtol=1e-5
    )


@pytest.mark.parametrize("grid", [(3, 5, 7), (5, 8, 6)])
def test_all_cubes_and_zero_gate_is_dense_attention(grid):
    q, k, v, _ = _qkv(grid, batch=2)
    n = tiling(grid).cubes
    dense = F.scaled_dot_product_attention(q, k, v)
    out = video_sparse_attention(q, k, v, grid, n, torch.zeros_like(q))
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)
    # a sparse selection is not dense (the check can fail)
    assert (
        video_sparse_attention(q, k, v, grid, 1, torch.zeros_like(q)) - dense
    ).abs().max() > 1e-2


def test_bf16_close_to_fp32():
    grid = (5, 8, 6)
    q, k, v, gate = _qkv(grid)
    ref = video_sparse_attention(q, k, v, grid, 2, gate)
    qb, kb, vb, gb = (x.bfloat16() for x in (q, k, v, gate))
    out = video_sparse_attention(qb, kb, vb, grid, 2, gb)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05
    ref_ungated = video_sparse_attention(q, k, v, grid, 2)
    assert (ref - ref_ungated).abs().max() > 0.05  # the gate matters


def test_topk_published_counts():
    # compute_topk: 480x832x81 -> grid 21x30x52 -> 6x8x13 = 624 cubes -> 125 kept at 0.8
    assert tiling((21, 30, 52)).cubes == 624 and topk_for(0.8, 624) == 125
    assert topk_for(0.8, 364) == 73 and topk_for(0.8, 1) == 1 and topk_for(0.0, 9) == 9
    with pytest.raises(ValueError, match="sparsity"):
        topk_for(1.0, 10)
    assert VSA((21, 30, 52)).topk == 125


def test_choose_sparsity():
    assert choose_sparsity(True, "auto", None) == 0.8
    assert choose_sparsity(True, "auto", 0.5) == 0.5
    assert choose_sparsity(True, "sdpa", None) is None  # dense kept as an option
    assert choose_sparsity(False, "auto", None) is None
    with pytest.raises(ValueError, match="trained with VSA"):
        choose_sparsity(False, "auto", 0.8)
    with pytest.raises(ValueError, match="dense"):
        choose_sparsity(True, "sdpa", 0.8)


def test_bad_inputs():
    q, k, v, _ = _qkv((3, 5, 7))
    with pytest.raises(ValueError, match="grid"):
        video_sparse_attention(q, k, v, (3, 5, 6), 1)
    with pytest.raises(ValueError, match="topk"):
        video_sparse_attention(q, k, v, (3, 5, 7), 10)


def _dit_pair(sparsity):
    """(a WanDiT running VSA, the same weights running dense SDPA), TINY shapes with gates."""
    import dataclasses

    from wanlite.models.configs import TINY
    from wanlite.models.dit import WanDiT
    from wanlite.weights.random_checkpoint import random_state_dict

    cfg = dataclasses.replace(TINY.dit, vsa_gate=True)
    vsa, dense = WanDiT(cfg, vsa_sparsity=sparsity), WanDiT(cfg)
    state = random_state_dict(vsa, "transformer")
    vsa.load_state_dict(state)
    dense.load_state_dict(state)
    return vsa, dense


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 5, 16, 12, generator=g)  # grid (5, 8, 6): 2x2x2 = 8 cubes
    ctx = torch.randn(1, 7, 32, generator=g)
    return model(x, torch.tensor([757.0]), ctx)


def test_dit_with_all_cubes_and_zero_gates_is_the_dense_dit():
    vsa, dense = _dit_pair(0.0)
    for b in vsa.blocks:
        torch.nn.init.zeros_(b.self_attn.gate_compress.weight)
        torch.nn.init.zeros_(b.self_attn.gate_compress.bias)
    torch.testing.assert_close(_forward(vsa), _forward(dense), atol=1e-5, rtol=1e-5)
    assert isinstance(vsa.attn[0], VSA) and vsa.attn[0].topk == 8


def test_dit_runs_the_gated_sparse_attention():
    vsa, dense = _dit_pair(0.8)
    out = _forward(vsa)
    assert vsa.attn[0].grid == (5, 8, 6) and vsa.attn[0].topk == 2  # ceil(0.2 * 8)
    assert torch.isfinite(out).all() and (out - _forward(dense)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="to_gate_compress"):
        from wanlite.models.configs import TINY
        from wanlite.models.dit import WanDiT

        WanDiT(TINY.dit, vsa_sparsity=0.8)  # no gates: no VSA


def test_fine_kernels_agree(monkeypatch):
    """The CPU fine branch as two GEMMs (default) equals SDPA's (the one used off CPU)."""
    import wanlite.ops.vsa as vsa_mod

    grid = (5, 8, 6)  # partial cubes: the pad mask is exercised
    q, k, v, gate = _qkv(grid)
    ref, _ = reference(q, k, v, grid, 3, gate)
    for kernel in ("bmm", "sdpa"):
        monkeypatch.setattr(vsa_mod, "FINE_KERNEL", kernel)
        out = video_sparse_attention(q, k, v, grid, 3, gate)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
