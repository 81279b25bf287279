"""Sliding context windows (``wanlite.runtime.windows``): peak RSS of a bidirectional
``generate()`` by video length, each run in its own process.

    python benchmarks/bench_windows.py --model random:micro --size 128x128 --frames 81,241,481

Per length, three runs: windows on (the defaults: 81-frame windows, 16 frames of overlap) with
``save_to`` (the frames stream into the MP4 as they are decoded), windows on keeping
``video.frames`` in memory (uint8 [F, H, W, 3]: grows with F by design), and windows off
(``context_frames=0``: every forward attends over the whole video) with ``save_to``.
``limits="model"`` (up to 1001 frames).  Random weights: memory and time only.  Prints the
host's CPU features, a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import gib, peak_rss, run_worker  # noqa: E402

from wanlite.bench import host_cpu, host_line  # noqa: E402

PROMPT = "a red fox running through snow, cinematic"
MODES = {  # name -> (context_frames, save_to)
    "windows+save_to": (81, True),
    "windows+frames": (81, False),
    "no windows+save_to": (0, True),
}


def worker(args) -> None:
    import wanlite

    h, w = (int(v) for v in args.size.split("x"))
    context_frames, save = MODES[args.mode]
    options = dict(device="cpu", dtype=args.dtype, limits="model", context_frames=context_frames)
    t0 = time.perf_counter()
    pipe = wanlite.load(args.model, **options)
    load_s, loaded = time.perf_counter() - t0, peak_rss()
    kw = dict(num_inference_steps=args.steps, guidance_scale=5.0, seed=42, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = Path(tmp) / "out.mp4" if save else None
        video = pipe.generate(PROMPT, h, w, num_frames=args.num_frames, save_to=out, **kw)
        total = time.perf_counter() - t0
        mp4 = out.stat().st_size if save else 0
    result = {"mode": args.mode, "frames": args.num_frames, "size": args.size, "load_s": load_s}
    result |= {"generate_s": total, "peak": peak_rss(), "peak_after_load": loaded}
    result |= {"dit_forwards": pipe.stats.get("dit_forwards"), "mp4_bytes": mp4}
    result["kept_frames"] = len(video.frames)  # 0 with save_to: the frames went to the file
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:micro")
    ap.add_argument("--size", default="128x128", help="HxW")
    ap.add_argument("--frames", default="81,241,481")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--num-frames", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(host_line())
    common = ["--model", args.model, "--size", args.size, "--steps", str(args.steps)]
    common += ["--dtype", args.dtype]
    results = []
    for f in args.frames.split(","):  # lengths interleaved across modes (a loaded host drifts)
        for mode in args.modes.split(","):
            r = run_worker(Path(__file__), ["--mode", mode, "--num-frames", f, *common])
            results.append(r)
            print(f"  {mode} {f}: peak {gib(r['peak'])} GiB, {r['generate_s']:.1f} s", flush=True)
    print(f"\nmodel {args.model}, {args.size}, {args.steps} steps, CFG 5, dtype {args.dtype}")
    print("| mode | frames | peak GiB | peak after load GiB | generate s | DiT forwards |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['frames']} | {gib(r['peak'])} | {gib(r['peak_after_load'])} | "
            f"{r['generate_s']:.1f} | {r['dit_forwards']} |"
        )
    out = {"bench": "windows", "host": host_cpu(), "model": args.model, "size": args.size}
    print(json.dumps(out | {"steps": args.steps, "dtype": args.dtype, "runs": results}))


if __name__ == "__main__":
    main()
