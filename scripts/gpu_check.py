"""The GPU check: what a session with one GPU for a few minutes should run, in one command.

    python scripts/gpu_check.py                       # CUDA, random:full:2, 480x640x81, 2 steps
    python scripts/gpu_check.py --device cpu --quick  # CI: random:tiny at a small size (< 2 min)

It prints one table and, as its last line, one JSON object with:

- ``tests``: every test marked ``@pytest.mark.cuda``, run (on CUDA) or listed as skipped with
  the reason (elsewhere), from ``pytest -m cuda``'s JUnit report;
- ``parity``: our frames against diffusers' ``WanPipeline`` on the same checkpoint, seed and
  size (PSNR in dB over uint8 frames, latents max |diff|);
- ``wall``: load + generate seconds, ours (default options) against diffusers loaded as its Wan
  docs show (``torch_dtype=bfloat16``, VAE in fp32, ``enable_model_cpu_offload()`` on CUDA);
- ``memory``: peak memory per phase (``torch.cuda.max_memory_allocated`` on CUDA, RSS on CPU)
  for each offload mode x quantization, beside the planner's estimate for the same placement;
- ``attention``: each attention backend that can run here (the others with the reason), its
  denoise seconds and latents max |diff| against SDPA.

Only the public API is used (``wanlite.load``, ``Pipeline.generate``, ``Video``, the planner's
``Placement.estimate``), so the check breaks when the API does, not when internals move.  Each
entry catches its own error (recorded, the check goes on); entries past ``--budget`` seconds are
recorded as skipped, so the check ends in time on a slow GPU.  Checkpoints are random (weights
are noise): this measures speed, memory and agreement, not pictures.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import wanlite  # noqa: E402
from wanlite.attention import NAMES, available  # noqa: E402
from wanlite.loading import resolve_model  # noqa: E402

PROMPT, NEGATIVE, SEED = "a red fox running through snow", "blurry, low quality", 1234
FULL = dict(model="random:full:2", height=480, width=640, num_frames=81, steps=2)
QUICK = dict(model="random:tiny", height=32, width=48, num_frames=5, steps=2)
KEYS = ("device", "dtype", "model", "size", "tests", "parity", "wall", "memory", "attention")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--quick", action="store_true", help="random:tiny at a small size")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--model", default=None, help="default: random:full:2 (random:tiny quick)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds before entries skip")
    return p.parse_args(argv)


# --- helpers ------------------------------------------------------------------------------------


def gen_kwargs(size: dict) -> dict:
    return dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=size["height"],
        width=size["width"],
        num_frames=size["num_frames"],
        num_inference_steps=size["steps"],
        seed=SEED,
        progress=False,
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(entry: dict, deadline: float, fn) -> dict:
    """``fn()``'s fields merged into ``entry``; an error or the time budget is recorded."""
    if time.perf_counter() > deadline:
        return {**entry, "status": "skipped: time budget"}
    try:
        return {**entry, "status": "ok", **fn()}
    except Exception as e:  # one broken entry must not hide the others
        return {**entry, "status": f"error: {type(e).__name__}: {e}"[:300]}


# --- sections ----------------------------------------------------------------------------------


