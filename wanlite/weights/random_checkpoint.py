"""Deterministic random weights in the exact layout of the real checkpoint.

Used by tests (``tiny``) and benchmarks (``full``): it proves the loading and compute paths,
not the picture.  Every tensor gets its own generator seeded from (seed, component, name), so a
tensor's values do not depend on which other tensors were generated or in what order, and the
full-size text encoder can be written one tensor at a time.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch

from ..ops.meta import on_meta

log = logging.getLogger(__name__)


def tensor_seed(seed: int, component: str, name: str) -> int:
    return zlib.crc32(f"{seed}:{component}:{name}".encode())


def random_tensor(component: str, name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A float32 tensor for parameter ``name`` (our Wan key) with a scale that keeps
    activations O(1) through the network: norms near 1, small biases, fan-in scaled weights."""
    g = torch.Generator().manual_seed(tensor_seed(seed, component, name))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("bias"):
        return x.mul_(0.02)
    if len(shape) == 1 or name.endswith("gamma"):
        return x.mul_(0.1).add_(1.0)
    if name.endswith("modulation"):
        return x.mul_(shape[-1] ** -0.5)
    if "token_embedding" in name:
        return x
    if "pos_embedding" in name:
        return x.mul_(0.5)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return x.mul_(fan_in**-0.5)


def random_state_dict(
    module: torch.nn.Module, component: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random values for every parameter of ``module`` (which may live on the meta device).

    Buffers are not included: they are derived (RoPE tables), never stored in checkpoints."""
    return {
        name: random_tensor(component, name, tuple(p.shape), seed).to(dtype)
        for name, p in module.named_parameters()
    }


# --- writing a whole checkpoint in the diffusers layout --------------------------------------

# Storage dtypes of the real Wan-AI/Wan2.1-T2V-1.3B-Diffusers files.
_STORAGE = {"transformer": torch.float32, "text_encoder": torch.bfloat16, "vae": torch.float32}
_WEIGHTS_NAME = {
    "transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "vae": "diffusion_pytorch_model",
}
FORMAT_VERSION = 1  # bump when the generated values or layout change (cache key)


def _components(cfg):
    """(component, module on meta, our-key -> diffusers-key, config.json dict) per weight set."""
    from ..models import dit, t5, vae

    with on_meta():
        modules = {
            "transformer": (dit.WanDiT(cfg.dit), dit.to_diffusers_key, cfg.dit.to_diffusers()),
            "text_encoder": (t5.UMT5Encoder(cfg.t5), t5.to_diffusers_key, cfg.t5.to_diffusers()),
            "vae": (
                vae.WanVAE(cfg.vae),
                lambda k: vae.to_diffusers_key(k, cfg.vae),
                cfg.vae.to_diffusers(),
            ),
        }
    return modules


def write_checkpoint(out: Path, cfg, seed: int = 0, shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a random-weight checkpoint for ``cfg`` (a ModelConfig) into the folder ``out``.

    Tensors are generated one at a time and flushed shard by shard, so the full-size text
    encoder (11 GB in bf16) never needs to be in memory at once."""
    import json

    from ..models.tokenizer import write_random_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for component, (module, to_key, config) in _components(cfg).items():
        folder = out / component
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        params = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        # The real VAE is one file; the other two are sharded with an index.
        limit = shard_bytes if component != "vae" else 1 << 62
        _write_shards(folder, component, params, to_key, seed, limit)
    (out / "scheduler").mkdir(exist_ok=True)
    sched = json.dumps(cfg.scheduler.to_diffusers(), indent=2)
    (out / "scheduler" / "scheduler_config.json").write_text(sched)
    write_random_tokenizer(out / "tokenizer", vocab_size=min(cfg.t5.vocab_size, 32000))
    index = dict(MODEL_INDEX)
    if cfg.dit.vsa_gate:  # the pipeline class FastVideo's registry recognises FastWan by
        index["_class_name"] = "WanDMDPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "_diffusers_version": "0.33.0.dev0",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def _write_shards(folder, component, params, to_key, seed, shard_bytes) -> None:
    import json

    from safetensors.torch import save_file

    dtype = _STORAGE[component]
    name = _WEIGHTS_NAME[component]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in params:
        nbytes = dtype.itemsize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"{name}.safetensors" if n == 1 else f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            t = random_tensor(component, key, shape, seed).to(dtype)
            tensors[to_key(key)] = t
            weight_map[to_key(key)] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# Layout variants, ``random:<size>-<variant>``: "fastwan" = FastVideo/FastWan2.1-T2V-1.3B-Diffusers
# (the Wan diffusers layout plus ``blocks.N.to_gate_compress.{weight,bias}`` [D, D], [D]).
VARIANTS = ("", "fastwan")


def checkpoint_config(size: str, t5_layers: int | None = None):
    import dataclasses

    from ..models.configs import SIZES

    base, _, variant = size.partition("-")
    if base not in SIZES or variant not in VARIANTS:
        names = sorted(f"{b}-{v}" if v else b for b in SIZES for v in VARIANTS)
        raise ValueError(f"random checkpoint size must be one of {names}, got {size!r}")
    cfg = SIZES[base]
    if variant == "fastwan":  # FastWan's layout: a VSA gate projection per self-attention
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, vsa_gate=True))
    if t5_layers is not None:
        if not 1 <= t5_layers <= cfg.t5.num_layers:
            raise ValueError(f"t5_layers must be in [1, {cfg.t5.num_layers}], got {t5_layers}")
        cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, num_layers=t5_layers))
    return cfg


