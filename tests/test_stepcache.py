"""Step caching: exact at threshold 0, skips and reuses the kept residual when allowed."""

import pytest
import torch

import wanlite
from wanlite.models.configs import TINY
from wanlite.models.dit import WanDiT
from wanlite.options import Options
from wanlite.runtime import stepcache
from wanlite.weights.random_checkpoint import random_state_dict


@pytest.fixture(scope="module")
def dit():
    model = WanDiT(TINY.dit).eval()
    model.load_state_dict(random_state_dict(model, "transformer", seed=5))
    return model


def _inputs(dit, t=500.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 7, TINY.dit.text_dim, generator=g)
    return x, dit.time_embeddings(torch.tensor([t]), 1), dit.prepare_text(ctx)


@pytest.mark.parametrize("mode", ["teacache", "firstblock"])
def test_threshold_zero_is_exact(dit, mode):
    cache = stepcache.make(mode, 0.0)
    for t in (900.0, 800.0, 700.0):
        x, temb, text = _inputs(dit, t)
        assert torch.equal(dit.step(x, temb, text, cache), dit.step(x, temb, text))
    assert cache.forwards == 3 and cache.skipped == 0


@pytest.mark.parametrize("mode,threshold", [("teacache", 0.2), ("firstblock", 0.01)])
def test_unchanged_input_reuses_the_residual(dit, mode, threshold):
    cache = stepcache.make(mode, threshold)
    x, temb, text = _inputs(dit)
    first = dit.step(x, temb, text, cache)
    again = dit.step(x, temb, text, cache)  # same input: the blocks are skipped
    assert cache.skipped == 1
    assert (again - first).abs().max().item() <= 1e-5
    cache.last = True  # the last step always runs the blocks
    dit.step(x, temb, text, cache)
    assert cache.skipped == 1 and cache.forwards == 3


def test_pipeline_reports_skipped_forwards(tiny_checkpoint):
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=6, seed=4, progress=False)
    exact = wanlite.load(str(tiny_checkpoint), device="cpu").generate("a fox", **kw)
    assert exact.stats["dit_forwards_skipped"] == 0
    for mode in ("teacache", "firstblock"):
        pipe = wanlite.load(str(tiny_checkpoint), device="cpu", cache=mode, cache_threshold=1e6)
        video = pipe.generate("a fox", **kw)
        # Huge threshold: every step but the first and the last reuses the residual, per branch.
        assert video.stats["dit_forwards"] == 12
        assert video.stats["dit_forwards_skipped"] == 8
        assert video.frames.shape == exact.frames.shape
        assert not torch.equal(video.latents, exact.latents)


def test_bad_cache_options():
    with pytest.raises(ValueError, match="cache"):
        Options(cache="magic")
    with pytest.raises(ValueError, match="cache_threshold"):
        Options(cache="teacache", cache_threshold=-1)
    with pytest.raises(ValueError, match="cfg_skip_last"):
        Options(cfg_skip_last=1.0)


@torch.no_grad()  # as ``dit.step`` runs the cache
def test_teacache_decides_from_the_host_schedule_without_reading_the_device(dit):
    """Given the schedule's time embeddings on the host (``set_schedule``) and the step index,
    TeaCache never reads the per-forward embedding: here it is a meta tensor (any read would
    raise), and the decisions and outputs equal those of the read-back path."""
    steps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0])
    e, e0 = dit.time_embeddings(steps, len(steps))
    # A threshold between the signals: step 1 skips, step 2 runs (s1 + s2 > it), ...
    rescale = stepcache.TeaCache(0.0).rescale
    signal = [float(rescale(stepcache.relative_l1(e[i], e[i - 1]))) for i in (1, 2)]
    threshold = signal[0] + signal[1] / 2
    x, _, text = _inputs(dit)
    rope = dit.rope(dit.grid(x.shape), x.device)
    h0 = dit.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
    outs, skipped = {}, {}
    for host in (False, True):
        cache = stepcache.make("teacache", threshold)
        if host:
            cache.set_schedule(e)
        outs[host] = []
        for i in range(len(steps)):
            cache.step, cache.last = i, i == len(steps) - 1
            e_i = torch.empty(1, e.shape[1], device="meta") if host else e[i : i + 1]
            outs[host].append(cache(dit, h0.clone(), (e_i, e0[i : i + 1]), text, rope))
        skipped[host] = cache.skipped
    assert skipped[True] == skipped[False] > 0 and cache.forwards - cache.skipped > 2
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))


@pytest.mark.cuda
@torch.no_grad()
def test_teacache_forward_does_not_sync_on_cuda(dit):
    """With the schedule on the host, a TeaCache forward queues its work without waiting for
    the GPU (``torch.cuda.set_sync_debug_mode("error")`` raises on any sync)."""
    import copy

    model = copy.deepcopy(dit).cuda()
    steps = torch.tensor([900.0, 700.0, 500.0], device="cuda")
    e, e0 = model.time_embeddings(steps, len(steps))
    x = torch.randn(1, 16, 2, 4, 6, device="cuda")
    text = model.prepare_text(torch.randn(1, 7, TINY.dit.text_dim, device="cuda"))
    rope = model.rope(model.grid(x.shape), x.device)
    h0 = model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
    cache = stepcache.make("teacache", 1e6)
    cache.set_schedule(e)
    cache.step = 0
    cache(model, h0.clone(), (e[:1], e0[:1]), text, rope)  # first forward: K/V made, tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in (1, 2):
            cache.step, cache.last = i, i == 2
            cache(model, h0.clone(), (e[i : i + 1], e0[i : i + 1]), text, rope)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.skipped == 1
