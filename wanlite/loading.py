"""Checkpoint loading: a diffusers-layout folder (or hub id, or ``random:<size>``) into our
modules, built on the meta device and filled straight from safetensors.

Loading is strict: every tensor in the files must map (through the component's rename table)
to one of our parameters with the same shape, and every parameter must be present.  Anything
else is an error naming the file and the keys, never a silently random or missing weight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .configs import read_json
from .tensorstore import TensorStore

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def resolve_model(model: str) -> Path:
    """A local folder, ``random:<tiny|full>[:t5_layers]``, or a hub id fetched into its cache."""
    if model.startswith("random:"):
        from .random_checkpoint import ensure_random_checkpoint

        size, _, layers = model[len("random:") :].partition(":")
        return ensure_random_checkpoint(size, t5_layers=int(layers) if layers else None)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers checkpoint folder (no model_index.json)")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"--model {model!r}: no such checkpoint folder")
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.safetensors", "tokenizer/*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline mode: all end the same way for a user
        raise RuntimeError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Point --model at a local folder in the diffusers layout (model_index.json, "
            "transformer/, text_encoder/, tokenizer/, vae/, scheduler/), or try random:tiny."
        ) from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: from the shard index if there is one."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: several shard indexes {[p.name for p in indexes]}")
    if indexes:
        weight_map = read_json(indexes[0])["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"{indexes[0]}: shard files missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        what = "no" if not files else "several unindexed"
        raise ValueError(f"{folder}: {what} .safetensors weight files ({[p.name for p in files]})")
    return files


def check_keys(
    store: TensorStore,
    module: torch.nn.Module,
    from_key: Callable[[str], str],
    aliases: dict[str, str] | None = None,
) -> dict[str, str]:
    """Map our parameter names to checkpoint keys, or raise naming every bad key.

    ``from_key`` renames a checkpoint key to ours (raising KeyError if it has no counterpart);
    ``aliases`` are tied duplicate keys, skipped.  Only headers are read."""
    expected = {k: tuple(p.shape) for k, p in module.named_parameters()}
    sources: dict[str, str] = {}
    extra, mismatched = [], []
    for key, e in store.entries.items():
        if key in (aliases or {}) and aliases[key] in store.entries:
            continue  # a tied duplicate of a key that is present
        try:
            ours = from_key(key)
        except KeyError:
            ours = None
        if ours not in expected:
            extra.append(f"{e.path.name}:{key}")
            continue
        if e.shape != expected[ours]:
            mismatched.append(f"{e.path.name}:{key} {e.shape} != expected {expected[ours]}")
        sources[ours] = key
    missing = sorted(set(expected) - set(sources))
    problems = [("unexpected keys", extra), ("missing keys", missing), ("mis-shaped", mismatched)]
    if any(keys for _, keys in problems):
        folder = next(iter(store.entries.values())).path.parent
        raise ValueError(
            f"checkpoint {folder} does not match the model: "
            + "; ".join(
                f"{what}: {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                for what, keys in problems
                if keys
            )
        )
    return sources
