"""Causal (frame-autoregressive) generation with a KV cache: the chunk loop as a generator.

A causal Wan DiT (Self-Forcing, guandeh17/Self-Forcing; CausVid's causal checkpoint) has the
1.3B architecture and weights of the same names, trained so that each chunk of latent frames
attends only to itself and the frames before it.  Generation, as Self-Forcing's
``pipeline/causal_inference.py`` (``CausalInferencePipeline.inference``) does it:

    for each chunk of ``chunk_frames`` latent frames (its slice of the initial noise):
        for each step t_i of the warped step list (``sampling.fewstep.warp_grid``):
            v = DiT(x, t_i; cached K/V of earlier frames)           # flow prediction
            x0 = x - sigma_i v                                      # x0 prediction
            x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_fresh        # re-noise (not after the last)
        DiT(x0, t = context_noise) once more: its K/V become the chunk's cache entry
        yield the chunk's x0 (decoded and shown while the next chunk is made)

No CFG (the models are distilled at guidance 1), and the prompt's cross-attention K/V are
computed once (``TextState.kv``).  The last chunk's clean rerun is skipped: nothing attends to
it, so the output is the same with one forward fewer.

Frame counts: the request's latent frames are rounded up to whole chunks, generated, and the
decoded frames trimmed to the request (the model is trained on whole chunks).  Fresh noise is
drawn from the request's CPU generator after the initial noise, in order, so a seed gives the
same video on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .models.dit import TextState, WanDiT
from .runtime.kvcache import KVCache
from .sampling.fewstep import warp_grid


@dataclass(frozen=True)
class CausalRecipe:
    """Self-Forcing's published inference settings (configs/self_forcing_dmd.yaml and
    default_config.yaml): 3 latent frames per chunk, the step list [1000, 750, 500, 250]
    warped through the shift-5 schedule, the clean rerun at timestep 0."""

    chunk_frames: int = 3
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    context_noise: int = 0

    def grid(self, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(DiT timesteps [n], sigmas [n + 1] ending in 0) of ``steps`` (None: all) steps."""
        return warp_grid(self.timesteps, self.shift, steps)

    def chunks(self, latent_frames: int) -> list[int]:
        """Chunk sizes covering ``latent_frames`` rounded up to whole chunks."""
        return [self.chunk_frames] * math.ceil(latent_frames / self.chunk_frames)


SELF_FORCING = CausalRecipe()


def causal_chunks(
    dit: WanDiT,
    text: TextState,
    noise: torch.Tensor,
    generator: torch.Generator,
    recipe: CausalRecipe = SELF_FORCING,
    steps: int | None = None,
    window: int | None = None,
    sink: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each chunk's x0 latents [B, C, n, h, w] (fp32, on the DiT's device) in order.

    ``noise`` [B, C, frames, h, w] fp32 is the whole video's initial noise (frames a multiple of
    the chunk size); ``generator`` (CPU) continues the request's random stream for the fresh
    noise of each re-noising step.  ``window`` / ``sink`` (latent frames): the rolling KV window
    and attention sinks (``runtime.kvcache``).  ``on_step(done, total)`` counts DiT forwards."""
    timesteps, sigmas = recipe.grid(steps)
    device, dtype = dit.patch_embedding.weight.device, dit.patch_embedding.weight.dtype
    b, _, frames, h, w = noise.shape
    chunks = recipe.chunks(frames)
    if sum(chunks) != frames:
        raise ValueError(f"{frames} latent frames are not whole chunks of {recipe.chunk_frames}")
    patch = dit.cfg.patch_size
    kv = KVCache(len(dit.blocks), (h // patch[1]) * (w // patch[2]), frames, window, sink)
    # The time embeddings of the steps and of the clean rerun, once: [n + 1, D], [n + 1, 6, D].
    t_all = torch.cat([timesteps, torch.tensor([float(recipe.context_noise)])]).to(device)
    e, e0 = dit.time_embeddings(t_all, len(t_all))
    total = len(chunks) * (len(timesteps) + 1) - 1
    done, start = 0, 0
    for c, n in enumerate(chunks):
        kv.begin_chunk(n)
        x = noise[:, :, start : start + n].to(device)
        for i in range(len(timesteps)):
            v = dit.step(x.to(dtype), (e[i : i + 1], e0[i : i + 1]), text, kv=kv).float()
            x0 = x - sigmas[i].item() * v
            s_next = sigmas[i + 1].item()
            if s_next > 0:  # Self-Forcing's scheduler.add_noise(x0, randn, t_{i+1})
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
                x = (1 - s_next) * x0 + s_next * eps.to(device)
            done += 1
            if on_step is not None:
                on_step(done, total)
        if c < len(chunks) - 1:  # the clean rerun: this chunk's K/V for the next ones
            dit.step(x0.to(dtype), (e[-1:], e0[-1:]), text, kv=kv)
            done += 1
            if on_step is not None:
                on_step(done, total)
        kv.commit()
        start += n
        yield x0
