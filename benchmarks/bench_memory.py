"""Peak memory and time: diffusers' WanPipeline vs wanlite's low-memory profiles, on the same
full-shape random checkpoint (all 24 umT5 layers) and the same parameters, each run in its own
process (peak RSS per phase, reset between phases via /proc/self/clear_refs).

    python benchmarks/bench_memory.py [--height 128 --width 128 --num-frames 9 --steps 2]

Prints a table (per-phase peaks, total peak, wall time, ratios to diffusers, fidelity vs
wanlite's unquantized output), the planner's estimate for 832x480x81 per profile, a check of
the planner's DiT activation estimate against one measured full-shape block forward at 32,760
tokens, and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    bench_params,
    compare,
    diffusers_phases,
    gib,
    peak_rss,
    reset_peak,
    run_worker,
    save_result,
    wanlite_generate,
)

PROFILES = {  # name -> wanlite options
    "none": dict(quant="none", offload="model"),
    "int8": dict(quant="int8", offload="model"),
    "fp8": dict(quant="fp8", offload="model"),
    "int8+blocks": dict(quant="int8", offload="blocks"),
    "none+blocks": dict(quant="none", offload="blocks"),
}
PHASES = ("encode", "denoise", "decode")


def block_check() -> dict:
    """Peak RSS of one full-shape DiT block forward at 480P's 32,760 tokens, fp32, CPU."""
    import torch

    from wanlite.models.configs import FULL
    from wanlite.models.dit import FFN_CHUNK, WanDiT
    from wanlite.weights.random_checkpoint import random_state_dict

    cfg = FULL.dit
    import dataclasses

    one = dataclasses.replace(cfg, num_layers=1)
    model = WanDiT(one).eval()
    model.load_state_dict(random_state_dict(model, "transformer", 0))
    grid, d = (21, 30, 52), cfg.dim
    x = torch.randn(1, grid[0] * grid[1] * grid[2], d)
    text = model.prepare_text(torch.randn(1, 512, cfg.text_dim))
    _, e0 = model.time_embeddings(torch.tensor([500.0]), 1)
    rope = model.rope(grid, "cpu")
    base = peak_rss()
    reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.blocks[0](x, e0, text, 0, rope, model.attn)
    seconds = time.perf_counter() - t0
    measured = peak_rss() - base
    tokens = x.shape[1]
    estimate = 8 * tokens * d * 4 + 2 * min(tokens, FFN_CHUNK) * cfg.ffn_dim * 4
    return {
        "tokens": tokens,
        "measured_activation_bytes": measured,
        "estimated_activation_bytes": estimate,
        "seconds": seconds,
    }


def decode_run(path: str, size: str, tiled: bool, vae_dtype: str) -> dict:
    """One generation (1 step, no CFG) whose decode phase is measured: peak RSS of the phase
    against the planner's decode estimate for the same call."""
    h, w, f = (int(v) for v in size.split("x"))
    params = bench_params(h, w, f, 1, 1.0)
    opts = dict(device="cpu", dtype="float32", offload="model", embed_cache=False)
    opts["vae_dtype"] = vae_dtype
    return wanlite_generate(path, params, opts | {"vae_tiling": "on" if tiled else "off"})


def decode_check(sizes: list[str], argv: list[str], tmp: Path, vae_dtype: str) -> list[dict]:
    """Tiled vs untiled decode at each size, each in its own process: measured decode peak,
    the planner's estimate, decode seconds, and the tiled frames' PSNR against untiled."""
    rows = []
    for size in sizes:
        runs = {}
        for tiled in (False, True):
            name = f"decode-{size}-{'tiled' if tiled else 'untiled'}"
            print(f"running {name} ...", file=sys.stderr, flush=True)
            runs[tiled] = run_worker(Path(__file__), [name, "--out", str(tmp / name), *argv])
        fid = compare(tmp / f"decode-{size}-untiled.npz", tmp / f"decode-{size}-tiled.npz")
        for tiled, r in runs.items():
            measured, est = r["phase_peaks"]["decode"], r["estimate"]["decode"]
            rows.append(
                dict(size=size, tiled=tiled, measured=measured, estimate=est,
                     ratio=est / measured, seconds=r["phase_seconds"]["decode"],
                     psnr_vs_untiled=fid["psnr_db"] if tiled else None)
            )  # fmt: skip
    print(f"\nVAE decode (full shapes, VAE {vae_dtype}, offload model): size, tiling: measured "
          "peak GiB, planner GiB (ratio), seconds, PSNR tiled vs untiled")  # fmt: skip
    for r in rows:
        psnr = "" if r["psnr_vs_untiled"] is None else f", {r['psnr_vs_untiled']:.1f} dB"
        print(
            f"  {r['size']:<12} {'tiled' if r['tiled'] else 'untiled':<8} {gib(r['measured'])}"
            f"  {gib(r['estimate'])} ({r['ratio']:.2f})  {r['seconds']:.1f} s{psnr}"
        )
    return rows


