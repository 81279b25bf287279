"""Few-step samplers of the distilled Wan2.1 1.3B models: their step grids and update rules.

Pure functions; the only state is a frozen ``FewStepState``.  Notation as in ``scheduler``:
flow sigma s, ``x_s = (1-s) x0 + s eps``, the DiT predicts ``v = eps - x0``, so
``x0 = x - s v``; the DiT is fed a timestep t (about ``1000 s``), and
``shift(u, k) = k u / (1 + (k-1) u)``.

Every recipe here predicts x0 at each step and moves it to the next sigma s' (the last s' = 0
returns x0 itself):

* re-noise (DMD: FastWan, Self-Forcing, CausVid; rCM): ``x = (1-s') x0 + s' eps_fresh``;
* deterministic (LightX2V's step distill since 2025-11): ``x = x0 + s' v``.

The fresh noise continues the request's random stream: the pipeline draws the initial noise as
the first ``randn`` of a CPU generator seeded with the seed (``pipeline.initial_noise``); step i
draws the (i+2)-th, of the same shape.  The generator's state is carried in the frozen state, so
a step can be replayed; the published code draws from its request generator the same way.

Grids (N = 1000 training timesteps; each cites the code it transcribes, see
tests/test_scheduler.py):

``"dmd"`` (FastVideo ``DmdDenoisingStage``, FastWan): the step list is fed to the DiT as given
    (integers, e.g. [1000, 757, 522]); its sigmas are looked up on the training grid of
    ``FlowMatchEulerDiscreteScheduler(shift=k)``: ``u_j = linspace(1, N, N)[::-1] / N`` (float32),
    ``s_j = shift(u_j, k)``, ``t_j = N s_j``; sigma(t) = ``s_j`` of the ``t_j`` nearest to t.
    757 -> 0.756757, 522 -> 0.521739 at k = 8.
``"warp"`` (Self-Forcing ``CausalInferencePipeline`` with ``warp_denoising_step``; LightX2V
    ``WanStepDistillScheduler``): ``s_j = shift(linspace(1, 0, N+1)[:-1][j], k)`` (float32),
    step t -> index N - t: sigma ``s_{N-t}``, and the DiT is fed ``N s_{N-t}`` (float).
    [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625] at k = 5.
``"rcm"`` (NVlabs/rcm ``wan2pt1_t2v_rcm_infer.py``): TrigFlow angles
    ``[atan(sigma_max), *mid_t[:n-1], 0]`` (float64), ``s = sin / (sin + cos)``; the DiT is fed
    ``N s`` rounded to bfloat16 as there (988, 932, 852, 608 for 4 steps); the start is
    ``s_0 eps``, not eps (``FewStepState.init_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

N_TRAIN = 1000
RCM_MID_T = (1.5, 1.4, 1.0)  # rCM's angles for steps 2..4 ("for better visual quality")
RCM_SIGMA_MAX = 80.0
GRIDS = ("dmd", "warp", "rcm")


def shift(u, k: float):
    return k * u / (1 + (k - 1) * u)


def _check_list(timesteps, steps: int | None) -> list[int]:
    ts = [float(t) for t in timesteps]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or not 0 < ts[-1] <= ts[0] <= N_TRAIN:
        raise ValueError(f"the step list must decrease strictly within (0, {N_TRAIN}], got {ts}")
    if any(t != int(t) for t in ts):
        raise ValueError(f"the step list holds training timesteps (integers), got {ts}")
    if steps is not None:
        if not 1 <= steps <= len(ts):
            raise ValueError(f"{steps} steps asked for, the recipe's step list has {len(ts)}")
        ts = ts[:steps]
    return [int(t) for t in ts]


def dmd_grid(timesteps, k: float, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(DiT timesteps [n] float32, sigmas [n+1] float32, last 0) of FastVideo's DMD stage."""
    ts = _check_list(timesteps, steps)
    u = torch.from_numpy(np.linspace(1, N_TRAIN, N_TRAIN, dtype=np.float32)[::-1].copy())
    s = shift(u / N_TRAIN, k)  # float32, as the scheduler's constructor
    grid_t = (s * N_TRAIN).double()
    idx = (grid_t[None] - torch.tensor(ts, dtype=torch.float64)[:, None]).abs().argmin(1)
    return torch.tensor(ts, dtype=torch.float32), torch.cat([s[idx], torch.zeros(1)])


