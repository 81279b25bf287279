"""wanlite: text-to-video with Wan2.1 T2V 1.3B (generate, convert, bench, serve, worker, schema).

The only module that prints: the library logs.  Every user error ends in one clear line on
stderr and a non-zero exit code, never a traceback.

Flags come in --help sections (``SECTIONS``: request / model and files / precision and memory /
speed / accelerators / output and logging), with one spelling per idea in every command:
``--num-inference-steps``; ``--out`` a file (generate), ``--out-dir`` a folder (convert, bench);
``--log-level`` with ``-q`` for warning.  ``generate`` never replaces a file silently: without
``--out`` it makes a new name, and an existing ``--out`` needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path

from . import __version__, server
from .options import (
    HelpFormatter,
    add_logging_options,
    add_runtime_options,
    add_single_file_flags,
    arg_group,
    runtime_options,
    single_files,
)
from .params import FIELDS, LIMITS, json_schema, validate
from .paths import DEFAULT_MODEL

SECTIONS = (
    "request",
    "model and files",
    "precision and memory",
    "speed",
    "accelerators",
    "output and logging",
)
PRESET_FIELDS = ("num_inference_steps", "guidance_scale")  # defaults a preset may change
_TYPES = {"string": str, "integer": int, "number": float}


def _command(sub, name: str, text: str, **kw) -> argparse.ArgumentParser:
    """A sub-command with the sections of ``SECTIONS`` made in their --help order."""
    p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter, **kw)
    for title in SECTIONS:
        arg_group(p, title)
    return p


def _add_size(group) -> None:
    group.add_argument(
        "--size",
        default=None,
        metavar="WxH",
        help="width and height in one: 640x480, or Wan's 832*480 (width*height); "
        "instead of --width/--height",
    )


def _add_generate(sub) -> None:
    p = _command(sub, "generate", "generate a video from a text prompt")
    request = arg_group(p, "request")
    for f in FIELDS:
        if f.name == "height":
            _add_size(request)
        rng = f" ({f.range_text()})" if f.minimum is not None else ""
        default = "random" if f.name == "seed" else repr(f.default)
        if f.name in PRESET_FIELDS:
            default += ", or the preset's"
        default = "" if f.required else f" (default: {default})"
        request.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_TYPES[f.type],
            # None: the preset's default if there is one, else the schema's (sampling.presets);
            # for height and width: not given (--size may set them).
            default=None if f.name in (*PRESET_FIELDS, "height", "width") else f.default,
            required=f.required,
            help=f"{f.description}{rng}{default}",
        )
    _add_model(arg_group(p, "model and files"), default=None)
    add_single_file_flags(arg_group(p, "model and files"))
    add_runtime_options(p)
    _add_preset(arg_group(p, "accelerators"))
    out = arg_group(p, "output and logging")
    out.add_argument(
        "--out",
        default=None,
        metavar="PATH.mp4",
        help="the MP4 to write (default: a new wanlite-DATE-TIME-seedN.mp4 here)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    out.add_argument(
        "--stream",
        action="store_true",
        help="causal models: write the MP4 chunk by chunk as it is made (playable while it "
        "grows, and after an interruption); --num-frames may then exceed the schema's limit",
    )
    out.add_argument(
        "--preview",
        default=None,
        metavar="PATH.png",
        help="keep a PNG contact sheet of the latest preview (the current prediction) here",
    )
    out.add_argument(
        "--preview-every", type=int, default=5, metavar="N", help="steps between previews"
    )
    add_logging_options(out)


def _add_model(group, default: str | None = DEFAULT_MODEL) -> None:
    text = "local folder, hub id, or random:tiny"
    if default is None:
        text += f" (default {DEFAULT_MODEL} unless every weight set is given as a single file)"
    group.add_argument("--model", default=default, help=text)


def _add_preset(group) -> None:
    group.add_argument(
        "--preset",
        default=None,
        help="a named recipe (see `wanlite presets`): sampler, default steps and guidance",
    )


def _presets(args) -> int:
    from .sampling.presets import describe_presets

    for name, settings, source in describe_presets():
        print(f"{name}: {settings}\n  source: {source}")
    return 0


def _add_out_dir(group, text: str, *aliases: str, default: str | None = None) -> None:
    # dest "out": the name the commands' functions take (convert(out, ...), bench.main)
    group.add_argument(
        "--out-dir",
        *aliases,
        dest="out",
        required=default is None,
        default=default,
        type=Path,
        metavar="DIR",
        help=text,
    )


def _add_convert(sub) -> None:
    p = _command(sub, "convert", "write single files (and/or a model) as one checkpoint folder")
    files = arg_group(p, "model and files")
    files.add_argument("--model", default=None, help="folder, hub id or random:... for the rest")
    add_single_file_flags(files)
    arg_group(p, "precision and memory").add_argument(
        "--quant",
        default=None,
        choices=("int8", "fp8"),
        help="write a wanlite quantized checkpoint (default: a diffusers folder)",
    )
    out = arg_group(p, "output and logging")
    _add_out_dir(out, "the new checkpoint folder (absent or empty)")
    add_logging_options(out)


def _convert(args) -> int:
    from .convert import convert

    out = convert(args.out, args.model, quant=args.quant, **single_files(args))
    print(f"wrote {'a ' + args.quant if args.quant else 'a diffusers'} checkpoint: {out}")
    return 0


def _add_quantize(sub) -> None:
    p = _command(sub, "quantize", "deprecated: use `wanlite convert --quant`")
    _add_model(arg_group(p, "model and files"))
    quant = arg_group(p, "precision and memory")
    quant.add_argument("--quant", required=True, choices=("int8", "fp8"), help="weight format")
    out = arg_group(p, "output and logging")
    _add_out_dir(out, "the new checkpoint folder", "--out")
    add_logging_options(out)


def _quantize(args) -> int:
    print(
        f"warning: `wanlite quantize` is deprecated: use `wanlite convert --model {args.model} "
        f"--quant {args.quant} --out-dir {args.out}` (it writes the same checkpoint)",
        file=sys.stderr,
    )
    return _convert(args)


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


def _add_bench(sub) -> None:
    from .bench import DEFAULT_MODES

    p = _command(sub, "bench", "time wanlite's speed modes on a checkpoint and device")
    request = arg_group(p, "request")
    prompt = "a red fox running through snow, cinematic"
    request.add_argument("--prompt", default=prompt, help="the prompt of every run")
    _add_size(request)
    request.add_argument("--height", type=int, default=None, help="(default: 256)")
    request.add_argument("--width", type=int, default=None, help="(default: 256)")
    request.add_argument("--num-frames", type=int, default=17, help="frames per video")
    request.add_argument(
        "--num-inference-steps",
        dest="steps",  # the name bench.main reads
        type=int,
        default=None,
        metavar="N",
        help="steps per run (default: 8, or the preset's)",
    )
    request.add_argument(
        "--guidance-scale", type=float, default=None, help="(default: 5.0, or the preset's)"
    )
    request.add_argument("--seed", type=int, default=42, help="the seed of every run")
    _add_model(arg_group(p, "model and files"))
    add_runtime_options(p, defaults=False)
    _add_preset(arg_group(p, "accelerators"))
    runs = p.add_argument_group("benchmark")
    runs.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated modes")
    runs.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per mode, interleaved; medians are reported (default 3: one run's "
        "differences are noise)",
    )
    out = arg_group(p, "output and logging")
    _add_out_dir(out, "folder for bench.json and bench.png", default="wanlite-bench")
    add_logging_options(out)


def _bench(args) -> int:
    from .bench import main as bench_main

    args.height, args.width = request_size(args, 256, 256)
    return bench_main(args)


# -- --size ---------------------------------------------------------------------------------------
_SIZE = re.compile(r"(\d+)\s*[xX*]\s*(\d+)")


def parse_size(text: str) -> tuple[int, int]:
    """``"832x480"`` or Wan's own ``"832*480"`` (width first in both) -> ``(height, width)``;
    the ranges are the request's to check."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"--size must be WIDTHxHEIGHT, e.g. 640x480 or 832*480, got {text!r}")
    return int(m[2]), int(m[1])


