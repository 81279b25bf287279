"""The text-to-video pipeline: prompt -> umT5 -> DiT denoising with CFG -> VAE -> uint8 frames.

Matches diffusers' ``WanPipeline`` step for step (same seed + parameters + weights => same video
within float tolerance): prompts are cleaned and tokenized to 512 tokens, the encoder output is
cut to each prompt's real length and zero-padded back to 512; the initial noise is drawn in fp32
from a CPU ``torch.Generator`` (so a seed means the same video on every device); the scheduler
state stays fp32 and latents are cast to the DiT dtype only for each forward; CFG combines
``u + g * (c - u)`` from the conditional and unconditional passes, run as one batch of 2 when the
planner finds room (else as two forwards; the two agree within float tolerance).  The DiT then
attends to each prompt's padding as one merged key (``dit.TextState``), also exact.

With ``nag_scale`` set (``wanlite.ops.nag``), the negative prompt is encoded even at guidance <= 1
and steers the conditional pass inside every block's cross-attention; its text state and K/V
are prepared once per generation, like the prompt's.  The unconditional pass of CFG is unchanged.

Sizes that the model cannot make directly are generated at the next valid size and cut back:
height and width round up to a multiple of 16 (VAE stride 8 x patch 2) and are center-cropped;
the frame count rounds up to 4k+1 (VAE temporal stride 4) and the extra frames at the end are
dropped.  The result always has exactly the requested height, width and frame count.

Past ``Options.context_frames`` (81 by default) the DiT runs each step on sliding context windows
of that many frames, blended (``wanlite.runtime.windows``, after Kijai's ComfyUI-WanVideoWrapper):
its memory stays flat in the length, and the result is no longer diffusers' single pass
(``context_frames=0`` keeps that).

A causal checkpoint (Self-Forcing, CausVid) is made chunk by chunk with a KV cache: its calls,
``stream()`` and ``generate()``'s causal branch, are in ``wanlite.causal``.

``output_type`` picks what ``video.frames`` holds (one video: diffusers' ``.frames[0]``):
"frames" (the default, unchanged) uint8 [F, H, W, 3]; diffusers' "np" float32 [F, H, W, 3] in
[0, 1] and "pt" a float32 CPU tensor [F, 3, H, W] in [0, 1], both from the decoder's floats
(x/2 + 0.5, clamped, as diffusers' ``VideoProcessor``), not from rounded bytes; "pil" a list
of RGB ``PIL.Image`` per frame (Pillow: ``pip install 'wanlite[pil]'``), rounded as diffusers'
``numpy_to_pil``; "latent" no decoding (``video.latents`` only).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .causal import SELF_FORCING, CausalCalls
from .frames import (
    Plan,
    as_output,
    check_output,
    initial_noise,
    model_label,
    to_float,
    to_uint8,
)
from .models.taehv import load_tiny_decoder
from .models.tokenizer import Tokenizer, clean_prompt
from .ops.nag import NAG
from .options import Options
from .params import GenerationParams, ParamError, validate
from .preview import Crop, PreviewCallback, Previewer
from .runtime import planner
from .runtime.branches import Branches
from .runtime.embed_cache import EmbeddingCache
from .runtime.lifecycle import components
from .runtime.memory import CallMeter, PeakMeter
from .runtime.parallel import init_parallel
from .runtime.tiling import iter_decode_tiled
from .runtime.windows import ContextWindows
from .sampling.presets import get_preset, request_defaults
from .sampling.scheduler import Sampler, make_sampler, to_x0
from .video import Video, made_by, write_mp4
from .weights.loading import ModelSource, resolve_source
from .weights.pthstore import is_causal_checkpoint

log = logging.getLogger(__name__)

MAX_TOKENS = 512
StepCallback = Callable[[int, int, torch.Tensor], None]


class Cancelled(Exception):
    """Raised through ``generate`` when a step callback asks to stop."""


# The umT5's token embedding (256k x 4096: 4 GiB in fp32) is never read whole: a prompt needs
# only its own rows, read from the checkpoint on demand (exact, a few KB each).
ROW_EMBEDDINGS = {"text_encoder": "token_embedding"}  # component -> module read by rows


class Pipeline(CausalCalls):
    """A loaded model.  Make one with :func:`wanlite.load`."""

    def __init__(self, path: Path | ModelSource, options: Options | None = None):
        # A model folder, or a ModelSource (single files, with or without a folder).
        self.source = ModelSource.of(path)
        self.path = self.source.folder  # None when every weight set is a single file
        self.options = options or Options()
        self.preset = get_preset(self.options.preset) if self.options.preset else None
        if self.preset is not None and (self.options.sampler != "unipc" or self.options.timesteps):
            raise ValueError(
                f"preset {self.preset.name!r} sets the sampler: leave sampler and timesteps unset"
            )
        self.device = self.options.resolve_device()
        self.cfg = self.source.config()
        self.causal = self._is_causal()
        # parallel="cfg=2,ulysses=2" under torchrun: the process groups and this rank's device.
        heads = self.cfg.dit.num_heads
        self.parallel = init_parallel(self.options.parallel, self.device, heads)
        if self.parallel is not None and self.device.type == "cuda":
            self.device = self.parallel.device
        self.dtype = self.options.resolve_dtype(self.device)
        self.tokenizer = Tokenizer.from_dir(self.source.tokenizer)
        meter = PeakMeter(self.device)
        t0 = time.perf_counter()
        with meter.phase("load"):
            # Headers only: every key and shape is checked now, weights are read when needed.
            self.components = components(
                self.source, self.cfg, self.options, self.device, self.dtype
            )
            text_encoder = self.components["text_encoder"]
            self.embeddings = EmbeddingCache(
                self.source.text_encoder_files(),
                text_encoder.quant,
                self.dtype,
                disk=self.options.embed_cache,
            )
            if self.options.offload == "none":
                resident = planner.Placement("none", False, False, planner.Estimate(0, 0, 0))
                for name in self._needed():
                    self._acquire(name, resident)
        self.load_seconds = time.perf_counter() - t0
        self.load_peak = meter.peaks["load"]
        self.placement: planner.Placement | None = None  # the last call's
        self.stats: dict = {}
        # The tiny VAE (decoder="taew2_1", and previews when given): 40 MB in fp32, resident.
        self.tae = self._load_tae()

    def _is_causal(self) -> bool:
        """A causal DiT (Self-Forcing, CausVid): ``causal=True``, or detected from the
        transformer file's keys (``pthstore.CAUSAL_WRAPPERS``) when ``causal`` is None."""
        o = self.options
        if o.causal is not None:
            causal = o.causal
        else:
            file = self.source.files.get("transformer")
            causal = file is not None and is_causal_checkpoint(file)
        if causal and (o.parallel is not None or o.compile or o.cache != "off" or self.preset):
            raise ValueError(
                "a causal model runs in one process, without compile, step caches or presets "
                "(its KV cache replaces them)"
            )
        return causal

    def _needed(self) -> tuple[str, ...]:
        """The weight sets this process reads: under ``parallel`` only rank 0 encodes and
        decodes (and broadcasts the results); every rank runs the DiT."""
        if self.parallel is None or self.parallel.main:
            return ("text_encoder", "transformer", "vae")
        return ("transformer",)

    def _acquire(self, name: str, place: planner.Placement) -> torch.nn.Module:
        comp = self.components[name]
        rows = ROW_EMBEDDINGS.get(name)
        return comp.acquire(place.streamed(name), row_embedding=rows, pack=place.pack)

    def _settle(self, place: planner.Placement) -> None:
        """Release what the placement does not keep: after each phase, and after a call that
        stopped part-way (cancelled, out of memory), so nothing stays loaded by accident."""
        for name, comp in self.components.items():
            if not place.kept(name):
                comp.release()

    def place(self, size: Plan, p: GenerationParams) -> planner.Placement:
        """The placement of one call, from the planner (logged)."""
        held = sum(c.resident_bytes() for c in self.components.values())
        place = planner.choose(
            self.cfg,
            size.latent_shape,
            self.options,
            self.device,
            self.dtype.itemsize,
            held,
            t5_quant=self.components["text_encoder"].quant,
            vae_bytes=self.components["vae"].dtype.itemsize,
            dtype=self.dtype,
            **self._forward_frames(size.latent_shape[1]),
        )
        if self.components["transformer"].packable and self.options.linear == "auto":
            _, f, h, w = size.latent_shape
            pt, ph, pw = self.cfg.dit.patch_size
            forwards = p.num_inference_steps * (2 if p.guidance_scale > 1 else 1)
            pays = planner.packing_pays((f // pt) * (h // ph) * (w // pw), forwards)
            place = dataclasses.replace(place, pack=pays)
        log.info(
            "offload=%s, tiled VAE=%s, CFG batched=%s, packed GEMMs=%s, estimated peak %.2f GiB",
            *(place.offload, place.vae_tiled, place.cfg_batched, place.pack),
            place.estimate.peak / 2**30,
        )
        return place

    def _forward_frames(self, latent_frames: int) -> dict[str, int | None]:
        """What one DiT forward of this call sees, for the planner: a causal chunk and the
        frames of its KV cache, or a context window; else the whole video (None)."""
        if self.causal:
            window = self.options.kv_window or latent_frames
            return dict(dit_frames=SELF_FORCING.chunk_frames, kv_frames=window)
        windows = ContextWindows.from_options(self.options, self.cfg.vae.temporal_stride)
        if windows is not None and windows.applies(latent_frames):
            return dict(dit_frames=windows.size, kv_frames=0)
        return dict(dit_frames=None, kv_frames=0)

    # -- phases ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_texts(
        self, texts: list[str], place: planner.Placement
    ) -> tuple[torch.Tensor, list[int]]:
        """(embeddings [B, 512, text_dim] zero-padded after each text's tokens, token counts).

        Repeated prompts (and the default negative prompt) come from the embedding cache."""
        cleaned = [clean_prompt(t) for t in texts]
        found = {t: self.embeddings.get(t) for t in set(cleaned)}
        todo = [t for t, e in found.items() if e is None]
        if todo:
            for t, e in zip(todo, self._encode(todo, place)):
                found[t] = e
                self.embeddings.put(t, e)
        out = torch.zeros(len(texts), MAX_TOKENS, self.cfg.t5.d_model, dtype=self.dtype)
        for i, t in enumerate(cleaned):
            e = found[t]
            out[i, : e.shape[0]] = e
        return out.to(self.device), [found[t].shape[0] for t in cleaned]

    def _encode(self, texts: list[str], place: planner.Placement) -> list[torch.Tensor]:
        """Run the text encoder: one [n_i, d_model] tensor per (cleaned) text.

        Each text cut to its real length: encoder outputs at real tokens do not depend on the
        padding after them (padded keys are masked; the position bias depends only on
        distances), so this is exact and 512/n times less work than encoding the padded batch.
        The texts go through the layers together but each on its own (``encode_each``): one
        pass over the layers (a streamed umT5 is read once, not once per text), and an
        embedding still depends only on (model, text), never on which other text shared its
        pass, so cached and fresh embeddings are bit-identical."""
        encoder = self._acquire("text_encoder", place)
        pairs = []
        for text in texts:
            ids, mask = self.tokenizer([text], max_length=MAX_TOKENS)
            n = int(mask.sum())
            if n >= MAX_TOKENS:
                log.warning("a prompt is longer than %d tokens and was truncated", MAX_TOKENS)
            pairs.append((ids[:, :n].to(self.device), mask[:, :n].to(self.device)))
        hidden = encoder.encode_each(pairs)
        return [h[0].to("cpu", self.dtype).clone() for h in hidden]

    def denoise(
        self,
        latents: torch.Tensor,
        contexts: torch.Tensor,
        lengths: list[int],
        sampler: Sampler,
        guidance_scale: float,
        place: planner.Placement,
        preview: Previewer | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The denoising loop as a generator: yields (step index, fp32 latents) after each step;
        on the steps it is due, ``preview`` gets that step's x0 prediction first.

        ``contexts`` is [1 or 2, 512, text_dim] (cond[, negative]) in the DiT dtype, zero-padded
        after ``lengths`` tokens; the negative row is CFG's unconditional pass when
        ``guidance_scale`` > 1, and NAG's negative prompt when NAG is on.  Runs the CFG branches
        as placed (batched or not), gates the unconditional pass (``cfg_skip_last``) and applies
        the step cache; counts go to ``self.stats``."""
        o = self.options
        timesteps, state, num_steps = sampler.timesteps, sampler.state, sampler.num_steps
        latents = latents.to(self.device)
        dit = self._acquire("transformer", place)
        par = self.parallel
        if par is not None:  # sequence-parallel hook; previews on rank 0 only
            par.attach(dit)
            preview, sent = (preview if par.main else None), par.sent
        nag = None if o.nag_scale is None else NAG(o.nag_scale, o.nag_tau, o.nag_alpha)
        branches = Branches(dit, contexts, lengths, o.cache, o.cache_threshold, par, nag)
        cfg = len(lengths) == 2 and guidance_scale > 1.0  # (NAG alone also brings a negative)
        batched = cfg and place.cfg_batched
        if par is not None:  # the same forwards on every rank; CFG-parallel splits the pair
            batched = cfg and (par.cfg == 2 or par.broadcast_object(batched))
        cfg_steps = num_steps - int(o.cfg_skip_last * num_steps) if cfg else 0
        self.stats = {"cfg_batched": batched, "cfg_steps": cfg_steps}
        # The time embeddings of the whole schedule, once: [steps, D] and [steps, 6, D] fp32.
        e, e0 = dit.time_embeddings(timesteps.to(self.device, torch.float32), len(timesteps))
        branches.set_schedule(e)
        windows = self._windows(latents.shape[2], par)

        def guided(x, i: int, temb, last: bool) -> torch.Tensor:  # CFG'd flow for latents x
            if i >= cfg_steps:
                return branches.run("cond", x, temb, last)
            if batched:
                cond, uncond = branches.run("both", x.expand(2, -1, -1, -1, -1), temb, last)
            else:
                cond = branches.run("cond", x, temb, last)
                uncond = branches.run("uncond", x, temb, last)
            return uncond + guidance_scale * (cond - uncond)

        for i in range(num_steps):
            branches.step = i
            x = latents.to(self.dtype)
            temb = (e[i : i + 1], e0[i : i + 1])
            last = i == num_steps - 1
            if windows is None:
                pred = guided(x, i, temb, last)
            else:  # each window's slice alone (window-local RoPE), blended: runtime.windows
                pred = windows.predict(lambda xw: guided(xw, i, temb, last), x, i)  # noqa: B023
            v = pred.float()
            if preview is not None and preview.due(i):  # x0 = x - sigma * v, [1, 16, T', h, w]
                preview(i, to_x0(latents, v, sampler.sigmas[i].item()))
            latents, state = sampler.step(state, v, latents)
            yield i, latents
        self.stats |= branches.counts()
        if par is not None:
            self.stats |= {"parallel": par.describe(), "comm_bytes": par.sent - sent}

    def _windows(self, latent_frames: int, par) -> ContextWindows | None:
        """The context windows of a video of ``latent_frames`` (None: one piece).  Step caches
        compare one input with the last, and a window's input is not the last window's; the
        sequence-parallel hook is untried on windows: both are errors with windows on."""
        windows = ContextWindows.from_options(self.options, self.cfg.vae.temporal_stride)
        if windows is None or not windows.applies(latent_frames):
            return None
        if self.options.cache != "off" or par is not None:
            what = "cache" if self.options.cache != "off" else "parallel"
            msg = f"{what} does not work with context windows (videos over context_frames); "
            raise ParamError(msg + "set context_frames=0 or a larger one", what)
        self.stats["context_windows"] = (windows.size, windows.overlap)
        return windows

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, place: planner.Placement) -> Iterator[torch.Tensor]:
        """Yield decoded chunks [1, 3, t, H, W] in [-1, 1] (un-normalizes the latents first;
        the tiny VAE takes them as they are and gives [0, 1])."""
        if self.options.decoder == "taew2_1":
            for chunk in self.tae.iter_decode(latents.to(self.device)):
                yield chunk.mul_(2).sub_(1)
            return
        vcfg = self.cfg.vae
        mean = torch.tensor(vcfg.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, -1, 1, 1, 1)
        z = (latents.float().cpu() / inv_std + mean).to(self.device)  # diffusers' op order
        vae = self._acquire("vae", place)
        if place.vae_tiled:
            yield from iter_decode_tiled(vae, z, planner.VAE_TILE, planner.VAE_OVERLAP)
        else:
            yield from vae.iter_decode(z)

    # -- the public call ------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        height: int = 480,
        width: int = 640,
        negative_prompt: str = " ",
        num_inference_steps: int | None = None,
        num_frames: int = 81,
        guidance_scale: float | None = None,
        seed: int | None = None,
        *,
        callback: StepCallback | None = None,
        on_decode: Callable[[int, int], None] | None = None,
        progress: bool = True,
        output_type: str = "frames",
        save_to: str | os.PathLike | None = None,
        preview_every: int = 0,
        on_preview: PreviewCallback | None = None,
    ) -> Video:
        """Generate a video.  Parameters and ranges are the hosted API's (``wanlite.params``;
        wider with ``limits="model"``: Options); a bad one raises ``ParamError``.
        ``num_inference_steps`` and ``guidance_scale`` default to 30 and 5.0, or to the preset's.

        ``callback(step, total, latents)`` runs after every denoising step; raising
        :class:`Cancelled` (or any exception) from it stops the generation.
        ``on_decode(frames_done, num_frames)`` runs after every decoded chunk (1 or 4 frames);
        raising from it stops the decode there.  ``output_type``: what ``video.frames`` holds,
        "frames" (uint8 [F, H, W, 3]), "np", "pt", "pil" as diffusers, or "latent" (no
        decoding); see the module docstring.  ``save_to="out.mp4"`` (or a ``Path``) streams
        the decoded frames to an MP4 as they are decoded (``video.frames`` is then empty and
        ``video.path`` names the file).
        ``on_preview(step, total, frames)`` with ``preview_every=k`` gets, every k steps, the
        step's x0 prediction as uint8 frames [T, height, width, 3] (``wanlite.preview``: the
        tiny VAE's frames if one is loaded, else one frame per latent frame)."""
        request = dict(prompt=prompt, height=height, width=width, negative_prompt=negative_prompt)
        if self.causal:  # chunk by chunk (``stream``), returned in one piece
            if callback is not None or on_preview is not None:
                raise ValueError("a causal model takes no step callback or previews: use stream()")
            kw = request | dict(num_inference_steps=num_inference_steps, seed=seed)
            kw |= dict(guidance_scale=guidance_scale)
            return self._generate_causal(kw, num_frames, output_type, save_to, on_decode, progress)
        request |= dict(num_inference_steps=num_inference_steps, num_frames=num_frames)
        p, seed, sampler = self.request(**request, guidance_scale=guidance_scale, seed=seed)
        progress = progress and (self.parallel is None or self.parallel.main)  # one bar
        check_output(output_type, save_to)
        size = Plan.for_request(p, self.cfg)
        previewer = self._previewer(p, size, preview_every, on_preview)
        place = self.placement = self.place(size, p)
        run = CallMeter(self.components, self.device)
        try:
            with run.phase("encode"):
                contexts, lengths = self._encode_phase(p, place)
            with run.phase("denoise"):
                latents = sampler.initial(initial_noise(size.latent_shape, seed))
                latents = self._denoise_phase(
                    p, latents, contexts, lengths, place, sampler, callback, progress, previewer
                )
            empty = np.zeros((0, p.height, p.width, 3), np.uint8)
            video = Video(empty, seed, params=p.to_dict(), latents=latents)
            video.metadata = made_by(p.to_dict(), seed, model_label(self.source))
            if output_type != "latent":
                floats = output_type in ("np", "pt")  # from the decoder's floats, not bytes
                with run.phase("decode"):
                    if self.parallel is None or self.parallel.main:
                        self._decode_phase(
                            video, latents, size, p, place, save_to, on_decode, floats, progress
                        )
                    if self.parallel is not None:  # rank 0 decoded (and wrote): share that
                        self._share_video(video, save_to is not None)
                if save_to is None:
                    video.frames = as_output(video.frames, output_type)
        finally:
            self._settle(place)
        return run.finish(video, self.stats)

    def _encode_phase(self, p: GenerationParams, place: planner.Placement):
        negative = p.guidance_scale > 1.0 or self.options.nag_scale is not None
        texts = [p.prompt, p.negative_prompt] if negative else [p.prompt]
        contexts = lengths = None
        if self.parallel is None or self.parallel.main:
            contexts, lengths = self.encode_texts(texts, place)
            self._settle(place)
        if self.parallel is not None:  # rank 0 read the umT5: the others get its embeddings
            contexts = self.parallel.broadcast_tensor(contexts).to(self.device)
            lengths = self.parallel.broadcast_object(lengths)
        return contexts.to(self.dtype), lengths

    def _share_video(self, video: Video, saved: bool) -> None:
        """Rank 0's decoded frames (or the path of the file it wrote) on every rank."""
        if saved:
            video.path = self.parallel.broadcast_object(video.path)
        else:
            main = self.parallel.main
            video.frames = self.parallel.share_frames(video.frames if main else None)

    def request(self, **kw) -> tuple[GenerationParams, int, Sampler]:
        """The validated request (the preset's defaults for steps and guidance where they are
        None), its seed (drawn if None) and its sampler: every check before any model work."""
        steps, guidance = request_defaults(
            self.options.preset, kw.pop("num_inference_steps"), kw.pop("guidance_scale")
        )
        p = validate(
            **kw, num_inference_steps=steps, guidance_scale=guidance, limits=self.options.limits
        )
        o = self.options
        seed = p.seed if p.seed is not None else secrets.randbelow(2**32)
        if self.parallel is not None:  # one seed on every rank: rank 0's draw
            seed = self.parallel.broadcast_object(seed)
        if self.preset is not None:  # (few-step samplers re-noise from the seed's stream)
            steps = p.num_inference_steps
            sampler = self.preset.make_sampler(self.cfg.scheduler, steps, o.shift, seed)
        else:
            sampler = make_sampler(
                o.sampler, self.cfg.scheduler, p.num_inference_steps, o.shift, o.timesteps
            )
        log.info(
            "generating %dx%d, %d frames, %d steps (%s), guidance %g, seed %d",
            *(p.width, p.height, p.num_frames, p.num_inference_steps, sampler.kind),
            *(p.guidance_scale, seed),
        )
        return p, seed, sampler

    def _denoise_phase(
        self, p, latents, contexts, lengths, place, sampler, callback, progress, preview=None
    ):
        n = p.num_inference_steps
        g = p.guidance_scale
        steps = self.denoise(latents, contexts, lengths, sampler, g, place, preview)
        with tqdm(total=n, desc="denoise", disable=not progress) as bar:
            for i, latents in steps:
                bar.update(1)
                if callback is not None:
                    callback(i, n, latents)
        if preview is not None:
            self.stats["preview_seconds"] = list(preview.seconds)
        self._settle(place)
        return latents

    def _previewer(self, p, size: Plan, every: int, callback) -> Previewer | None:
        """The step previews of a call (None without ``on_preview``), checked before any work."""
        if callback is None:
            return None
        crop = Crop((size.height, size.width), (p.height, p.width), p.num_frames)
        return Previewer(every, p.num_inference_steps, callback, crop, self.tae)

    def _load_tae(self):
        if not self.options.tae:
            return None
        # On CPU the full VAE's dtype (bf16 with a bf16 DiT, channels-last: models.taehv)
        cpu = self.device.type == "cpu"
        dtype = self.options.resolve_vae_dtype(self.dtype) if cpu else self.dtype
        return load_tiny_decoder(self.options.tae, self.device, dtype)

    def _decode_phase(
        self, video, latents, size, p, place, save_to, on_decode, floats=False, progress=False
    ) -> None:
        with tqdm(total=p.num_frames, desc="decode", unit="frame", disable=not progress) as bar:

            def decoded(n: int, total: int) -> None:  # the bar, then the caller's callback
                bar.update(n - bar.n)
                if on_decode is not None:
                    on_decode(n, total)

            chunks = self._iter_frames(latents, size, p, place, decoded, floats)
            if save_to is None:
                video.frames = np.concatenate(list(chunks))
            else:  # frames go straight to the encoder; only one chunk is ever held
                h, w = p.height, p.width
                video.path = write_mp4(save_to, chunks, h, w, video.fps, video.metadata)
        self._settle(place)

    def _iter_frames(
        self, latents, size: Plan, p: GenerationParams, place, on_decode=None, floats=False
    ):
        """uint8 (or, with ``floats``, float32 in [0, 1]) frame chunks [n, height, width, 3],
        cropped and trimmed to the request."""
        top, left = (size.height - p.height) // 2, (size.width - p.width) // 2
        host = to_float if floats else to_uint8
        n = 0
        for chunk in self.decode(latents, place):
            frames = host(chunk)[:, top : top + p.height, left : left + p.width]
            frames = frames[: p.num_frames - n]
            n += len(frames)
            if on_decode is not None:
                on_decode(n, p.num_frames)
            yield np.ascontiguousarray(frames)
            if n >= p.num_frames:
                return


def load(
    model: str | os.PathLike | None = None,
    *,
    transformer: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    **options,
) -> Pipeline:
    """Load a checkpoint: ``model`` a local diffusers-layout folder, hub id, or ``random:tiny``
    (default: the hub's 1.3B when no single file is given), and/or single files
    (``transformer``, ``text_encoder``, ``vae``: safetensors, GGUF or .pth in the formats of
    ``wanlite.weights.formats``) replacing those weight sets; ``tokenizer`` a folder with the umT5
    tokenizer.json (needed when there is no ``model``).  Paths may be ``str`` or
    ``os.PathLike``; ``options`` are :class:`Options` fields (``dtype="bfloat16"`` or
    ``dtype=torch.bfloat16``, ``limits="model"``, ...)."""
    model = os.fspath(model) if model is not None else None
    files = dict(transformer=transformer, text_encoder=text_encoder, vae=vae)
    source = resolve_source(model, **files, tokenizer=tokenizer)
    return Pipeline(source, Options(**options))
