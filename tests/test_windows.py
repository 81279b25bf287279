"""Sliding context windows (``wanlite.runtime.windows``), against the published method:
kijai/ComfyUI-WanVideoWrapper, ``context_windows/context.py`` (``uniform_standard``,
``static_standard``, ``ordered_halving``, ``create_window_mask``) and ``nodes.py``
(``WanVideoContextOptions`` defaults; ``WanVideoSampler.process``: video -> latent frames,
per-window prediction, ``noise_pred /= counter``).  The example values below were worked out by
hand from those functions' equations (not run from the source)."""

from __future__ import annotations

import pytest
import torch

from wanlite import Options
from wanlite.models.configs import TINY
from wanlite.models.dit import WanDiT
from wanlite.params import ParamError
from wanlite.runtime.windows import (
    ContextWindows,
    blend_weights,
    ordered_halving,
    static_standard,
    uniform_standard,
    window_weights,
)
from wanlite.weights.random_checkpoint import random_state_dict


def test_ordered_halving_is_the_bit_reversed_fraction():
    # 1 -> 0b1 reversed over 64 bits = 2^63 / 2^64; 2 -> 1/4; 3 -> 3/4; 4 -> 1/8.
    got = [ordered_halving(s) for s in range(6)]
    assert got == [0.0, 0.5, 0.25, 0.75, 0.125, 0.625]


def test_published_schedule_examples():
    """31 latent frames (121 video frames), the node's defaults 21 / 4 latent frames."""
    r = lambda a, b: list(range(a, b))  # noqa: E731
    # step 0: pad 0, starts 0 and 17; [17, 38) wraps, moves to end [10, 31); 0 is covered.
    assert uniform_standard(0, 31, 21, 4) == [r(0, 21), r(10, 31)]
    # step 1: pad round(31 * 0.5) = 16, starts 16 and 33 (= 2 mod 31); [16, 37) wraps to 0,
    # moves to end, and the next window [2, 23) misses 0, so [0, 21) goes in after it.
    assert uniform_standard(1, 31, 21, 4) == [r(10, 31), r(0, 21), r(2, 23)]
    # static: starts every 21 - 4 = 17 frames, the last pulled back to end on frame 30.
    assert static_standard(31, 21, 4) == [r(0, 21), r(10, 31)]
    assert static_standard(60, 21, 4) == [r(0, 21), r(17, 38), r(34, 55), r(39, 60)]
    # one window when the video fits: the whole video
    assert uniform_standard(5, 21, 21, 4) == static_standard(21, 21, 4) == [r(0, 21)]


def test_published_window_weights():
    # linear: no ramp at the video's ends; 1 -> 0 over the last 4 frames = linspace(1, 0, 4)
    w = window_weights(range(0, 21), 31, 4, "linear")
    assert w[:17].eq(1).all() and torch.allclose(w[17:], torch.tensor([1, 2 / 3, 1 / 3, 0]))
    w = window_weights(range(10, 31), 31, 4, "linear")
    assert torch.allclose(w[:4], torch.tensor([0, 1 / 3, 2 / 3, 1])) and w[4:].eq(1).all()
    # pyramid over 21 frames: 1 .. 11 .. 1, divided by the peak 11 (not at the video's ends)
    mid = window_weights(range(5, 26), 31, 4, "pyramid")
    tri = torch.tensor([*range(1, 12), *range(10, 0, -1)], dtype=torch.float32) / 11
    assert torch.equal(mid, tri)
    first = window_weights(range(0, 21), 31, 4, "pyramid")  # the ramp 0..1 as a floor
    assert torch.equal(first[4:], tri[4:]) and first[3] == 1 and first[0] == tri[0]
    even = window_weights(range(3, 7), 31, 1, "pyramid")
    assert torch.equal(even, torch.tensor([0.5, 1, 1, 0.5]))


def test_defaults_are_the_nodes():
    """81 / 16 video frames -> (81 - 1) // 4 + 1 = 21 and 16 // 4 = 4 latent frames."""
    w = ContextWindows.from_options(Options())
    assert (w.size, w.overlap, w.schedule, w.fuse) == (21, 4, "uniform_standard", "linear")
    assert ContextWindows.from_options(Options(context_frames=0)) is None
    # by default only past the hosted schema's 120 frames (31 latent): hosted requests are exact
    assert not w.applies(31) and w.applies(32)
    given = ContextWindows.from_options(Options(context_frames=81))  # asked for: past 81 frames
    assert not given.applies(21) and given.applies(22)


@pytest.mark.parametrize("schedule", ["uniform_standard", "static_standard"])
@pytest.mark.parametrize("fuse", ["linear", "pyramid"])
def test_schedules_cover_every_frame_with_weights_summing_to_one(schedule, fuse):
    for size, overlap in ((21, 4), (5, 1), (8, 3)):
        plan = ContextWindows(size, overlap, schedule, fuse)
        for n in range(size + 1, size * 6):
            for step in range(12):
                windows = plan.windows(step, n)
                assert all(len(w) == size for w in windows)
                assert sorted(set(sum(windows, []))) == list(range(n)), (n, step)
                total = torch.zeros(n)
                for w, b in zip(windows, blend_weights(windows, n, overlap, fuse)):
                    assert (b >= 0).all()
                    total.index_add_(0, torch.tensor(w), b)
                assert torch.allclose(total, torch.ones(n), atol=1e-6), (n, step)


