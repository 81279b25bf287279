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
        yield the chunk's x0 (decoded and shown before the next chunk is made)
        DiT(x0, t = context_noise) once more: its K/V become the chunk's cache entry

No CFG (the models are distilled at guidance 1), and the prompt's cross-attention K/V are
computed once (``TextState.kv``).  The last chunk's clean rerun is skipped: nothing attends to
it, so the output is the same with one forward fewer.  Each chunk is yielded before its rerun
(the original runs the rerun first and decodes the whole video at the end): the rerun changes
nothing in the chunk, so a stream shows it one forward (a fifth of the chunk's work) sooner.

Frame counts: the request's latent frames are rounded up to whole chunks, generated, and the
decoded frames trimmed to the request (the model is trained on whole chunks).  Fresh noise is
drawn from the request's CPU generator after the initial noise, in order, so a seed gives the
same video on every device.

``CausalCalls`` holds the ``Pipeline`` methods of a causal model (``Pipeline`` inherits them):
``stream()``, and ``generate()``'s causal branch, which returns the streamed chunks in one piece.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .frames import Plan, as_output, check_output, counted, model_label, to_float, to_uint8
from .models.dit import TextState, WanDiT
from .models.vae import StreamDecoder
from .params import GenerationParams, ParamError, fields, validate
from .runtime import planner
from .runtime.kvcache import KVCache
from .runtime.memory import CallMeter
from .sampling.fewstep import warp_grid
from .video import Video, made_by, write_mp4


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
        last = c == len(chunks) - 1
        clean = None if last else x0.to(dtype, copy=True)  # the rerun's input, not the caller's
        # Yielded before the clean rerun, which only later chunks need: a stream shows each
        # chunk one forward sooner (the same forwards and the same frames as the rerun first).
        yield x0
        if not last:  # the clean rerun: this chunk's K/V for the next ones
            dit.step(clean, (e[-1:], e0[-1:]), text, kv=kv)
            done += 1
            if on_step is not None:
                on_step(done, total)
        kv.commit()
        start += n


class CausalCalls:
    """The calls of a ``Pipeline`` on a causal model (mixed into ``wanlite.pipeline.Pipeline``,
    whose placement, encoding and weights they use): ``stream()``, and ``generate()``'s causal
    branch, which returns the streamed chunks in one piece."""

    def stream(
        self,
        prompt: str,
        height: int = 480,
        width: int = 640,
        num_frames: int = 81,
        seed: int | None = None,
        negative_prompt: str = " ",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        *,
        progress: bool = True,
    ) -> Iterator[np.ndarray]:
        """A causal model's video as it is made: uint8 frames [f, height, width, 3], one chunk
        at a time, each as soon as it is denoised and decoded (``wanlite.causal``).  The causal
        VAE keeps its cache between chunks, so the frames equal ``generate()``'s.  Parameters
        as ``generate``'s, except ``num_frames``: up to ``self.max_stream_frames`` (memory stays
        flat past ``kv_window`` latent frames); ``num_inference_steps`` 1-4 (default 4) and
        ``guidance_scale`` 1 (the models are distilled without CFG); ``negative_prompt`` is
        unused.  ``video.seed`` of ``generate`` is ``self.last_seed`` here."""
        kw = dict(prompt=prompt, height=height, width=width, negative_prompt=negative_prompt)
        kw |= dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        p, seed, steps = self._causal_request(
            kw | {"seed": seed}, num_frames, self.max_stream_frames
        )
        return self._stream(p, seed, steps, progress, to_uint8)

    @property
    def max_stream_frames(self) -> int:
        """The longest ``stream()``: RoPE's positions (``rope_max_seq_len`` latent frames)."""
        return 1 + self.cfg.vae.temporal_stride * (self.cfg.dit.rope_max_seq_len - 1)

    def _causal_request(self, kw: dict, num_frames, max_frames: int):
        if not self.causal:
            raise ValueError(
                "stream() needs a causal checkpoint (Self-Forcing, CausVid: pass its .pt as "
                "transformer=, or causal=True)"
            )
        steps, guidance = kw.pop("num_inference_steps"), kw.pop("guidance_scale")
        kw |= dict(
            num_inference_steps=steps or 1, guidance_scale=1.0 if guidance is None else guidance
        )
        p = validate(**kw, num_frames=1, limits=self.options.limits)  # all but the frames
        bad = isinstance(num_frames, bool) or not isinstance(num_frames, int)
        if bad or not 1 <= num_frames <= max_frames:
            msg = f"num_frames must be an integer in [1, {max_frames}], got {num_frames!r}"
            raise ParamError(msg, "num_frames")
        n_steps = len(SELF_FORCING.timesteps)
        if steps is not None and not 1 <= steps <= n_steps:
            msg = f"num_inference_steps must be in [1, {n_steps}] for a causal model"
            raise ParamError(msg, "num_inference_steps")
        if guidance is not None and guidance > 1:
            msg = "guidance_scale must be <= 1: causal models are distilled without CFG"
            raise ParamError(msg, "guidance_scale")
        seed = p.seed if p.seed is not None else secrets.randbelow(2**32)
        p = dataclasses.replace(p, num_frames=num_frames, seed=seed, guidance_scale=1.0)
        p = dataclasses.replace(p, num_inference_steps=steps or n_steps)
        return p, seed, p.num_inference_steps

    def _stream(self, p: GenerationParams, seed: int, steps: int, progress: bool, host):
        """The chunks of a causal video (``host``: ``to_uint8``, ``to_float``, or None for
        the x0 latents themselves), cropped and trimmed to the request."""
        size = Plan.for_request(p, self.cfg)
        c, f, h, w = size.latent_shape
        frames = len(SELF_FORCING.chunks(f)) * SELF_FORCING.chunk_frames
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, c, frames, h, w), generator=gen, dtype=torch.float32)
        place = self.placement = self.place(size, p)
        self.last_seed = seed
        try:
            contexts, lengths = self._encode_phase(p, place)
            dit = self._acquire("transformer", place)
            text = dit.prepare_text(contexts, lengths)
            decode = self._chunk_decoder(place)
            top, left = (size.height - p.height) // 2, (size.width - p.width) // 2
            o, done = self.options, 0
            with tqdm(total=p.num_frames, desc="stream", unit="frame", disable=not progress) as bar:
                for x0 in causal_chunks(
                    dit, text, noise, gen, SELF_FORCING, steps, o.kv_window, o.kv_sink
                ):
                    if host is None:  # output_type "latent": no decoding
                        yield x0
                        continue
                    out = host(decode(x0))[:, top : top + p.height, left : left + p.width]
                    out = np.ascontiguousarray(out[: p.num_frames - done])
                    done += len(out)
                    bar.update(len(out))
                    if len(out):
                        yield out
        finally:
            self._settle(place)

    def _chunk_decoder(self, place: planner.Placement) -> Callable[[torch.Tensor], torch.Tensor]:
        """Latent chunks [1, C, n, h, w] -> their frames [1, 3, m, H, W] in [-1, 1], keeping the
        decoder's causal state between chunks (the frames of one whole decode)."""
        if self.options.decoder == "taew2_1":
            tae = self.tae.stream()
            return lambda z: tae(z.to(self.device)) * 2 - 1  # [0, 1] -> [-1, 1]
        vcfg = self.cfg.vae
        mean = torch.tensor(vcfg.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, -1, 1, 1, 1)
        vae = StreamDecoder(self._acquire("vae", place))  # the op order of ``decode``
        return lambda z: vae((z.float().cpu() / inv_std + mean).to(self.device))

    def _generate_causal(self, kw: dict, num_frames, output_type, save_to, on_decode, progress):
        """``generate()`` on a causal model: the streamed chunks in one piece."""
        limit = next(f.maximum for f in fields(self.options.limits) if f.name == "num_frames")
        p, seed, steps = self._causal_request(kw, num_frames, limit)
        check_output(output_type, save_to)
        host = {"latent": None, "np": to_float, "pt": to_float}.get(output_type, to_uint8)
        run = CallMeter(self.components, self.device)
        empty = np.zeros((0, p.height, p.width, 3), np.uint8)
        video = Video(empty, seed, params=p.to_dict())
        video.metadata = made_by(p.to_dict(), seed, model_label(self.source))
        with run.phase("denoise"):  # encode, denoise and decode interleave chunk by chunk
            chunks = self._stream(p, seed, steps, progress, host)
            if on_decode is not None:
                chunks = counted(chunks, p.num_frames, on_decode)
            if host is None:
                video.latents = torch.cat(list(chunks), dim=2)
            elif save_to is not None:
                h, w, meta = p.height, p.width, video.metadata
                video.path = write_mp4(save_to, chunks, h, w, video.fps, meta)
            else:
                video.frames = as_output(np.concatenate(list(chunks)), output_type)
        return run.finish(video, self.stats)