def planner_table() -> dict:
    from wanlite.models.configs import FULL
    from wanlite.runtime.planner import estimate

    out = {}
    for name, o in PROFILES.items():
        for tiled in (False, True):
            est = estimate(
                FULL,
                (16, 21, 60, 104),
                compute_bytes=4,
                quant=o["quant"],
                offload=o["offload"],
                tiled=tiled,
            )
            out[f"{name}{' +tiled VAE' if tiled else ''}"] = est.as_dict() | {"peak": est.peak}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--out", type=Path)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--profiles", default=",".join(PROFILES))
    p.add_argument("--no-block-check", action="store_true")
    p.add_argument("--size", default="full", help="random checkpoint size (tiny: smoke test)")
    p.add_argument(
        "--decode-sizes",
        default="256x256x9,480x640x9",
        help="HxWxF sizes for the tiled/untiled decode check ('' to skip)",
    )
    p.add_argument("--vae-dtype", default="float32", help="the decode check's VAE dtype")
    a = p.parse_args()
    from wanlite.weights.loading import resolve_model

    params = bench_params(a.height, a.width, a.num_frames, a.steps, 5.0)
    if a.worker == "block":
        print(json.dumps(block_check()))
        return
    if a.worker is not None:
        path = str(resolve_model(f"random:{a.size}"))
        if a.worker.startswith("decode-"):
            _, size, tiling = a.worker.split("-")
            save_result(decode_run(path, size, tiling == "tiled", a.vae_dtype), a.out)
        elif a.worker == "diffusers-bf16":
            save_result(diffusers_phases(path, params, "bfloat16"), a.out)
        else:
            opts = PROFILES[a.worker] | dict(device="cpu", dtype="float32", embed_cache=False)
            save_result(wanlite_generate(path, params, opts), a.out)
        return
    resolve_model(f"random:{a.size}")  # build it once, outside the timed workers
    tmp = Path(tempfile.mkdtemp())
    argv = [x for x in sys.argv[1:]]
    names = ["diffusers-bf16", *a.profiles.split(",")] if a.profiles else []
    res = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        res[name] = run_worker(Path(__file__), [name, "--out", str(tmp / name), *argv])
    sizes = [s for s in a.decode_sizes.split(",") if s]
    decode = decode_check(sizes, argv, tmp, a.vae_dtype) if sizes else None
    if not names:
        print(json.dumps({"decode_check": decode}))
        return
    ref = res["diffusers-bf16"]
    base = "none" if "none" in res else None
    print(
        f"\n{a.size} shapes (all umT5 layers), {a.height}x{a.width}x{a.num_frames}, "
        f"{a.steps} steps, CFG 5.0; CPU; diffusers bf16 weights+compute, wanlite fp32 compute"
    )
    head = f"{'engine':<16}" + "".join(f"{ph + ' GiB':>12}" for ph in PHASES)
    print(
        head + f"{'peak GiB':>10}{'x diff.':>8}{'time s':>8}{'x diff.':>8}"
        f"{'PSNR dB':>9}{'lat diff':>10}"
    )
    for name, r in res.items():
        r["peak_ratio"] = r["peak"] / ref["peak"]
        r["time_ratio"] = r["generate_s"] / ref["generate_s"]
        if base is not None and name != "diffusers-bf16":
            r["fidelity_vs_none"] = compare(tmp / f"{base}.npz", tmp / f"{name}.npz")
        fid = r.get("fidelity_vs_none", {})
        cells = "".join(f"{gib(r['phase_peaks'][ph]):>12}" for ph in PHASES)
        print(
            f"{name:<16}{cells}{gib(r['peak']):>10}{r['peak_ratio']:>8.3f}"
            f"{r['generate_s']:>8.1f}{r['time_ratio']:>8.3f}"
            f"{fid.get('psnr_db', float('nan')):>9.1f}"
            f"{fid.get('latents_max_abs_diff', float('nan')):>10.2e}"
        )
    plan = planner_table()
    print("\nplanner estimate for 832x480x81 (GiB): profile: encode / denoise / decode -> peak")
    for name, e in plan.items():
        print(
            f"  {name:<24} {gib(e['encode'])} / {gib(e['denoise'])} / {gib(e['decode'])}"
            f" -> {gib(e['peak'])}"
        )
    block = None
    if not a.no_block_check:
        block = run_worker(Path(__file__), ["block"])
        print(
            f"\none DiT block forward at {block['tokens']} tokens (fp32 CPU, "
            f"{block['seconds']:.0f} s): activation peak measured "
            f"{gib(block['measured_activation_bytes'])} GiB, planner "
            f"{gib(block['estimated_activation_bytes'])} GiB"
        )
    print(
        json.dumps(
            {
                "params": params,
                "results": res,
                "planner_832x480x81": plan,
                "block_check": block,
                "decode_check": decode,
            }
        )
    )


if __name__ == "__main__":
    main()
