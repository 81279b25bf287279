"""Parity of wanlite.sampling.scheduler with diffusers' UniPC / flow Euler schedulers, plus the
math."""

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wanlite.models.configs import SchedulerConfig
from wanlite.sampling.scheduler import (
    EulerState,
    Sampler,
    euler_step,
    euler_timesteps_and_sigmas,
    make_sampler,
    timesteps_and_sigmas,
    to_x0,
    unipc_init,
    unipc_step,
)

SHAPE = (2, 4, 3, 5, 6)  # [batch, channels, frames, height, width], like the latents


def _diffusers_unipc(cfg: SchedulerConfig, n: int) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler.from_config(cfg.to_diffusers())
    sched.set_timesteps(n)
    sched.set_begin_index(0)  # as WanPipeline does
    return sched


def _fake_model(x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for the DiT's flow prediction at step k."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + k))
    tf = t.float() / 1000
    y = 1.3 * x + tf
    return y / (1 + y.abs()) - 0.5 * x * tf + 0.3 * noise  # (tanh is slow on small CPU tensors)


def _start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 30, 50, 100])
def test_timesteps_and_sigmas_match_diffusers(n):
    ref = _diffusers_unipc(SchedulerConfig(), n)
    ts, sigmas = timesteps_and_sigmas(SchedulerConfig(), n)
    assert ts.dtype == ref.timesteps.dtype == torch.int64
    assert sigmas.dtype == ref.sigmas.dtype == torch.float32
    assert ts.shape == (n,) and sigmas.shape == (n + 1,)
    assert torch.equal(ts, ref.timesteps)
    assert torch.equal(sigmas, ref.sigmas)
    assert sigmas[-1] == 0 and sigmas[0] == torch.tensor(1 - 1e-6, dtype=torch.float32)


def test_timesteps_every_step_count_and_shift():
    for shift in (1.0, 3.0, 5.0):
        cfg = SchedulerConfig(flow_shift=shift)
        ref = UniPCMultistepScheduler.from_config(cfg.to_diffusers())
        for n in range(1, 101):
            ref.set_timesteps(n)
            ts, sigmas = timesteps_and_sigmas(cfg, n)
            assert torch.equal(ts, ref.timesteps), (shift, n)
            assert torch.equal(sigmas, ref.sigmas), (shift, n)


def test_known_timesteps():
    cfg = SchedulerConfig()
    assert timesteps_and_sigmas(cfg, 4)[0].tolist() == [999, 900, 750, 500]
    assert timesteps_and_sigmas(cfg, 2)[0].tolist() == [999, 750]
    assert timesteps_and_sigmas(cfg, 1)[0].tolist() == [999]


CONFIGS = {
    "wan": SchedulerConfig(),
    "shift5": SchedulerConfig(flow_shift=5.0),
    "bh1": SchedulerConfig(solver_type="bh1"),
    "order1": SchedulerConfig(solver_order=1),
    "order3": SchedulerConfig(solver_order=3),
    "no_corrector_0_2": SchedulerConfig(disable_corrector=(0, 2)),
}


def _run_both(cfg: SchedulerConfig, n: int, ours_cfg: SchedulerConfig | None = None):
    """Run diffusers and ours side by side; the max abs diff of each step's output."""
    ref = _diffusers_unipc(cfg, n)
    ts, sigmas = timesteps_and_sigmas(cfg, n)
    state = unipc_init(ours_cfg or cfg, sigmas)
    a = b = _start()
    diffs = []
    for k, t in enumerate(ts):
        a = ref.step(_fake_model(a, t, k), t, a).prev_sample
        b_in, v = b, _fake_model(b, t, k)
        b, state = unipc_step(state, v, b_in)
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        if k == n - 1 and cfg.solver_type == "bh1" and torch.isnan(a).all():
            # diffusers 0.42.1 bug: at sigma = 0, bh1's B(h) = -h = -inf and it computes
            # -inf * 0 = NaN.  Ours returns the x0 prediction there, as bh2 does.
            assert torch.equal(b, to_x0(b_in, v, sigmas[k]))
            continue
        diffs.append((a - b).abs().max().item())  # NaN-propagating, unlike builtins.max
    return diffs


