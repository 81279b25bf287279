"""``wanlite convert``: single files (and/or a model folder) -> one diffusers-layout folder, so a
user converts once and then loads a folder that diffusers' ``WanPipeline.from_pretrained``
reads too (or, with ``quant``, wanlite's pre-quantized checkpoint via
``lifecycle.quantize_checkpoint``).

Per weight set: a single file is read through its store (``formats``: our names, dequantized,
fp8 upcast) one tensor at a time and written under the diffusers names in shards with an
index; a weight set that comes from the model folder is copied as it is.  Dtypes: as the store
delivers them (bf16 / fp16 / fp32 as stored, plain fp8 as bf16, block-quantized GGUF as fp32),
except fp8-scaled weights (delivered in fp32), which are written in bf16 -- the precision of
the files they were made from, and half the size.  Configs come from the folder, or are the
recognised 1.3B's (``configs.FULL``), with the scheduler's defaults.

Written into ``.<out>.converting`` next to ``out`` and renamed at the end: an interrupted convert
leaves no half folder under the final name.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .models import dit, t5, vae
from .weights.loading import WEIGHTS, ModelSource, resolve_source

log = logging.getLogger(__name__)
WEIGHTS_NAME = {
    "transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "vae": "diffusion_pytorch_model",
}


def convert(
    out: Path,
    model: str | None = None,
    *,
    transformer=None,
    text_encoder=None,
    vae=None,
    tokenizer=None,
    quant: str | None = None,
    shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write the model described by the arguments (as ``wanlite.load`` takes them) to ``out``:
    a diffusers folder, or with ``quant`` ("int8" / "fp8") a wanlite quantized checkpoint."""
    out = Path(out)
    if quant not in (None, "none", "int8", "fp8"):
        raise ValueError(f"--quant must be int8 or fp8, got {quant!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out-dir {out} exists and is not an empty folder")
    files = dict(transformer=transformer, text_encoder=text_encoder, vae=vae)
    source = resolve_source(model, **files, tokenizer=tokenizer)
    tmp = out.with_name(f".{out.name}.converting")  # quantize_checkpoint uses ".part" itself
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_folder(source, tmp, shard_bytes)
        if quant in (None, "none"):
            _replace(tmp, out)
        else:
            from .runtime.lifecycle import quantize_checkpoint

            if out.exists():
                out.rmdir()  # empty: checked above
            quantize_checkpoint(tmp, out, quant, shard_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty: checked by the caller
    tmp.rename(out)


def write_folder(source: ModelSource, out: Path, shard_bytes: int) -> None:
    """The diffusers layout of ``source`` in the (new) folder ``out``."""
    from .weights.random_checkpoint import MODEL_INDEX

    cfg = source.config()
    out.mkdir(parents=True)
    configs = {"transformer": cfg.dit, "text_encoder": cfg.t5, "vae": cfg.vae}
    for name in WEIGHTS:
        if name in source.files:
            folder = out / name
            folder.mkdir()
            config = json.dumps(configs[name].to_diffusers(), indent=2)
            (folder / "config.json").write_text(config)
            write_weights(source.store(name), name, cfg, folder, shard_bytes)
        else:
            shutil.copytree(source.folder / name, out / name)
    _copy_rest(source, cfg, out)
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))


def _copy_rest(source: ModelSource, cfg, out: Path) -> None:
    """The scheduler config (the folder's, or the defaults) and the tokenizer's files."""
    if source.folder is not None:
        shutil.copytree(source.folder / "scheduler", out / "scheduler")
    else:
        (out / "scheduler").mkdir()
        sched = json.dumps(cfg.scheduler.to_diffusers(), indent=2)
        (out / "scheduler" / "scheduler_config.json").write_text(sched)
    (out / "tokenizer").mkdir()
    for f in source.tokenizer.iterdir():  # file contents only: a read-only source stays so
        if f.is_file() and f.suffix != ".md":
            shutil.copyfile(f, out / "tokenizer" / f.name)


def _diffusers_key(name: str, cfg):
    return {
        "transformer": dit.to_diffusers_key,
        "text_encoder": t5.to_diffusers_key,
        "vae": lambda k: vae.to_diffusers_key(k, cfg.vae),
    }[name]


def write_weights(store, name: str, cfg, folder: Path, shard_bytes: int) -> None:
    """Every tensor of ``store`` (our names) under the diffusers names, sharded with an index
    when it takes more than one shard (the VAE is always one file, as diffusers writes it)."""
    from safetensors.torch import save_file

    to_key = _diffusers_key(name, cfg)
    limit = shard_bytes if name != "vae" else 1 << 62
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for ours, entry in store.entries.items():
        dtype = torch.bfloat16 if entry.dtype == torch.float32 and _scaled(store, ours) else None
        t = store.get(ours, dtype).contiguous()
        if shards[-1] and size + t.numel() * t.element_size() > limit:
            _flush(shards, folder, name, save_file)
            size = 0
        shards[-1][to_key(ours)] = t
        size += t.numel() * t.element_size()
    _flush(shards, folder, name, save_file, last=True)
    log.info("%s: %d tensors written to %s", name, len(store.entries), folder)


def _scaled(store, ours: str) -> bool:
    return ours in getattr(store, "names", {}) and store.names[ours] in store.scales


def _flush(shards: list, folder: Path, name: str, save_file, last: bool = False) -> None:
    """Write the current shard as a numbered temporary file; on the last call, name them all
    (one file: ``<name>.safetensors``, else ``-0000i-of-0000n`` with an index)."""
    i = len(shards)
    save_file(shards[-1], str(folder / f".shard{i}"), metadata={"format": "pt"})
    keys = list(shards[-1])
    shards[-1] = keys  # keep only the names: the tensors are on disk
    if not last:
        shards.append({})
        return
    n, base, weight_map = len(shards), WEIGHTS_NAME[name], {}
    for j, keys in enumerate(shards, 1):
        fname = f"{base}.safetensors" if n == 1 else f"{base}-{j:05d}-of-{n:05d}.safetensors"
        (folder / f".shard{j}").rename(folder / fname)
        weight_map.update(dict.fromkeys(keys, fname))
    if n > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2))
