"""Architecture configs (frozen dataclasses): *what the checkpoint is*.

They are read from the diffusers ``config.json`` of each component (``read_model_config``) and
can be written back in that format (the random-checkpoint writer does).  Runtime choices
(device, dtype, attention backend, ...) live in ``wanlite.options``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# Per-channel latent statistics of the Wan2.1 VAE (constants of the trained model).
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def _pick(cls, d: dict, renames: dict[str, str]) -> dict:
    """Select the fields of ``cls`` from a diffusers/transformers config dict."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for src, dst in renames.items():
        if src in d and dst in names:
            out[dst] = d[src]
    return out


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    num_heads: int = 12
    head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    # VSA-trained (FastWan): a to_gate_compress projection per self-attention.  Not in any
    # config.json: ``weights.loading`` detects it from the checkpoint's keys.
    vsa_gate: bool = False

    _DIFFUSERS = {
        "num_attention_heads": "num_heads",
        "attention_head_dim": "head_dim",
        "in_channels": "in_channels",
        "out_channels": "out_channels",
        "text_dim": "text_dim",
        "freq_dim": "freq_dim",
        "ffn_dim": "ffn_dim",
        "num_layers": "num_layers",
        "patch_size": "patch_size",
        "eps": "eps",
        "cross_attn_norm": "cross_attn_norm",
        "rope_max_seq_len": "rope_max_seq_len",
    }

    def __post_init__(self):
        if self.dim != self.num_heads * self.head_dim:
            raise ValueError(f"DiT dim {self.dim} != num_heads*head_dim")

    @classmethod
    def from_diffusers(cls, d: dict) -> DiTConfig:
        kw = _pick(cls, d, cls._DIFFUSERS)
        kw["patch_size"] = tuple(kw.get("patch_size", (1, 2, 2)))
        kw["dim"] = kw["num_heads"] * kw["head_dim"]
        if d.get("image_dim") or d.get("added_kv_proj_dim"):
            raise ValueError("image-conditioned Wan transformers (I2V) are not supported")
        return cls(**kw)

    def to_diffusers(self) -> dict:
        out = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0"}
        for src, dst in self._DIFFUSERS.items():
            v = getattr(self, dst)
            out[src] = list(v) if isinstance(v, tuple) else v
        out.update(qk_norm="rms_norm_across_heads", image_dim=None, added_kv_proj_dim=None)
        return out


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    _DIFFUSERS = {
        "vocab_size": "vocab_size",
        "d_model": "d_model",
        "d_ff": "d_ff",
        "num_layers": "num_layers",
        "num_heads": "num_heads",
        "d_kv": "d_kv",
        "relative_attention_num_buckets": "num_buckets",
        "relative_attention_max_distance": "max_distance",
        "layer_norm_epsilon": "eps",
    }

    @classmethod
    def from_diffusers(cls, d: dict) -> T5Config:
        if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ValueError("only the gated-gelu umT5 encoder is supported")
        return cls(**_pick(cls, d, cls._DIFFUSERS))

    def to_diffusers(self) -> dict:
        out = {
            "architectures": ["UMT5EncoderModel"],
            "model_type": "umt5",
            "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new",
            "is_gated_act": True,
            "tie_word_embeddings": False,
            "scalable_attention": True,
            "dropout_rate": 0.1,
            "initializer_factor": 1.0,
            "is_encoder_decoder": True,
            "num_decoder_layers": self.num_layers,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }
        for src, dst in self._DIFFUSERS.items():
            out[src] = getattr(self, dst)
        return out


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    _DIFFUSERS = {
        "base_dim": "base_dim",
        "z_dim": "z_dim",
        "dim_mult": "dim_mult",
        "num_res_blocks": "num_res_blocks",
        "temperal_downsample": "temporal_downsample",  # sic: diffusers' spelling
        "latents_mean": "latents_mean",
        "latents_std": "latents_std",
    }

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        if d.get("is_residual") or d.get("patch_size") or d.get("attn_scales"):
            raise ValueError("only the Wan2.1 VAE layout is supported (not Wan2.2's)")
        if d.get("decoder_base_dim") not in (None, d.get("base_dim", 96)):
            raise ValueError("a decoder_base_dim different from base_dim is not supported")
        kw = _pick(cls, d, cls._DIFFUSERS)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})

    def to_diffusers(self) -> dict:
        out = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0"}
        for src, dst in self._DIFFUSERS.items():
            v = getattr(self, dst)
            out[src] = list(v) if isinstance(v, tuple) else v
        out.update(attn_scales=[], dropout=0.0)
        return out


