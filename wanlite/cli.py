"""wanlite: text-to-video with Wan2.1 T2V 1.3B (generate, quantize, bench, serve, schema).

The only module that prints: the library logs.  Every user error ends in one clear line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import server
from .options import add_runtime_options, runtime_options
from .params import FIELDS, json_schema, validate
from .paths import DEFAULT_MODEL


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a video from a text prompt")
    p.add_argument(
        "--model",
        default=None,
        help=f"local folder, hub id, or random:tiny (default {DEFAULT_MODEL} unless every "
        "weight set is given as a single file)",
    )
    add_single_file_flags(p)
    p.add_argument("--out", default="video.mp4", help="output MP4 path (default video.mp4)")
    types = {"string": str, "integer": int, "number": float}
    for f in FIELDS:
        rng = f" ({f.range_text()})" if f.minimum is not None else ""
        default = "" if f.default is None else f"; default {f.default!r}"
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=types[f.type],
            # None: the preset's default if there is one, else the schema's (wanlite.presets)
            default=None if f.name in PRESET_FIELDS else f.default,
            required=f.required,
            help=f"{f.description}{rng}{default}",
        )
    add_runtime_options(p)
    _add_preset(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument(
        "--preview",
        default=None,
        metavar="PATH.png",
        help="keep a PNG contact sheet of the latest preview (the current prediction) here",
    )
    p.add_argument(
        "--preview-every", type=int, default=5, metavar="N", help="steps between previews (5)"
    )


PRESET_FIELDS = ("num_inference_steps", "guidance_scale")  # defaults a preset may change


def _add_preset(p) -> None:
    p.add_argument(
        "--preset",
        default=None,
        help="a named recipe (see `wanlite presets`): sampler, default steps and guidance",
    )


def _presets(args) -> int:
    from .presets import describe_presets

    for name, settings, source in describe_presets():
        print(f"{name}: {settings}\n  source: {source}")
    return 0


def add_single_file_flags(p, tokenizer: bool = True) -> None:
    """--transformer / --text-encoder / --vae (/ --tokenizer): single files (``formats``)."""
    what = {
        "transformer": "the DiT: safetensors (original/diffusers names, bf16/fp16/fp32/fp8), GGUF",
        "text-encoder": "the umT5: safetensors (HF-T5 or Wan names, fp8 scaled too), .pth, GGUF",
        "vae": "the VAE: .pth or safetensors (original or diffusers names)",
    }
    for name, text in what.items():
        p.add_argument(f"--{name}", default=None, help=f"single file for {text}")
    if tokenizer:
        p.add_argument(
            "--tokenizer", default=None, help="folder with the umT5 tokenizer.json (or the file)"
        )


def single_files(args) -> dict:
    keys = ("transformer", "text_encoder", "vae", "tokenizer")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="write single files (and/or a model) as one diffusers folder, once"
    )
    p.add_argument("--model", default=None, help="folder, hub id or random:... for the rest")
    add_single_file_flags(p)
    p.add_argument("--out", required=True, type=Path, help="new checkpoint folder")
    p.add_argument("--quant", default=None, help="int8 | fp8: a wanlite quantized checkpoint")


def _convert(args) -> int:
    from .convert import convert

    out = convert(args.out, args.model, quant=args.quant, **single_files(args))
    print(f"wrote {'a ' + args.quant if args.quant else 'a diffusers'} checkpoint: {out}")
    return 0


def _previews(args) -> dict:
    """``generate``'s preview arguments for ``--preview PATH.png`` (checked before loading)."""
    if args.preview is None:
        return {}
    from .preview import contact_sheet, write_png

    path = Path(args.preview)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--preview must be a .png path, got {str(path)!r}")
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"--preview {str(path)!r} is a directory or its folder does not exist")
    if args.preview_every < 1:
        raise ValueError(f"--preview-every must be at least 1, got {args.preview_every}")

    def on_preview(step: int, total: int, frames) -> None:
        write_png(path, contact_sheet(frames))  # atomic: a viewer never sees half a file

    return dict(preview_every=args.preview_every, on_preview=on_preview)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write a quantized copy of a checkpoint")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder, hub id, or random:tiny")
    p.add_argument("--quant", required=True, help="int8 | fp8")
    p.add_argument("--out", required=True, type=Path, help="new checkpoint folder")


