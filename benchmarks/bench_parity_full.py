"""Exactness on the full 1.3B shapes: wanlite vs diffusers' WanPipeline, same checkpoint, fp32.

    python benchmarks/bench_parity_full.py [--t5-layers 2] [--height 128 --width 128 ...]

Uses the deterministic random checkpoint ``random:full:<t5_layers>`` (built into wanlite's
cache on first use).  Each engine runs in its own process (fp32, CPU); prints a table and a
last line of JSON with the latent and frame differences, times and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import (
    bench_params,
    compare,
    diffusers_phases,
    gib,
    run_worker,
    save_result,
    wanlite_generate,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["diffusers", "wanlite"])
    p.add_argument("--out", type=Path)
    p.add_argument("--t5-layers", type=int, default=2)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=5.0)
    a = p.parse_args()
    from wanlite.weights.loading import resolve_model

    path = str(resolve_model(f"random:full:{a.t5_layers}"))
    params = bench_params(a.height, a.width, a.num_frames, a.steps, a.guidance)
    if a.worker == "diffusers":
        save_result(diffusers_phases(path, params, "float32"), a.out)
        return
    if a.worker == "wanlite":
        save_result(wanlite_generate(path, params, device="cpu", dtype="float32"), a.out)
        return
    tmp = Path(tempfile.mkdtemp())
    base = sys.argv[1:]
    res = {}
    for engine in ("diffusers", "wanlite"):
        res[engine] = run_worker(Path(__file__), [engine, "--out", str(tmp / engine), *base])
    diff = compare(tmp / "diffusers.npz", tmp / "wanlite.npz")
    print(
        f"full shapes, umT5 {a.t5_layers} layers, {a.height}x{a.width}x{a.num_frames}, "
        f"{a.steps} steps, CFG {a.guidance}, fp32 CPU"
    )
    print(f"{'engine':<10} {'load s':>8} {'generate s':>11} {'peak GiB':>9}")
    for engine, r in res.items():
        print(f"{engine:<10} {r['load_s']:8.1f} {r['generate_s']:11.1f} {gib(r['peak']):>9}")
    print(
        f"latents max abs diff {diff['latents_max_abs_diff']:.2e}; "
        f"frames max diff {diff['frames_max_diff']} uint8 levels"
    )
    speed = res["diffusers"]["generate_s"] / res["wanlite"]["generate_s"]
    print(
        json.dumps(
            {
                "params": params,
                "t5_layers": a.t5_layers,
                **diff,
                "speedup_vs_diffusers": speed,
                "peak_ratio_vs_diffusers": res["wanlite"]["peak"] / res["diffusers"]["peak"],
                "results": res,
            }
        )
    )


if __name__ == "__main__":
    main()
