"""``wanlite bench``: time and memory of wanlite's speed modes on your checkpoint and device.

Each mode runs in its own process (so its peak memory is its own: CUDA max_memory_allocated,
or peak RSS per phase on CPU), with the same request and seed.  Output: a table (per-phase
seconds, s/step, seconds of weight reads inside the call, peak memory, speed-up vs the exact
mode, DiT forwards skipped, fidelity vs the exact mode: PSNR of the frames and max abs diff of
the latents), a JSON file, and a PNG chart.

Modes are named ``exact`` (``exact:aten`` / ``exact:onednn`` force a linear backend),
``compile``, ``teacache:<threshold>``, ``firstblock:<threshold>``, ``cfg-skip:<fraction>``,
joined by commas; ``benchmarks/bench_speed.py`` runs the same harness
next to diffusers' WanPipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RANDOM_LORA = "random-lora"  # a mode's placeholder for a random LoRA file written for the run
DEFAULT_MODES = (
    "exact,compile,teacache:0.05,teacache:0.08,teacache:0.15,firstblock:0.05,cfg-skip:0.25"
)


def parse_modes(spec: str) -> dict[str, dict]:
    """``"exact,teacache:0.08"`` -> {name: wanlite Options overrides}."""
    modes = {}
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        kind, _, value = name.partition(":")
        try:
            if kind == "exact" and not value:
                modes[name] = {}
            elif kind == "exact" and value in ("aten", "onednn"):  # a linear backend, forced
                modes[name] = {"linear": value}
            elif kind == "compile" and not value:
                modes[name] = {"compile": True}
            elif kind in ("teacache", "firstblock"):
                modes[name] = {"cache": kind, "cache_threshold": float(value)}
            elif kind == "cfg-skip":
                modes[name] = {"cfg_skip_last": float(value)}
            elif kind == "vae" and value in ("float32", "bfloat16"):  # the VAE's dtype, forced
                modes[name] = {"vae_dtype": value}
            elif kind == "preset" and value:  # with a random rank-32 LoRA (mode_jobs writes it)
                modes[name] = {"preset": value, "lora": RANDOM_LORA}
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"unknown bench mode {name!r}: use exact, exact:aten, compile, teacache:<t>, "
                "firstblock:<t>, cfg-skip:<fraction>, vae:float32|bfloat16 or preset:<name>"
            ) from None
    if not modes:
        raise ValueError("no bench modes given")
    return modes


def host_cpu() -> dict:
    """The host's CPU: model name and the features that decide bf16 speed.  Printed with every
    benchmark: figures from hosts with other features are not comparable."""
    flags, name = set(), "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return {"model": name, "cores": os.cpu_count(), "features": [f for f in wanted if f in flags]}


def host_line() -> str:
    cpu = host_cpu()
    return f"host: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['features']) or 'none'}"


def run_generation(model: str, params: dict, options: dict) -> dict:
    """Load and generate once in this process; measurements plus the output arrays."""
    import wanlite

    t0 = time.perf_counter()
    pipe = wanlite.load(model, **options)
    load_s = time.perf_counter() - t0
    warmup_s = None
    if options.get("compile"):  # compile once for these shapes (1 step), as a long-lived app would
        t0 = time.perf_counter()
        pipe.generate(**(params | {"num_inference_steps": 1}), progress=False)
        warmup_s = time.perf_counter() - t0
        pipe.embeddings.memory.clear()  # the timed run encodes its prompts like every other mode
    t0 = time.perf_counter()
    video = pipe.generate(**params, progress=False)
    generate_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "compile_warmup_s": warmup_s,
        "generate_s": generate_s,
        "weights_s": video.weights_seconds,
        "prefetch_s": video.prefetch_seconds,
        "prefetch_wait_s": video.prefetch_wait_seconds,
        "lora_merge_s": sum(c.lora_seconds for c in pipe.components.values()),
        "steps": video.params["num_inference_steps"],
        "guidance_scale": video.params["guidance_scale"],
        "phase_seconds": video.timings,
        "phase_peaks": video.peak_memory,
        "peak": max(pipe.load_peak, *video.peak_memory.values()),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "stats": video.stats,
        "estimate": pipe.placement.estimate.as_dict(),  # the planner's, for this call
        "arrays": {"latents": video.latents.float().cpu().numpy(), "frames": video.frames},
    }


def save(result: dict, npz: Path) -> None:
    """Worker side: arrays to ``npz``, the rest as the last line of stdout."""
    np.savez(npz, **result.pop("arrays"))
    print(json.dumps(result))


def run_worker(args: list[str], timeout: float = 24 * 3600) -> dict:
    """Run ``python -m wanlite.bench --worker ...`` (or another module's worker) in a new
    process; return the JSON it prints last."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )
    if r.returncode != 0:
        raise RuntimeError(f"bench worker {args} failed:\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def compare(ref_npz: Path, npz: Path) -> dict:
    a, b = np.load(ref_npz), np.load(npz)
    return {
        "latents_max_abs_diff": float(np.abs(a["latents"] - b["latents"]).max()),
        "frames_max_diff": int(np.abs(a["frames"].astype(int) - b["frames"].astype(int)).max()),
        "psnr_db": psnr(a["frames"], b["frames"]),
    }


def mode_jobs(
    model: str, params: dict, modes: dict[str, dict], workdir: Path, base: dict | None = None
) -> dict[str, list[str]]:
    """The worker command line of each mode (``base`` options shared); outputs go to workdir."""
    jobs = {}
    for name, opts in modes.items():
        request = params
        if opts.get("lora") == RANDOM_LORA:  # a preset row: its steps and guidance, a LoRA
            opts = opts | {"lora": [(str(_random_lora(model, workdir)), 1.0)]}
            request = params | {"num_inference_steps": None, "guidance_scale": None}
        spec = json.dumps({"model": model, "params": request, "options": (base or {}) | opts})
        jobs[name] = ["-m", "wanlite.bench", "--worker", spec, str(workdir / f"{_safe(name)}.npz")]
    return jobs


def _random_lora(model: str, workdir: Path) -> Path:
    from .models.configs import read_model_config
    from .weights.random_checkpoint import write_random_lora

    path = workdir / "random-lora-rank32.safetensors"
    return path if path.is_file() else write_random_lora(path, read_model_config(model).dit)


def warm_page_cache(*places: str | Path | tuple[Path, int, int]) -> float:
    """Read every file under each of ``places`` (folders, files, or (file, offset, nbytes)
    ranges) once (into the OS page cache, not this process), so each timed run starts from the
    same warm cache; returns the seconds it took."""
    t0 = time.perf_counter()
    chunk = 64 * 2**20
    for place in places:
        if isinstance(place, tuple):
            ranges = [place]
        else:
            files = [Path(place)] + sorted(Path(place).rglob("*"))
            ranges = [(f, 0, f.stat().st_size) for f in files if f.is_file()]
        for path, offset, nbytes in ranges:
            with open(path, "rb", buffering=0) as f:
                for start in range(offset, offset + nbytes, chunk):
                    os.pread(f.fileno(), min(chunk, offset + nbytes - start), start)
    return time.perf_counter() - t0


def read_set(model: str, opts: dict) -> list[Path | tuple[Path, int, int]]:
    """What a wanlite call with ``opts`` reads from disk: the byte ranges of the tensors its
    components load (``Component.source_entry``: from the cast cache where it holds them, else
    from the checkpoint; not the modules read by rows, the umT5's token embedding: a prompt
    reads a few of its rows) and the folder's small files (not LoRA files: a bench writes its
    random LoRA just before the runs).  Warming just these models a user's repeated calls;
    warming the whole checkpoint (what diffusers reads) would also fill the page cache with the
    5.7 GB fp32 DiT that wanlite no longer reads, evicting what it does on a 24 GB machine."""
    from .pipeline import ROW_EMBEDDINGS, load

    pipe = load(model, **{k: v for k, v in opts.items() if k != "lora"})
    ranges: list[tuple[Path, int, int]] = []
    for name, comp in pipe.components.items():
        by_rows = ROW_EMBEDDINGS.get(name)
        for ours in comp.names:
            if by_rows is not None and ours.startswith(by_rows + "."):
                continue
            e = comp.source_entry(ours)
            if getattr(e, "path", None) is not None:
                ranges.append((Path(e.path), e.offset, e.nbytes))
    small = [f for f in Path(model).rglob("*") if f.is_file() and f.stat().st_size < 2**24]
    return [*small, *_merged_ranges(ranges)]


def _merged_ranges(ranges: list[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    """Sorted, with adjacent or overlapping ranges of a file joined (fewer, longer reads)."""
    out: list[list] = []
    for path, offset, nbytes in sorted(ranges):
        if out and out[-1][0] == path and offset <= out[-1][1] + out[-1][2]:
            out[-1][2] = max(out[-1][2], offset + nbytes - out[-1][1])
        else:
            out.append([path, offset, nbytes])
    return [tuple(r) for r in out]


def cast_files(model: str, modes: dict[str, dict], base: dict | None = None) -> list[Path]:
    """The cast cache files (``wanlite.weights.castcache``) the runs of ``modes`` read, written now
    if missing: a user's second and later calls find them on disk, and so do the timed runs (the
    call that writes them is timed on its own, see ``benchmarks/bench_speed.py``)."""
    from .pipeline import load

    files = set()
    for opts in modes.values():
        opts = {k: v for k, v in ((base or {}) | opts).items() if k != "lora"}
        for comp in load(model, **opts).components.values():
            if (f := comp.cast_file(write=True)) is not None:
                files.add(f)
    return sorted(files)


def run_jobs(
    jobs: dict[str, list[str]],
    steps: int,
    repeat: int = 1,
    warm: str | Path | list | dict | None = None,
) -> dict[str, dict]:
    """Run every job ``repeat`` times, round-robin (so slow spells of a shared machine hit all
    rows alike); times are the per-phase medians (and s/step of ``steps``), peaks the maximum.
    ``warm``: a checkpoint folder (or a list of places, see ``warm_page_cache``; or a dict of
    such lists by job name: what each job reads) read into the page cache before every run.
    The npz path of a job is its last argument."""
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for i in range(repeat):
        for name, argv in jobs.items():
            places = warm.get(name) if isinstance(warm, dict) else warm
            if places is not None:
                warm_page_cache(*(places if isinstance(places, list) else [places]))
            print(f"running {name} ({i + 1}/{repeat}) ...", file=sys.stderr, flush=True)
            runs[name].append(run_worker(argv) | {"npz": argv[-1]})
    return {name: _median(rs, steps) for name, rs in runs.items()}


def _median(rs: list[dict], steps: int) -> dict:
    out = dict(rs[0])
    out["phase_seconds"] = {
        k: float(np.median([r["phase_seconds"][k] for r in rs])) for k in rs[0]["phase_seconds"]
    }
    out["generate_s"] = float(np.median([r["generate_s"] for r in rs]))
    out["load_s"] = float(np.median([r["load_s"] for r in rs]))
    # Seconds of the call spent reading weights (wanlite reads them at first use; None for a
    # reference that does not report it).
    w = [r["weights_s"] for r in rs if r.get("weights_s") is not None]
    out["weights_s"] = float(np.median(w)) if w else None
    out["weights_s_each"] = [r.get("weights_s") for r in rs]
    if all(r.get("lora_merge_s") is not None for r in rs):
        out["lora_merge_s"] = float(np.median([r["lora_merge_s"] for r in rs]))
    out["s_per_step"] = out["phase_seconds"]["denoise"] / out.get("steps", steps)
    out["peak"] = max(r["peak"] for r in rs)
    out["runs"] = len(rs)
    out["generate_s_each"] = [r["generate_s"] for r in rs]
    out["denoise_s_each"] = [r["phase_seconds"]["denoise"] for r in rs]
    return out


def within_noise(a: list[float], b: list[float]) -> bool:
    """Whether two rows' run times cannot be told apart: one run each (no spread measured), or
    their ranges over the repeated runs overlap."""
    if len(a) < 2 or len(b) < 2:
        return True
    return min(a) <= max(b) and min(b) <= max(a)


def add_fidelity(results: dict[str, dict], exact: str) -> None:
    """Fidelity of each row vs the ``exact`` row, and its denoise speed-up over it."""
    for r in results.values():
        r["fidelity_vs_exact"] = compare(Path(results[exact]["npz"]), Path(r["npz"]))
        r["speedup_vs_exact"] = results[exact]["phase_seconds"]["denoise"] / max(
            r["phase_seconds"]["denoise"], 1e-9
        )
        r["speedup_within_noise"] = within_noise(
            results[exact]["denoise_s_each"], r["denoise_s_each"]
        )


def run_modes(
    model: str, params: dict, modes: dict[str, dict], workdir: Path, base=None, repeat: int = 1
) -> dict[str, dict]:
    """Every mode in its own process; fidelity and speed-up vs the first mode."""
    jobs = mode_jobs(model, params, modes, workdir, base)
    warm = [model, *cast_files(model, modes, base)]
    results = run_jobs(jobs, params["num_inference_steps"], repeat, warm=warm)
    add_fidelity(results, next(iter(results)))
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def table(results: dict[str, dict], ref: str | None = None) -> str:
    """One row per engine/mode; ratios to ``ref`` (e.g. diffusers) when given."""
    head = (
        f"{'mode':<20}{'encode s':>9}{'denoise s':>10}{'decode s':>9}{'s/step':>8}"
        f"{'total s':>9}{'weights s':>10}{'peak GiB':>9}{'x exact':>8}{'skipped':>8}"
        f"{'PSNR dB':>8}{'lat diff':>9}"
    )
    if ref is not None:
        head += f"{'time x ref':>11}"
    lines = [head]
    for name, r in results.items():
        ph, fid, st = r["phase_seconds"], r.get("fidelity_vs_exact", {}), r.get("stats", {})
        skipped = (
            f"{st['dit_forwards_skipped'] / max(st['dit_forwards'], 1):.0%}"
            if "dit_forwards" in st
            else "-"
        )
        speed = r.get("speedup_vs_exact")
        db, lat = fid.get("psnr_db", float("nan")), fid.get("latents_max_abs_diff", float("nan"))
        row = (
            f"{name:<20}{ph['encode']:>9.1f}{ph['denoise']:>10.1f}{ph['decode']:>9.1f}"
            f"{r['s_per_step']:>8.2f}{r['generate_s']:>9.1f}{_num(r.get('weights_s')):>10}"
            f"{r['peak'] / 2**30:>9.2f}"
            f"{_speed(speed, r.get('speedup_within_noise')):>8}{skipped:>8}"
            f"{db:>8.1f}{lat:>9.1e}"
        )
        if ref is not None:
            row += f"{r['generate_s'] / results[ref]['generate_s']:>11.3f}"
        lines.append(row)
    lines.append(
        "x exact: denoise speed-up (medians); ~ marks a difference within the run-to-run "
        "spread (ranges of the repeated runs overlap, or one run only)"
    )
    return "\n".join(lines)


def _speed(speed: float | None, noise: bool | None) -> str:
    return "-" if speed is None else f"{'~' if noise else ''}{speed:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pyplot():
    """matplotlib's pyplot, or None when it is not installed (only the chart needs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def chart(results: dict[str, dict], path: Path, title: str) -> Path | None:
    """Stacked bars of seconds per phase for each mode, labelled with the PSNR vs exact; None
    without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4.5))
    bottom = np.zeros(len(names))
    for phase in ("encode", "denoise", "decode"):
        vals = np.array([results[n]["phase_seconds"][phase] for n in names])
        ax.bar(names, vals, bottom=bottom, label=phase)
        bottom += vals
    for i, n in enumerate(names):
        db = results[n].get("fidelity_vs_exact", {}).get("psnr_db")
        if db is not None:
            label = "identical" if db == float("inf") else f"{db:.1f} dB"
            ax.text(i, bottom[i], label, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend()
    plt.xticks(rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args) -> int:
    """The ``wanlite bench`` command (arguments from ``cli``)."""
    from .options import runtime_options
    from .params import validate
    from .sampling.presets import request_defaults
    from .weights.loading import resolve_model

    modes = parse_modes(args.modes)
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    steps = args.steps if args.steps is not None or args.preset else 8  # short by default
    steps, guidance = request_defaults(args.preset, steps, args.guidance_scale)
    params = validate(
        prompt=args.prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=args.seed,
        limits=args.limits or "hosted",
    ).to_dict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(args.model))
    base = runtime_options(args)  # only the flags that were given
    if args.preset:
        base["preset"] = args.preset
    base["embed_cache"] = False  # every mode encodes its prompts: same work in every row
    results = run_modes(model, params, modes, out, base, args.repeat)
    title = (
        f"{args.model}: {params['width']}x{params['height']}x{params['num_frames']}, "
        f"{params['num_inference_steps']} steps, {results[next(iter(results))]['device']}"
    )
    print(title)
    print(host_line())
    print(table(results))
    doc = {"params": params, "host": host_cpu(), "results": results}
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    png = chart(results, out / "bench.png", title)
    if png is None:
        print(f"wrote {out / 'bench.json'} (no chart: pip install 'wanlite[bench]' for matplotlib)")
    else:
        print(f"wrote {out / 'bench.json'} and {png}")
    print(json.dumps(doc))
    return 0


def _worker(argv: list[str]) -> None:
    spec, npz = json.loads(argv[0]), Path(argv[1])
    save(run_generation(spec["model"], spec["params"], spec["options"]), npz)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("internal entry point: use `wanlite bench`")
    _worker(sys.argv[2:])
