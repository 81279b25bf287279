"""The sections of ``gpu_check.py``, each run in its own process (``run``), and the table.

Each section returns the top-level keys it fills in the check's JSON and writes them to
``--out`` as it goes (``Out.save``), so that a section stopped at its time limit keeps what it
finished.  torch and wanlite are imported inside the sections: the table (``print_table``)
needs the standard library only.  A section that cannot run here says why in a ``status``
("skipped: ..." or "unavailable: ...").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE, SEED = "a red fox running through snow", "blurry, low quality", 1234
PACKAGES = (
    "numpy",
    "safetensors",
    "tokenizers",
    "ftfy",
    "av",
    "tqdm",
    "huggingface_hub",
    "pytest",
    "diffusers",
    "transformers",
    "accelerate",
    "triton",
)


class Out:
    """The section's result, saved to ``path`` after each change."""

    def __init__(self, path: str | None):
        self.path, self.data = path, {}

    def save(self, **keys) -> None:
        self.data.update(keys)
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, default=str))


def run(args) -> int:
    out = Out(args.out)
    if args.section == "prepare":
        sys.path.insert(0, str(REPO))
        from wanlite.weights.loading import resolve_model

        print(resolve_model(args.model))
        return 0
    SECTION_FNS[args.section](args, out)
    return 0


# --- helpers ------------------------------------------------------------------------------------


WANLITE_NEEDS = ("numpy", "safetensors", "tokenizers", "ftfy", "av", "tqdm", "huggingface_hub")


def cannot_run_wanlite(out: Out, **empty) -> bool:
    """Save ``empty`` with the reason and return True when wanlite's packages are missing."""
    reason = missing(*WANLITE_NEEDS)
    if reason:
        out.save(**{k: v if v else {"status": reason} for k, v in empty.items()}, _status=reason)
    return reason is not None


def missing(*names: str) -> str | None:
    """The reason ("skipped: ...") naming the first package that is not installed, or None."""
    for n in names:
        if importlib.util.find_spec(n) is None:
            return f"skipped: {n} is not installed (see gpu_check --wheels)"
    return None


def _torch_device(args):
    import torch

    return torch.device(args.device), getattr(torch, args.dtype)


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


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class DeviceMemory:
    """The memory the GPU really uses (the driver's total - free, ``mem_get_info``): before,
    after, and the peak sampled every 20 ms on a thread -- what ``max_memory_allocated`` does
    not see (the CUDA context, cuBLAS workspaces, the allocator's cache and fragmentation).
    On the CPU every field stays None."""

    def __init__(self, device):
        self.device, self.peak, self.before, self.after = device, None, None, None
        self._stop = threading.Event()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        if self.device.type == "cuda":
            free_memory(self.device)
            self.before = self.peak = self._used()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._stop.set()
            self._thread.join()
            self.after = self._used()
            self.peak = max(self.peak, self.after)
        return False

    def as_dict(self) -> dict:
        return dict(
            device_used_before=self.before, device_used_after=self.after, device_used_peak=self.peak
        )


def run_ours(model: str, kw: dict, output_type: str = "frames", **options) -> dict:
    import wanlite

    t0 = time.perf_counter()
    pipe = wanlite.load(model, **options)
    loaded = time.perf_counter()
    video = pipe.generate(**kw, output_type=output_type)
    done = time.perf_counter()
    out = dict(
        video=video,
        load_s=loaded - t0,
        generate_s=done - loaded,
        placement=pipe.placement.offload,
        estimate=pipe.placement.estimate.as_dict(),
    )
    del pipe
    return out


def guarded(entry: dict, fn) -> dict:
    """``fn()``'s fields merged into ``entry``; an error is recorded, the section goes on."""
    try:
        return {**entry, "status": "ok", **fn()}
    except Exception as e:  # one broken entry must not hide the others
        return {**entry, "status": f"error: {type(e).__name__}: {e}"[:300]}


# --- sections -----------------------------------------------------------------------------------


