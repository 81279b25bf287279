"""Flow-matching samplers: UniPC multistep (the Wan checkpoint's scheduler) and flow Euler.

Pure functions; the only state is a frozen dataclass threaded through ``unipc_step`` (so a
step can be replayed or inspected).  The results equal diffusers' ``UniPCMultistepScheduler`` in
the Wan configuration (use_flow_sigmas, prediction_type="flow_prediction", predict_x0,
timestep_spacing="linspace"): bit for bit on CPU in tests/test_scheduler.py.  The scalar
coefficients are computed in float32 on the CPU like diffusers', then applied as Python floats,
so the latents may live on any device.

Grid (n steps, N = num_train_timesteps, s = flow_shift; computed in float64 like diffusers)::

    u_i     = linspace(1, 1/N, n+1)[i]            i = 0..n-1
    sigma_i = s*u_i / (1 + (s-1)*u_i)             the SD3/Wan time shift; sigma_0 = 1
    sigma_0 = 1 - 1e-6                            keeps lambda_0 = log((1-sigma_0)/sigma_0) finite
    sigma_n = 0                                   final_sigmas_type="zero"
    t_i     = int64(N*sigma_i)  (truncated)       the DiT's timestep; e.g. n=4: 999, 900, 750, 500

sigmas are stored as float32 and every coefficient below is computed in float32 from them.

Flow matching: x = (1-sigma)*x0 + sigma*noise and the model predicts v = noise - x0, so::

    alpha = 1 - sigma,   x0 = x - sigma*v,   lambda = log(alpha/sigma)   (half log-SNR, rising)

UniPC (Zhao et al. 2023, arXiv:2302.04867), data-prediction form with B(h).  One update from
sigma_s to sigma_t (t = s+1) of x = x_s, with x0 predictions m_0 at s and m_k at s-k::

    h     = lambda_t - lambda_s,      r_k = (lambda_{s-k} - lambda_s)/h  (< 0),  r_p = 1
    D_k   = (m_k - m_0)/r_k
    base  = (sigma_t/sigma_s)*x + alpha_t*(1 - exp(-h))*m_0          (DDIM = DPM-Solver-1)
    B(h)  = exp(-h) - 1  (bh2)  or  -h  (bh1)
    g_i   = i! * z*phi_{i+1}(z) / B(h),  z = -h,  phi_k(z) = (e^z - sum_{j<k} z^j/j!) / z^k
    R_ij  = r_j^(i-1)                                                (i, j = 1..p)
    UniP-p (predictor):  x_t = base - alpha_t*B(h) * sum_{k<p} rho_k*D_k
                         rho = R[:p-1,:p-1]^-1 g[:p-1]    (rho = 1/2 for p = 2)
    UniC-p (corrector):  x_t = base - alpha_t*B(h) * (sum_{k<p} rho_k*D_k + rho_p*(m_t - m_0))
                         rho = R^-1 g                      (rho = 1/2 for p = 1)

Step i (the model was evaluated at x_i, sigma_i and returned v_i):
  1. m_i = x_i - sigma_i*v_i.
  2. Corrector (i > 0, i-1 not in disable_corrector): redo the update i-1 -> i from the same
     x_{i-1} with the same order, adding m_i as the point at r = 1.  This replaces x_i; m_i
     itself stays the one computed from the uncorrected x_i (UniC needs no extra model call).
  3. Predictor of order p_i = min(solver_order, i+1, n-i) (warm-up, lower_order_final).
At the last step sigma_n = 0: lambda = inf, exp(-h) = 0, p = 1, so x_n = m_{n-1} exactly.
(diffusers 0.42.1 returns NaN there for bh1: it multiplies B(h) = -inf by a zero correction.)

Flow Euler:  x_t = x_s + (sigma_t - sigma_s)*v, on one of two grids:

* ``"euler"``: diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` grid, which is not
  UniPC's.  Its constructor shifts the training grid once, in float32, and keeps the ends;
  ``set_timesteps`` then spaces n points between those ends and shifts them *again*::

      lo      = shift32(1/N)                             (float32; shift(u) = s*u/(1+(s-1)*u))
      u_i     = linspace(1, lo, n)[i]                    (float64)
      sigma_i = float32(shift(u_i)),  t_i = N*sigma_i    (float32, not truncated),  sigma_n = 0

* a fixed timestep list (e.g. CausVid's ``[1000, 934, 862, ...]``): sigma_i = t_i/N, no shift,
  and the DiT gets t_i as given.

``make_sampler`` puts these and the few-step samplers of the distilled models (``fewstep``:
``"dmd"``, ``"warp"``, ``"distill"``, ``"rcm"``) behind one interface (``Sampler``): timesteps
for the DiT, the start from the initial noise, an initial state and a pure
``step(state, model_output, sample) -> (sample, state)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..models.configs import SchedulerConfig
from . import fewstep
from .fewstep import FewStepState

_EPS = 1e-6  # diffusers' nudge of sigma_0 away from 1


def _check(cfg: SchedulerConfig) -> None:
    if cfg.solver_type not in ("bh1", "bh2"):
        raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {cfg.solver_type!r}")
    if not 1 <= cfg.solver_order <= 3:
        raise ValueError(f"solver_order must be 1, 2 or 3, got {cfg.solver_order}")
    if cfg.final_sigmas_type != "zero":
        raise ValueError("only final_sigmas_type='zero' is supported")
    if not cfg.lower_order_final:
        # With a final sigma of 0, a multistep last step divides by r_k = 0 (NaN in diffusers).
        raise ValueError("lower_order_final=False is not supported")
    if cfg.flow_shift <= 0 or cfg.num_train_timesteps < 1:
        raise ValueError("flow_shift and num_train_timesteps must be positive")


def timesteps_and_sigmas(cfg: SchedulerConfig, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT timesteps ``[n]`` (int64) and the sigma grid ``[n+1]`` (float32, last = 0).

    Equal to diffusers' ``set_timesteps(num_steps)`` ``timesteps`` and ``sigmas``."""
    _check(cfg)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    big_n, shift = cfg.num_train_timesteps, cfg.flow_shift
    u = np.linspace(1, 1 / big_n, num_steps + 1)[:-1]
    sigmas = shift * u / (1 + (shift - 1) * u)
    if abs(sigmas[0] - 1) < _EPS:
        sigmas[0] -= _EPS
    timesteps = torch.from_numpy(sigmas * big_n).to(torch.int64)  # truncation, as diffusers
    return timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def to_x0(sample: torch.Tensor, model_output: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean-sample estimate from a flow (velocity) prediction."""
    return sample - float(sigma) * model_output


@dataclass(frozen=True)
class UniPCState:
    """Everything UniPC carries between steps; never mutated (``unipc_step`` returns a new one)."""

    sigmas: torch.Tensor  # [n+1] float32 grid on the CPU
    solver_order: int = 2
    bh2: bool = True
    disable_corrector: tuple[int, ...] = ()
    index: int = 0  # the step to take next: the model has been evaluated at sigmas[index]
    x0s: tuple[torch.Tensor, ...] = ()  # x0 predictions at sigmas[index-len(x0s):index]
    last_sample: torch.Tensor | None = None  # x_{index-1}: where the last predictor started
    last_order: int = 0  # the order of that predictor (the corrector reuses it)


def unipc_init(cfg: SchedulerConfig, sigmas: torch.Tensor) -> UniPCState:
    """A fresh UniPC state for the grid from ``timesteps_and_sigmas``."""
    _check(cfg)
    return UniPCState(
        sigmas=sigmas.detach().to("cpu", torch.float32),
        solver_order=cfg.solver_order,
        bh2=cfg.solver_type == "bh2",
        disable_corrector=tuple(cfg.disable_corrector),
    )


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def _unipc_update(
    st: UniPCState,
    s: int,
    x: torch.Tensor,
    x0s: tuple[torch.Tensor, ...],
    order: int,
    m_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP-``order`` from sigmas[s] to sigmas[s+1] (x0s[-1] at s, x0s[-1-k] at s-k); with
    ``m_t`` (the x0 prediction at s+1) it is UniC-``order`` instead."""
    sig = st.sigmas
    sigma_s, sigma_t = sig[s], sig[s + 1]
    alpha_t = 1 - sigma_t
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    z = -h
    h_phi_1 = torch.expm1(z)
    b_h = h_phi_1 if st.bh2 else z
    rks = [(_lam(sig[s - k]) - lam_s) / h for k in range(1, order)] + [torch.ones(())]
    g, phi, fact = [], h_phi_1 / z - 1, 1
    for i in range(1, order + 1):
        g.append(phi * fact / b_h)
        fact *= i + 1
        phi = phi / z - 1 / fact
    big_r, g = torch.stack([torch.stack(rks) ** i for i in range(order)]), torch.stack(g)

    m0 = x0s[-1]
    diffs = [(x0s[-1 - k] - m0) / rks[k - 1].item() for k in range(1, order)]
    if m_t is None:  # predictor
        rho = [0.5] if order == 2 else torch.linalg.solve(big_r[:-1, :-1], g[:-1]).tolist()
    else:  # corrector
        rho = [0.5] if order == 1 else torch.linalg.solve(big_r, g).tolist()
        diffs.append(m_t - m0)
    out = (sigma_t / sigma_s).item() * x - (alpha_t * h_phi_1).item() * m0
    if diffs:
        res = sum(r * d for r, d in zip(rho, diffs, strict=True))
        out = out - (alpha_t * b_h).item() * res
    return out


def unipc_step(
    state: UniPCState, model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, UniPCState]:
    """One UniPC step: the model's flow prediction at ``sample`` (sigmas[state.index]) ->
    (the fp32 sample at the next sigma, the new state).  Inputs are upcast to fp32."""
    i, n = state.index, len(state.sigmas) - 1
    if i >= n:
        raise ValueError(f"all {n} steps have been taken")
    x = sample.float()
    m_i = to_x0(x, model_output.float(), state.sigmas[i].item())
    if state.last_sample is not None and i - 1 not in state.disable_corrector:
        x = _unipc_update(state, i - 1, state.last_sample, state.x0s, state.last_order, m_i)
    x0s = (*state.x0s, m_i)[-state.solver_order :]
    order = min(state.solver_order, i + 1, n - i)
    prev = _unipc_update(state, i, x, x0s, order)
    new = dataclasses.replace(state, index=i + 1, x0s=x0s, last_sample=x, last_order=order)
    return prev, new


# --- flow Euler ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EulerState:
    """Flow Euler's only state: the grid and the step to take next."""

    sigmas: torch.Tensor  # [n+1] float32 on the CPU, last = 0
    index: int = 0


def _shift(u, s: float):
    return s * u / (1 + (s - 1) * u)


def euler_timesteps_and_sigmas(
    cfg: SchedulerConfig, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT timesteps ``[n]`` (float32) and sigmas ``[n+1]`` (float32, last = 0) of
    diffusers' ``FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)`` (see the module doc)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if cfg.flow_shift <= 0 or cfg.num_train_timesteps < 1:
        raise ValueError("flow_shift and num_train_timesteps must be positive")
    big_n, s = cfg.num_train_timesteps, cfg.flow_shift
    # The constructor's ends, in float32 torch arithmetic like diffusers' (sigma_max = 1).
    lo = _shift(torch.tensor(1.0, dtype=torch.float32) / big_n, s).item()
    hi = _shift(torch.tensor(float(big_n), dtype=torch.float32) / big_n, s).item()
    u = np.linspace(hi * big_n, lo * big_n, num_steps) / big_n
    sigmas = torch.from_numpy(_shift(u, s)).to(torch.float32)
    return sigmas * big_n, torch.cat([sigmas, torch.zeros(1)])


def fixed_timesteps_and_sigmas(
    cfg: SchedulerConfig, timesteps, num_steps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A given timestep list (strictly decreasing, in (0, N]), cut to ``num_steps``: the DiT
    timesteps as given (float32) and sigmas = t/N, then 0."""
    ts = [float(t) for t in timesteps]
    big_n = cfg.num_train_timesteps
    if not ts:
        raise ValueError("the timestep list is empty")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"the timestep list must be strictly decreasing, got {ts}")
    if not 0 < ts[-1] <= ts[0] <= big_n:
        raise ValueError(f"timesteps must lie in (0, {big_n}], got {ts}")
    if num_steps is not None:
        if not 1 <= num_steps <= len(ts):
            raise ValueError(f"{num_steps} steps asked for, the timestep list has {len(ts)}")
        ts = ts[:num_steps]
    t = torch.tensor(ts, dtype=torch.float32)
    return t, torch.cat([t / big_n, torch.zeros(1)])


def euler_step(
    state: EulerState, model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, EulerState]:
    """x + (sigma_next - sigma)*v in fp32 (the difference taken in float32, as diffusers)."""
    i, sig = state.index, state.sigmas
    if i >= len(sig) - 1:
        raise ValueError(f"all {len(sig) - 1} steps have been taken")
    dt = (sig[i + 1] - sig[i]).item()
    out = sample.float() + dt * model_output.float()
    return out, dataclasses.replace(state, index=i + 1)


# --- one interface for the pipeline --------------------------------------------------------------

SAMPLERS = ("unipc", "euler")  # what ``Options.sampler`` may name
# The few-step kinds (presets name them): (grid, fresh noise at each step).
FEWSTEP = {"dmd": ("dmd", True), "warp": ("warp", True), "distill": ("warp", False)}
FEWSTEP_KINDS = (*FEWSTEP, "rcm")


@dataclass(frozen=True)
class Sampler:
    """A sampler for one generation: ``timesteps`` [n] float32 for the DiT's time embedding,
    ``sigmas`` [n+1], the initial ``state``, a pure ``step`` and ``init_scale`` (the first
    sample is ``init_scale * noise``: 1, or rCM's s_0)."""

    kind: str
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    state: UniPCState | EulerState | FewStepState
    init_scale: float = 1.0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """The first sample from the request's initial noise."""
        return noise if self.init_scale == 1.0 else noise * self.init_scale

    def step(self, state, model_output: torch.Tensor, sample: torch.Tensor):
        """(the fp32 sample at the next sigma, the new state); ``state`` is not modified."""
        if isinstance(state, UniPCState):
            return unipc_step(state, model_output, sample)
        if isinstance(state, FewStepState):
            return fewstep.fewstep_step(state, model_output, sample)
        return euler_step(state, model_output, sample)


def _fewstep_sampler(kind, cfg, steps, shift, timesteps, seed) -> Sampler:
    if kind == "rcm":
        if shift is not None or timesteps is not None:
            raise ValueError("the rcm sampler has its own grid: no shift or timestep list")
        ts, sigmas = fewstep.rcm_grid(4 if steps is None else steps)
        state = fewstep.fewstep_state(sigmas, True, seed)
        return Sampler(kind, ts, sigmas, state, init_scale=sigmas[0].item())
    if timesteps is None:
        raise ValueError(f"the {kind} sampler needs its step list (timesteps)")
    grid, renoise = FEWSTEP[kind]
    k = cfg.flow_shift if shift is None else float(shift)
    make = fewstep.dmd_grid if grid == "dmd" else fewstep.warp_grid
    ts, sigmas = make(timesteps, k, steps)
    return Sampler(kind, ts, sigmas, fewstep.fewstep_state(sigmas, renoise, seed))


def make_sampler(
    kind: str,
    cfg: SchedulerConfig,
    steps: int | None,
    shift: float | None = None,
    timesteps=None,
    seed: int | None = None,
) -> Sampler:
    """``"unipc"`` (the checkpoint's scheduler) or ``"euler"`` for ``steps`` steps; ``shift``
    overrides ``cfg.flow_shift``.  With ``timesteps`` (``"euler"`` only) the grid is that list
    cut to ``steps`` (None: all of it), unshifted, so ``shift`` is refused there.

    The few-step kinds (``fewstep``): ``"dmd"`` / ``"warp"`` / ``"distill"`` take the recipe's
    step list (``timesteps``, cut to ``steps``) mapped with ``shift`` (default
    ``cfg.flow_shift``); ``"rcm"`` its own grid for 1-4 steps.  Those that re-noise need the
    request's ``seed``."""
    if kind not in (*SAMPLERS, *FEWSTEP_KINDS):
        known = ", ".join((*SAMPLERS, *FEWSTEP_KINDS))
        raise ValueError(f"unknown sampler {kind!r}; choose one of {known}")
    if shift is not None and not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if kind in FEWSTEP_KINDS:
        return _fewstep_sampler(kind, cfg, steps, shift, timesteps, seed)
    if shift is not None:
        cfg = dataclasses.replace(cfg, flow_shift=float(shift))
    if timesteps is not None:
        if kind != "euler":
            raise ValueError(f"a timestep list needs the euler sampler, not {kind!r}")
        if shift is not None:
            raise ValueError("shift does not apply to a fixed timestep list")
        ts, sigmas = fixed_timesteps_and_sigmas(cfg, timesteps, steps)
        return Sampler(kind, ts, sigmas, EulerState(sigmas))
    if steps is None:
        raise ValueError(f"the {kind} sampler needs a step count")
    if kind == "euler":
        ts, sigmas = euler_timesteps_and_sigmas(cfg, steps)
        return Sampler(kind, ts, sigmas, EulerState(sigmas))
    ts, sigmas = timesteps_and_sigmas(cfg, steps)
    return Sampler(kind, ts.to(torch.float32), sigmas, unipc_init(cfg, sigmas))


__all__ = [
    "FEWSTEP_KINDS",
    "SAMPLERS",
    "EulerState",
    "Sampler",
    "UniPCState",
    "euler_step",
    "euler_timesteps_and_sigmas",
    "fixed_timesteps_and_sigmas",
    "make_sampler",
    "timesteps_and_sigmas",
    "to_x0",
    "unipc_init",
    "unipc_step",
]
