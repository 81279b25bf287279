"""Shared benchmark plumbing: run one engine in its own process, measure it, compare outputs.

Each run happens in a fresh Python process so that its peak RSS (VmHWM) is its own.  A worker
writes its final latents and uint8 frames to an .npz and its measurements to JSON on stdout.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from wanlite import bench
from wanlite.bench import compare, psnr  # noqa: F401  (re-exported for the scripts)
from wanlite.bench import run_generation as wanlite_generate  # noqa: F401
from wanlite.bench import save as save_result  # noqa: F401

HERE = Path(__file__).resolve().parent


def bench_params(height: int, width: int, num_frames: int, steps: int, guidance: float) -> dict:
    """The request both engines get (fixed prompt and seed)."""
    return dict(
        prompt="a red fox running through snow, cinematic",
        negative_prompt=" ",
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=42,
    )


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_worker(script: Path, args: list[str], timeout: float = 7200) -> dict:
    """Run ``script --worker ...`` in a new process; return the JSON it prints last."""
    return bench.run_worker([str(script), "--worker", *args], timeout)


def diffusers_phases(path: str, params: dict, dtype: str) -> dict:
    """diffusers' WanPipeline run phase by phase through its own public API (encode_prompt,
    the pipeline call on those embeddings, the VAE decode and video post-processing, as its
    __call__ does them), so peak memory and time can be measured per phase."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    peaks, secs = {}, {}
    reset_peak()
    t0 = time.perf_counter()
    # As diffusers' Wan docs load it: the VAE in fp32, the rest in ``dtype``.
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=getattr(torch, dtype))
    secs["load"], peaks["load"] = time.perf_counter() - t0, peak_rss()
    cfg_on = params["guidance_scale"] > 1
    with torch.inference_mode():
        reset_peak()
        t0 = time.perf_counter()
        pe, npe = pipe.encode_prompt(
            params["prompt"],
            params["negative_prompt"],
            cfg_on,
            max_sequence_length=512,
            device=torch.device("cpu"),
        )
        secs["encode"], peaks["encode"] = time.perf_counter() - t0, peak_rss()
        reset_peak()
        t0 = time.perf_counter()
        latents = pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=npe,
            height=params["height"],
            width=params["width"],
            num_frames=params["num_frames"],
            num_inference_steps=params["num_inference_steps"],
            guidance_scale=params["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(params["seed"]),
            output_type="latent",
        ).frames
        secs["denoise"], peaks["denoise"] = time.perf_counter() - t0, peak_rss()
        reset_peak()
        t0 = time.perf_counter()
        vae = pipe.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = (latents.float() / inv_std + mean).to(vae.dtype)
        video = pipe.video_processor.postprocess_video(vae.decode(z).sample, output_type="np")
        secs["decode"], peaks["decode"] = time.perf_counter() - t0, peak_rss()
    u8 = (np.asarray(video[0], dtype=np.float64) * 255).round().astype(np.uint8)
    return {
        "phase_peaks": peaks,
        "phase_seconds": secs,
        "peak": max(peaks.values()),
        "generate_s": secs["encode"] + secs["denoise"] + secs["decode"],
        "load_s": secs["load"],
        "arrays": {"latents": latents.float().numpy(), "frames": u8},
    }


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f}"