def env(args, out: Out) -> None:
    import importlib.metadata as md

    import torch

    info = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda)
    info["cuda_available"] = torch.cuda.is_available()
    if args.device.startswith("cuda") and torch.cuda.is_available():
        d = torch.device(args.device)
        info.update(
            gpu=torch.cuda.get_device_name(d), capability=torch.cuda.get_device_capability(d)
        )
        free, total = torch.cuda.mem_get_info(d)
        info.update(gpu_total_bytes=total, gpu_free_bytes=free)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = md.version(name) if importlib.util.find_spec(name) else None
        except md.PackageNotFoundError:
            packages[name] = "present"
    info["packages"] = packages
    try:
        sys.path.insert(0, str(REPO))
        import wanlite  # noqa: F401

        info["wanlite"] = "ok"
    except Exception as e:
        info["wanlite"] = f"error: {type(e).__name__}: {e}"[:200]
    out.save(env=info)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        out.save(_status="error: --device cuda but no CUDA device here (use --device cpu)")


def tests(args, out: Out) -> None:
    """``pytest -m cuda`` (without CUDA each is listed as skipped with its reason)."""
    reason = missing("pytest")
    if reason:
        out.save(tests=[], _status=reason)
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cuda.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={report}", "tests"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report: {proc.stdout[-500:]}{proc.stderr[-500:]}")
        found = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, why = "passed", ""
            for kind in ("skipped", "failure", "error"):
                node = case.find(kind)
                if node is not None:
                    outcome, why = kind, (node.get("message") or "")[:200]
            name = f"{case.get('classname')}::{case.get('name')}"
            found.append({"test": name, "outcome": outcome, "reason": why})
    out.save(tests=found)


# (offload, quant) in the order they matter: the default first, then what saves most memory.
MEMORY_ENTRIES = [
    ("none", "none"),
    ("model", "none"),
    ("blocks", "none"),
    ("none", "fp8"),
    ("none", "int8"),
    ("model", "int8"),
    ("blocks", "int8"),
    ("model", "fp8"),
    ("blocks", "fp8"),
]


def memory(args, out: Out) -> None:
    if cannot_run_wanlite(out, memory=[]):
        return
    device, _ = _torch_device(args)
    kw, rows = gen_kwargs(args.size), []
    for offload, quant in MEMORY_ENTRIES:

        def entry(offload=offload, quant=quant):
            with DeviceMemory(device) as real:
                r = run_ours(
                    args.model,
                    kw,
                    device=args.device,
                    dtype=args.dtype,
                    offload=offload,
                    quant=quant,
                    embed_cache=False,
                )
            peak, est = r["video"].peak_memory, r["estimate"]
            ratio = {k: peak[k] / est[k] for k in peak if est.get(k)}
            fields = dict(peak=peak, estimate=est, peak_over_estimate=ratio, **real.as_dict())
            if real.peak is not None:  # the run's own share of the device, against the plan
                fields["device_peak_over_estimate"] = (real.peak - real.before) / max(est.values())
            return fields

        rows.append(guarded(dict(offload=offload, quant=quant), entry))
        free_memory(device)
        out.save(memory=rows)


def parity(args, out: Out) -> None:
    """One run each (ours with default options, diffusers as its docs show) gives parity and
    wall; without diffusers our times are still reported."""
    if cannot_run_wanlite(out, parity={}, wall={}):
        return
    device, dtype = _torch_device(args)
    kw = gen_kwargs(args.size)
    ours = run_ours(args.model, kw, device=args.device, dtype=args.dtype)
    free_memory(device)
    wall = dict(
        wanlite_load_s=ours["load_s"],
        wanlite_generate_s=ours["generate_s"],
        wanlite_offload=ours["placement"],
    )
    reason = missing("diffusers", "transformers") or (
        missing("accelerate") if device.type == "cuda" else None
    )
    if reason:
        out.save(parity={"status": reason}, wall={**wall, "diffusers": reason}, _status=reason)
        return
    from wanlite.weights.loading import resolve_model

    ref = run_diffusers(resolve_model(args.model), kw, device, dtype)
    frames = ours["video"].frames
    ours_s, ref_s = ours["load_s"] + ours["generate_s"], ref["load_s"] + ref["generate_s"]
    wall.update(
        diffusers_load_s=ref["load_s"],
        diffusers_generate_s=ref["generate_s"],
        speedup=ref_s / ours_s,
    )
    out.save(
        parity=dict(
            status="ok", psnr_db=psnr(frames, ref["frames"]), frames_shape=list(frames.shape)
        ),
        wall=wall,
    )


