"""The CFG branches of one generation, each with its prepared text and step-cache policy: what
the denoising loop (``pipeline.Pipeline.denoise``) runs the DiT through at every step."""

from __future__ import annotations

import torch

from ..models.dit import NagText, TextState
from ..ops.nag import NAG
from . import stepcache


class Branches:
    """The CFG branches of one generation: prepared text and a step-cache policy per branch.

    "cond" and "uncond" run one prompt each; "both" runs them as one batch of 2.  Each is made
    on first use (so sequential CFG never builds the batched text, and the other way round).
    With ``nag`` (``wanlite.ops.nag.NAG``), "cond" and row 0 of "both" get NAG against the negative
    prompt (``contexts[1]``), whose text state (and so its per-block K/V) is prepared once and
    shared by every branch, the unconditional one included."""

    def __init__(
        self,
        dit,
        contexts: torch.Tensor,
        lengths: list[int],
        cache: str,
        threshold,
        parallel=None,
        nag: NAG | None = None,
    ):
        self.dit, self.contexts, self.lengths = dit, contexts, lengths
        self.cache, self.threshold = cache, threshold
        self.nag = nag
        self.negative: TextState | None = None
        # CFG-parallel (``runtime.parallel``): "both" runs this rank's pass and gathers the pair.
        self.parallel = parallel
        self.split = parallel is not None and parallel.cfg == 2
        self.state: dict[str, tuple] = {}
        self.forwards = self.skipped = 0
        self.step: int | None = None  # the step index of the next ``run``
        self.schedule: torch.Tensor | None = None  # the time embeddings, on the host

    def set_schedule(self, e: torch.Tensor) -> None:
        """TeaCache decides from the time embeddings e [steps, D]: read back once, here, so
        that its decisions never wait for the device (``stepcache``)."""
        if self.cache == "teacache":
            self.schedule = e.float().cpu()

    def _make(self, name: str) -> tuple:
        rows = {"cond": slice(0, 1), "uncond": slice(1, 2), "both": slice(0, 2)}[name]
        if name == "both" and self.split:
            rows = slice(self.parallel.cfg_rank, self.parallel.cfg_rank + 1)
        if rows == slice(1, 2):
            text = self._negative()
        else:
            text = self.dit.prepare_text(self.contexts[rows], self.lengths[rows])
            if self.nag is not None and rows.start == 0:  # row 0 is the conditional one
                text.nag = NagText(self.nag, self._negative())
        make = stepcache.make if self.parallel is None else self.parallel.make_cache
        cache = make(self.cache, self.threshold)
        if self.schedule is not None and isinstance(cache, stepcache.TeaCache):
            cache.set_schedule(self.schedule)
        return text, cache

    def _negative(self) -> TextState:
        """The negative prompt's text state, made once (and its K/V once per block)."""
        if self.negative is None:
            self.negative = self.dit.prepare_text(self.contexts[1:2], self.lengths[1:2])
        return self.negative

    def run(self, name: str, x: torch.Tensor, temb, last: bool) -> torch.Tensor:
        if name not in self.state:
            self.state[name] = self._make(name)
        text, cache = self.state[name]
        width = 2 if name == "both" else 1  # branch forwards per call
        self.forwards += width
        split = name == "both" and self.split
        if split:
            x = x[self.parallel.cfg_rank : self.parallel.cfg_rank + 1]
        self.dit.step_index = self.step or 0  # radial attention's dense first steps
        if cache is None:
            out = self.dit.step(x, temb, text)
        else:
            cache.last, cache.step, skipped = last, self.step, cache.skipped
            out = self.dit.step(x, temb, text, cache)
            self.skipped += width * (cache.skipped - skipped)
        return self.parallel.gather_cfg(out) if split else out

    def counts(self) -> dict[str, int]:
        """DiT forwards by branch (a batched pair counts 2), and how many the cache skipped."""
        return {"dit_forwards": self.forwards, "dit_forwards_skipped": self.skipped}
