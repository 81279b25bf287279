"""Causal streaming (``Pipeline.stream``): time to the first frames, seconds of video made per
wall second, and peak RSS, each run in its own process.

    python benchmarks/bench_stream.py --model random:full:2 --runs 480x640x81,480x832x81
    python benchmarks/bench_stream.py --model random:micro --runs 64x64x81,64x64x241,64x64x481
    python benchmarks/bench_stream.py --model random:full:2 --runs 480x832x81 --chunks 1

The checkpoint's DiT is run as a causal one (``causal=True``: a Self-Forcing checkpoint has the
same layout and shapes; loading its ``.pt`` is tested in tests/test_causal.py), with
Self-Forcing's recipe: chunks of 3 latent frames, 4 steps, the clean rerun, a rolling KV window
of ``--kv-window`` latent frames (21, the trained length, by default).  Random weights: speed
and memory only.  ``--chunks N`` stops each run after N chunks (time to the first frames
without the whole video: "all frames" is then blank and the rate is over the chunks made).
Prints the host's CPU features, a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import gib, peak_rss, run_worker  # noqa: E402

from wanlite.bench import host_cpu, host_line  # noqa: E402

PROMPT = "a red fox running through snow, cinematic"


def worker(args) -> None:
    import wanlite

    h, w, f = (int(v) for v in args.run.split("x"))
    options = dict(device="cpu", dtype=args.dtype, causal=True, kv_window=args.kv_window)
    options |= dict(limits="model")  # Wan's own 480x832, past the hosted API's 640 width
    options |= dict(kv_sink=args.kv_sink, decoder=args.decoder)
    if args.decoder == "taew2_1":
        from wanlite.weights.random_checkpoint import write_random_taehv

        options["tae"] = str(write_random_taehv(Path(args.workdir) / "taew2_1.safetensors"))
    t0 = time.perf_counter()
    pipe = wanlite.load(args.model, **options)
    load_s = time.perf_counter() - t0
    chunks, t0 = [], time.perf_counter()
    for frames in pipe.stream(PROMPT, h, w, f, seed=42, progress=False):
        chunks.append((time.perf_counter() - t0, len(frames)))
        partial = args.chunks is not None and len(chunks) >= args.chunks
        # A line per chunk on stderr: a long run's progress when the worker is run by hand.
        print(f"chunk {len(chunks)}: {chunks[-1][0]:.1f} s, {len(frames)} frames, "
              f"peak {gib(peak_rss())} GiB", file=sys.stderr, flush=True)  # fmt: skip
        if partial:
            break  # closes the stream: its placement is settled
    total = time.perf_counter() - t0
    n = sum(c[1] for c in chunks)
    print(
        json.dumps(
            {
                "run": args.run,
                "load_s": load_s,
                "first_s": chunks[0][0],
                "total_s": None if partial else total,
                "frames": n,
                "video_s_per_s": n / 16 / total,  # 16 fps
                "chunk_s": [round(c[0], 2) for c in chunks],
                "peak": peak_rss(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:micro")
    ap.add_argument("--runs", default="64x64x81,64x64x241,64x64x481", help="HxWxF,...")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decoder", default="vae", choices=["vae", "taew2_1"])
    ap.add_argument("--kv-window", type=int, default=21)
    ap.add_argument("--kv-sink", type=int, default=0)
    ap.add_argument("--chunks", type=int, help="stop each run after this many chunks")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="/tmp/wanlite-bench-stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    Path(args.workdir).mkdir(exist_ok=True)
    print(host_line())
    common = ["--model", args.model, "--dtype", args.dtype, "--decoder", args.decoder]
    common += ["--kv-window", str(args.kv_window), "--kv-sink", str(args.kv_sink)]
    common += ["--workdir", args.workdir]
    common += [] if args.chunks is None else ["--chunks", str(args.chunks)]
    results = []
    for run in args.runs.split(","):
        r = run_worker(Path(__file__), ["--run", run, *common])
        results.append(r)
        print(
            f"  {run}: first frames {r['first_s']:.1f} s, all {_secs(r['total_s'])} s", flush=True
        )
    print(f"\nmodel {args.model}, dtype {args.dtype}, decoder {args.decoder}, "
          f"kv window {args.kv_window} sink {args.kv_sink}")  # fmt: skip
    print("| HxWxF | load s | first frames s | all frames s | video s per wall s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['run']} | {r['load_s']:.1f} | {r['first_s']:.1f} | {_secs(r['total_s'])} | "
            f"{r['video_s_per_s']:.3g} | {gib(r['peak'])} |"
        )
    out = {"bench": "stream", "host": host_cpu(), "model": args.model, "dtype": args.dtype}
    out |= {"chunks": args.chunks}
    out |= {"decoder": args.decoder, "kv_window": args.kv_window, "kv_sink": args.kv_sink}
    print(json.dumps(out | {"runs": results}))


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


if __name__ == "__main__":
    main()
