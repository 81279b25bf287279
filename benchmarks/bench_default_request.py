"""What a default request (480x640, 81 frames, 30 steps, CFG 5) costs on this CPU, estimated
from measured pieces at the real 1.3B shapes (random weights, the same arithmetic).

    python benchmarks/bench_default_request.py [--dtype auto] [--blocks 2]

A whole default request takes hours on a 2-core CPU, so it is not run end to end.  Measured
instead (``--whole-call`` runs whole ``wanlite generate`` processes of the fast recipe instead:
3 steps, guidance 1, radial attention, the tiny VAE), each the median of a few runs after a warm-up:
- one DiT block forward on the request's token stream (21 x 30 x 40 = 25,200 tokens per
  branch), both CFG branches batched, in wanlite's compute dtype; a step is ``num_layers`` of
  those (the embedders and the head are a rounding error next to 30 blocks);
- the VAE decode of 3 latent frames (9 video frames) at 480x640, scaled to the request's 21
  latent frames (the decode is causal and chunked per latent frame: linear in their count).
The text encode (seconds: ``bench_speed.py`` measures it with all 24 umT5 layers) is left out.
Prints the host's CPU features, a table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch

from wanlite.bench import host_cpu, host_line, run_worker
from wanlite.models.configs import FULL
from wanlite.models.dit import WanDiT
from wanlite.models.vae import WanVAE
from wanlite.options import Options
from wanlite.weights.random_checkpoint import random_state_dict

LATENT = (16, 21, 60, 80)  # 480x640x81 in latent space
PROMPT = "a red fox running through snow, cinematic"
PHASES = ("load", "encode", "denoise", "decode")


def _median_seconds(fn, runs: int) -> float:
    fn()  # warm-up (oneDNN primitives, allocator)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def block_seconds(dtype: torch.dtype, blocks: int, runs: int) -> float:
    """Seconds of one block forward at the request's size, CFG batched (batch 2)."""
    cfg = dataclasses.replace(FULL.dit, num_layers=blocks)
    model = WanDiT(cfg).eval()
    model.load_state_dict(random_state_dict(model, "transformer", 0))
    model = model.to(dtype)
    grid = (LATENT[1], LATENT[2] // 2, LATENT[3] // 2)
    x = torch.randn(2, grid[0] * grid[1] * grid[2], cfg.dim, dtype=dtype)
    text = model.prepare_text(torch.randn(2, 512, cfg.text_dim, dtype=dtype), [12, 1])
    _, e0 = model.time_embeddings(torch.tensor([500.0]), 1)
    rope = model.rope(grid, "cpu")
    step = lambda: model.run_blocks(x.clone(), e0, text, rope)  # noqa: E731
    return _median_seconds(step, runs) / blocks


@torch.inference_mode()
def decode_seconds(latent_frames: int, runs: int, dtype: torch.dtype) -> float:
    """Seconds of a full-shape VAE decode of 480x640 latents in ``dtype`` (wanlite's VAE dtype
    for the chosen compute dtype)."""
    vae = WanVAE(FULL.vae).eval()
    vae.load_state_dict(random_state_dict(vae, "vae", 0))
    vae = vae.to(dtype)
    z = torch.randn(1, 16, latent_frames, LATENT[2], LATENT[3], dtype=dtype)
    return _median_seconds(lambda: vae.decode(z), runs)


WHOLE_MODES = {  # the fast whole-call recipe at the default size, and its dense baseline
    # the authors' few-step setting (scripts/wan_t2v_inference_lightx2v.sh): with the 12 dense
    # first steps of the 50-step default, every step of a 3-step call would be dense
    "radial": ["--attention", "radial", "--radial-dense-steps", "1", "--radial-dense-blocks", "1"],
    "sdpa": ["--attention", "sdpa"],
}
_PHASE = re.compile(r"^(load|encode|denoise|decode): ([0-9.]+) s")


def whole_call(model: str, mode: str, steps: int, workdir: Path) -> dict:
    """One ``wanlite generate`` at 480x640x81 as a whole process: ``steps`` steps, guidance 1,
    the tiny VAE decoder (a random ``taew2_1``), from an empty cast cache (the first call on a
    machine); its phases as the CLI reports them, the wall time and the peak RSS."""
    import subprocess
    import sys

    from wanlite.weights.random_checkpoint import write_random_taehv

    tae = write_random_taehv(workdir / "taew2_1.safetensors")
    cast = workdir / f"cast-{mode}"
    shutil.rmtree(cast, ignore_errors=True)
    cmd = [sys.executable, "-m", "wanlite", "generate", "--model", model, "--prompt", PROMPT]
    cmd += ["--size", "640x480", "--num-frames", "81", "--num-inference-steps", str(steps)]
    cmd += ["--guidance-scale", "1", "--decoder", "taew2_1", "--tae", str(tae), "--seed", "42"]
    cmd += ["--cast-cache", str(cast), "--out", str(workdir / f"{mode}.mp4"), "--overwrite"]
    cmd += WHOLE_MODES[mode]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{r.stderr[-3000:]}")
    phases = {m[1]: float(m[2]) for line in r.stdout.splitlines() if (m := _PHASE.match(line))}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # its only child
    return {"mode": mode, "wall_s": wall, "phases": phases, "peak": peak}


def main_whole(a) -> None:
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(host_line())
    rows = []
    for mode in a.modes.split(","):  # each through a worker process of its own: its own peak
        args = ["--whole-worker", mode, "--model", a.model, "--steps", str(a.steps)]
        rows.append(run_worker([__file__, *args, "--workdir", str(workdir)]))
    print(f"\n480x640x81, {a.steps} steps, guidance 1, tiny VAE, {a.model}, empty cast cache:")
    print(
        "| mode | load s | encode s | denoise s | decode s | wall s | peak RSS GiB (max so far) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases"]
        cells = " | ".join(f"{ph.get(k, float('nan')):.1f}" for k in PHASES)
        print(f"| {r['mode']} | {cells} | {r['wall_s']:.1f} | {r['peak'] / 2**30:.2f} |")
    print(json.dumps({"host": host_cpu(), "model": a.model, "steps": a.steps, "runs": rows}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="auto")
    p.add_argument("--blocks", type=int, default=1, help="DiT blocks per timed forward")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--whole-call", action="store_true", help="run whole generate processes")
    p.add_argument("--model", default="random:full", help="--whole-call: the checkpoint")
    p.add_argument("--modes", default="radial,sdpa", help="--whole-call: " + ",".join(WHOLE_MODES))
    p.add_argument("--workdir", default="/tmp/wanlite-whole-call", help="--whole-call: files")
    p.add_argument("--whole-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.whole_worker:
        return print(json.dumps(whole_call(a.model, a.whole_worker, a.steps, Path(a.workdir))))
    if a.whole_call:
        return main_whole(a)
    cpu = torch.device("cpu")
    options = Options(dtype=a.dtype)
    dtype = options.resolve_dtype(cpu)
    vae_dtype = options.resolve_vae_dtype(dtype)
    block = block_seconds(dtype, a.blocks, a.runs)
    step = block * FULL.dit.num_layers
    dec3 = decode_seconds(3, 1, vae_dtype)
    decode = dec3 * LATENT[1] / 3
    total = step * a.steps + decode
    print(host_line())
    print(f"default request 480x640x81, {a.steps} steps, CFG 5 (batched), DiT in {dtype}, VAE "
          f"in {vae_dtype}:")  # fmt: skip
    print(f"  one DiT block, both branches: {block:.1f} s -> one step ({FULL.dit.num_layers} "
          f"blocks): {step:.0f} s")  # fmt: skip
    print(f"  VAE decode, 3 latent frames: {dec3:.0f} s -> 21 latent frames: {decode:.0f} s")
    print(f"  estimated total: {total / 60:.0f} min ({total / 3600:.1f} h), text encode aside")
    print(
        json.dumps(
            {
                "host": host_cpu(),
                "dtype": str(dtype),
                "vae_dtype": str(vae_dtype),
                "block_s": block,
                "step_s": step,
                "decode_s": decode,
                "total_s": total,
                "steps": a.steps,
            }
        )
    )


if __name__ == "__main__":
    main()
