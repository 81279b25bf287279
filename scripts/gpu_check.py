"""The GPU check: what a session with one GPU for a few minutes should run, in one command.

    python scripts/gpu_check.py                       # CUDA, random:full:2, 480x640x81, 2 steps
    python scripts/gpu_check.py --wheels DIR          # install a wheel folder first (offline;
                                                      # default: ./wheels when it exists)
    python scripts/gpu_check.py --device cpu --quick  # CI: random:tiny at a small size

Made for a bare box: only a CUDA torch (2.11+), python3 and this folder, no network, a few
minutes.  Every section runs in its own process (``--section NAME``) under its own time limit,
so a missing package, an error, a crash or a hang costs that section only and is reported in the
table and the JSON; a section past the overall ``--budget`` is recorded as skipped.  The driver
needs nothing but the standard library.  ``--wheels DIR`` installs a folder of wheels first
(``pip install --no-index``, or plain unzipping where pip is missing) into a private folder put
on the sections' ``PYTHONPATH``; the checkpoint is written in the background meanwhile.

Sections, most important first (seconds allowed on a GPU):

- ``env`` (30): torch / CUDA / GPU, which optional packages import, the wheel install;
- ``tests`` (120): every ``@pytest.mark.cuda`` test (skipped with the reason without pytest);
- ``memory`` (150): peak memory per offload mode x quantization beside the planner's estimate:
  ``torch.cuda.max_memory_allocated`` per phase, and the memory the GPU really used (the
  driver's ``mem_get_info``: before, after, and the peak sampled every 20 ms);
- ``parity`` (120): our bf16 frames against diffusers' ``WanPipeline`` (PSNR) and the wall time
  against diffusers with ``enable_model_cpu_offload()`` (skipped with the reason without
  diffusers; our own times are still reported);
- ``attention`` (60): SDPA's kernels on the DiT's attention shape, then each wanlite backend end
  to end against SDPA, then ``ATTENTION_HOOKS`` (radial / VSA / Triton kernels register there);
- ``fp8`` (30): ``torch._scaled_mm`` (fp8 per-token x per-channel scales) against bf16 GEMMs on
  the DiT's linear shapes (sm89+);
- ``kernels`` (45): wanlite's int8 / fp8 ``QLinear`` (the backend resolved for this GPU)
  against bf16 and the dequantizing path, and the fused Triton kernels (``wanlite.kernels``)
  against the model's torch functions; ``use_kernel`` says which win here;
- ``causal`` (60): the causal (streaming) path: ``Pipeline.stream`` chunk times and memory.

It prints one table and, as its last line, one JSON object.  Checkpoints are random (weights are
noise): this measures speed, memory and agreement, not pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
FULL = dict(model="random:full:2", height=480, width=640, num_frames=81, steps=2)
QUICK = dict(model="random:tiny", height=32, width=48, num_frames=5, steps=2)
# name: (seconds allowed on a GPU, with --quick); the order is the run order and importance
SECTIONS = {
    "env": (30, 60),
    "tests": (120, 150),
    "memory": (150, 180),
    "parity": (120, 120),
    "attention": (60, 90),
    "fp8": (30, 30),
    "kernels": (45, 60),
    "causal": (60, 90),
}
NEEDS_MODEL = ("memory", "parity", "attention", "causal")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--quick", action="store_true", help="random:tiny at a small size")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--model", default=None, help="default: random:full:2 (random:tiny quick)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all sections")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--wheels", default=None, help="wheels to install first (default: ./wheels)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    args.model = args.model or size.pop("model")
    size.pop("model", None)
    args.size = size
    if args.wheels is None and (REPO / "wheels").is_dir():  # prepared beside the code
        args.wheels = str(REPO / "wheels")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


# --- wheels ------------------------------------------------------------------------------------


def install_wheels(folder: Path, target: Path) -> dict:
    """Install every wheel of ``folder`` into ``target`` without the network: pip if it runs
    (``--no-index --no-deps --target``: the folder was resolved where it was downloaded), else
    unzip each wheel (a wheel is a zip of importable files)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return {"status": f"error: no .whl files in {folder}"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"]
    cmd += ["--target", str(target), *map(str, wheels)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            return {"status": "ok", "how": "pip", "wheels": len(wheels)}
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
    except (OSError, subprocess.TimeoutExpired) as e:
        why = [str(e)]
    for w in wheels:  # no pip (or it failed): unzip
        with zipfile.ZipFile(w) as z:
            z.extractall(target)
    return {"status": "ok", "how": f"unzipped (pip: {why[0][:120]})", "wheels": len(wheels)}


# --- the driver --------------------------------------------------------------------------------


def child_env(extra: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    paths = [str(extra)] if extra else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_section(name: str, args, limit: float, env: dict) -> tuple[dict, dict]:
    """Run one section in its own process group, killed after ``limit`` seconds; (its result
    keys, its status).  A section writes its JSON as it goes: a timeout keeps what is done."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out)]
        cmd += ["--device", args.device, "--dtype", args.dtype, "--model", args.model]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 else f"error: exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            status = f"error: time limit {limit:.0f} s"
        result = json.loads(out.read_text()) if out.is_file() else {}
    if status != "ok":
        status += f": {' | '.join((log or '').strip().splitlines()[-3:])}"[:400]
    own = result.pop("_status", None)  # the section's own verdict ("skipped: ...")
    status = own if status == "ok" and own else status
    return result, dict(status=status, seconds=round(time.perf_counter() - t0, 1), limit_s=limit)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        from gpu_check_sections import run  # noqa: PLC0415  (the sections: torch and wanlite)

        return run(args)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    result = dict(device=args.device, dtype=args.dtype, model=args.model, size=args.size)
    extra = None
    if args.wheels:
        extra = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        result["wheels"] = install_wheels(Path(args.wheels), extra)
    env = child_env(extra)
    chosen = [s for s in SECTIONS if s in args.sections.split(",")]
    # The checkpoint is written meanwhile (minutes for random:full on a slow disk).
    prep, prep_log = None, tempfile.TemporaryFile("w+")  # noqa: SIM115  (read at the end)
    if any(s in NEEDS_MODEL for s in chosen):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", "prepare"]
        prep = subprocess.Popen(
            [*cmd, "--model", args.model],
            env=env,
            start_new_session=True,
            stdout=prep_log,
            stderr=subprocess.STDOUT,
        )
    sections = {}
    for name in chosen:
        if name in NEEDS_MODEL and prep is not None and prep.poll() is None:
            try:
                prep.wait(timeout=max(deadline - time.perf_counter(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(prep.pid, signal.SIGKILL)
        left = deadline - time.perf_counter()
        limit = min(SECTIONS[name][1 if args.quick else 0], left)
        if left < 5:
            sections[name] = dict(status="skipped: time budget", seconds=0, limit_s=0)
            continue
        keys, sections[name] = run_section(name, args, limit, env)
        result.update(keys)
    if prep is not None:
        if prep.poll() is None:  # still writing the checkpoint: the budget is spent
            os.killpg(prep.pid, signal.SIGKILL)
            prep.wait()
        prep_log.seek(0)
        tail = " | ".join(prep_log.read().strip().splitlines()[-2:])[:300]
        result["prepare"] = dict(returncode=prep.poll(), tail=tail)
    result["sections"] = sections
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    from gpu_check_sections import print_table  # noqa: PLC0415  (standard library only)

    print_table(result)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
