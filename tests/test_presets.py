"""Presets (wanlite.presets): the CausVid recipe, defaults vs explicit values, validation."""

import dataclasses

import pytest
import torch

from wanlite.configs import SchedulerConfig
from wanlite.presets import PRESETS, Preset, describe_presets, get_preset

CAUSVID = [1000, 934, 862, 756, 603, 410, 250, 140, 74]


def test_causvid_is_the_published_recipe():
    p = get_preset("causvid")
    assert (p.num_inference_steps, p.guidance_scale, p.sampler) == (8, 1.0, "euler")
    assert list(p.timesteps) == CAUSVID
    assert "Causvid Rank32 - 8 Steps" in p.source and "rank-32" in p.lora_hint
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
    name, sets, source = rows[0]
    assert name == "causvid" and "8 steps" in sets and "guidance 1" in sets and "euler" in sets
    assert source == PRESETS["causvid"].source
    assert all(isinstance(p, Preset) and p.name == n for n, p in PRESETS.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["causvid"].num_inference_steps = 30
