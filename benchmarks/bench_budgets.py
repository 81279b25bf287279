"""Budgeted runs against the unbudgeted default: peak RSS and wall per ``--max-memory``.

    python benchmarks/bench_budgets.py [--model random:full:2] [--budgets 3GB,4GB,6GB,8GB]
                                       [--dtype auto] [--height 128 --width 128 --num-frames 9
                                       --steps 2]

Each budget (and the unbudgeted default, "none") runs in its own process: load + one generate
call (CFG 5, embedding cache off, so every run encodes its prompts), as ``wanlite generate``
does.  Reported per run: the placement the planner chose (offload, DiT kept), its estimate,
the measured peak RSS (VmHWM: anonymous and mapped file pages), the wall of load + generate,
the seconds per phase, the seconds spent reading weights (and, for streamed blocks, on the
prefetch thread beside the compute, with the compute's waits for it), and the PSNR of the
frames against the unbudgeted run (placement must not change the result).  Prints the host's
CPU features, a table and a last line of JSON.  Only ratios within one run compare (other
processes load this host's CPU); the page cache is whatever the runs before left.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import bench_params, compare, gib, run_worker, save_result

from wanlite.bench import host_line

PHASES = ("encode", "denoise", "decode")


def worker(model: str, budget: str, params: dict, dtype: str) -> dict:
    """Load and generate once; the whole process's peak RSS and the wall of both."""
    import wanlite
    from wanlite.bench import host_cpu  # noqa: F401  (same import cost in every worker)

    opts = dict(device="cpu", dtype=dtype, embed_cache=False)
    if budget != "none":
        opts["max_memory"] = budget
    t0 = time.perf_counter()
    pipe = wanlite.load(model, **opts)
    load_s = time.perf_counter() - t0
    video = pipe.generate(**params, progress=False)
    wall = time.perf_counter() - t0
    place = pipe.placement
    return {
        "budget": budget,
        "offload": place.offload,
        "keep_dit": place.keep_dit,
        "cfg_batched": place.cfg_batched,
        "estimate": place.estimate.peak,
        # VmHWM is reset at each phase start (``PeakMeter``): the max over load and phases
        "peak": max(pipe.load_peak, *video.peak_memory.values()),
        "wall_s": wall,
        "load_s": load_s,
        "phase_seconds": video.timings,
        "weights_s": video.weights_seconds,
        "prefetch_s": video.prefetch_seconds,
        "prefetch_wait_s": video.prefetch_wait_seconds,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "arrays": {"latents": video.latents.float().numpy(), "frames": video.frames},
    }


def table(rows: list[dict]) -> None:
    head = f"{'budget':<8}{'offload':<9}{'DiT kept':<9}{'est GiB':>8}{'peak GiB':>9}"
    head += f"{'wall s':>8}{'x none':>7}" + "".join(f"{p[:6] + ' s':>9}" for p in PHASES)
    print(head + f"{'weights s':>10}{'prefetch s (waited)':>20}{'PSNR dB':>9}")
    for r in rows:
        secs = "".join(f"{r['phase_seconds'].get(p, 0):>9.1f}" for p in PHASES)
        psnr = "inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        prefetch = f"{r['prefetch_s']:.1f} ({r['prefetch_wait_s']:.1f})" if r["prefetch_s"] else "-"
        print(
            f"{r['budget']:<8}{r['offload']:<9}{str(r['keep_dit']):<9}{gib(r['estimate']):>8}"
            f"{gib(r['peak']):>9}{r['wall_s']:>8.1f}{r['wall_ratio']:>7.2f}{secs}"
            f"{r['weights_s']:>10.1f}{prefetch:>20}{psnr:>9}"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--out", type=Path)
    p.add_argument("--model", default="random:full:2")
    p.add_argument("--budgets", default="3GB,4GB,6GB,8GB")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    params = bench_params(a.height, a.width, a.num_frames, a.steps, 5.0)
    if a.worker is not None:
        save_result(worker(a.model, a.worker, params, a.dtype), a.out)
        return
    from wanlite.weights.loading import resolve_model

    resolve_model(a.model)  # build a random checkpoint once, outside the timed workers
    print(host_line())
    tmp = Path(tempfile.mkdtemp())
    argv = sys.argv[1:]
    runs = {}
    # The unbudgeted run first and last: the other processes on this host change its speed;
    # the ratios are to the mean of both, and their spread shows the noise.
    for i, name in enumerate(["none", *a.budgets.split(","), "none"]):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = tmp / f"{i}-{name}"
        runs[i] = run_worker(Path(__file__), [name, "--out", str(out), *argv]) | {"npz": out}
    base = (runs[0]["wall_s"] + runs[len(runs) - 1]["wall_s"]) / 2
    rows = []
    for r in runs.values():
        r["wall_ratio"] = r["wall_s"] / base
        r["psnr_db"] = compare(runs[0]["npz"].with_suffix(".npz"), r["npz"].with_suffix(".npz"))
        r["psnr_db"] = r["psnr_db"]["psnr_db"]
        rows.append(r)
    print(
        f"\n{a.model}, {a.height}x{a.width}x{a.num_frames}, {a.steps} steps, CFG 5, dtype "
        f"{rows[0]['dtype']}; one process per row (load + one call, embedding cache off)"
    )
    table(rows)
    keep = ("budget", "offload", "keep_dit", "estimate", "peak", "wall_s", "phase_seconds")
    keep += ("weights_s", "prefetch_s", "prefetch_wait_s", "psnr_db", "wall_ratio")
    out = [{k: r[k] for k in keep} for r in rows]
    print(json.dumps({"host": host_line(), "model": a.model, "runs": out}, default=str))


if __name__ == "__main__":
    main()
