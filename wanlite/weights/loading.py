"""Checkpoint loading: a diffusers-layout folder (or hub id, or ``random:<size>``) into our
modules, built on the meta device and filled straight from safetensors.

Loading is strict: every tensor in the files must map (through the component's rename table)
to one of our parameters with the same shape, and every parameter must be present.  Anything
else is an error naming the file and the keys, never a silently random or missing weight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.configs import read_json
from .tensorstore import TensorStore

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def resolve_model(model: str | os.PathLike) -> Path:
    """A local folder (str or ``os.PathLike``), ``random:<size>[-fastwan][:t5_layers]``, or a hub
    id fetched into its cache."""
    model = os.fspath(model)
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
        paths = {e.path for e in store.entries.values()}
        where = paths.pop() if len(paths) == 1 else next(iter(paths), Path("(empty)")).parent
        raise ValueError(
            f"checkpoint {where} does not match the model: "
            + "; ".join(
                f"{what}: {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                for what, keys in problems
                if keys
            )
        )
    return sources


# --- VSA-trained DiTs (FastWan) -----------------------------------------------------------------

VSA_GATE = "to_gate_compress.weight"  # diffusers-layout key suffix (FastVideo's FastWan)


def has_vsa_gates(keys) -> bool:
    """Whether DiT keys (diffusers names, or ours: ``self_attn.gate_compress``) hold the VSA
    gate projections that FastWan was trained with."""
    return any(k.endswith((VSA_GATE, "self_attn.gate_compress.weight")) for k in keys)


def folder_has_vsa_gates(folder: Path) -> bool:
    """``has_vsa_gates`` of a diffusers ``transformer/`` folder: from its shard index, or from
    the safetensors header (no tensor is read)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return has_vsa_gates(read_json(indexes[0])["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    return len(files) == 1 and has_vsa_gates(TensorStore(files).entries)


# --- where each part comes from: a diffusers folder, single files, or both ---------------------

WEIGHTS = ("transformer", "text_encoder", "vae")


class ModelSource:
    """The model folder (diffusers layout; may be None) and single files that replace some of
    its weight sets.  With a folder, its configs describe the single files (other sizes of
    the architecture load too); without one, each file's size is recognised from its tensors
    (``formats.recognise``: only the 1.3B), and every weight set and the tokenizer must be given.
    Single files are opened once, here, and handed to the components as stores."""

    def __init__(self, folder: Path | None, files=None, tokenizer: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.files = {k: Path(v).expanduser() for k, v in (files or {}).items() if v}
        unknown = set(self.files) - set(WEIGHTS)
        if unknown:
            raise ValueError(f"unknown weight sets {sorted(unknown)}; expected {WEIGHTS}")
        missing = [c for c in WEIGHTS if c not in self.files]
        if self.folder is None and missing:
            from .formats import FLAGS

            raise ValueError(
                f"no {', '.join(FLAGS[c] for c in missing)} given and no --model: pass those "
                "files too, or --model (a diffusers folder, hub id or random:...) for the rest"
            )
        self.tokenizer = _tokenizer_dir(tokenizer, self.folder)
        self._opened: dict[str, tuple] = {}
        self._cfg = None

    @classmethod
    def of(cls, source) -> ModelSource:
        """``source`` as it is if it is a ModelSource, else a model folder."""
        return source if isinstance(source, ModelSource) else cls(Path(source))

    def config(self):
        """The ``ModelConfig``: the folder's, or recognised from the single files."""
        if self._cfg is None:
            from ..models.configs import ModelConfig, read_model_config

            if self.folder is not None:
                self._cfg = self._gated(read_model_config(self.folder))
            else:
                parts = {c: self._open(c, None)[1] for c in WEIGHTS}
                dit, t5, vae = (parts[c] for c in WEIGHTS)
                self._cfg = ModelConfig(dit=dit, t5=t5, vae=vae)  # scheduler: the 1.3B's
            if self._cfg.dit.vsa_gate:
                log.info("the DiT carries VSA gates (to_gate_compress): a FastWan checkpoint")
        return self._cfg

    def _gated(self, cfg):
        """``cfg`` with ``dit.vsa_gate`` as the DiT's keys say (no config.json says it)."""
        if "transformer" in self.files:  # a single file: its keys, under our names
            gated = has_vsa_gates(self._open("transformer", cfg.dit)[0].entries)
        else:
            gated = folder_has_vsa_gates(self.folder / "transformer")
        if gated == cfg.dit.vsa_gate:
            return cfg
        return dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, vsa_gate=gated))

    def _open(self, component: str, cfg):
        if component not in self._opened:
            from .formats import open_component

            self._opened[component] = open_component(component, self.files[component], cfg)
            store = self._opened[component][0]
            log.info("%s: %s (%d tensors)", component, self.files[component], len(store.entries))
        return self._opened[component]

    def text_encoder_files(self) -> list[Path]:
        """The files that make up the text encoder (the embedding cache's key): the single
        file, or every file of the folder's ``text_encoder/``."""
        if "text_encoder" in self.files:
            return [self.files["text_encoder"]]
        return sorted((self.folder / "text_encoder").iterdir())

    def store(self, component: str):
        """The single file's store (keyed by our names), or None: from the folder."""
        if component not in self.files:
            return None
        cfg = self.config()
        part = {"transformer": cfg.dit, "text_encoder": cfg.t5, "vae": cfg.vae}[component]
        return self._open(component, part)[0]


def _tokenizer_dir(tokenizer, folder: Path | None) -> Path:
    """The folder holding tokenizer.json: ``tokenizer`` (that folder or the file itself), else
    the model folder's ``tokenizer/``."""
    if tokenizer is None and folder is None:
        raise ValueError(
            "no tokenizer: pass --tokenizer (a folder with the umT5 tokenizer.json, e.g. "
            "google/umt5-xxl's) or --model (a diffusers folder or hub id, which has one)"
        )
    path = Path(tokenizer).expanduser() if tokenizer is not None else folder / "tokenizer"
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there")
    return path


def resolve_source(
    model: str | None = None, *, transformer=None, text_encoder=None, vae=None, tokenizer=None
) -> ModelSource:
    """``wanlite.load``'s arguments -> a ModelSource.  ``model`` defaults to the hub's 1.3B
    only when no single file is given (no surprise download for the parts not given)."""
    from ..paths import DEFAULT_MODEL

    files = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
    files = {k: v for k, v in files.items() if v is not None}
    if model is None and not files:
        model = DEFAULT_MODEL
    folder = resolve_model(model) if model is not None else None
    return ModelSource(folder, files, tokenizer)
