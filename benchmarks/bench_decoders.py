"""Decode time and peak memory: the tiny VAE (TAEHV taew2_1) vs the full Wan VAE, same latents.

    WANLITE_CACHE=$HOME/.cache/wanlite python benchmarks/bench_decoders.py \
        [--sizes 256x256x17,480x640x17] [--threads 2]

Each (decoder, size) runs in its own process: load the decoder, then decode random DiT-space
latents of that size chunk by chunk to uint8 frames, as the pipeline does (the full VAE gets
them un-normalized with latents_mean/std, untiled; the tiny VAE as they are).  Reported: load
seconds, decode seconds, and peak RSS of the decode phase (reset after loading, via
/proc/self/clear_refs) and of the whole process.  Weights: the full-shape random checkpoint's
vae/ folder (``ensure_random_checkpoint("full")``) and a random taew2_1 file with the real
layout; random weights give the real cost, not the picture.  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import peak_rss, reset_peak, run_worker

from wanlite.bench import host_line


def _full_vae():
    from safetensors.torch import load_file

    from wanlite.models.configs import read_model_config
    from wanlite.models.vae import WanVAE, from_diffusers_key
    from wanlite.weights.random_checkpoint import ensure_random_checkpoint

    path = ensure_random_checkpoint("full")
    cfg = read_model_config(path).vae
    state = load_file(str(path / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = WanVAE(cfg).eval()
    vae.load_state_dict({from_diffusers_key(k, cfg): v for k, v in state.items()})
    return vae, cfg


def _worker(decoder: str, size: str, threads: int, tae_path: str) -> dict:
    import torch

    from wanlite.frames import to_uint8

    torch.set_num_threads(threads)
    h, w, f = (int(v) for v in size.split("x"))
    t0 = time.perf_counter()
    if decoder == "taew2_1":
        from wanlite.models.taehv import load_tiny_decoder

        model = load_tiny_decoder(tae_path)
    else:
        model, cfg = _full_vae()
    load_s, load_peak = time.perf_counter() - t0, peak_rss()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g)
    if decoder == "vae":  # the pipeline's un-normalization
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        z = z * torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1) + mean
    reset_peak()
    t0 = time.perf_counter()
    frames = 0
    with torch.inference_mode():
        for chunk in model.iter_decode(z):
            chunk = chunk * 2 - 1 if decoder == "taew2_1" else chunk
            frames += len(to_uint8(chunk))
    decode_s = time.perf_counter() - t0
    return {
        "decoder": decoder,
        "size": size,
        "frames": frames,
        "load_s": round(load_s, 3),
        "decode_s": round(decode_s, 3),
        "s_per_frame": round(decode_s / frames, 4),
        "decode_peak_rss": peak_rss(),
        "load_peak_rss": load_peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256x256x17,480x640x17", help="HxWxF, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("DECODER", "SIZE", "TAE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker[:2], args.threads, args.worker[2])))
        return 0
    from wanlite.weights.random_checkpoint import ensure_random_checkpoint, write_random_taehv

    print(host_line())
    print(f"torch threads: {args.threads}")
    ensure_random_checkpoint("full")  # built once, outside the timed workers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tae = str(write_random_taehv(Path(tmp) / "taew2_1.safetensors"))
        for size in args.sizes.split(","):
            for decoder in ("taew2_1", "vae"):
                extra = [decoder, size, tae, "--threads", str(args.threads)]
                rows.append(run_worker(Path(__file__), extra))
                r = rows[-1]
                print(
                    f"{size:>12} {decoder:>8}: decode {r['decode_s']:7.2f} s "
                    f"({r['s_per_frame']:.3f} s/frame), peak RSS during decode "
                    f"{r['decode_peak_rss'] / 2**20:7.0f} MiB (after load "
                    f"{r['load_peak_rss'] / 2**20:.0f} MiB), load {r['load_s']:.2f} s"
                )
    speed = {}
    for size in args.sizes.split(","):
        tiny, full = (next(r for r in rows if r["size"] == size and r["decoder"] == d)
                      for d in ("taew2_1", "vae"))  # fmt: skip
        speed[size] = {
            "speedup": round(full["decode_s"] / tiny["decode_s"], 2),
            "memory_ratio": round(full["decode_peak_rss"] / tiny["decode_peak_rss"], 2),
        }
        print(f"{size}: tiny VAE {speed[size]['speedup']}x faster, "
              f"{speed[size]['memory_ratio']}x less peak RSS")  # fmt: skip
    print(json.dumps({"host": host_line(), "threads": args.threads, "rows": rows, "ratios": speed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