def _quantize(args) -> int:
    from .lifecycle import quantize_checkpoint
    from .loading import resolve_model

    out = quantize_checkpoint(resolve_model(args.model), args.out, args.quant)
    print(f"wrote {args.quant} checkpoint: {out}")
    return 0


def _add_bench(sub) -> None:
    from .bench import DEFAULT_MODES

    p = sub.add_parser("bench", help="time wanlite's speed modes on a checkpoint and device")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder, hub id, or random:tiny")
    p.add_argument(
        "--modes", default=DEFAULT_MODES, help=f"comma-separated (default {DEFAULT_MODES})"
    )
    p.add_argument("--out", default="wanlite-bench", help="folder for bench.json and bench.png")
    p.add_argument("--prompt", default="a red fox running through snow, cinematic")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=None, help="default 8, or the preset's")
    p.add_argument(
        "--guidance-scale", type=float, default=None, help="default 5.0, or the preset's"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per mode, interleaved; medians are reported (default 3: one run's "
        "differences are noise)",
    )
    add_runtime_options(p, defaults=False)
    _add_preset(p)


def _bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def _generate(args) -> int:
    from . import load
    from .memory import fmt_bytes
    from .presets import request_defaults

    request = {f.name: getattr(args, f.name) for f in FIELDS}
    steps, guidance = request_defaults(
        args.preset, request.pop("num_inference_steps"), request.pop("guidance_scale")
    )
    params = validate(request | {"num_inference_steps": steps, "guidance_scale": guidance})
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must be an .mp4 path, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory")
    previews = _previews(args)
    pipe = load(args.model, preset=args.preset, **single_files(args), **runtime_options(args))
    video = pipe.generate(**params.to_dict(), progress=not args.quiet, save_to=out, **previews)
    if pipe.parallel is not None and not pipe.parallel.main:
        return 0  # under torchrun: rank 0 wrote the file and reports
    if "parallel" in video.stats:
        sent = video.stats["comm_bytes"] / max(1, params.num_inference_steps) / 2**20
        print(f"parallel {video.stats['parallel']}: {sent:.1f} MiB sent per step by rank 0")
    print(f"seed: {video.seed}")
    size = f"{params.num_frames} frames, {params.width}x{params.height}, {video.fps} fps"
    print(f"saved: {out} ({size})")
    print(f"load: {pipe.load_seconds:.1f} s, peak {fmt_bytes(pipe.load_peak)}")
    for phase, seconds in video.timings.items():
        print(f"{phase}: {seconds:.1f} s, peak {fmt_bytes(video.peak_memory[phase])}")
    print(f"of which reading weights: {video.weights_seconds:.1f} s")
    shown = video.stats.get("preview_seconds")
    if shown:
        each = sum(shown) / len(shown)
        print(f"previews: {len(shown)} to {args.preview}, {each:.2f} s each")
    st = video.stats
    if "dit_forwards" in st:
        cfg = "batched" if st["cfg_batched"] else "sequential"
        print(
            f"DiT forwards: {st['dit_forwards']}, skipped by the step cache: "
            f"{st['dit_forwards_skipped']} (CFG {cfg}, negative pass on {st['cfg_steps']} steps)"
        )
    nag = _nag_summary(pipe.options)
    if nag:
        print(nag)
    return 0


def _nag_summary(o) -> str | None:
    """The summary's NAG line from the options ``o``, or None when NAG is off (nothing is
    printed then)."""
    if o.nag_scale is None:
        return None
    return f"NAG: scale {o.nag_scale:g}, tau {o.nag_tau:g}, alpha {o.nag_alpha:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanlite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_quantize(sub)
    _add_convert(sub)
    _add_bench(sub)
    server.add_parser(sub)
    server.add_worker_parser(sub)
    sub.add_parser("schema", help="print the JSON Schema of the generation parameters")
    sub.add_parser("presets", help="list the named recipes (--preset) and their sources")
    args = parser.parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "serve":
        return server.run(args)
    if args.command == "worker":
        return server.run_worker(args)
    # Under torchrun (--parallel) only rank 0 logs; the other ranks print errors only.
    quiet = getattr(args, "quiet", False) or os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        commands = {
            "generate": _generate,
            "quantize": _quantize,
            "convert": _convert,
            "bench": _bench,
            "presets": _presets,
        }
        return commands[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
