"""Presets (wanlite.sampling.presets): the published recipes (CausVid, FastWan, rCM,
LightX2V), defaults vs explicit values, validation."""

import dataclasses

import pytest
import torch

from wanlite.models.configs import SchedulerConfig
from wanlite.sampling.presets import PRESETS, Preset, describe_presets, get_preset

CAUSVID = [1000, 934, 862, 756, 603, 410, 250, 140, 74]


def test_causvid_is_the_published_recipe():
    p = get_preset("causvid")
    assert (p.num_inference_steps, p.guidance_scale, p.sampler) == (8, 1.0, "euler")
    assert list(p.timesteps) == CAUSVID
    assert "Causvid Rank32 - 8 Steps" in p.source and "rank-32" in p.files
    s = p.make_sampler(SchedulerConfig(flow_shift=5.0), p.num_inference_steps)
    assert s.timesteps.tolist() == CAUSVID[:8]
    assert torch.equal(s.sigmas, torch.tensor([*CAUSVID[:8], 0.0]) / 1000)


def test_explicit_request_values_win():
    p = get_preset("causvid")
    assert p.defaults() == (8, 1.0)
    assert p.defaults(num_inference_steps=4) == (4, 1.0)
    assert p.defaults(guidance_scale=3.0) == (8, 3.0)
    assert p.defaults(6, 0.0) == (6, 0.0)  # zero is a value, not "unset"
    assert p.make_sampler(SchedulerConfig(), 4).timesteps.tolist() == CAUSVID[:4]


def test_preset_errors():
    p = get_preset("causvid")
    with pytest.raises(ValueError, match="9"):
        p.make_sampler(SchedulerConfig(), 12)  # more steps than the recipe's timestep list
    with pytest.raises(ValueError, match="shift"):
        p.make_sampler(SchedulerConfig(), 8, shift=5.0)
    with pytest.raises(ValueError, match="causvid"):
        get_preset("lightning")


def test_listing_and_frozen():
    rows = describe_presets()
    assert [r[0] for r in rows] == sorted(PRESETS)
    assert [r[0] for r in rows] == ["causvid", "fastwan", "lightx2v", "rcm"]
    name, sets, source = rows[0]
    assert name == "causvid" and "8 steps" in sets and "guidance 1" in sets and "euler" in sets
    assert source == PRESETS["causvid"].source
    assert all(isinstance(p, Preset) and p.name == n for n, p in PRESETS.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["causvid"].num_inference_steps = 30


def test_fastwan_is_fastvideos_dmd_recipe():
    p = get_preset("fastwan")
    assert (p.num_inference_steps, p.guidance_scale, p.sampler) == (3, 1.0, "dmd")
    assert p.timesteps == (1000, 757, 522) and p.shift == 8.0
    assert "FastWan2_1_T2V_480P_Config" in p.source and "DmdDenoisingStage" in p.source
    assert "FastWan2.1-T2V-1.3B-Diffusers" in p.files and "VSA" in p.attention
    s = p.make_sampler(SchedulerConfig(flow_shift=3.0), 3, seed=0)  # the preset's shift, not 3
    assert s.timesteps.tolist() == [1000, 757, 522]
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.756757, 0.521739, 0.0]))
    with pytest.raises(ValueError, match="seed"):
        p.make_sampler(SchedulerConfig(), 3)  # DMD re-noises from the request's seed


def test_explicit_shift_and_steps_win_over_the_preset():
    p = get_preset("fastwan")
    assert p.defaults(num_inference_steps=2) == (2, 1.0)
    s = p.make_sampler(SchedulerConfig(), 2, shift=1.0, seed=0)  # shift 1: sigma = t / 1000
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.757, 0.0]))
    s = get_preset("lightx2v").make_sampler(SchedulerConfig(), 4)
    torch.testing.assert_close(s.timesteps, torch.tensor([1000, 937.5, 833.3333, 625]))
    assert get_preset("lightx2v").make_sampler(
        SchedulerConfig(), 4, shift=1.0
    ).timesteps.tolist() == [
        1000.0,
        750.0,
        500.0,
        250.0,
    ]


def test_rcm_and_lightx2v_recipes():
    r = get_preset("rcm")
    assert (r.num_inference_steps, r.guidance_scale, r.sampler, r.timesteps) == (
        4,
        1.0,
        "rcm",
        None,
    )
    assert "wan2pt1_t2v_rcm_infer.py" in r.source and "rCM_Wan2.1_T2V_1.3B_480p.pt" in r.files
    s = r.make_sampler(SchedulerConfig(), 4, seed=1)
    assert s.timesteps.tolist() == [988.0, 932.0, 852.0, 608.0] and s.init_scale < 1
    assert r.make_sampler(SchedulerConfig(), 2, seed=1).num_steps == 2
    with pytest.raises(ValueError, match="shift"):
        r.make_sampler(SchedulerConfig(), 4, shift=5.0, seed=1)
    x = get_preset("lightx2v")
    assert (x.num_inference_steps, x.guidance_scale, x.sampler, x.shift) == (4, 1.0, "distill", 5.0)
    assert "WanStepDistillScheduler" in x.source and "NVFP4" in x.files
    assert not x.make_sampler(SchedulerConfig(), 4).state.renoise  # deterministic: no seed needed