def test_blend_of_a_framewise_prediction_is_that_prediction():
    """A prediction that acts frame by frame gives the same after blending: checks the slices
    and the weighted sum, whatever the windows."""
    x = torch.randn(2, 3, 40, 2, 2)
    plan = ContextWindows(9, 3)
    for step in range(4):
        got = plan.predict(lambda xw: 2 * xw + 1, x, step)
        assert torch.allclose(got, 2 * x + 1, atol=1e-6)


@pytest.fixture(scope="module")
def dit():
    with torch.device("meta"):
        model = WanDiT(TINY.dit)
    state = random_state_dict(model, "transformer", seed=5)
    model = WanDiT(TINY.dit).eval()
    model.load_state_dict(state, strict=True)
    return model


def _step(dit, frames: int):
    g = torch.Generator().manual_seed(frames)
    x = torch.randn(1, TINY.dit.in_channels, frames, 4, 4, generator=g)
    ctx = torch.randn(1, 6, TINY.dit.text_dim, generator=g)
    temb = dit.time_embeddings(torch.tensor([700.0]), 1)
    text = dit.prepare_text(ctx)
    return x, (lambda xw: dit.step(xw, temb, text))


@torch.inference_mode()
def test_one_window_equals_the_plain_prediction_exactly(dit):
    x, predict = _step(dit, 5)
    plain = predict(x)
    for schedule in ("uniform_standard", "static_standard"):
        got = ContextWindows(5, 2, schedule).predict(predict, x, step=3)
        assert torch.equal(got, plain)


@torch.inference_mode()
def test_windows_see_window_local_positions(dit):
    """Frames only one window weighs are that window's prediction alone, run as a clip of its
    own (RoPE from 0, as the wrapper's ``rope_apply`` with ``freqs[:f]``); overlapped frames are
    the normalised linear blend."""
    x, predict = _step(dit, 7)
    windows = static_standard(7, 4, 1)  # [0, 4), [3, 7): frame 3 shared
    assert windows == [[0, 1, 2, 3], [3, 4, 5, 6]]
    got = ContextWindows(4, 1, "static_standard").predict(predict, x, step=0)
    a, b = predict(x[:, :, 0:4]), predict(x[:, :, 3:7])
    assert torch.equal(got[:, :, :3], a[:, :, :3]) and torch.equal(got[:, :, 4:], b[:, :, 1:])
    # overlap 1: linspace(1, 0, 1) = [1] ends window 0, linspace(0, 1, 1) = [0] starts window 1
    assert torch.equal(got[:, :, 3], a[:, :, 3])
    whole = predict(x)  # the whole clip attends across all 7 frames: not the same
    assert not torch.allclose(got, whole, atol=1e-4)


@pytest.fixture(scope="module")
def long_pipe(tiny_checkpoint):
    from wanlite.pipeline import Pipeline

    return Pipeline(tiny_checkpoint, Options(device="cpu", dtype="float32", limits="model"))


def test_long_generate_runs_in_windows_with_the_exact_frame_count(long_pipe):
    """129 frames (33 latent) with the default 81-frame windows: every step runs the windows of
    its schedule, two CFG passes each."""
    video = long_pipe.generate(
        "a long shot", height=16, width=16, num_frames=129, num_inference_steps=2,
        guidance_scale=5.0, seed=3, progress=False,
    )  # fmt: skip
    assert video.frames.shape == (129, 16, 16, 3)
    stats = long_pipe.stats
    assert stats["context_windows"] == (21, 4)
    plan = ContextWindows.from_options(long_pipe.options)
    assert stats["dit_forwards"] == 2 * sum(len(plan.windows(i, 33)) for i in range(2))


def test_step_cache_with_windows_is_an_error(tiny_checkpoint):
    from wanlite.pipeline import Pipeline

    opts = Options(device="cpu", dtype="float32", limits="model", cache="teacache")
    pipe = Pipeline(tiny_checkpoint, opts)
    with pytest.raises(ParamError, match="context windows"):
        pipe.generate("x", height=16, width=16, num_frames=129, num_inference_steps=1)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"context_frames": 4}, "context_frames"),
        ({"context_frames": True}, "context_frames"),
        ({"context_frames": -1}, "context_frames"),
        ({"context_overlap": 81}, "context_overlap"),
        ({"context_overlap": -1}, "context_overlap"),
        ({"context_schedule": "uniform_looped"}, "context_schedule"),
        ({"context_fuse": "flat"}, "context_fuse"),
    ],
)
def test_bad_window_options_name_the_field(kw, field):
    with pytest.raises(ParamError) as e:
        Options(**kw)
    assert e.value.field == field and field in str(e.value)
