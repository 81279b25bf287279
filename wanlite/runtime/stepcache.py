"""Step caching: skip the DiT's blocks at steps where their output would barely change.

Consecutive denoising steps feed the blocks similar inputs, so their total residual
(output - input of the 30 blocks) changes slowly.  A policy decides at each forward whether to
run the blocks or to add the residual kept from the last step that ran them.  One policy object
per CFG branch (conditional, unconditional, or the batched pair): the residuals differ per
branch.  Memory: one residual [B, L, D] in the stream dtype per branch (~200 MB fp32 at 480P).

- ``TeaCache`` (Liu et al., "Timestep Embedding Tells: It's Time to Cache"): the signal is the
  relative L1 change of the time embedding ``e`` between forwards, rescaled by a polynomial fitted
  on the real Wan2.1-T2V-1.3B weights (TeaCache4Wan2.1's coefficients for that model) and
  accumulated; the blocks run again when the sum reaches the threshold (then it restarts at 0).
  Higher thresholds skip more.  The polynomial only means something for weights like the real
  model's: with random weights the time embedding changes ~100% per step and nothing is skipped
  at thresholds near the default.
- ``FirstBlockCache`` (as in ParaAttention / diffusers' FirstBlockCache): block 0 always runs; if
  its residual differs from the one at the last full step by less than ``threshold`` (relative
  L1), the other 29 blocks are skipped and their kept residual is added.  The signal comes from
  the latents themselves, so it adapts to the content.

The first and the last step always run the blocks (no residual yet; the last step sets the fine
detail).  TeaCache's signal depends only on the schedule and the time-embedding weights: the
pipeline hands it the whole schedule's embeddings once, on the host (``schedule``, read back
before the loop), and the step index before each forward (``step``), so its decisions never
wait for the GPU.  Called without a schedule (``dit.step`` directly), it reads the embedding
back: one sync per forward.  The first-block cache's signal comes from the latents: one scalar
read back per forward, by design.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MODES = ("off", "teacache", "firstblock")
DEFAULT_THRESHOLD = {"teacache": 0.08, "firstblock": 0.05}
# TeaCache4Wan2.1, Wan2.1-T2V-1.3B, time-embedding signal (numpy.poly1d order, highest first).
TEACACHE_COEFFICIENTS = (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975, 1.37887774e-1)


def relative_l1(now: Tensor, before: Tensor) -> float:
    return float((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12))


class StepCache:
    """Base policy: counts forwards and skips; ``last`` marks the final step (always run)."""

    def __init__(self, threshold: float):
        if not threshold >= 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold!r}")
        self.threshold = threshold
        self.forwards = self.skipped = 0
        self.last = False
        self.step: int | None = None  # the step index of the next forward, when known
        self.residual: Tensor | None = None

    def __call__(self, dit, h: Tensor, temb, text, rope) -> Tensor:
        raise NotImplementedError


class TeaCache(StepCache):
    def __init__(self, threshold: float, coefficients=TEACACHE_COEFFICIENTS):
        super().__init__(threshold)
        self.rescale = np.poly1d(coefficients)
        self.previous: Tensor | None = None
        self.accumulated = 0.0
        # The schedule's time embeddings e [steps, D] fp32 on the host (``set_schedule``)
        self.schedule: Tensor | None = None

    def set_schedule(self, e: Tensor) -> None:
        """The time embeddings of every step, [steps, D], moved to the host once."""
        self.schedule = e.detach().float().cpu()

    def __call__(self, dit, h: Tensor, temb, text, rope) -> Tensor:
        self.forwards += 1
        host = self.schedule is not None and self.step is not None
        e = self.schedule[self.step] if host else temb[0]
        run = self.previous is None or self.residual is None or self.last
        if not run:
            self.accumulated += float(self.rescale(relative_l1(e, self.previous)))
            run = self.accumulated >= self.threshold
        self.previous = e
        if not run:
            self.skipped += 1
            return h.add_(self.residual) if h.dtype == torch.float32 else h + self.residual
        self.accumulated = 0.0
        start = h.clone()
        h = dit.run_blocks(h, temb[1], text, rope)
        self.residual = h - start
        return h


class FirstBlockCache(StepCache):
    def __init__(self, threshold: float):
        super().__init__(threshold)
        self.first: Tensor | None = None  # block 0's residual at the last full step

    def _distance(self, dit, first: Tensor) -> float:
        """The skip signal: block 0's residual against the last full step's (relative L1).
        ``parallel.AgreedFirstBlockCache`` sums it over the ranks instead."""
        return relative_l1(first, self.first)

    def __call__(self, dit, h: Tensor, temb, text, rope) -> Tensor:
        self.forwards += 1
        start = h.clone()
        h = dit.run_blocks(h, temb[1], text, rope, stop=1)
        first = h - start
        skip = (
            self.first is not None
            and self.residual is not None
            and not self.last
            and self._distance(dit, first) < self.threshold
        )
        if skip:
            self.skipped += 1
            return h.add_(self.residual) if h.dtype == torch.float32 else h + self.residual
        self.first = first
        start = h.clone()
        h = dit.run_blocks(h, temb[1], text, rope, start=1)
        self.residual = h - start
        return h


def make(mode: str, threshold: float | None = None) -> StepCache | None:
    """A fresh policy for one branch of one generation (None for ``"off"``)."""
    if mode not in MODES:
        raise ValueError(f"cache must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    t = DEFAULT_THRESHOLD[mode] if threshold is None else threshold
    return TeaCache(t) if mode == "teacache" else FirstBlockCache(t)
