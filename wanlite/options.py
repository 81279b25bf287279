"""Runtime options: how to run a checkpoint (device, dtype, attention, memory, speed modes).

``Options`` is independent of the checkpoint (that is ``wanlite.configs``).  The command-line
flags of ``wanlite generate`` and ``wanlite serve`` are made here from one table (``FLAGS``), so
a new option is added in one place.  Light on purpose: torch is imported only to resolve.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_DTYPES.update({"float16": "float16", "fp16": "float16"})


@dataclass(frozen=True)
class Options:
    """Runtime choices, independent of the checkpoint.

    device: "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ...
    dtype: compute dtype of the DiT and the text encoder; "auto" = bf16 where the hardware
        multiplies bf16 natively, else fp32 on CPU (bf16 is emulated, slower than fp32, on CPUs
        without AMX-BF16 / AVX512-BF16) and fp16 on CUDA (GPUs before sm80 have no bf16 units);
        see ``cpu_bf16_feature`` and ``cuda_auto_dtype``.
    vae_dtype: the VAE's; "auto" = bf16 when the compute dtype is bf16, else fp32 (see
        ``resolve_vae_dtype``).
    attention: attention backend name, or "auto" (see ``wanlite.attention``).
    quant / offload / max_memory / vae_tiling / embed_cache: memory (see README "Low memory").
    cast_cache: "auto" writes weights that need a narrowing cast (the fp32 DiT run in bf16)
        once, cast, to ``<cache>/cast`` (or to the folder given instead of "auto") and maps
        them in place on later loads: the same values; "off" casts them on every load (see
        ``wanlite.castcache``).
    cfg_batch: run the conditional and unconditional passes as one batch of 2 ("on"), as two
        forwards ("off"), or batched when the planner's estimate fits the budget ("auto").
    cfg_skip_last: fraction of the last steps that skip the unconditional pass (0 = never).
    cache / cache_threshold: step caching (see ``wanlite.stepcache``); "off" is exact.
    compile: torch.compile the repeated DiT block (first call pays the compile time).
    linear: kernels of the DiT blocks' linear layers: "aten" (torch's GEMM), "onednn" (fp32
        weights packed once for oneDNN, bias and GELU fused: CPU, resident fp32 blocks only),
        or "auto" (onednn where it applies, else aten; see ``wanlite.quant``).
    lora: ``[(path, scale), ...]`` (or "PATH[:SCALE]" strings): LoRA files merged into the DiT
        as its weights are read (see ``wanlite.lora``); several add up.
    sampler / shift / timesteps: "unipc" (the checkpoint's) or "euler" (flow-matching Euler);
        ``shift`` overrides the scheduler config's ``flow_shift``; ``timesteps`` a fixed list
        (flow Euler on sigma = t / 1000, as accelerator LoRAs use).  See ``wanlite.scheduler``.
    preset: a named recipe (``wanlite.presets``, e.g. "causvid"): its sampler, and defaults for
        ``num_inference_steps`` and ``guidance_scale`` that explicit request values override.
    decoder / tae: "vae" (the full VAE) or "taew2_1" (the tiny VAE, ``wanlite.taehv``: much
        faster, lower quality); ``tae`` the path of its ``taew2_1.pth`` / ``.safetensors``,
        needed for "taew2_1" and, if given, also used for live previews.
    parallel: "cfg=2,ulysses=2" (``parse_parallel``): the two guidance passes on two ranks and/or
        Ulysses sequence parallel over the DiT's heads, under torchrun (``wanlite.parallel``).
    nag_scale / nag_tau / nag_alpha: NAG, the negative prompt applied inside the conditional
        pass's cross-attention, so that it works at guidance 1 (``wanlite.nag``).  ``nag_scale``
        None is off (the default); otherwise it must be > 1 (at 1 NAG would change nothing, and
        below 1 it would pull toward the negative prompt: both are errors, not a silent "off").
        ``nag_tau`` > 0 caps the guided features' L1 norm at tau times the positive's;
        ``nag_alpha`` in [0, 1] blends the guided features with the positive ones.  Defaults
        2.5 and 0.25, as Kijai's Wan node (whose scale default is 11).
    """

    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    quant: str = "none"  # "none" | "int8" | "fp8": DiT and umT5 block linears (see quant.py)
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
    lora: tuple[tuple[str, float], ...] = ()
    sampler: str = "unipc"  # "unipc" | "euler"
    shift: float | None = None
    timesteps: tuple[float, ...] | None = None
    preset: str | None = None
    vae_dtype: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    decoder: str = "vae"  # "vae" | "taew2_1"
    tae: str | None = None  # path of taew2_1.pth / .safetensors
    parallel: str | None = None  # "cfg=2,ulysses=2" under torchrun (see wanlite.parallel)
    nag_scale: float | None = None  # NAG off; > 1 on (see wanlite.nag)
    nag_tau: float = 2.5
    nag_alpha: float = 0.25

    def __post_init__(self):
        object.__setattr__(self, "lora", tuple(parse_lora(x) for x in self.lora or ()))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", parse_timesteps(self.timesteps))
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            choices = ["auto", *sorted(_DTYPES)]
            raise ValueError(f"dtype must be one of {choices}, got {self.dtype!r}")
        if self.vae_dtype != "auto" and self.vae_dtype not in _DTYPES:
            choices = ["auto", *sorted(_DTYPES)]
            raise ValueError(f"vae_dtype must be one of {choices}, got {self.vae_dtype!r}")
        for name, allowed in (
            ("quant", ("none", "int8", "fp8")),
            ("offload", ("none", "model", "blocks", "auto")),
            ("vae_tiling", ("auto", "on", "off")),
            ("cfg_batch", ("auto", "on", "off")),
            ("cache", ("off", "teacache", "firstblock")),
            ("compile", (False, True)),
            ("linear", ("auto", "aten", "onednn")),
            ("sampler", ("unipc", "euler")),
            ("decoder", ("vae", "taew2_1")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        if not isinstance(self.cfg_skip_last, int | float) or not 0 <= self.cfg_skip_last < 1:
            raise ValueError(f"cfg_skip_last must be in [0, 1), got {self.cfg_skip_last!r}")
        t = self.cache_threshold
        if t is not None and (not isinstance(t, int | float) or isinstance(t, bool) or t < 0):
            raise ValueError(f"cache_threshold must be a number >= 0, got {t!r}")
        s = self.shift
        if s is not None and (not isinstance(s, int | float) or isinstance(s, bool) or not s > 0):
            raise ValueError(f"shift must be a number > 0, got {s!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ValueError(f"preset must be a preset name, got {self.preset!r}")
        if not isinstance(self.cast_cache, str) or not self.cast_cache:
            raise ValueError(
                f"cast_cache must be 'auto', 'off' or a folder, got {self.cast_cache!r}"
            )
        if self.decoder == "taew2_1" and not self.tae:
            raise ValueError("decoder 'taew2_1' needs tae: the path of taew2_1.pth/.safetensors")
        if self.tae is not None:
            object.__setattr__(self, "tae", str(self.tae))
        self._check_nag()
        if self.parallel is not None:  # normalised: "cfg=C,ulysses=U", or None for 1 x 1
            cfg, ulysses = parse_parallel(self.parallel)
            text = f"cfg={cfg},ulysses={ulysses}" if cfg * ulysses > 1 else None
            object.__setattr__(self, "parallel", text)

    def _check_nag(self) -> None:
        def number(name: str, ok, rule: str) -> None:
            v = getattr(self, name)
            real = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not real or not ok(v):
                raise ValueError(f"{name} must be {rule}, got {v!r}")

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
        and its frames measured 46-48 dB PSNR from fp32's: README "Precision"), else fp32
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
        raise ValueError(f"max_memory must look like '6GB' or '512MB', got {value!r}") from None


def parse_lora(value) -> tuple[str, float]:
    """``(path, scale)``, or ``"PATH[:SCALE]"`` (scale default 1.0) -> ``(path, scale)``."""
    import math
    from pathlib import Path

    if isinstance(value, str | Path):
        path, _, scale = str(value).rpartition(":") if ":" in str(value) else (value, "", "1")
        try:
            value = (str(path), float(scale))
        except ValueError:  # a ':' that is part of the path (no scale after it)
            value = (str(value), 1.0)
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and isinstance(value[1], int | float) and not isinstance(value[1], bool)
    if not ok or not math.isfinite(value[1]):
        raise ValueError(f"lora must be (path, scale) or 'PATH[:SCALE]', got {value!r}")
    return str(value[0]), float(value[1])


def parse_timesteps(value) -> tuple[float, ...]:
    """``[1000, 934, ...]`` or ``"1000,934,..."`` -> a tuple of floats (checked by the sampler)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"timesteps must be numbers like 1000,934,862, got {value!r}") from None
    if not out:
        raise ValueError("timesteps must not be empty")
    return out


