"""CFG-parallel and Ulysses sequence parallel on this host: wall, per-rank peak memory and
communication per step, for each rank layout.

    WANLITE_CACHE=$HOME/.cache/wanlite python benchmarks/bench_parallel.py \
        [--layouts "none;cfg=2;ulysses=2;cfg=2,ulysses=2;ulysses=4"] [--layers 4] \
        [--size 256x256x9] [--steps 3] [--cores 2]

Model: the 1.3B's DiT at full width (dim 1536, 12 heads, ffn 8960) with ``--layers`` blocks
(30 in the real model: fewer keep a CPU run short; per-block cost and per-block communication
are the real ones), random weights, fp32; the umT5 (2 layers) and VAE of the full random
checkpoint, which only rank 0 reads.  Each layout is one ``torchrun`` launch (gloo); the
``--cores`` cores are shared out, ``OMP_NUM_THREADS = max(1, cores // ranks)`` per rank.  Each
rank loads, runs one warm-up step, then the timed request (``output_type="latent"``: the
denoising loop, which is what is parallel).  Reported per layout: denoise wall (the slowest
rank), peak RSS of the denoise phase on rank 0 (which also holds the umT5 and VAE here,
``offload="none"``) and on the other ranks (the DiT only), and bytes sent per rank per step
(counted in ``wanlite.runtime.parallel``).  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = ["none", "cfg=2", "ulysses=2", "cfg=2,ulysses=2", "ulysses=4"]


def checkpoint(layers: int) -> Path:
    """The full random checkpoint (umT5 with 2 layers) with a ``layers``-block DiT."""
    from wanlite.models.configs import FULL
    from wanlite.models.dit import WanDiT, to_diffusers_key
    from wanlite.paths import cache_dir
    from wanlite.weights import random_checkpoint as rc

    base = rc.ensure_random_checkpoint("full", t5_layers=2)
    out = cache_dir() / f"bench-parallel-{layers}blocks-v1"
    if (out / "model_index.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for name in ("text_encoder", "vae", "tokenizer", "scheduler", "model_index.json"):
        (tmp / name).symlink_to(base / name)
    dit = dataclasses.replace(FULL.dit, num_layers=layers)
    import torch

    with torch.device("meta"):
        module = WanDiT(dit)
    (tmp / "transformer").mkdir()
    (tmp / "transformer" / "config.json").write_text(json.dumps(dit.to_diffusers(), indent=2))
    params = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
    rc._write_shards(tmp / "transformer", "transformer", params, to_diffusers_key, 0, 2 * 2**30)
    tmp.rename(out)
    return out


def worker(model: str, layout: str, size: str, steps: int, out: Path) -> None:
    import torch

    import wanlite

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    h, w, f = (int(v) for v in size.split("x"))
    parallel = None if layout == "none" else layout
    pipe = wanlite.load(model, device="cpu", dtype="float32", offload="none", parallel=parallel)
    request = dict(height=h, width=w, num_frames=f, seed=1, progress=False, output_type="latent")
    pipe.generate("a red fox", num_inference_steps=1, **request)  # warm-up
    video = pipe.generate("a red fox", num_inference_steps=steps, **request)
    rank = int(os.environ.get("RANK", 0))
    row = dict(
        rank=rank,
        denoise_s=video.timings["denoise"],
        encode_s=video.timings["encode"],
        peak_denoise=video.peak_memory["denoise"],
        load_peak=pipe.load_peak,
        comm_bytes_per_step=video.stats.get("comm_bytes", 0) / steps,
        forwards=video.stats["dit_forwards"],
    )
    (out / f"{rank}.json").write_text(json.dumps(row))


def launch(model: Path, layout: str, args) -> list[dict]:
    ranks = 1
    if layout != "none":
        from wanlite.options import parse_parallel

        c, u = parse_parallel(layout)
        ranks = c * u
    out = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.cores // ranks)), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(ranks), __file__, "--worker", str(model), layout]
    cmd += [args.size, str(args.steps), str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        model, layout, size, steps, out = sys.argv[2:]
        return worker(model, layout, size, int(steps), Path(out))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default=";".join(LAYOUTS), help="';'-separated layouts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--size", default="256x256x9", help="HxWxF")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    from wanlite.bench import host_line

    model = checkpoint(args.layers)
    print(host_line())
    print(f"DiT: 1.3B width, {args.layers} blocks, fp32; {args.size}, {args.steps} steps, CFG on")
    print(f"{'layout':<18} {'ranks':>5} {'denoise s':>10} {'s/step':>8} {'peak rank 0':>12} "
          f"{'peak others':>12} {'comm MB/step/rank':>18}")  # fmt: skip
    rows = {}
    for layout in args.layouts.split(";"):
        ranks = launch(model, layout, args)
        wall = max(r["denoise_s"] for r in ranks)
        peak = ranks[0]["peak_denoise"] / 2**30
        others = max([r["peak_denoise"] / 2**30 for r in ranks[1:]], default=0)
        others_text = f"{others:>10.2f} G" if len(ranks) > 1 else f"{'-':>12}"
        comm = max(r["comm_bytes_per_step"] for r in ranks)
        rows[layout] = dict(ranks=ranks, wall=wall)
        print(f"{layout:<18} {len(ranks):>5} {wall:>10.1f} {wall / args.steps:>8.2f} "
              f"{peak:>10.2f} G {others_text} {comm / 2**20:>18.2f}")  # fmt: skip
    print(json.dumps(dict(args=vars(args), rows=rows)))


if __name__ == "__main__":
    main()
