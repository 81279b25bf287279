"""The few-step samplers (wanlite.sampling.fewstep) against independent transcriptions of the
published code's equations, one per recipe (each reference cites repository, file, function),
plus the update rule's own properties."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from wanlite.models.configs import SchedulerConfig
from wanlite.sampling.fewstep import FewStepState, dmd_grid, fewstep_step, rcm_grid, warp_grid
from wanlite.sampling.scheduler import make_sampler

SHAPE = (1, 4, 3, 5, 6)
SEED = 1234


def _fake_model(x: torch.Tensor, t: float, k: int) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the DiT's flow prediction at step k."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + k))
    y = 1.3 * x.float() + float(t) / 1000
    return y / (1 + y.abs()) - 0.5 * x.float() * float(t) / 1000 + 0.3 * noise


def _ours(sampler, noise: torch.Tensor) -> list[torch.Tensor]:
    """Our loop as the pipeline runs it: x = initial(noise), then step after step."""
    x, state, out = sampler.initial(noise), sampler.state, []
    for k, t in enumerate(sampler.timesteps.tolist()):
        x, state = sampler.step(state, _fake_model(x, t, k), x)
        out.append(x)
    assert state.index == sampler.num_steps
    return out


def _stream(seed: int = SEED) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# -- FastWan: hao-ai-lab/FastVideo fastvideo/pipelines/stages/denoising.py
#    DmdDenoisingStage.forward, fastvideo/models/utils.py pred_noise_to_pred_video,
#    fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py
#    FlowMatchEulerDiscreteScheduler.__init__ / add_noise (its training grid is diffusers').


def _fastvideo_lookup(sched, t: torch.Tensor) -> torch.Tensor:
    """sigma of the training-grid timestep nearest to t (argmin over |timesteps - t|)."""
    ts = sched.timesteps.double()
    return sched.sigmas.double()[(ts[None] - t.double()[:, None]).abs().argmin(1)]


def fastvideo_dmd(noise: torch.Tensor, steps=(1000, 757, 522), shift=8.0) -> list:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)  # set_timesteps is never called
    g = _stream()
    latents = torch.randn(noise.shape, generator=g)  # the request generator's first draw
    assert torch.equal(latents, noise)
    timesteps = torch.tensor(steps, dtype=torch.long)
    out = []
    for i, t in enumerate(timesteps):
        pred = _fake_model(latents, float(t), i).double()
        sigma_t = _fastvideo_lookup(sched, t[None]).item()
        pred_video = (latents.double() - sigma_t * pred).float()
        if i < len(timesteps) - 1:
            fresh = torch.randn(noise.shape, generator=g)
            sigma = _fastvideo_lookup(sched, timesteps[i + 1][None]).float().item()
            latents = (1 - sigma) * pred_video + sigma * fresh
        else:
            latents = pred_video
        out.append(latents)
    return out


def test_dmd_grid_is_fastvideos():
    ts, sigmas = dmd_grid((1000, 757, 522), 8.0)
    assert ts.tolist() == [1000, 757, 522]  # fed to the DiT as given
    sched = FlowMatchEulerDiscreteScheduler(shift=8.0)
    ref = _fastvideo_lookup(sched, torch.tensor([1000.0, 757.0, 522.0])).float()
    assert torch.equal(sigmas[:3], ref) and sigmas[3] == 0
    torch.testing.assert_close(
        sigmas[:3], torch.tensor([1.0, 0.756757, 0.521739]), atol=1e-6, rtol=0
    )


def test_dmd_trajectory_matches_fastvideo():
    s = make_sampler("dmd", SchedulerConfig(), 3, 8.0, (1000, 757, 522), seed=SEED)
    noise = torch.randn(SHAPE, generator=_stream())
    for a, b in zip(_ours(s, noise), fastvideo_dmd(noise), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


# -- Self-Forcing: guandeh17/Self-Forcing pipeline/causal_inference.py
#    CausalInferencePipeline.__init__ (warp_denoising_step), utils/scheduler.py
#    FlowMatchScheduler.set_timesteps (shift 5, sigma_min 0, extra_one_step) / add_noise,
#    utils/wan_wrapper.py WanDiffusionWrapper._convert_flow_pred_to_x0.


def self_forcing_grid(steps=(1000, 750, 500, 250), shift=5.0):
    sigmas = torch.linspace(1.0, 0.0, 1000 + 1)[:-1]  # sigma_start 1, sigma_min 0, extra step
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    warped = torch.cat((timesteps, torch.tensor([0.0])))[1000 - torch.tensor(steps)]
    return sigmas, timesteps, warped


def self_forcing(noise: torch.Tensor) -> list:
    sigmas, timesteps, steps = self_forcing_grid()
    g, out = _stream(), []
    x = torch.randn(noise.shape, generator=g)

    def lookup(t):
        return sigmas.double()[(timesteps.double()[None] - t.double()[:, None]).abs().argmin(1)]

    for i, t in enumerate(steps):
        flow = _fake_model(x, t.item(), i).double()
        x0 = (x.double() - lookup(t[None]).item() * flow).float()
        if i < len(steps) - 1:
            sigma = lookup(steps[i + 1][None]).float().item()
            x = (1 - sigma) * x0 + sigma * torch.randn(noise.shape, generator=g)
        else:
            x = x0
        out.append(x)
    return out


def test_warp_grid_is_self_forcings():
    ts, sigmas = warp_grid((1000, 750, 500, 250), 5.0)
    assert torch.equal(ts, self_forcing_grid()[2])
    torch.testing.assert_close(ts, torch.tensor([1000, 937.5, 833.3333, 625]), atol=1e-3, rtol=0)
    assert torch.equal(sigmas, torch.cat([ts / 1000, torch.zeros(1)]))


def test_warp_trajectory_matches_self_forcing():
    s = make_sampler("warp", SchedulerConfig(), 4, 5.0, (1000, 750, 500, 250), seed=SEED)
    noise = torch.randn(SHAPE, generator=_stream())
    for a, b in zip(_ours(s, noise), self_forcing(noise), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


# -- LightX2V: ModelTC/LightX2V lightx2v/models/schedulers/wan/step_distill/scheduler.py
#    WanStepDistillScheduler.set_denoising_timesteps / step_post (deterministic since 2025-11).


def lightx2v(noise: torch.Tensor, steps=(1000, 750, 500, 250), shift=5.0):
    sigmas = torch.linspace(1.0, 0.0, 1000 + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    index = [1000 - x for x in steps]
    timesteps, sigmas = (sigmas * 1000)[index], sigmas[index]
    latents, out = noise.clone(), []
    for i in range(len(steps)):
        flow = _fake_model(latents, timesteps[i].item(), i).float()
        x = latents.float() - sigmas[i].item() * flow
        if i < len(steps) - 1:
            x = x + flow * sigmas[i + 1].item()
        latents = x
        out.append(latents)
    return timesteps, out


def test_distill_matches_lightx2v():
    s = make_sampler("distill", SchedulerConfig(), 4, 5.0, (1000, 750, 500, 250))
    noise = torch.randn(SHAPE, generator=_stream())
    ts, ref = lightx2v(noise)
    assert torch.equal(s.timesteps, ts)
    for a, b in zip(_ours(s, noise), ref, strict=True):
        assert torch.equal(a, b)  # no noise, same float32 operations


# -- rCM: NVlabs/rcm rcm/inference/wan2pt1_t2v_rcm_infer.py (__main__: the TrigFlow grid,
#    x = noise * t_0, the bf16 timestep, the re-noising update in float64).


def rcm(noise: torch.Tensor, num_steps: int, sigma_max=80.0) -> tuple[list, list]:
    g = _stream()
    init = torch.randn(noise.shape, generator=g, dtype=torch.float32)
    mid_t = [1.5, 1.4, 1.0][: num_steps - 1]
    t_steps = torch.tensor([math.atan(sigma_max), *mid_t, 0], dtype=torch.float64)
    t_steps = torch.sin(t_steps) / (torch.cos(t_steps) + torch.sin(t_steps))
    x = init.to(torch.float64) * t_steps[0]
    fed, out = [], []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        t_in = (t_cur.float() * 1000).to(torch.bfloat16)
        fed.append(t_in.float().item())
        v = _fake_model(x.float(), t_in.float().item(), i).to(torch.float64)
        x = (1 - t_next) * (x - t_cur * v) + t_next * torch.randn(
            *x.shape, dtype=torch.float32, generator=g
        )
        out.append(x.float())
    return fed, out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rcm_matches_the_reference(n):
    s = make_sampler("rcm", SchedulerConfig(), n, seed=SEED)
    noise = torch.randn(SHAPE, generator=_stream())
    fed, ref = rcm(noise, n)
    assert s.timesteps.tolist() == fed
    for a, b in zip(_ours(s, noise), ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rcm_grid_published_values():
    ts, sigmas = rcm_grid(4)
    assert ts.tolist() == [988.0, 932.0, 852.0, 608.0]
    expected = [0.987654, 0.933781, 0.852895, 0.608979, 0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected), atol=1e-6, rtol=0)
    assert rcm_grid(1)[1].tolist() == pytest.approx([80 / 81, 0.0])  # sin/(sin+cos) = 80/81
    assert make_sampler("rcm", SchedulerConfig(), 4, seed=0).init_scale == sigmas[0].item()


# -- the update rule itself


def test_step_is_pure_and_replayable():
    s = make_sampler("dmd", SchedulerConfig(), 3, 8.0, (1000, 757, 522), seed=7)
    x = torch.randn(SHAPE, generator=_stream(7))
    v = torch.randn(SHAPE)
    a, st_a = s.step(s.state, v, x)
    b, st_b = s.step(s.state, v, x)
    assert torch.equal(a, b) and s.state.index == 0 and st_a.index == 1
    c, _ = s.step(st_a, v, a)
    d, _ = s.step(st_b, v, b)
    assert torch.equal(c, d)  # the carried generator state replays the same noise
    # fresh noise = the seed stream's draws after the initial one
    g = _stream(7)
    torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    sig = s.sigmas
    x0 = x - sig[0].item() * v
    torch.testing.assert_close(a, (1 - sig[1].item()) * x0 + sig[1].item() * eps)


def test_last_step_returns_x0_and_draws_nothing():
    sig = torch.tensor([0.6, 0.0])
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out, st = fewstep_step(FewStepState(sig, True, seed=3), v, x)
    assert torch.equal(out, x - 0.6 * v) and st.rng is None
    with pytest.raises(ValueError, match="steps"):
        fewstep_step(st, v, x)


def test_exact_on_a_straight_flow():
    """x_s = (1-s) x0 + s eps with v = eps - x0 constant: every x0 prediction is x0 exactly,
    whatever the noise drawn, so every recipe lands on x0."""
    x0 = torch.randn(SHAPE, generator=_stream(1))
    for kind, steps, shift, ts in (
        ("dmd", 3, 8.0, (1000, 757, 522)),
        ("warp", 4, 5.0, (1000, 750, 500, 250)),
        ("distill", 4, 5.0, (1000, 750, 500, 250)),
        ("rcm", 4, None, None),
    ):
        s = make_sampler(kind, SchedulerConfig(), steps, shift, ts, seed=5)
        eps = torch.randn(SHAPE, generator=_stream(5))
        x, state = s.initial(eps) + (1 - s.sigmas[0].item()) * x0, s.state  # on the line
        for _ in range(steps):
            v = (x - x0) / s.sigmas[state.index].item()  # = eps_now - x0: the exact flow
            x, state = s.step(state, v, x)
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "dmd", "timesteps": None},  # needs its step list
        {"kind": "dmd", "timesteps": (1000, 757, 522), "steps": 4},  # more than listed
        {"kind": "dmd", "timesteps": (1000, 757.5), "steps": 2},  # not training timesteps
        {"kind": "dmd", "timesteps": (757, 1000), "steps": 2},
        {"kind": "warp", "timesteps": (1000, 750), "steps": 2, "seed": None},  # re-noises
        {"kind": "rcm", "steps": 5},
        {"kind": "rcm", "steps": 4, "shift": 5.0},
        {"kind": "dmd", "timesteps": (1000, 757, 522), "shift": -1.0},
    ],
)
def test_bad_fewstep_requests_raise(kwargs):
    kwargs = {"steps": 3, "seed": 0, **kwargs}
    kind, steps = kwargs.pop("kind"), kwargs.pop("steps")
    with pytest.raises(ValueError):
        make_sampler(kind, SchedulerConfig(), steps, **kwargs)


def test_grids_are_cut_to_the_step_count():
    ts, sig = dmd_grid((1000, 757, 522), 8.0, steps=2)
    assert ts.tolist() == [1000, 757] and sig[-1] == 0 and len(sig) == 3
    ts, sig = warp_grid((1000, 750, 500, 250), 5.0, steps=1)
    assert ts.tolist() == [1000.0] and sig.tolist() == [1.0, 0.0]
    assert np.isclose(warp_grid((1000, 500), 1.0)[1][1].item(), 0.5)  # shift 1: identity
