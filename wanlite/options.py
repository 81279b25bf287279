"""Runtime options: how to run a checkpoint (device, dtype, attention, memory, speed modes).

``Options`` is independent of the checkpoint (that is ``wanlite.models.configs``).  The command-line
flags of ``wanlite generate`` and ``wanlite serve`` are made here from one table (``FLAGS``), so
a new option is added in one place.  Light on purpose: torch is imported only to resolve.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass

from .params import LIMITS, ParamError

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_DTYPES.update({"float16": "float16", "fp16": "float16"})


def dtype_name(value, name: str = "dtype") -> str:
    """``"auto"``, a name or alias ("bf16"), or a ``torch.dtype`` -> the canonical name
    ("bfloat16"); ParamError naming ``name`` otherwise.  torch is not imported: a
    ``torch.dtype`` prints as "torch.bfloat16"."""
    text = value
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        text = str(value).removeprefix("torch.")
    if text == "auto" or (isinstance(text, str) and text in _DTYPES):
        return "auto" if text == "auto" else _DTYPES[text]
    choices = ["auto", *sorted(_DTYPES), "torch.float32", "torch.bfloat16", "torch.float16"]
    raise ParamError(f"{name} must be one of {choices}, got {value!r}", name)


def path_text(value, name: str) -> str:
    """A path given as ``str`` or ``os.PathLike`` (``pathlib.Path``) -> str; ParamError else."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ParamError(f"{name} must be a path (str or os.PathLike), got {value!r}", name)
    return value