def warp_grid(timesteps, k: float, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(DiT timesteps [n] float32, sigmas [n+1] float32, last 0) of the warped step list."""
    ts = _check_list(timesteps, steps)
    s = shift(torch.linspace(1.0, 0.0, N_TRAIN + 1)[:-1], k)  # float32
    idx = torch.tensor([N_TRAIN - t for t in ts])
    return s[idx] * N_TRAIN, torch.cat([s[idx], torch.zeros(1)])


def rcm_grid(
    steps: int, sigma_max: float = RCM_SIGMA_MAX, mid_t=RCM_MID_T
) -> tuple[torch.Tensor, torch.Tensor]:
    """(DiT timesteps [n] float32 (bf16-rounded), sigmas [n+1] float32, last 0) of rCM."""
    if not 1 <= steps <= len(mid_t) + 1:
        raise ValueError(f"rCM samples in 1 to {len(mid_t) + 1} steps, got {steps}")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    angles = torch.tensor([math.atan(sigma_max), *mid_t[: steps - 1], 0.0], dtype=torch.float64)
    s = torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))
    t = (s[:-1].float() * N_TRAIN).to(torch.bfloat16).float()
    return t, s.float()


@dataclass(frozen=True)
class FewStepState:
    """The grid, the update rule and the random stream position; never mutated."""

    sigmas: torch.Tensor  # [n+1] float32 on the CPU, last = 0
    renoise: bool  # True: fresh noise at each step (DMD, rCM); False: x0 + s' v
    seed: int | None = None  # the request's seed (needed when renoise)
    index: int = 0
    rng: torch.Tensor | None = None  # CPU generator state after the last draw (None: seed's)


def _fresh_noise(state: FewStepState, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next fp32 draw of the request's stream, shaped like ``like``; (noise, new rng)."""
    g = torch.Generator("cpu")
    if state.rng is None:  # right after the initial noise: replay that one draw
        g.manual_seed(state.seed)
        torch.randn(like.shape, generator=g, dtype=torch.float32)
    else:
        g.set_state(state.rng)
    eps = torch.randn(like.shape, generator=g, dtype=torch.float32)
    return eps.to(like.device), g.get_state()


def fewstep_step(
    state: FewStepState, model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, FewStepState]:
    """x0 = x - s v (fp32); then the next sample: (1-s') x0 + s' eps, or x0 + s' v; x0 at the
    end.  ``state`` is not modified."""
    i, sig = state.index, state.sigmas
    if i >= len(sig) - 1:
        raise ValueError(f"all {len(sig) - 1} steps have been taken")
    v = model_output.float()
    x0 = sample.float() - sig[i].item() * v
    s_next, rng = sig[i + 1].item(), state.rng
    if s_next == 0:
        out = x0
    elif state.renoise:
        eps, rng = _fresh_noise(state, x0)
        out = (1 - s_next) * x0 + s_next * eps
    else:
        out = x0 + v * s_next
    return out, dataclasses.replace(state, index=i + 1, rng=rng)


def fewstep_state(sigmas: torch.Tensor, renoise: bool, seed: int | None) -> FewStepState:
    if renoise and seed is None:
        raise ValueError("a re-noising few-step sampler needs the request's seed")
    return FewStepState(sigmas.detach().to("cpu", torch.float32), renoise, seed)


__all__ = [
    "GRIDS",
    "FewStepState",
    "dmd_grid",
    "fewstep_state",
    "fewstep_step",
    "rcm_grid",
    "warp_grid",
]
