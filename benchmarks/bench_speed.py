"""Speed: diffusers' WanPipeline vs wanlite's speed modes, same checkpoint, request and seed,
each run in its own process, in one invocation.

    python benchmarks/bench_speed.py [--height 256 --width 256 --num-frames 17 --steps 8]

Both engines compute in fp32 on the CPU (bf16 matmuls are ~6x slower than fp32 there, and the
exact mode is held to diffusers' output).  The checkpoint is the full-shape random one with 2 of
the 24 umT5 layers (``random:full:2``): diffusers in fp32 holds the whole 5.7 B-parameter text
encoder in RAM (22.7 GB) and would not fit this 24 GiB machine next to the DiT.  With 2 layers
the text phase is cheap for both engines, which understates wanlite's lead there.

Prints a table (seconds per phase, s/step, total, seconds of weight reads inside the call, peak
memory, speed-up of the denoise phase vs wanlite's exact mode, share of DiT forwards skipped,
fidelity vs exact, and each row's time as a ratio to diffusers), the fidelity of the exact mode
against diffusers, the load + first call totals, writes a PNG chart, and ends with one JSON line.

Both engines read their weights inside the timed call: wanlite at first use of each component,
diffusers through the memory map that ``from_pretrained`` leaves its safetensors weights in
(its load takes seconds for 8.5 GB; the pages are read at first touch, in the call).
"weights s" is wanlite's share of its call; diffusers' is not separable ("-").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import bench_params, diffusers_phases, save_result

from wanlite.bench import (
    DEFAULT_MODES,
    add_fidelity,
    chart,
    compare,
    mode_jobs,
    parse_modes,
    run_jobs,
    table,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", default=DEFAULT_MODES)
    p.add_argument("--size", default="full:2", help="random checkpoint (tiny: smoke test)")
    p.add_argument("--chart", type=Path, default=Path("bench_speed.png"))
    p.add_argument("--repeat", type=int, default=1, help="runs per row, interleaved; medians")
    a = p.parse_args()
    from wanlite.loading import resolve_model

    params = bench_params(a.height, a.width, a.num_frames, a.steps, 5.0)
    path = str(resolve_model(f"random:{a.size}"))  # built once, outside the timed workers
    if a.worker:
        save_result(diffusers_phases(path, params, "float32"), a.out)
        return
    tmp = Path(tempfile.mkdtemp())
    base = dict(device="cpu", dtype="float32", embed_cache=False)
    ref_job = [__file__, "--worker", *sys.argv[1:], "--out", str(tmp / "diffusers.npz")]
    jobs = {"diffusers-fp32": ref_job} | mode_jobs(path, params, parse_modes(a.modes), tmp, base)
    res = run_jobs(jobs, a.steps, a.repeat)
    ref = res.pop("diffusers-fp32")
    exact = next(iter(res))
    add_fidelity(res, exact)
    vs_diffusers = compare(tmp / "diffusers.npz", Path(res[exact]["npz"]))
    ref["fidelity_vs_exact"] = vs_diffusers
    rows = {"diffusers-fp32": ref, **res}
    print(
        f"\nrandom:{a.size} checkpoint, "
        f"{a.width}x{a.height}x{a.num_frames}, {a.steps} steps, CFG 5.0; CPU fp32, 2 cores"
    )
    print(table(rows, ref="diffusers-fp32"))
    print(
        f"\n{exact} vs diffusers: latents max abs diff {vs_diffusers['latents_max_abs_diff']:.2e}, "
        f"frames max diff {vs_diffusers['frames_max_diff']} levels, "
        f"PSNR {vs_diffusers['psnr_db']:.1f} dB"
    )
    cold = {n: r["load_s"] + r["generate_s"] for n, r in rows.items()}
    mine = res[exact]
    print(
        f"load + first call: diffusers {cold['diffusers-fp32']:.1f} s (load {ref['load_s']:.1f} s)"
        f", {exact} {cold[exact]:.1f} s (load {mine['load_s']:.1f} s + {mine['weights_s']:.1f} s"
        f" of weight reads in the call): {cold[exact] / cold['diffusers-fp32']:.3f}x"
    )
    title = f"wanlite vs diffusers, {a.width}x{a.height}x{a.num_frames}, {a.steps} steps, CPU"
    print(f"chart: {chart(rows, a.chart, title)}")
    print(json.dumps({"params": params, "results": rows, "exact_vs_diffusers": vs_diffusers}))


if __name__ == "__main__":
    main()