PARALLEL_AXES = ("cfg", "ulysses")  # diffusers / SGLang names; "ring" is not implemented


def parse_parallel(value) -> tuple[int, int]:
    """``"cfg=2,ulysses=2"`` (or a dict of the same; an axis left out is 1) -> ``(cfg, ulysses)``.
    cfg is 1 or 2 (the two guidance passes); the ulysses degree must also divide the DiT's head
    count, which ``wanlite.parallel`` checks against the checkpoint."""
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
            raise ValueError(
                f"parallel must look like 'cfg=2,ulysses=2' (axes {PARALLEL_AXES}, each "
                f"once, degrees >= 1), got {value!r}"
            )
        degrees[name] = degree
    cfg, ulysses = degrees.get("cfg", 1), degrees.get("ulysses", 1)
    if cfg > 2:
        raise ValueError(f"parallel cfg degree must be 1 or 2 (two guidance passes), got {cfg}")
    return cfg, ulysses


# (option name, argparse type, help).  Each becomes ``--name-with-dashes``; defaults come from
# ``Options``.  A bool option is a store_true flag.
FLAGS: tuple[tuple[str, type, str], ...] = (
    ("device", str, "auto | cpu | cuda[:N]"),
    ("dtype", str, "auto | float32 | bfloat16 | float16"),
    ("vae_dtype", str, "auto | float32 | bfloat16 (auto: bf16 with a bf16 DiT; see README)"),
    ("attention", str, "auto | sdpa | math | flash_attn | sage | xformers"),
    ("quant", str, "none | int8 | fp8 (DiT and umT5 blocks)"),
    ("offload", str, "auto | none | model | blocks"),
    ("max_memory", str, "memory budget for auto, e.g. 6GB"),
    ("vae_tiling", str, "auto | on | off"),
    ("cast_cache", str, "auto | off | DIR: keep the DiT cast to bf16 on disk (faster loads)"),
    ("cfg_batch", str, "auto | on | off (CFG passes as a batch)"),
    ("cfg_skip_last", float, "skip the negative pass on this fraction of the last steps"),
    ("cache", str, "off | teacache | firstblock (not exact)"),
    ("cache_threshold", float, "step-cache threshold"),
    ("compile", bool, "torch.compile the DiT block"),
    ("linear", str, "auto | aten | onednn (DiT block GEMMs)"),
    ("lora", list, "PATH[:SCALE] a LoRA file merged into the DiT (repeatable; scale 1.0)"),
    ("sampler", str, "unipc | euler"),
    ("shift", float, "flow shift (default: the checkpoint's scheduler config)"),
    ("timesteps", str, "a fixed timestep list for flow Euler, e.g. 1000,934,862,756"),
    ("decoder", str, "vae | taew2_1 (the tiny VAE: fast, lower quality; needs --tae)"),
    ("tae", str, "path of taew2_1.pth/.safetensors (the tiny VAE; also used for previews)"),
    ("parallel", str, "cfg=2,ulysses=2 under torchrun: CFG / sequence parallel (cfg*ulysses)"),
    ("nag_scale", float, "NAG (> 1, e.g. 11): negative prompt in cross-attention; off if unset"),
    ("nag_tau", float, "NAG: cap of the guided features' L1 norm, times the positive's (2.5)"),
    ("nag_alpha", float, "NAG: blend of guided and positive features, in [0, 1] (0.25)"),
)


def add_runtime_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Add the ``Options`` flags to ``parser``.  ``defaults=False`` leaves every default None
    (``wanlite bench`` passes on only the flags that were given)."""
    base = Options()
    for name, kind, text in FLAGS:
        flag = "--" + name.replace("_", "-")
        default = getattr(base, name) if defaults else None
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=default, help=text)
        elif kind is list:  # repeatable; None when never given
            parser.add_argument(flag, action="append", default=None, metavar="PATH[:SCALE]",
                                help=text)  # fmt: skip
        else:
            parser.add_argument(flag, type=kind, default=default, help=text)


def runtime_options(args: argparse.Namespace) -> dict:
    """The ``Options`` keyword arguments from parsed flags (None = not given, left out)."""
    values = {name: getattr(args, name) for name, _, _ in FLAGS}
    return {k: v for k, v in values.items() if v is not None and v != ()}
