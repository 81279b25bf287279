"""Step caching: exact at threshold 0, skips and reuses the kept residual when allowed."""

import pytest
import torch

import wanlite
from wanlite import stepcache
from wanlite.configs import TINY
from wanlite.dit import WanDiT
from wanlite.options import Options
from wanlite.random_checkpoint import random_state_dict


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