@dataclass(frozen=True)
class SchedulerConfig:
    """The flow-matching UniPC setup of the Diffusers Wan checkpoint."""

    num_train_timesteps: int = 1000
    flow_shift: float = 3.0
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"
    disable_corrector: tuple[int, ...] = ()

    _DIFFUSERS = {
        "num_train_timesteps": "num_train_timesteps",
        "flow_shift": "flow_shift",
        "solver_order": "solver_order",
        "solver_type": "solver_type",
        "lower_order_final": "lower_order_final",
        "final_sigmas_type": "final_sigmas_type",
        "disable_corrector": "disable_corrector",
    }

    @classmethod
    def from_diffusers(cls, d: dict) -> SchedulerConfig:
        cls_name = d.get("_class_name", "UniPCMultistepScheduler")
        if cls_name != "UniPCMultistepScheduler" or not d.get("use_flow_sigmas", False):
            raise ValueError(f"unsupported scheduler config: {cls_name} without flow sigmas")
        if d.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise ValueError("only prediction_type='flow_prediction' is supported")
        kw = _pick(cls, d, cls._DIFFUSERS)
        if "disable_corrector" in kw:
            kw["disable_corrector"] = tuple(kw["disable_corrector"])
        return cls(**kw)

    def to_diffusers(self) -> dict:
        out = {
            "_class_name": "UniPCMultistepScheduler",
            "_diffusers_version": "0.33.0.dev0",
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "dynamic_thresholding_ratio": 0.995,
            "predict_x0": True,
            "prediction_type": "flow_prediction",
            "rescale_betas_zero_snr": False,
            "sample_max_value": 1.0,
            "solver_p": None,
            "steps_offset": 0,
            "thresholding": False,
            "timestep_spacing": "linspace",
            "trained_betas": None,
            "use_beta_sigmas": False,
            "use_exponential_sigmas": False,
            "use_flow_sigmas": True,
            "use_karras_sigmas": False,
        }
        for src, dst in self._DIFFUSERS.items():
            v = getattr(self, dst)
            out[src] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class ModelConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    t5: T5Config = field(default_factory=T5Config)
    vae: VAEConfig = field(default_factory=VAEConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


FULL = ModelConfig()
# Tiny shapes for tests: every structural feature of the real model, a few thousand times smaller.
TINY = ModelConfig(
    dit=DiTConfig(dim=64, ffn_dim=128, num_layers=2, num_heads=2, head_dim=32, text_dim=32),
    t5=T5Config(vocab_size=512, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8),
    vae=VAEConfig(base_dim=8, num_res_blocks=1),
)
# Micro: the smallest shapes that keep every structural feature; for runs at the full default
# request size (480x640, 81 frames, 30 steps) in seconds-to-minutes on a CPU.
MICRO = ModelConfig(
    dit=DiTConfig(dim=16, ffn_dim=32, num_layers=1, num_heads=1, head_dim=16, text_dim=32),
    t5=TINY.t5,
    vae=VAEConfig(base_dim=4, num_res_blocks=1),
)
SIZES = {"micro": MICRO, "tiny": TINY, "full": FULL}


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_model_config(path: Path) -> ModelConfig:
    """The architecture of the diffusers-layout checkpoint folder ``path``, checked for
    consistency between its components."""
    path = Path(path)
    cfg = ModelConfig(
        dit=DiTConfig.from_diffusers(read_json(path / "transformer" / "config.json")),
        t5=T5Config.from_diffusers(read_json(path / "text_encoder" / "config.json")),
        vae=VAEConfig.from_diffusers(read_json(path / "vae" / "config.json")),
        scheduler=SchedulerConfig.from_diffusers(
            read_json(path / "scheduler" / "scheduler_config.json")
        ),
    )
    if cfg.t5.d_model != cfg.dit.text_dim:
        raise ValueError(f"text encoder width {cfg.t5.d_model} != DiT text_dim {cfg.dit.text_dim}")
    if cfg.vae.z_dim != cfg.dit.in_channels:
        raise ValueError(f"VAE z_dim {cfg.vae.z_dim} != DiT in_channels {cfg.dit.in_channels}")
    return cfg