@dataclass(frozen=True)
class Options:
    """Runtime choices, independent of the checkpoint.

    device: "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ...
    dtype: compute dtype of the DiT and the text encoder: a name ("bfloat16", "bf16", ...) or a
        ``torch.dtype`` (``torch.bfloat16``), kept as the canonical name; "auto" = bf16 where
        the hardware multiplies bf16 natively, else fp32 on CPU (bf16 is emulated, slower than
        fp32, on CPUs without AMX-BF16 / AVX512-BF16) and fp16 on CUDA (GPUs before sm80 have
        no bf16 units); see ``cpu_bf16_feature`` and ``cuda_auto_dtype``.
    vae_dtype: the VAE's (a name or ``torch.dtype``, as ``dtype``); "auto" = bf16 when the
        compute dtype is bf16, else fp32 (see ``resolve_vae_dtype``).
    attention: attention backend name, or "auto" (see ``wanlite.ops.attention``).  A checkpoint
        trained with VSA (FastWan: to_gate_compress weights) runs Video Sparse Attention under
        "auto" (``wanlite.ops.vsa``), at ``vsa_sparsity`` (None: the published 0.8); a named
        backend runs it dense.  "radial": Radial Attention's static block-sparse mask
        (``wanlite.ops.radial``; not exact), dense for the first ``radial_dense_steps`` steps and
        ``radial_dense_blocks`` blocks, window scaled by ``radial_decay``; the defaults 12, 1,
        0.2 are the published 1x-length Wan2.1 setting (few-step recipes use 1, 1, 0.2);
        ``radial_cpu_kernel``: its CPU path, "auto" (flex_attention compiled where a C++
        compiler is found, else gather), "flex" or "gather" (both exact under the mask).
    quant / offload / max_memory / vae_tiling / embed_cache: memory (see docs/memory.md).
        quant "w8a8": int8 weights as "int8", and int8 GEMMs with activations quantized per
        token (CPU: oneDNN, packed once for resident blocks; CUDA sm80+: ``torch._int_mm``, as
        "int8" there); not exact (``wanlite.ops.quant``).  "auto" choices never pick it.
    cast_cache: "auto" writes weights that need a narrowing cast (the fp32 DiT run in bf16)
        once, cast, to ``<cache>/cast`` (or to the folder given instead of "auto") and maps
        them in place on later loads: the same values; "off" casts them on every load (see
        ``wanlite.weights.castcache``).
    cfg_batch: run the conditional and unconditional passes as one batch of 2 ("on"), as two
        forwards ("off"), or batched when the planner's estimate fits the budget ("auto").
    cfg_skip_last: fraction of the last steps that skip the unconditional pass (0 = never).
    cache / cache_threshold: step caching (see ``wanlite.runtime.stepcache``); "off" is exact.
    compile: torch.compile the repeated DiT block (first call pays the compile time).
    linear: kernels of the DiT blocks' linear layers: "aten" (torch's GEMM), "onednn" (fp32
        weights packed once for oneDNN, bias and GELU fused: CPU, resident fp32 blocks only),
        or "auto" (onednn where it applies, else aten; see ``wanlite.ops.quant``).
    fused: "triton" runs the DiT blocks' adaLN, gated residual adds and q/k RMSNorm + RoPE with
        the Triton kernels of ``wanlite.kernels`` (CUDA; off by default until the GPU check
        shows them faster, see scripts/gpu_check.py's "kernels" section); "off": torch ops.
    lora: ``[(path, scale), ...]`` (or "PATH[:SCALE]" strings): LoRA files merged into the DiT
        as its weights are read (see ``wanlite.weights.lora``); several add up.
    sampler / shift / timesteps: "unipc" (the checkpoint's) or "euler" (flow-matching Euler);
        ``shift`` overrides the scheduler config's ``flow_shift``; ``timesteps`` a fixed list
        (flow Euler on sigma = t / 1000, as accelerator LoRAs use).  See ``sampling.scheduler``.
    preset: a named recipe (``sampling.presets``, e.g. "causvid"): its sampler, and defaults for
        ``num_inference_steps`` and ``guidance_scale`` that explicit request values override.
    decoder / tae: "vae" (the full VAE) or "taew2_1" (the tiny VAE, ``wanlite.models.taehv``: much
        faster, lower quality); ``tae`` the path of its ``taew2_1.pth`` / ``.safetensors``,
        needed for "taew2_1" and, if given, also used for live previews.
    limits: the request ranges ``generate`` accepts (``wanlite.params.LIMITS``): "hosted" (the
        hosted API's schema exactly: up to 480x640, 120 frames) or "model" (height and width
        up to 1280, frames up to 1001: Wan2.1's native 832x480 and 480x832 and longer clips, past
        81 frames through context windows).
    Paths (``cast_cache``, ``tae``, ``lora``) may be ``str`` or ``os.PathLike``; they are kept
    as str.  A bad value raises ``wanlite.ParamError`` (a ValueError) naming the option.
    parallel: "cfg=2,ulysses=2" (``parse_parallel``): the two guidance passes on two ranks and/or
        Ulysses sequence parallel over the DiT's heads, under torchrun (``runtime.parallel``).
    nag_scale / nag_tau / nag_alpha: NAG, the negative prompt applied inside the conditional
        pass's cross-attention, so that it works at guidance 1 (``wanlite.ops.nag``).  ``nag_scale``
        None is off (the default); otherwise it must be > 1 (at 1 NAG would change nothing, and
        below 1 it would pull toward the negative prompt: both are errors, not a silent "off").
        ``nag_tau`` > 0 caps the guided features' L1 norm at tau times the positive's;
        ``nag_alpha`` in [0, 1] blends the guided features with the positive ones.  Defaults
        2.5 and 0.25, as Kijai's Wan node (whose scale default is 11).
    causal / kv_window / kv_sink: causal (frame-autoregressive) checkpoints, Self-Forcing's and
        CausVid's (``wanlite.causal``): ``causal`` None detects one from the transformer file,
        True / False say so.  ``kv_window`` latent frames are attended to (None: every earlier
        frame), of which the first ``kv_sink`` stay whatever the length ("attention sinks"):
        memory stays flat past the window.  21 (the 81 frames it was trained on) by default.
    context_frames / context_overlap / context_schedule / context_fuse: sliding context windows
        of the bidirectional model (``wanlite.runtime.windows``, after Kijai's
        ComfyUI-WanVideoWrapper): a video longer than ``context_frames`` video frames is
        denoised per window at every step, windows overlapping by ``context_overlap`` video
        frames, their predictions blended ("linear" ramps or "pyramid" weights).  Defaults 81,
        16, "uniform_standard" (windows move each step) and "linear", the wrapper's; video
        frames become latent frames as it converts them ((81 - 1) // 4 + 1 = 21, 16 // 4 = 4).
        ``context_frames`` None (the default) is 81-frame windows for videos longer than the
        hosted schema's 120 frames only (every hosted request stays one exact pass, as diffusers
        runs it); a number applies to every video longer than it; 0 turns windows off.
    """

    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    vsa_sparsity: float | None = None  # VSA-trained checkpoints (FastWan): None = 0.8
    radial_dense_steps: int = 12  # attention="radial": the first steps run dense
    radial_dense_blocks: int = 1  # attention="radial": the first DiT blocks run dense
    radial_decay: float = 0.2  # attention="radial": window width factor (decay_factor)
    radial_cpu_kernel: str = "auto"  # attention="radial" on CPU: "auto" | "flex" | "gather"
    quant: str = "none"  # "none" | "int8" | "fp8" | "w8a8": DiT block linears (see quant.py)
    offload: str = "auto"  # "none" | "model" | "blocks" | "auto" (from max_memory)
    max_memory: str | int | None = None  # budget for "auto", e.g. "6GB"; None = what is free
    vae_tiling: str = "auto"  # "auto" | "on" | "off"
    embed_cache: bool = True  # cache prompt embeddings on disk (keyed by model and prompt)
    cast_cache: str = "auto"  # "auto" | "off" | a folder: weights cast once, kept (castcache.py)
    cfg_batch: str = "auto"  # "auto" | "on" | "off"
    cfg_skip_last: float = 0.0  # in [0, 1)
    cache: str = "off"  # "off" | "teacache" | "firstblock"
    cache_threshold: float | None = None  # None = the mode's default
    compile: bool = False
    linear: str = "auto"  # "auto" | "aten" | "onednn"
    fused: str = "off"  # "off" | "triton": fused norm / RoPE / gate kernels (wanlite.kernels)
    lora: tuple[tuple[str, float], ...] = ()
    sampler: str = "unipc"  # "unipc" | "euler"
    shift: float | None = None
    timesteps: tuple[float, ...] | None = None
    preset: str | None = None
    vae_dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    decoder: str = "vae"  # "vae" | "taew2_1"
    tae: str | None = None  # path of taew2_1.pth / .safetensors
    parallel: str | None = None  # "cfg=2,ulysses=2" under torchrun (see wanlite.runtime.parallel)
    nag_scale: float | None = None  # NAG off; > 1 on (see wanlite.ops.nag)
    nag_tau: float = 2.5
    nag_alpha: float = 0.25
    limits: str = "hosted"  # "hosted" | "model" (see wanlite.params.LIMITS)
    causal: bool | None = None  # None: detected from the transformer file (wanlite.causal)
    kv_window: int | None = 21  # causal: latent frames attended to (None: all; runtime.kvcache)
    kv_sink: int = 0  # causal: first latent frames always kept in the window
    context_frames: int | None = None  # None: 81, past 120 frames; 0: off (runtime.windows)
    context_overlap: int = 16  # video frames shared by neighbouring windows
    context_schedule: str = "uniform_standard"  # "uniform_standard" | "static_standard"
    context_fuse: str = "linear"  # "linear" | "pyramid": the windows' blend weights

    def __post_init__(self):
        object.__setattr__(self, "lora", tuple(parse_lora(x) for x in self.lora or ()))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", parse_timesteps(self.timesteps))
        object.__setattr__(self, "dtype", dtype_name(self.dtype, "dtype"))
        object.__setattr__(self, "vae_dtype", dtype_name(self.vae_dtype, "vae_dtype"))
        for name, allowed in (
            ("quant", ("none", "int8", "fp8", "w8a8")),
            ("offload", ("none", "model", "blocks", "auto")),
            ("vae_tiling", ("auto", "on", "off")),
            ("cfg_batch", ("auto", "on", "off")),
            ("cache", ("off", "teacache", "firstblock")),
            ("compile", (False, True)),
            ("linear", ("auto", "aten", "onednn")),
            ("fused", ("off", "triton")),
            ("sampler", ("unipc", "euler")),
            ("decoder", ("vae", "taew2_1")),
            ("limits", tuple(LIMITS)),
            ("radial_cpu_kernel", ("auto", "flex", "gather")),
        ):
            if getattr(self, name) not in allowed:
                msg = f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                raise ParamError(msg, name)
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        if not isinstance(self.cfg_skip_last, int | float) or not 0 <= self.cfg_skip_last < 1:
            msg = f"cfg_skip_last must be in [0, 1), got {self.cfg_skip_last!r}"
            raise ParamError(msg, "cfg_skip_last")
        t = self.cache_threshold
        if t is not None and (not isinstance(t, int | float) or isinstance(t, bool) or t < 0):
            raise ParamError(f"cache_threshold must be a number >= 0, got {t!r}", "cache_threshold")
        s = self.shift
        if s is not None and (not isinstance(s, int | float) or isinstance(s, bool) or not s > 0):
            raise ParamError(f"shift must be a number > 0, got {s!r}", "shift")
        vs = self.vsa_sparsity
        if vs is not None and (
            not isinstance(vs, int | float) or isinstance(vs, bool) or not 0 <= vs < 1
        ):
            raise ParamError(f"vsa_sparsity must be in [0, 1), got {vs!r}", "vsa_sparsity")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ParamError(f"preset must be a preset name, got {self.preset!r}", "preset")
        for name in ("radial_dense_steps", "radial_dense_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ParamError(f"{name} must be an integer >= 0, got {v!r}", name)
        d = self.radial_decay
        if not isinstance(d, int | float) or isinstance(d, bool) or not 0 < d < math.inf:
            raise ParamError(f"radial_decay must be a number > 0, got {d!r}", "radial_decay")
        self._check_paths()
        self._check_nag()
        self._check_causal()
        self._check_windows()
        if self.parallel is not None:  # normalised: "cfg=C,ulysses=U", or None for 1 x 1
            cfg, ulysses = parse_parallel(self.parallel)
            text = f"cfg={cfg},ulysses={ulysses}" if cfg * ulysses > 1 else None
            object.__setattr__(self, "parallel", text)

    def _check_paths(self) -> None:
        if isinstance(self.cast_cache, os.PathLike | str) and os.fspath(self.cast_cache):
            object.__setattr__(self, "cast_cache", os.fspath(self.cast_cache))
        else:
            msg = f"cast_cache must be 'auto', 'off' or a folder, got {self.cast_cache!r}"
            raise ParamError(msg, "cast_cache")
        if self.tae is not None:
            object.__setattr__(self, "tae", path_text(self.tae, "tae"))
        if self.decoder == "taew2_1" and not self.tae:
            msg = "decoder 'taew2_1' needs tae: the path of taew2_1.pth/.safetensors"
            raise ParamError(msg, "tae")

    def _check_causal(self) -> None:
        if self.causal not in (None, True, False):
            raise ParamError(f"causal must be True, False or None, got {self.causal!r}", "causal")
        k, w = self.kv_sink, self.kv_window
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ParamError(f"kv_sink must be an integer >= 0, got {k!r}", "kv_sink")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < k + 3):
            msg = f"kv_window must be None or an integer >= kv_sink + 3 (one chunk), got {w!r}"
            raise ParamError(msg, "kv_window")

    def _check_windows(self) -> None:
        f, o = self.context_frames, self.context_overlap
        bad = f is not None and (isinstance(f, bool) or not isinstance(f, int))
        if bad or not (f is None or f == 0 or f >= 5):
            msg = "context_frames must be None (auto), 0 (off) or an integer >= 5 (video frames)"
            raise ParamError(f"{msg}, got {f!r}", "context_frames")
        # o < f keeps o // 4 < (f - 1) // 4 + 1: in latent frames, each window moves on.
        if isinstance(o, bool) or not isinstance(o, int) or o < 0 or o >= (f or 81):
            msg = f"context_overlap must be an integer in [0, context_frames), got {o!r}"
            raise ParamError(msg, "context_overlap")
        for name, allowed in (
            ("context_schedule", ("uniform_standard", "static_standard")),
            ("context_fuse", ("linear", "pyramid")),
        ):
            if getattr(self, name) not in allowed:
                msg = f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                raise ParamError(msg, name)

    def _check_nag(self) -> None:
        def number(name: str, ok, rule: str) -> None:
            v = getattr(self, name)
            real = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not real or not ok(v):
                raise ParamError(f"{name} must be {rule}, got {v!r}", name)

        if self.nag_scale is not None:
            number("nag_scale", lambda v: v > 1, "a number > 1 (or None: NAG off)")
        number("nag_tau", lambda v: v > 0, "a number > 0")
        number("nag_alpha", lambda v: 0 <= v <= 1, "a number in [0, 1]")

    def resolve_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} was asked for but CUDA is not available")
        return dev

    def resolve_dtype(self, device):
        """The compute dtype on ``device`` (a ``torch.device``); "auto" is decided and logged."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, _DTYPES[self.dtype])
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            capability = torch.cuda.get_device_capability(index)  # the chosen device's
            name = cuda_auto_dtype(capability, hip=torch.version.hip is not None)
            why = f"{torch.cuda.get_device_name(index)}, sm{capability[0]}{capability[1]}"
        elif device.type == "cpu":
            feature = cpu_bf16_feature()
            name = "float32" if feature is None else "bfloat16"
            why = feature or "no AMX-BF16 / AVX512-BF16: bf16 matmuls would be emulated"
        else:
            name, why = "float32", f"device type {device.type!r}"
        log.info("dtype (auto) on %s: %s (%s)", device, name, why)
        return getattr(torch, name)

    def resolve_cast_cache(self):
        """The folder of the cast cache (a ``Path``), or None when it is off."""
        from pathlib import Path

        from .paths import cache_dir

        if self.cast_cache == "off":
            return None
        return cache_dir() / "cast" if self.cast_cache == "auto" else Path(self.cast_cache)

    def resolve_vae_dtype(self, dtype):
        """The VAE's dtype, given the compute dtype ``dtype``.  "auto": bf16 when that is bf16
        (hardware with bf16 units: there the VAE's convolutions run 2.3-2.7x faster than fp32,
        and its frames measured 46-48 dB PSNR from fp32's: docs/precision-and-devices.md), else fp32
        (fp16 is never picked: the VAE's activations can overflow it).  diffusers' Wan docs
        run the VAE in fp32: ``vae_dtype="float32"``."""
        import torch

        if self.vae_dtype != "auto":
            return getattr(torch, _DTYPES[self.vae_dtype])
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


# --- "auto" dtype from the hardware -------------------------------------------------------------
# Pure functions of what the hardware reports, so both branches are tested on any machine.

CPU_BF16_ENV = "WANLITE_CPU_BF16"  # "1"/"0" overrides the CPU detection (tests, odd hosts)
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # in order of preference for the log line


def cpu_bf16_flag(flags) -> str | None:
    """The first native bf16 matmul feature among ``flags`` (names as torch and
    /proc/cpuinfo spell them: "amx_bf16", "avx512_bf16"), or None."""
    return next((f for f in _CPU_BF16_FLAGS if f in flags), None)


def cpu_flags() -> set[str]:
    """The CPU features torch detected (cpuinfo), else those /proc/cpuinfo lists (Linux)."""
    import torch

    try:
        caps = torch._C._cpu._get_cpu_capability()  # {feature: bool, ...} (torch >= 2.6)
        return {k for k, v in caps.items() if v is True}
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_feature() -> str | None:
    """Why bf16 is the CPU's "auto" dtype (the feature, or the override), or None for fp32."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return f"{CPU_BF16_ENV}=1" if override == "1" else None
    if override:
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1, got {override!r}")
    return cpu_bf16_flag(cpu_flags())


def cuda_auto_dtype(capability: tuple[int, int], hip: bool = False) -> str:
    """bf16 where the GPU has bf16 units (sm80+, or any ROCm GPU), else fp16: what
    ``torch.cuda.is_bf16_supported(including_emulation=False)`` decides, for a given device
    (that function asks the current one) and without a GPU."""
    return "bfloat16" if hip or capability[0] >= 8 else "float16"


def parse_bytes(value: str | int) -> int:
    """ "6GB", "6 GiB", "512MB", 123 -> bytes (GB and GiB both mean 2**30 here)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().replace(" ", "").removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        msg = f"max_memory must look like '6GB' or '512MB', got {value!r}"
        raise ParamError(msg, "max_memory") from None


def parse_lora(value) -> tuple[str, float]:
    """``(path, scale)``, ``"PATH[:SCALE]"`` (scale default 1.0) or an ``os.PathLike`` (scale
    1.0) -> ``(path, scale)``.  A ``Path`` is never split at ':' (it is a path, not a spec)."""
    if isinstance(value, os.PathLike):
        value = (os.fspath(value), 1.0)
    elif isinstance(value, str):
        path, _, scale = value.rpartition(":") if ":" in value else (value, "", "1")
        try:
            value = (path, float(scale))
        except ValueError:  # a ':' that is part of the path (no scale after it)
            value = (value, 1.0)
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and isinstance(value[0], str | os.PathLike)
    ok = ok and isinstance(value[1], int | float) and not isinstance(value[1], bool)
    if not ok or not math.isfinite(value[1]) or not os.fspath(value[0]):
        raise ParamError(f"lora must be (path, scale) or 'PATH[:SCALE]', got {value!r}", "lora")
    return os.fspath(value[0]), float(value[1])


def parse_timesteps(value) -> tuple[float, ...]:
    """``[1000, 934, ...]`` or ``"1000,934,..."`` -> a tuple of floats (checked by the sampler)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        msg = f"timesteps must be numbers like 1000,934,862, got {value!r}"
        raise ParamError(msg, "timesteps") from None
    if not out:
        raise ParamError("timesteps must not be empty", "timesteps")
    return out


PARALLEL_AXES = ("cfg", "ulysses")  # diffusers / SGLang names; "ring" is not implemented


def parse_parallel(value) -> tuple[int, int]:
    """``"cfg=2,ulysses=2"`` (or a dict of the same; an axis left out is 1) -> ``(cfg, ulysses)``.
    cfg is 1 or 2 (the two guidance passes); the ulysses degree must also divide the DiT's head
    count, which ``wanlite.runtime.parallel`` checks against the checkpoint."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        items = [tuple(x.strip() for x in p.partition("=")[::2]) for p in parts]
    degrees = {}
    for name, degree in items:
        ok = name in PARALLEL_AXES and name not in degrees
        try:
            degree = int(degree)
        except (TypeError, ValueError):
            ok = False
        if not ok or isinstance(degree, bool) or degree < 1:
            raise ParamError(
                f"parallel must look like 'cfg=2,ulysses=2' (axes {PARALLEL_AXES}, each "
                f"once, degrees >= 1), got {value!r}",
                "parallel",
            )
        degrees[name] = degree
    cfg, ulysses = degrees.get("cfg", 1), degrees.get("ulysses", 1)
    if cfg > 2:
        msg = f"parallel cfg degree must be 1 or 2 (two guidance passes), got {cfg}"
        raise ParamError(msg, "parallel")
    return cfg, ulysses


# (option name, argparse type, help).  Each becomes ``--name-with-dashes``; defaults come from
# ``Options``, closed sets of values from ``CHOICES``, the --help section from ``GROUPS``.  A bool
# option is a store_true flag.
FLAGS: tuple[tuple[str, type, str], ...] = (
    ("device", str, "auto (CUDA if present, else CPU) | cpu | cuda | cuda:N"),
    ("dtype", str, "compute dtype of the DiT and umT5 (auto: bf16 where the hardware has it)"),
    ("vae_dtype", str, "the VAE's dtype (auto: bf16 with a bf16 DiT, else float32)"),
    ("attention", str, "attention backend (auto: the fastest usable one)"),
    ("vsa_sparsity", float, "VSA checkpoints (FastWan): key cubes dropped (default 0.8)"),
    ("radial_dense_steps", int, "--attention radial: the first steps run dense"),
    ("radial_dense_blocks", int, "--attention radial: the first DiT blocks run dense"),
    ("radial_decay", float, "--attention radial: window width factor (decay_factor)"),
    ("radial_cpu_kernel", str, "--attention radial on CPU: flex_attention or SDPA on gathers"),
    ("quant", str, "quantized weights of the DiT and umT5 blocks"),
    ("offload", str, "where weights wait between uses (auto: from --max-memory)"),
    ("max_memory", str, "memory budget for --offload auto, e.g. 6GB (default: what is free)"),
    ("vae_tiling", str, "decode in tiles (auto: when the budget needs it)"),
    ("cast_cache", str, "auto | off | DIR: keep the DiT cast to bf16 on disk (faster loads)"),
    ("cfg_batch", str, "run the two CFG passes as one batch (auto: when it fits)"),
    ("cfg_skip_last", float, "skip the negative pass on this fraction of the last steps"),
    ("cache", str, "step cache: skips DiT forwards (not exact)"),
    ("cache_threshold", float, "step-cache threshold (default: the cache's own)"),
    ("compile", bool, "torch.compile the DiT block"),
    ("linear", str, "kernels of the DiT block GEMMs (auto: onednn where it applies)"),
    ("fused", str, "triton: fused norm / RoPE / gated-add kernels in the DiT blocks (CUDA)"),
    ("lora", list, "a LoRA file merged into the DiT, at SCALE (1.0 if left out); repeatable"),
    ("sampler", str, "unipc (the checkpoint's) or flow-matching euler"),
    ("shift", float, "flow shift (default: the checkpoint's scheduler config)"),
    ("timesteps", str, "a fixed timestep list for flow Euler, e.g. 1000,934,862,756"),
    ("decoder", str, "vae, or taew2_1: the tiny VAE (fast, lower quality; needs --tae)"),
    ("tae", str, "path of taew2_1.pth/.safetensors (the tiny VAE; also used for previews)"),
    ("parallel", str, "cfg=2,ulysses=2 under torchrun: CFG / sequence parallel (cfg*ulysses)"),
    ("nag_scale", float, "NAG (> 1, e.g. 11): negative prompt in cross-attention; off if unset"),
    ("nag_tau", float, "NAG: cap of the guided features' L1 norm, times the positive's"),
    ("nag_alpha", float, "NAG: blend of guided and positive features, in [0, 1]"),
    ("limits", str, "request ranges: hosted (the hosted API's) or model (1280, 1001 frames)"),
    ("causal", bool, "the DiT is causal (Self-Forcing, CausVid; default: detected from its file)"),
    ("kv_window", int, "causal: latent frames attended to (a rolling window: flat memory)"),
    ("kv_sink", int, "causal: first latent frames kept in the window (attention sinks)"),
    (
        "context_frames",
        int,
        "video frames per context window (default: 81, for videos over 120 frames only; 0 = off)",
    ),
    ("context_overlap", int, "video frames shared by neighbouring context windows"),
    ("context_schedule", str, "context windows: uniform_standard (moving) or static_standard"),
    ("context_fuse", str, "context windows' blend weights: linear ramps or pyramid"),
)
# The flags with a closed set of values (argparse refuses others, listing these).  Kept equal
# to what ``Options`` accepts (tests/test_options.py); attention's names are
# ``wanlite.ops.attention.NAMES``, not imported here because that module imports torch.
_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": _DTYPE_CHOICES,
    "vae_dtype": _DTYPE_CHOICES,
    "attention": ("auto", "sdpa", "math", "flash_attn", "sage", "xformers", "radial"),
    "quant": ("none", "int8", "fp8", "w8a8"),
    "offload": ("auto", "none", "model", "blocks"),
    "vae_tiling": ("auto", "on", "off"),
    "cfg_batch": ("auto", "on", "off"),
    "cache": ("off", "teacache", "firstblock"),
    "linear": ("auto", "aten", "onednn"),
    "fused": ("off", "triton"),
    "sampler": ("unipc", "euler"),
    "decoder": ("vae", "taew2_1"),
    "limits": tuple(LIMITS),
    "radial_cpu_kernel": ("auto", "flex", "gather"),
    "context_schedule": ("uniform_standard", "static_standard"),
    "context_fuse": ("linear", "pyramid"),
}
# The --help section of each runtime flag, in the order the sections are shown (the commands
# add "model and files" and "output and logging" around them).
GROUPS: dict[str, tuple[str, ...]] = {
    "request": ("limits",),
    "precision and memory": (
        *("device", "dtype", "vae_dtype", "quant", "offload", "max_memory", "vae_tiling"),
        "cast_cache",
    ),
    "speed": (
        *("attention", "linear", "fused", "compile", "cfg_batch", "cfg_skip_last", "cache"),
        *("cache_threshold", "decoder", "tae", "parallel", "vsa_sparsity"),
        *("radial_dense_steps", "radial_dense_blocks", "radial_decay", "radial_cpu_kernel"),
    ),
    "accelerators": (
        *("sampler", "shift", "timesteps", "lora", "nag_scale", "nag_tau", "nag_alpha"),
        *("causal", "kv_window", "kv_sink"),
    ),
    "long videos": ("context_frames", "context_overlap", "context_schedule", "context_fuse"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" after each flag that has a default to show: not after one
    whose help already names its default, nor for None, False or an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        nothing = default is None or default is False or default == [] or default == ()
        if "default" in text or nothing:
            return text
        return super()._get_help_string(action)


def arg_group(parser: argparse.ArgumentParser, title: str):
    """The argument group ``title`` of ``parser``, made (at the end of --help) if new."""
    for group in parser._action_groups:  # argparse keeps no public index of its groups
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_logging_options(group) -> None:
    """``--log-level`` and its shorthand ``-q/--quiet`` (= warning: no progress bars, no info
    lines), the one logging scheme of every command."""
    group.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log lines shown")
    group.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="warning",
        default=argparse.SUPPRESS,  # --log-level's default stands
        help="same as --log-level warning: errors, warnings and the summary only",
    )


def add_runtime_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Add the ``Options`` flags to ``parser``, each in its ``GROUPS`` section.
    ``defaults=False`` leaves every default None (``wanlite bench`` passes on only the flags
    that were given)."""
    base = Options()
    for title in GROUPS:  # the sections in their order (those already there stay in place)
        arg_group(parser, title)
    section = {name: title for title, names in GROUPS.items() for name in names}
    for name, kind, text in FLAGS:
        flag = "--" + name.replace("_", "-")
        default = getattr(base, name) if defaults else None
        group = arg_group(parser, section[name]) if name in section else parser
        if kind is bool:
            group.add_argument(flag, action="store_true", default=default, help=text)
        elif kind is list:  # repeatable; None when never given
            group.add_argument(flag, action="append", default=None, metavar="PATH[:SCALE]",
                               help=text)  # fmt: skip
        else:
            choices = CHOICES.get(name)
            group.add_argument(flag, type=kind, default=default, choices=choices, help=text)


# Single files replacing a model folder's weight sets (``wanlite.load``'s keywords), for every
# command that loads a model.
SINGLE_FILES = {
    "transformer": "the DiT: safetensors (original/diffusers names, bf16/fp16/fp32/fp8), GGUF, "
    "or a Self-Forcing / CausVid causal .pt",
    "text-encoder": "the umT5: safetensors (HF-T5 or Wan names, fp8 scaled too), .pth, GGUF",
    "vae": "the VAE: .pth or safetensors (original or diffusers names)",
    "tokenizer": "the umT5 tokenizer: a folder with tokenizer.json (or the file)",
}


def add_single_file_flags(group, tokenizer: bool = True) -> None:
    """--transformer / --text-encoder / --vae (/ --tokenizer): single files (``formats``)."""
    for name, text in SINGLE_FILES.items():
        if tokenizer or name != "tokenizer":
            group.add_argument(f"--{name}", default=None, help=f"single file for {text}")


def single_files(args: argparse.Namespace) -> dict:
    """The single-file flags that were given, as ``wanlite.load``'s keywords."""
    names = (n.replace("-", "_") for n in SINGLE_FILES)
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def runtime_options(args: argparse.Namespace) -> dict:
    """The ``Options`` keyword arguments from parsed flags (None = not given, left out)."""
    values = {name: getattr(args, name) for name, _, _ in FLAGS}
    return {k: v for k, v in values.items() if v is not None and v != ()}