def run_diffusers(path: Path, kw: dict, device, dtype) -> dict:
    """diffusers as its Wan docs load it: the VAE in fp32, CPU offload of whole models on CUDA."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    t0 = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    loaded = time.perf_counter()
    frames = pipe(
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
    del pipe
    frames = np.clip(np.round(frames * 255), 0, 255).astype(np.uint8)
    return dict(frames=frames, load_s=loaded - t0, generate_s=done - loaded)


def _timed(fn, reps: int, device) -> float:
    """Median seconds of ``fn()`` after one warm-up call (synchronized on CUDA)."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sdpa_kernels(args, device, dtype) -> list[dict]:
    """SDPA's kernels on the DiT's self-attention shape (1.3B: 12 heads x 128; 25,200 tokens
    at 480x640x81; 1,024 --quick), each against the math kernel on the same inputs."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = 1024 if args.quick else 25200
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (
        torch.randn(1, 12, tokens, 128, generator=g, device=device, dtype=dtype) for _ in range(3)
    )
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q[:, :, :256], k, v).float()
    rows = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)

        def one(backend=backend):
            with sdpa_kernel([backend]):
                f = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                try:
                    diff = (f()[:, :, :256].float() - ref).abs().max().item()
                except RuntimeError as e:  # this kernel does not take these inputs here
                    if "No viable backend" not in str(e):
                        raise
                    return dict(status=f"unavailable: not for {device.type} {dtype}")
                return dict(seconds=_timed(f, 3, device), max_diff_vs_math=diff)

        row = {"kernel": f"sdpa:{name.lower()}", "tokens": tokens}
        rows.append(guarded(row, one) if backend is not None else {**row, "status": "absent"})
    return rows


# --- HOOK: further attention kernels ------------------------------------------------------------
# Other parts of the project (wanlite/kernels/: Triton kernels; attention="radial" / VSA) add
# their kernel checks here: a function (args, device, dtype) -> list of rows
# {"kernel": name, "status": "ok" | "unavailable: why" | ..., "seconds": ..., "max_diff_vs_sdpa"}.
# Each is run under ``guarded``, after SDPA's kernels and the end-to-end backends.
ATTENTION_HOOKS: list = []


def radial_kernel(args, device, dtype) -> list[dict]:
    """attention="radial"'s Triton block-sparse kernel (``wanlite.kernels.block_sparse``) against
    SDPA on one block's self-attention (480x640x81: 25,200 tokens; --quick 256x256x17), with
    the radial mask and with a full mask; ``use_kernel``: whether the kernel beats dense SDPA
    on this GPU (``benchmarks/bench_attention.py::cuda_timings``)."""
    rows = [{"kernel": "triton:radial"}, {"kernel": "triton:full_mask"}]
    why = "unavailable: CUDA only (tests/test_kernels.py runs it in Triton's interpreter)"
    why = why if device.type != "cuda" else missing("triton", *WANLITE_NEEDS)
    if why:
        return [{**r, "status": why} for r in rows]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_attention import cuda_timings  # noqa: PLC0415

    size = "256x256x17" if args.quick else "480x640x81"
    r = cuda_timings(size, str(dtype).removeprefix("torch."))
    ms, diff = r["ms"], r["max_abs_diff"]
    common = dict(status="ok", tokens=r["tokens"], sdpa_seconds=ms["sdpa"] / 1e3)
    rows[0].update(common, seconds=ms["triton_radial"] / 1e3, kept_blocks=r["kept_blocks"])
    rows[0].update(max_diff_vs_sdpa=diff["triton_radial_vs_masked_sdpa"])
    rows[0].update(speedup_vs_sdpa=r["radial_speedup_vs_sdpa"], use_kernel=r["use_kernel"])
    rows[1].update(common, seconds=ms["triton_full"] / 1e3)
    rows[1].update(max_diff_vs_sdpa=diff["triton_full_vs_sdpa"])
    return rows


ATTENTION_HOOKS.append(radial_kernel)
# -------------------------------------------------------------------------------------------------


def attention(args, out: Out) -> None:
    device, dtype = _torch_device(args)
    rows = sdpa_kernels(args, device, dtype)
    out.save(attention=rows)
    if missing(*WANLITE_NEEDS):
        rows.append({"backend": "wanlite", "status": missing(*WANLITE_NEEDS)})
        out.save(attention=rows)
        return
    from wanlite.ops.attention import NAMES, available

    kw, reference = gen_kwargs(args.size), None
    for name in ("sdpa", *(n for n in NAMES if n not in ("auto", "sdpa"))):
        reason = available(name, device, dtype)
        if reason is not None:
            rows.append(dict(backend=name, status=f"unavailable: {reason}"))
            continue

        def one(name=name):
            nonlocal reference
            r = run_ours(
                args.model,
                kw,
                "latent",
                attention=name,
                embed_cache=False,
                device=args.device,
                dtype=args.dtype,
            )
            lat = r["video"].latents.float().cpu()
            reference = lat if reference is None else reference
            diff = (lat - reference).abs().max().item()
            return dict(denoise_s=r["video"].timings["denoise"], latents_max_diff=diff)

        rows.append(guarded(dict(backend=name), one))
        free_memory(device)
        out.save(attention=rows)
    for hook in ATTENTION_HOOKS:
        rows.extend(_hook_rows(hook, args, device, dtype))
        out.save(attention=rows)


def _hook_rows(hook, args, device, dtype) -> list[dict]:
    try:
        return list(hook(args, device, dtype))
    except Exception as e:
        return [{"kernel": hook.__name__, "status": f"error: {type(e).__name__}: {e}"[:300]}]


# The DiT's linears at 480x640x81 (25,200 tokens): (tokens, in, out)
FP8_SHAPES = [(25200, 1536, 1536), (25200, 1536, 8960), (25200, 8960, 1536)]


def fp8(args, out: Out) -> None:
    """fp8 e4m3 GEMMs through ``torch._scaled_mm`` (activations quantized per token, weights per
    output channel, as ComfyUI's "fp8 scaled" path) against bf16 ``F.linear``: seconds with and
    without the activation quantization, and the relative error against the bf16 result."""
    import torch

    device, _ = _torch_device(args)
    if device.type != "cuda":
        why = "skipped: needs a CUDA GPU (sm89+)"
        out.save(fp8={"status": why}, _status=why)
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9) or not hasattr(torch, "_scaled_mm"):
        why = f"unavailable: sm{cap[0]}{cap[1]} (fp8 GEMMs need sm89+)"
        out.save(fp8={"status": why}, _status=why)
        return
    rows = [guarded(dict(shape=list(s)), lambda s=s: _fp8_row(*s, device)) for s in FP8_SHAPES]
    out.save(fp8={"status": "ok", "rows": rows})


def _fp8_row(m: int, k: int, n: int, device) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) / k**0.5
    fmax = torch.finfo(torch.float8_e4m3fn).max
    sw = (w.abs().amax(1, keepdim=True).float() / fmax).clamp_min(1e-12)  # [n, 1]
    wq = (w.float() / sw).to(torch.float8_e4m3fn)

    def quant_x():
        sx = (x.abs().amax(1, keepdim=True).float() / fmax).clamp_min(1e-12)  # [m, 1]
        return (x.float() / sx).to(torch.float8_e4m3fn), sx

    xq, sx = quant_x()

    def gemm(a, s):  # rowwise scales: [m, 1] x [1, n]; the weight column-major (wq.t())
        return torch._scaled_mm(a, wq.t(), scale_a=s, scale_b=sw.t(), out_dtype=torch.bfloat16)

    ref = F.linear(x, w)
    got = gemm(xq, sx)
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    bf16_s = _timed(lambda: F.linear(x, w), 5, device)
    fp8_s = _timed(lambda: gemm(xq, sx), 5, device)
    fp8_q_s = _timed(lambda: gemm(*quant_x()), 5, device)
    return dict(
        bf16_s=bf16_s,
        fp8_s=fp8_s,
        fp8_with_act_quant_s=fp8_q_s,
        speedup=bf16_s / fp8_s,
        speedup_with_quant=bf16_s / fp8_q_s,
        rel_error=rel,
    )


# --- wanlite's compute kernels: low-precision linears, fused Triton kernels ---------------------


def kernels(args, out: Out) -> None:
    """wanlite's own compute paths on the DiT's shapes (480x640x81: 25,200 tokens; --quick 1,024),
    each against what it replaces: ``QLinear`` int8 / fp8 with the backend this GPU resolves to
    (``wanlite.ops.quant.compute_backend``: ``_int_mm`` / ``_scaled_mm``, or dequantize) against
    the bf16 ``F.linear`` and against the dequantizing path; the Triton kernels of
    ``wanlite.kernels`` (``fused_norm``, ``gated``) against the model's torch functions.
    ``use_kernel``: faster here -- the evidence ``Options.fused="triton"`` waits for."""
    device, _ = _torch_device(args)
    if device.type != "cuda":
        why = "skipped: needs a CUDA GPU (tests/test_fused_kernels.py runs the kernels on CPU)"
        out.save(kernels={"status": why}, _status=why)
        return
    if cannot_run_wanlite(out, kernels={}):
        return
    tokens = 1024 if args.quick else 25200
    rows = []
    for mode in ("fp8", "int8"):
        for _, k, n in FP8_SHAPES:
            entry = dict(kernel=f"qlinear:{mode}", shape=[tokens, k, n])
            rows.append(guarded(entry, lambda m=mode, k=k, n=n: _qlinear_row(m, tokens, k, n)))
            out.save(kernels={"status": "ok", "rows": rows})
    why = missing("triton")
    for name in ("modulate", "gated_residual", "qk_norm_rope"):
        if why:
            rows.append(dict(kernel=f"triton:{name}", status=why))
            continue
        rows.append(guarded(dict(kernel=f"triton:{name}"), lambda n=name: _fused_row(n, tokens)))
        out.save(kernels={"status": "ok", "rows": rows})


def _qlinear_row(mode: str, m: int, k: int, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    from wanlite.ops import quant

    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    lin = torch.nn.Linear(k, n, device=dev)
    x = torch.randn(1, m, k, device=dev, dtype=torch.bfloat16)
    q = quant.QLinear.from_linear(lin, mode).to(dev)
    wb, bb = lin.weight.bfloat16(), lin.bias.bfloat16()
    ref = F.linear(x, wb, bb)
    got = q(x)

    def dequant():
        return F.linear(x, quant.dequantize(q.weight, q.weight_scale, x.dtype), bb)

    bf16_s, q_s, dq_s = (
        _timed(f, 5, dev) for f in (lambda: F.linear(x, wb, bb), lambda: q(x), dequant)
    )
    return dict(backend=quant.compute_backend(mode, dev, x.dtype), bf16_s=bf16_s, seconds=q_s,
                dequant_s=dq_s, speedup_vs_bf16=bf16_s / q_s, psnr_vs_bf16_db=_psnr_t(got, ref),
                use_kernel=q_s < bf16_s)  # fmt: skip


def _psnr_t(y, ref) -> float:
    """PSNR of tensor ``y`` against ``ref``, peak max|ref| (dB)."""
    import math

    mse = (y.double() - ref.double()).pow(2).mean().item()
    peak = ref.double().abs().max().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def _fused_row(name: str, tokens: int) -> dict:
    """One Triton kernel against the model's torch function on one block's activations (1.3B:
    D 1536, 12 heads x 128; the grid 21x30x40 at 25,200 tokens)."""
    import torch

    from wanlite.kernels import fused_norm, gated
    from wanlite.models import dit

    dev, d, heads = torch.device("cuda"), 1536, 12
    grid = (21, 30, 40) if tokens == 25200 else (4, 16, 16)
    length = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, length, d, device=dev, dtype=torch.bfloat16)
    shift, scale, gate = (torch.randn(1, 6, d, device=dev) * 0.3).chunk(6, 1)[:3]
    if name == "modulate":
        norm = torch.nn.LayerNorm(d, 1e-6, elementwise_affine=False)
        ref = lambda: dit._modulate(norm, x, shift, scale, torch.bfloat16)  # noqa: E731
        new = lambda: fused_norm.modulate(norm, x, shift, scale, torch.bfloat16)  # noqa: E731
    elif name == "gated_residual":
        stream = x.float()  # the fp32 stream is updated in place: both add to copies
        y = torch.randn_like(x)
        ref = lambda: dit._gated_add(stream.clone(), y, gate)  # noqa: E731
        new = lambda: gated.gated_residual(stream.clone(), y, gate)  # noqa: E731
    else:
        qkv = torch.randn(1, length, 3 * d, device=dev, dtype=torch.bfloat16)
        norm = torch.nn.RMSNorm(d, eps=1e-6, device=dev, dtype=torch.bfloat16)
        cos, sin = dit.rope_tables(grid, d // heads, dev)
        q = qkv[..., :d]
        ref = lambda: dit.apply_rope(norm(q).unflatten(-1, (heads, -1)), cos, sin)  # noqa: E731
        new = lambda: fused_norm.qk_norm_rope(q, norm.weight, cos, sin, heads, 1e-6)  # noqa: E731
    with torch.no_grad():
        diff = (new().float() - ref().float()).abs().max().item()
        torch_s, triton_s = _timed(ref, 10, dev), _timed(new, 10, dev)
    return dict(tokens=length, torch_s=torch_s, seconds=triton_s, max_diff_vs_torch=diff,
                speedup=torch_s / triton_s, use_kernel=triton_s < torch_s)  # fmt: skip


def causal(args, out: Out) -> None:
    """The causal path (``Pipeline.stream``, Self-Forcing / CausVid checkpoints), on the random
    checkpoint read as causal: seconds to each chunk, frames, peak memory."""
    if cannot_run_wanlite(out, causal={}):
        return
    import wanlite

    device, _ = _torch_device(args)
    frames = 9 if args.quick else 21
    with DeviceMemory(device) as real:
        t0 = time.perf_counter()
        pipe = wanlite.load(args.model, device=args.device, dtype=args.dtype, causal=True)
        loaded, chunks = time.perf_counter(), []
        for chunk in pipe.stream(
            PROMPT,
            height=args.size["height"],
            width=args.size["width"],
            num_frames=frames,
            seed=SEED,
            progress=False,
        ):
            chunks.append(dict(frames=int(chunk.shape[0]), at_s=time.perf_counter() - loaded))
    out.save(causal=dict(status="ok", load_s=loaded - t0, chunks=chunks, **real.as_dict()))


SECTION_FNS = dict(
    env=env, tests=tests, memory=memory, parity=parity, attention=attention, fp8=fp8, causal=causal
)
SECTION_FNS["kernels"] = kernels


# --- the table ----------------------------------------------------------------------------------


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(r: dict) -> None:
    print(f"\n== GPU check: {r['device']} {r['dtype']} {r['model']} {r['size']} ==")
    for name, s in r.get("sections", {}).items():
        print(f"  {name:10s} {s['seconds']:6.1f} s of {s['limit_s']:3.0f}  {s['status'][:110]}")
    env = r.get("env", {})
    print(
        f"\n-- env: torch {env.get('torch')} cuda {env.get('cuda')} {env.get('gpu', '')} "
        f"wanlite: {env.get('wanlite')}"
    )
    print(f"   packages: {env.get('packages')}")
    print("\n-- tests marked cuda --")
    for t in r.get("tests", []):
        print(f"  {t['outcome']:8s} {t['test']}  {t['reason']}")
    print(f"\n-- parity vs diffusers: {r.get('parity')}")
    print(f"-- wall: {r.get('wall')}")
    print("\n-- peak memory per phase, GiB (estimate); device: real peak used (driver) --")
    print(f"  {'offload':8s} {'quant':6s} {'encode':>16s} {'denoise':>16s} {'decode':>16s} device")
    for m in r.get("memory", []):
        if m["status"] != "ok":
            print(f"  {m['offload']:8s} {m['quant']:6s} {m['status']}")
            continue
        cells = [f"{gib(m['peak'][k])} ({gib(m['estimate'][k])})" for k in m["peak"]]
        real = m.get("device_used_peak")
        dev = "-" if real is None else gib(real - m["device_used_before"])
        print(
            f"  {m['offload']:8s} {m['quant']:6s} "
            + " ".join(f"{c:>16s}" for c in cells)
            + f" {dev}"
        )
    print("\n-- attention --")
    for a in r.get("attention", []):
        extra = {k: v for k, v in a.items() if k not in ("backend", "kernel", "status")}
        print(f"  {a.get('backend') or a.get('kernel'):24s} {a['status']}  {extra or ''}")
    print(f"\n-- fp8: {r.get('fp8')}")
    print("\n-- kernels (wanlite's: low-precision linears, fused Triton) --")
    k = r.get("kernels") or {}
    for row in k.get("rows", []) if isinstance(k, dict) else []:
        extra = {n: v for n, v in row.items() if n not in ("kernel", "status")}
        print(f"  {row['kernel']:22s} {row['status']}  {extra}")
    if isinstance(k, dict) and "rows" not in k:
        print(f"  {k.get('status')}")
    print(f"-- causal: {r.get('causal')}")
    print(f"\nelapsed {r['elapsed_s']:.1f} s")