@pytest.mark.parametrize(
    ("name", "n"), [(c, n) for c in CONFIGS for n in (1, 2, 3, 5, 30)] + [("wan", 100)]
)
def test_unipc_trajectory_matches_diffusers(name, n):
    diffs = _run_both(CONFIGS[name], n)
    worst = max(diffs, default=0.0)
    print(f"unipc {name:>16} steps={n:3d}: max abs diff over steps {worst:.3e}")
    assert all(d <= 1e-5 for d in diffs)  # (False for NaN)


def test_parity_check_discriminates():
    # Our bh1 against diffusers' bh2: the comparison above must be able to fail.
    diffs = _run_both(SchedulerConfig(), 5, ours_cfg=SchedulerConfig(solver_type="bh1"))
    assert max(diffs) > 1e-2


@pytest.mark.parametrize("name", ["wan", "bh1", "order3"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_exact_on_a_straight_flow(name, n):
    # x_sigma = (1-sigma)*x0 + sigma*noise, v = noise - x0 (constant): every x0 prediction is x0,
    # the finite differences vanish and the base update is exact, so the result is x0.
    cfg = CONFIGS[name]
    x0, noise = _start(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ts, sigmas = timesteps_and_sigmas(cfg, n)
    state = unipc_init(cfg, sigmas)
    x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    for i in range(n):
        expected = (1 - sigmas[i]) * x0 + sigmas[i] * noise
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
        x, state = unipc_step(state, noise - x0, x)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_last_step_returns_the_x0_prediction():
    ts, sigmas = timesteps_and_sigmas(SchedulerConfig(), 1)
    x, v = _start(), _fake_model(_start(), ts[0], 0)
    out, state = unipc_step(unipc_init(SchedulerConfig(), sigmas), v, x)
    torch.testing.assert_close(out, to_x0(x, v, sigmas[0]), atol=0, rtol=0)
    assert state.index == 1
    with pytest.raises(ValueError):
        unipc_step(state, v, out)


def test_step_is_pure_and_upcasts():
    cfg = SchedulerConfig()
    ts, sigmas = timesteps_and_sigmas(cfg, 5)
    state = unipc_init(cfg, sigmas)
    x = _start()
    for k in range(3):
        x, state = unipc_step(state, _fake_model(x, ts[k], k), x)
    x_copy, v = x.clone(), _fake_model(x, ts[3], 3)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    out1, new1 = unipc_step(state, v, x)
    out2, new2 = unipc_step(state, v, x)  # same state again: same answer
    assert torch.equal(out1, out2) and new1.index == new2.index == 4
    assert torch.equal(x, x_copy)
    assert all(getattr(state, k) is fields[k] for k in fields)  # nothing replaced in place
    # bf16 model outputs are upcast before use (diffusers multiplies sigma*v in bf16 instead).
    out_bf16, _ = unipc_step(state, v.bfloat16(), x)
    out_up, _ = unipc_step(state, v.bfloat16().float(), x)
    assert out_bf16.dtype == torch.float32 and torch.equal(out_bf16, out_up)


@pytest.mark.parametrize(
    "bad",
    [
        {"solver_type": "bh3"},
        {"solver_order": 4},
        {"solver_order": 0},
        {"final_sigmas_type": "sigma_min"},
        {"lower_order_final": False},
        {"flow_shift": 0.0},
    ],
)
def test_unsupported_configs_raise(bad):
    cfg = SchedulerConfig(**bad)
    with pytest.raises(ValueError):
        timesteps_and_sigmas(cfg, 4)
    with pytest.raises(ValueError):
        unipc_init(cfg, torch.zeros(5))


def test_bad_step_count_raises():
    with pytest.raises(ValueError):
        timesteps_and_sigmas(SchedulerConfig(), 0)


# --- flow Euler and the Sampler interface --------------------------------------------------------

CAUSVID = [1000, 934, 862, 756, 603, 410, 250, 140, 74]


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_euler_grid_equals_diffusers_for_every_step_count(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    cfg = SchedulerConfig(flow_shift=shift)
    for n in range(1, 101):
        ref.set_timesteps(n)
        ts, sigmas = euler_timesteps_and_sigmas(cfg, n)
        assert ts.dtype == sigmas.dtype == torch.float32
        assert torch.equal(ts, ref.timesteps), (shift, n)
        assert torch.equal(sigmas, ref.sigmas), (shift, n)


def test_euler_grid_is_not_unipcs():
    # diffusers shifts the Euler grid's end twice (see the module doc): the grids differ.
    ts, sigmas = euler_timesteps_and_sigmas(SchedulerConfig(), 4)
    assert ts[-1].item() == pytest.approx(8.9286, abs=1e-4)
    assert not torch.allclose(sigmas, timesteps_and_sigmas(SchedulerConfig(), 4)[1])


@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("n", [1, 4, 8, 30])
def test_euler_trajectory_matches_diffusers(shift, n):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ref.set_begin_index(0)
    sampler = make_sampler("euler", SchedulerConfig(), n, shift=shift)  # shift overrides cfg
    assert torch.equal(sampler.timesteps, ref.timesteps)
    a = b = _start()
    state = sampler.state
    for k, t in enumerate(sampler.timesteps):
        a = ref.step(_fake_model(a, t, k), t, a).prev_sample
        b, state = sampler.step(state, _fake_model(b, t, k), b)
        assert (a - b).abs().max().item() <= 1e-5
    assert state.index == n


def test_fixed_timesteps_causvid():
    s = make_sampler("euler", SchedulerConfig(flow_shift=5.0), 8, timesteps=CAUSVID)
    assert s.timesteps.tolist() == CAUSVID[:8] and s.num_steps == 8
    assert torch.equal(s.sigmas, torch.tensor([*CAUSVID[:8], 0], dtype=torch.float32) / 1000)
    x, v = _start(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    state = s.state
    for i in range(8):
        x_in = x
        x, state = s.step(state, v, x_in)
        expected = x_in + (s.sigmas[i + 1] - s.sigmas[i]).item() * v
        assert torch.equal(x, expected)
    # A constant velocity from sigma 1 to 0 lands exactly on x0 = x_1 - v.
    torch.testing.assert_close(x, _start() - v, atol=1e-5, rtol=0)
    assert make_sampler("euler", SchedulerConfig(), None, timesteps=CAUSVID).num_steps == 9


def test_unipc_sampler_is_the_unchanged_unipc():
    cfg, n = SchedulerConfig(), 6
    sampler = make_sampler("unipc", cfg, n)
    ts, sigmas = timesteps_and_sigmas(cfg, n)
    assert sampler.timesteps.dtype == torch.float32 and torch.equal(sampler.timesteps, ts.float())
    state, a, b = unipc_init(cfg, sigmas), _start(), _start()
    s_state = sampler.state
    for k, t in enumerate(ts):
        a, state = unipc_step(state, _fake_model(a, t, k), a)
        b, s_state = sampler.step(s_state, _fake_model(b, t, k), b)
        assert torch.equal(a, b)
    shifted = make_sampler("unipc", cfg, n, shift=5.0)
    ref = timesteps_and_sigmas(dataclasses.replace(cfg, flow_shift=5.0), n)[1]
    assert torch.equal(shifted.sigmas, ref) and not torch.equal(shifted.sigmas, sigmas)


def test_euler_step_is_pure():
    s = make_sampler("euler", SchedulerConfig(), 3)
    x, v = _start(), torch.ones(SHAPE)
    out1, st1 = s.step(s.state, v, x)
    out2, _ = s.step(s.state, v.bfloat16(), x)
    assert s.state.index == 0 and st1.index == 1 and isinstance(st1, EulerState)
    assert torch.equal(out1, out2) and out1.dtype == torch.float32
    done = EulerState(s.sigmas, index=3)
    with pytest.raises(ValueError):
        euler_step(done, v, x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "ddim"},
        {"kind": "euler", "timesteps": []},
        {"kind": "euler", "timesteps": [1000, 934, 934]},
        {"kind": "euler", "timesteps": [500, 700]},
        {"kind": "euler", "timesteps": [1200, 500]},
        {"kind": "euler", "timesteps": [1000, 0]},
        {"kind": "euler", "timesteps": CAUSVID, "steps": 10},  # more steps than the list
        {"kind": "euler", "timesteps": CAUSVID, "steps": 0},
        {"kind": "euler", "timesteps": CAUSVID, "shift": 5.0},
        {"kind": "unipc", "timesteps": CAUSVID},
        {"kind": "euler", "shift": 0.0},
        {"kind": "euler", "steps": 0},
        {"kind": "unipc", "steps": None},
    ],
)
def test_bad_sampler_requests_raise(kwargs):
    kwargs = {"steps": 4, **kwargs}
    with pytest.raises(ValueError):
        make_sampler(kwargs.pop("kind"), SchedulerConfig(), kwargs.pop("steps"), **kwargs)


def test_sampler_is_frozen():
    s = make_sampler("euler", SchedulerConfig(), 2)
    assert isinstance(s, Sampler)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.kind = "unipc"


def _denoise(pipe, sampler, prompt, neg, latents, guidance):
    """The denoise loop of ``Pipeline.denoise`` driven by ``sampler`` (CFG as two forwards)."""
    from wanlite.runtime import planner

    place = planner.Placement("none", False, False, planner.Estimate(0, 0, 0))
    contexts, lengths = pipe.encode_texts([prompt, neg], place)
    dit = pipe.components["transformer"].acquire()
    texts = [dit.prepare_text(contexts[i : i + 1], lengths[i : i + 1]) for i in (0, 1)]
    state, seen = sampler.state, []
    for t in sampler.timesteps:
        temb = dit.time_embeddings(t.reshape(1), 1)
        cond, uncond = (dit.step(latents, temb, text) for text in texts)
        latents, state = sampler.step(state, uncond + guidance * (cond - uncond), latents)
        seen.append(latents)
    return seen


@pytest.mark.parametrize("shift", [3.0, 7.0])
def test_euler_in_wanpipeline_loop_matches_diffusers(tiny_pipe, diffusers_pipe, shift):
    # diffusers' WanPipeline with FlowMatchEulerDiscreteScheduler(shift) against our loop: the
    # timesteps the DiT sees and the latents after every step.
    from diffusers import WanPipeline

    from wanlite.frames import initial_noise

    ref_pipe = WanPipeline(
        **{**diffusers_pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift)}
    )
    prompt, neg, n, g, seed = "a red fox", "blurry", 4, 4.0, 11
    ref_ts, ref_lat = [], []

    def grab(pipe, i, t, kw):
        ref_ts.append(t.clone())
        ref_lat.append(kw["latents"].clone())
        return {}

    ref_pipe(
        prompt=prompt, negative_prompt=neg, height=32, width=32, num_frames=5,
        num_inference_steps=n, guidance_scale=g, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=grab,
    )  # fmt: skip
    sampler = make_sampler("euler", tiny_pipe.cfg.scheduler, n, shift=shift)
    ours = _denoise(tiny_pipe, sampler, prompt, neg, initial_noise((16, 2, 4, 4), seed), g)
    assert torch.equal(torch.stack(ref_ts), sampler.timesteps)
    diffs = [(a - b).abs().max().item() for a, b in zip(ref_lat, ours, strict=True)]
    print(f"euler shift={shift}: per-step latents max abs diff {max(diffs):.2e}")
    assert max(diffs) <= 1e-5
    # and the check can fail: the UniPC loop ends elsewhere
    other = _denoise(tiny_pipe, make_sampler("unipc", tiny_pipe.cfg.scheduler, n, shift=shift),
                     prompt, neg, initial_noise((16, 2, 4, 4), seed), g)  # fmt: skip
    assert (other[-1] - ref_lat[-1]).abs().max().item() > 1e-3