def cuda_tests() -> list[dict]:
    """Run ``pytest -m cuda`` (on a machine without CUDA every one is skipped with its reason)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cuda.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={report}", "tests"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report: {proc.stdout[-500:]}{proc.stderr[-500:]}")
        tests = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, reason = "passed", ""
            for kind in ("skipped", "failure", "error"):
                node = case.find(kind)
                if node is not None:
                    outcome, reason = kind, (node.get("message") or "")[:200]
            name = f"{case.get('classname')}::{case.get('name')}"
            tests.append({"test": name, "outcome": outcome, "reason": reason})
    return tests


def run_ours(model: str, kw: dict, output_type: str = "frames", **options) -> dict:
    t0 = time.perf_counter()
    pipe = wanlite.load(model, **options)
    loaded = time.perf_counter()
    video = pipe.generate(**kw, output_type=output_type)
    done = time.perf_counter()
    estimate = pipe.placement.estimate.as_dict()
    out = dict(
        video=video,
        load_s=loaded - t0,
        generate_s=done - loaded,
        placement=pipe.placement.offload,
        estimate=estimate,
    )
    del pipe
    return out


def run_diffusers(path: Path, kw: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """diffusers as its Wan docs load it: the VAE in fp32, CPU offload of whole models on CUDA."""
    from diffusers import AutoencoderKLWan, WanPipeline

    t0 = time.perf_counter()
    # ``dtype=`` is what the docs' ``torch_dtype=`` is called in current diffusers.
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    loaded = time.perf_counter()
    out = pipe(
        prompt=kw["prompt"],
        negative_prompt=kw["negative_prompt"],
        height=kw["height"],
        width=kw["width"],
        num_frames=kw["num_frames"],
        num_inference_steps=kw["num_inference_steps"],
        generator=torch.Generator("cpu").manual_seed(kw["seed"]),
        output_type="np",
    ).frames[0]
    done = time.perf_counter()
    frames = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    del pipe
    return dict(frames=frames, load_s=loaded - t0, generate_s=done - loaded)


def parity_and_wall(args, device, dtype, kw) -> tuple[dict, dict]:
    """One run each (ours with default options, diffusers as documented) gives both."""
    ours = run_ours(args.model, kw, device=str(device), dtype=str(dtype).removeprefix("torch."))
    free_memory(device)
    ref = run_diffusers(resolve_model(args.model), kw, device, dtype)
    free_memory(device)
    frames = ours["video"].frames
    parity = dict(psnr_db=psnr(frames, ref["frames"]), frames_shape=list(frames.shape))
    ours_s, ref_s = ours["load_s"] + ours["generate_s"], ref["load_s"] + ref["generate_s"]
    wall = dict(
        wanlite_load_s=ours["load_s"],
        wanlite_generate_s=ours["generate_s"],
        wanlite_offload=ours["placement"],
        diffusers_load_s=ref["load_s"],
        diffusers_generate_s=ref["generate_s"],
        speedup=ref_s / ours_s,
    )
    return parity, wall


def memory_matrix(args, device, dtype, kw, deadline) -> list[dict]:
    rows = []
    for offload in ("none", "model", "blocks"):
        for quant in ("none", "int8", "fp8"):

            def run(offload=offload, quant=quant):
                r = run_ours(
                    args.model, kw, device=str(device), dtype=str(dtype).removeprefix("torch."),
                    offload=offload, quant=quant, embed_cache=False,
                )  # fmt: skip
                peak = r["video"].peak_memory
                ratio = {k: peak[k] / r["estimate"][k] for k in peak if r["estimate"].get(k)}
                return dict(peak=peak, estimate=r["estimate"], peak_over_estimate=ratio)

            rows.append(guarded(dict(offload=offload, quant=quant), deadline, run))
            free_memory(device)
    return rows


def attention_backends(args, device, dtype, kw, deadline) -> list[dict]:
    rows, reference = [], None
    for name in ("sdpa", *(n for n in NAMES if n not in ("auto", "sdpa"))):
        reason = available(name, device, dtype)
        if reason is not None:
            rows.append(dict(backend=name, status=f"unavailable: {reason}"))
            continue

        def run(name=name):
            nonlocal reference
            opts = dict(device=str(device), dtype=str(dtype).removeprefix("torch."))
            r = run_ours(args.model, kw, "latent", attention=name, embed_cache=False, **opts)
            lat = r["video"].latents.float().cpu()
            reference = lat if reference is None else reference
            diff = (lat - reference).abs().max().item()
            return dict(denoise_s=r["video"].timings["denoise"], latents_max_diff=diff)

        rows.append(guarded(dict(backend=name), deadline, run))
        free_memory(device)
    return rows


# --- report ------------------------------------------------------------------------------------


def gib(n) -> str:
    return f"{n / 2**30:.2f}"


def print_table(r: dict) -> None:
    print(f"\n== GPU check: {r['device']} {r['dtype']} {r['model']} {r['size']} ==")
    print("\n-- tests marked cuda --")
    for t in r["tests"]:
        print(f"  {t['outcome']:8s} {t['test']}  {t['reason']}")
    p, w = r["parity"], r["wall"]
    print(f"\n-- parity vs diffusers: {p}")
    print(f"-- wall: {w}")
    print("\n-- peak memory per phase, GiB (estimate) --")
    print(f"  {'offload':8s} {'quant':6s} {'encode':>16s} {'denoise':>16s} {'decode':>16s}")
    for m in r["memory"]:
        if m["status"] != "ok":
            print(f"  {m['offload']:8s} {m['quant']:6s} {m['status']}")
            continue
        cells = [f"{gib(m['peak'][k])} ({gib(m['estimate'][k])})" for k in m["peak"]]
        print(f"  {m['offload']:8s} {m['quant']:6s} " + " ".join(f"{c:>16s}" for c in cells))
    print("\n-- attention backends --")
    for a in r["attention"]:
        extra = {k: v for k, v in a.items() if k not in ("backend", "status")}
        print(f"  {a['backend']:10s} {a['status']}  {extra or ''}")
    print(f"\nelapsed {r['elapsed_s']:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    size = dict(QUICK if args.quick else FULL)
    args.model = args.model or size.pop("model")
    size.pop("model", None)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --quick)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    deadline = t0 + args.budget
    kw = gen_kwargs(size)
    resolve_model(args.model)  # write the random checkpoint once, before anything is timed
    result = dict(device=str(device), dtype=str(dtype).removeprefix("torch."))
    result.update(model=args.model, size=size)
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    result["tests"] = cuda_tests()
    try:
        result["parity"], result["wall"] = parity_and_wall(args, device, dtype, kw)
    except Exception as e:
        result["parity"] = result["wall"] = {"status": f"error: {type(e).__name__}: {e}"[:300]}
    result["memory"] = memory_matrix(args, device, dtype, kw, deadline)
    result["attention"] = attention_backends(args, device, dtype, kw, deadline)
    result["elapsed_s"] = time.perf_counter() - t0
    print_table(result)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
