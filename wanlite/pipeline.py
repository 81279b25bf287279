"""The text-to-video pipeline: prompt -> umT5 -> DiT denoising with CFG -> VAE -> uint8 frames.

Matches diffusers' ``WanPipeline`` step for step (same seed + parameters + weights => same video
within float tolerance): prompts are cleaned and tokenized to 512 tokens, the encoder output is
cut to each prompt's real length and zero-padded back to 512; the initial noise is drawn in fp32
from a CPU ``torch.Generator`` (so a seed means the same video on every device); the scheduler
state stays fp32 and latents are cast to the DiT dtype only for each forward; CFG runs the
conditional and unconditional passes as two forwards and combines ``u + g * (c - u)``.

Sizes that the model cannot make directly are generated at the next valid size and cut back:
height and width round up to a multiple of 16 (VAE stride 8 x patch 2) and are center-cropped;
the frame count rounds up to 4k+1 (VAE temporal stride 4) and the extra frames at the end are
dropped.  The result always has exactly the requested height, width and frame count.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dit as dit_mod
from . import t5 as t5_mod
from . import vae as vae_mod
from .configs import DiTConfig, ModelConfig, Options, SchedulerConfig, T5Config, VAEConfig
from .loading import load_module, read_json, resolve_model
from .memory import PeakMeter
from .params import GenerationParams, validate
from .scheduler import timesteps_and_sigmas, unipc_init, unipc_step
from .tokenizer import Tokenizer, clean_prompt
from .video import Video

log = logging.getLogger(__name__)

MAX_TOKENS = 512
StepCallback = Callable[[int, int, torch.Tensor], None]


class Cancelled(Exception):
    """Raised through ``generate`` when a step callback asks to stop."""


@dataclass(frozen=True)
class Plan:
    """The size actually generated for a request, and how it is cut back."""

    height: int
    width: int
    num_frames: int
    latent_shape: tuple[int, int, int, int]  # (channels, frames, height, width)

    @classmethod
    def for_request(cls, p: GenerationParams, cfg: ModelConfig) -> Plan:
        s = cfg.vae.spatial_stride * cfg.dit.patch_size[1]
        ts = cfg.vae.temporal_stride
        h, w = -(-p.height // s) * s, -(-p.width // s) * s
        f = -(-(p.num_frames - 1) // ts) * ts + 1
        vs = cfg.vae.spatial_stride
        shape = (cfg.dit.in_channels, (f - 1) // ts + 1, h // vs, w // vs)
        return cls(h, w, f, shape)


def read_model_config(path: Path) -> ModelConfig:
    cfg = ModelConfig(
        dit=DiTConfig.from_diffusers(read_json(path / "transformer" / "config.json")),
        t5=T5Config.from_diffusers(read_json(path / "text_encoder" / "config.json")),
        vae=VAEConfig.from_diffusers(read_json(path / "vae" / "config.json")),
        scheduler=SchedulerConfig.from_diffusers(
            read_json(path / "scheduler" / "scheduler_config.json")
        ),
    )
    if cfg.t5.d_model != cfg.dit.text_dim:
        raise ValueError(f"text encoder width {cfg.t5.d_model} != DiT text_dim {cfg.dit.text_dim}")
    if cfg.vae.z_dim != cfg.dit.in_channels:
        raise ValueError(f"VAE z_dim {cfg.vae.z_dim} != DiT in_channels {cfg.dit.in_channels}")
    return cfg


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 noise from a CPU generator, exactly as diffusers draws it for a CPU generator."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (x/2 + 0.5, clamped, rounded)."""
    x = (video[0].float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


class Pipeline:
    """A loaded model.  Make one with :func:`wanlite.load`."""

    def __init__(self, path: Path, options: Options | None = None):
        self.path = Path(path)
        self.options = options or Options()
        self.device = self.options.resolve_device()
        self.dtype = self.options.resolve_dtype(self.device)
        self.cfg = read_model_config(self.path)
        self.tokenizer = Tokenizer.from_dir(self.path / "tokenizer")
        meter = PeakMeter(self.device)
        t0 = time.perf_counter()
        with meter.phase("load"):
            self.text_encoder = self._load("text_encoder", t5_mod, t5_mod.UMT5Encoder, self.dtype)
            self.dit = self._load("transformer", dit_mod, dit_mod.WanDiT, self.dtype)
            self.vae = self._load("vae", vae_mod, vae_mod.WanVAE, torch.float32)
        self.load_seconds = time.perf_counter() - t0
        self.load_peak = meter.peaks["load"]

    def _load(self, component: str, mod, cls, dtype: torch.dtype) -> torch.nn.Module:
        cfg = {"transformer": self.cfg.dit, "text_encoder": self.cfg.t5, "vae": self.cfg.vae}
        c = cfg[component]
        with torch.device("meta"):
            module = cls(c, attn=self.options.attention) if component == "transformer" else cls(c)
        if component == "vae":
            from_key = lambda k: mod.from_diffusers_key(k, c)  # noqa: E731
        else:
            from_key = mod.from_diffusers_key
        aliases = getattr(mod, "TIED_ALIASES", None)
        load_module(module, self.path / component, from_key, self.device, dtype, aliases)
        return module.eval().requires_grad_(False)

    # -- phases ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        """[B, 512, text_dim] embeddings: real tokens encoded, the rest exact zeros."""
        ids, mask = self.tokenizer([clean_prompt(t) for t in texts], max_length=MAX_TOKENS)
        lengths = mask.sum(1).tolist()
        if max(lengths) >= MAX_TOKENS:
            log.warning("a prompt is longer than %d tokens and was truncated", MAX_TOKENS)
        # Encoder outputs at real tokens do not depend on the padding after them (padded keys
        # are masked; the position bias depends only on distances), so encode up to the longest
        # real length only: exact, and 512/len times less work for a short prompt.
        n_max = max(lengths)
        ids, mask = ids[:, :n_max].to(self.device), mask[:, :n_max].to(self.device)
        hidden = self.text_encoder(ids, mask)
        out = hidden.new_zeros(len(texts), MAX_TOKENS, hidden.shape[-1])
        for i, n in enumerate(lengths):
            out[i, :n] = hidden[i, :n]
        return out

    def denoise(
        self,
        latents: torch.Tensor,
        contexts: list[torch.Tensor],
        num_steps: int,
        guidance_scale: float,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The denoising loop as a generator: yields (step index, fp32 latents) after each step.

        ``contexts`` is [cond] or [cond, uncond], each [1, 512, text_dim] in the DiT dtype."""
        timesteps, sigmas = timesteps_and_sigmas(self.cfg.scheduler, num_steps)
        state = unipc_init(self.cfg.scheduler, sigmas)
        latents = latents.to(self.device)
        for i, t in enumerate(timesteps):
            x = latents.to(self.dtype)
            tt = t.to(self.device, torch.float32).expand(x.shape[0])
            preds = [self.dit(x, tt, ctx) for ctx in contexts]
            if len(preds) == 2:
                cond, uncond = preds
                pred = uncond + guidance_scale * (cond - uncond)
            else:
                pred = preds[0]
            latents, state = unipc_step(state, pred.float(), latents)
            yield i, latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield decoded chunks [1, 3, t, H, W] in [-1, 1] (un-normalizes the latents first)."""
        vcfg = self.cfg.vae
        mean = torch.tensor(vcfg.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, -1, 1, 1, 1)
        z = latents.float().cpu() / inv_std + mean  # same op order as diffusers
        yield from self.vae.iter_decode(z.to(self.device))

    # -- the public call ------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        height: int = 480,
        width: int = 640,
        negative_prompt: str = " ",
        num_inference_steps: int = 30,
        num_frames: int = 81,
        guidance_scale: float = 5.0,
        seed: int | None = None,
        *,
        callback: StepCallback | None = None,
        progress: bool = True,
        output_type: str = "frames",
    ) -> Video:
        """Generate a video.  Parameters and ranges are the hosted API's (``wanlite.params``).

        ``callback(step, total, latents)`` runs after every denoising step; raising
        :class:`Cancelled` (or any exception) from it stops the generation.
        ``output_type="latent"`` skips decoding and returns the final latents in ``.latents``."""
        p = validate(
            prompt=prompt,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            num_frames=num_frames,
            guidance_scale=guidance_scale,
            seed=seed,
        )
        if output_type not in ("frames", "latent"):
            raise ValueError(f"output_type must be 'frames' or 'latent', got {output_type!r}")
        seed = p.seed if p.seed is not None else secrets.randbelow(2**32)
        log.info("seed %d", seed)
        plan = Plan.for_request(p, self.cfg)
        meter, timings = PeakMeter(self.device), {}

        t0 = time.perf_counter()
        with meter.phase("encode"):
            cfg_on = p.guidance_scale > 1.0
            texts = [p.prompt, p.negative_prompt] if cfg_on else [p.prompt]
            emb = self.encode_prompts(texts).to(self.dtype)
            contexts = [emb[i : i + 1] for i in range(len(texts))]
        timings["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with meter.phase("denoise"):
            latents = initial_noise(plan.latent_shape, seed)
            steps = self.denoise(latents, contexts, p.num_inference_steps, p.guidance_scale)
            bar = tqdm(total=p.num_inference_steps, desc="denoise", disable=not progress)
            with bar:
                for i, latents in steps:
                    bar.update(1)
                    if callback is not None:
                        callback(i, p.num_inference_steps, latents)
        timings["denoise"] = time.perf_counter() - t0

        empty = np.zeros((0, p.height, p.width, 3), np.uint8)
        video = Video(empty, seed, params=p.to_dict(), latents=latents)
        if output_type == "frames":
            t0 = time.perf_counter()
            with meter.phase("decode"):
                video.frames = self._frames(latents, plan, p)
            timings["decode"] = time.perf_counter() - t0
        video.timings = timings
        video.peak_memory = dict(meter.peaks)
        return video

    def _frames(self, latents: torch.Tensor, plan: Plan, p: GenerationParams) -> np.ndarray:
        top, left = (plan.height - p.height) // 2, (plan.width - p.width) // 2
        chunks, n = [], 0
        for chunk in self.decode(latents):
            frames = to_uint8(chunk)[:, top : top + p.height, left : left + p.width]
            chunks.append(frames[: p.num_frames - n])
            n += len(chunks[-1])
            if n >= p.num_frames:
                break
        return np.concatenate(chunks)


def load(model: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", **options) -> Pipeline:
    """Load a checkpoint (local diffusers-layout folder, hub id, or ``random:tiny``)."""
    return Pipeline(resolve_model(model), Options(**options))