def ensure_random_checkpoint(size: str, t5_layers: int | None = None, seed: int = 0) -> Path:
    """The cached random checkpoint for ``size``, written on first use (atomically)."""
    import shutil
    import tempfile

    from ..paths import cache_dir

    cfg = checkpoint_config(size, t5_layers)
    layers = f"-t5x{cfg.t5.num_layers}" if t5_layers is not None else ""
    out = cache_dir() / f"random-{size}{layers}-seed{seed}-v{FORMAT_VERSION}"
    if (out / "model_index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing random %s checkpoint to %s (first use)", size, out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # Tiny checkpoints use small shards so the sharded-loading path is always exercised.
        shard = 64 * 1024 if size.startswith("tiny") else 2 * 1024**3
        write_checkpoint(tmp, cfg, seed=seed, shard_bytes=shard)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "model_index.json").is_file():  # another process won the race
            return out
        raise
    return out


def write_random_lora(path: Path, cfg, rank: int = 32, seed: int = 0) -> Path:
    """A random LoRA in the original (Kijai / ComfyUI) key layout, on every linear of every DiT
    block, like the accelerator LoRAs for the 1.3B (``cfg`` a ``DiTConfig``): for benchmarks of
    the merge, not for pictures."""
    from safetensors.torch import save_file

    from ..models import dit

    with on_meta():
        model = dit.WanDiT(cfg)
    tensors = {}
    for name, module in model.named_modules():
        if not (name.startswith("blocks.") and isinstance(module, torch.nn.Linear)):
            continue
        g = torch.Generator().manual_seed(tensor_seed(seed, "lora", name))
        down = torch.randn(rank, module.in_features, generator=g) * module.in_features**-0.5
        up = torch.randn(module.out_features, rank, generator=g) * (0.01 / rank**0.5)
        key = f"diffusion_model.{name}"
        tensors |= {
            f"{key}.lora_down.weight": down.bfloat16(),
            f"{key}.lora_up.weight": up.bfloat16(),
        }
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_random_taehv(path: str | Path, seed: int = 0) -> Path:
    """A random ``taew2_1`` tiny VAE file: every key of the real one (encoder and decoder) with
    its real shape, fp16 as shipped; ``.safetensors``, or a torch pickle for ``.pth``."""
    from ..models.taehv import file_shapes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: random_tensor("taehv", k, shape, seed) for k, shape in file_shapes().items()}
    tensors["decoder.22.bias"] += 0.5  # mid-grey output: most pixels inside (0, 1), not clamped
    tensors = {k: v.half() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, str(path))
    return path


def _original_dit(folder: Path) -> dict[str, torch.Tensor]:
    """The DiT of the diffusers checkpoint ``folder`` under the original Wan names."""
    from ..models import dit
    from .tensorstore import TensorStore, weight_files

    store = TensorStore(weight_files(Path(folder) / "transformer"))
    try:
        return {dit.from_diffusers_key(k): store.get(k) for k in store.entries}
    finally:
        store.close()


def write_rcm_file(folder: Path, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The DiT of the diffusers checkpoint ``folder`` as NVlabs rCM stores its Wan2.1 DiTs
    (``rCM_Wan2.1_T2V_1.3B_480p.pt``): a ``torch.save`` dict of original Wan names under a
    ``net.`` prefix, with the patch embedding a Linear [D, C*pt*ph*pw] over patches flattened
    (c, kt, kh, kw) (``rcm/networks/wan2pt1.py``), in ``dtype`` (bf16 as released).  For the
    conversion tests."""
    tensors = {}
    for name, w in _original_dit(folder).items():
        if name == "patch_embedding.weight":
            w = w.reshape(w.shape[0], -1)
        tensors[f"net.{name}"] = w.to(dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, str(path))
    return path


def write_causal_file(folder: Path, path: str | Path, wrapper: str = "generator_ema") -> Path:
    """The DiT of the diffusers checkpoint ``folder`` as Self-Forcing stores its causal DiTs
    (``self_forcing_dmd.pt``): a ``torch.save`` dict ``{wrapper: {"model." + original Wan name:
    tensor}}`` (``generator_ema`` with the EMA weights, or ``generator``; CausVid's checkpoints
    use ``generator``).  Random weights in a causal checkpoint's layout, for the tests."""
    tensors = {f"model.{name}": w for name, w in _original_dit(folder).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrapper: tensors}, str(path))
    return path