def request_size(args, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` from ``--size`` or ``--height``/``--width`` (the defaults given here
    for those not given); both at once is an error, even when they agree."""
    if args.size is None:
        return (
            height if args.height is None else args.height,
            width if args.width is None else args.width,
        )
    if args.height is not None or args.width is not None:
        raise ValueError("--size sets the width and height: give --size or --width/--height")
    return parse_size(args.size)


# -- generate -------------------------------------------------------------------------------------
def _check_out(args) -> Path | None:
    """``--out``, checked before any model work: an .mp4 path, not a folder, and no existing
    file unless ``--overwrite``; its folder (or this one) writable if it exists.  None without
    ``--out`` (a new name is made at the end)."""
    if args.out is None:
        _check_writable(Path("."))
        return None
    out = Path(args.out)
    _check_writable(out.parent)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must be an .mp4 path, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory")
    if out.exists() and not args.overwrite:
        raise ValueError(
            f"--out {str(out)!r} exists: add --overwrite to replace it, or leave --out out "
            "for a new name"
        )
    return out


def _check_writable(folder: Path) -> None:
    """A folder that exists but cannot take a new file is an error now, not after the run."""
    import tempfile

    if not folder.exists():
        return  # made when the video is written
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write a video into {str(folder)!r}: {e.strerror or e}") from None


def _publish(tmp: Path, out: Path | None, overwrite: bool, stamp: str, seed: int) -> Path:
    """Give the finished MP4 ``tmp`` its name: ``out`` (replaced only with ``overwrite``), or
    ``wanlite-<stamp>-seed<seed>.mp4`` here; a name taken meanwhile gets "-2", "-3", ..."""
    from .video import move_into_place

    if out is not None and overwrite:
        move_into_place(tmp, out)
        return out
    base = out or Path(f"wanlite-{stamp}-seed{seed}.mp4")
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.stem}-{n}{base.suffix}")
        try:
            move_into_place(tmp, path, overwrite=False)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _generate(args) -> int:
    from . import load
    from .sampling.presets import request_defaults

    stamp = time.strftime("%Y%m%d-%H%M%S")  # the start: names a video made without --out
    request = {f.name: getattr(args, f.name) for f in FIELDS}
    request["height"], request["width"] = request_size(args, 480, 640)
    steps, guidance = request_defaults(
        args.preset, request.pop("num_inference_steps"), request.pop("guidance_scale")
    )
    request |= {"num_inference_steps": steps, "guidance_scale": guidance}
    frames = request["num_frames"]
    if args.stream:  # stream() checks the frame count against its own, longer limit
        request["num_frames"] = 1
    params = validate(request, limits=args.limits)  # --limits model: the wider ranges
    previews = _previews(args)
    out = _check_out(args)
    pipe = load(args.model, preset=args.preset, **single_files(args), **runtime_options(args))
    if pipe.causal:  # its own step count and no CFG, unless given explicitly
        steps, guidance = args.num_inference_steps, args.guidance_scale
        params = dataclasses.replace(params, num_inference_steps=steps, guidance_scale=guidance)
    if args.stream:
        return _stream(args, pipe, dataclasses.replace(params, num_frames=frames), out, stamp)
    # Written under a hidden name beside the target, named when done (never over a file).
    folder = out.parent if out is not None else Path(".")
    tmp = folder / f".wanlite-{os.getpid()}-{secrets.token_hex(4)}.mp4"
    try:
        progress = args.log_level in ("debug", "info")  # the bars: not with -q
        video = pipe.generate(**params.to_dict(), progress=progress, save_to=tmp, **previews)
        if pipe.parallel is not None and not pipe.parallel.main:
            return 0  # under torchrun: rank 0 wrote the file and reports
        path = _publish(tmp, out, args.overwrite, stamp, video.seed)
    finally:
        tmp.unlink(missing_ok=True)
    if out is not None and path != out:
        print(f"warning: {out} appeared while generating: saved as {path}", file=sys.stderr)
    _summary(args, pipe, video, params, path)
    return 0


def _stream(args, pipe, params, out: Path | None, stamp: str) -> int:
    """``generate --stream``: the MP4 is written where it will stay, fragment by fragment, as
    the causal model makes each chunk (never over an existing file without --overwrite)."""
    from .causal import SELF_FORCING
    from .frames import model_label
    from .video import made_by, write_fragmented_mp4

    if not pipe.causal:
        raise ValueError("--stream needs a causal model (Self-Forcing, CausVid): see --causal")
    if params.seed is None:  # drawn here, so the file can be named after it before the run
        params = dataclasses.replace(params, seed=secrets.randbelow(2**32))
    kw = params.to_dict()
    chunks = pipe.stream(**kw, progress=args.log_level in ("debug", "info"))
    used = {"num_inference_steps": kw["num_inference_steps"] or len(SELF_FORCING.timesteps)}
    meta = made_by(kw | used | {"guidance_scale": 1.0}, params.seed, model_label(pipe.source))
    t0 = time.perf_counter()
    for n in itertools.count(1):
        base = out or Path(f"wanlite-{stamp}-seed{params.seed}.mp4")
        path = base if n == 1 else base.with_name(f"{base.stem}-{n}{base.suffix}")
        try:
            h, w = params.height, params.width
            write_fragmented_mp4(path, chunks, h, w, metadata=meta, overwrite=args.overwrite)
            break
        except FileExistsError:
            if out is not None:  # --out appeared meanwhile
                print(f"warning: {out} appeared before the stream began", file=sys.stderr)
            continue
    print(f"seed: {params.seed}")
    size = f"{params.num_frames} frames, {params.width}x{params.height}, 16 fps"
    print(f"saved: {path} ({size}), streamed in {time.perf_counter() - t0:.1f} s")
    return 0


def _summary(args, pipe, video, params, path: Path) -> None:
    from .runtime.memory import fmt_bytes

    if "parallel" in video.stats:
        sent = video.stats["comm_bytes"] / max(1, params.num_inference_steps) / 2**20
        print(f"parallel {video.stats['parallel']}: {sent:.1f} MiB sent per step by rank 0")
    print(f"seed: {video.seed}")
    size = f"{params.num_frames} frames, {params.width}x{params.height}, {video.fps} fps"
    print(f"saved: {path} ({size})")
    print(f"load: {pipe.load_seconds:.1f} s, peak {fmt_bytes(pipe.load_peak)}")
    for phase, seconds in video.timings.items():
        print(f"{phase}: {seconds:.1f} s, peak {fmt_bytes(video.peak_memory[phase])}")
    print(f"of which reading weights: {video.weights_seconds:.1f} s")
    if video.prefetch_seconds:
        print(
            f"streamed blocks: {video.prefetch_seconds:.1f} s of reads beside the compute, "
            f"which waited {video.prefetch_wait_seconds:.1f} s for them"
        )
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


def _nag_summary(o) -> str | None:
    """The summary's NAG line from the options ``o``, or None when NAG is off (nothing is
    printed then)."""
    if o.nag_scale is None:
        return None
    return f"NAG: scale {o.nag_scale:g}, tau {o.nag_tau:g}, alpha {o.nag_alpha:g}"


# -- main -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """The ``wanlite`` argument parser, every sub-command included."""
    p = argparse.ArgumentParser(
        prog="wanlite", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"wanlite {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_convert(sub)
    _add_bench(sub)
    server.add_parser(sub)
    server.add_worker_parser(sub)
    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of the generation parameters",
        formatter_class=HelpFormatter,
    )
    ranges = "request ranges: hosted (the hosted API's) or model (up to 1280, 1001 frames)"
    schema.add_argument("--limits", choices=tuple(LIMITS), default="hosted", help=ranges)
    sub.add_parser("presets", help="list the named recipes (--preset) and their sources")
    _add_quantize(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(args.limits), indent=2))
        return 0
    if args.command == "serve":
        return server.run(args)
    if args.command == "worker":
        return server.run_worker(args)
    # Under torchrun (--parallel) only rank 0 logs; the other ranks print errors only.
    level = getattr(args, "log_level", "info")
    if os.environ.get("RANK", "0") != "0":
        level = "warning"
    logging.basicConfig(level=level.upper(), format="%(message)s")
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
    except (RuntimeError, ImportError, OSError) as e:  # ImportError: an optional package, named
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
