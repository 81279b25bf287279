"""Single-file checkpoints: what a file is, and its tensors under OUR parameter names.

Everything is decided from the file's content, never from its name:

- container, from the first bytes: safetensors (8-byte header size, then ``{``), GGUF (magic
  ``GGUF``; ``gguf_reader``), zip ``torch.save`` ``.pth`` (``PK``; ``pthstore``, weights-only
  unpickling, memory-mapped);
- component and key style, from the key names (a known prefix such as
  ``model.diffusion_model.`` stripped first):

  ============  ===============================================================================
  DiT           original Wan names (ours), or diffusers ``WanTransformer3DModel`` names
  umT5          Wan's own names (ours: ``token_embedding``, ``blocks.N.attn.q``, ...), HF-T5
                names (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``),
                or llama.cpp T5 names in GGUF (``enc.blk.N.attn_q``, ``token_embd``)
  VAE           original Wan names (ours), or diffusers ``AutoencoderKLWan`` names
  ============  ===============================================================================

- precision, from the tensors: float tensors as stored; fp8 tensors without scales (Kijai's
  plain fp8 files) upcast exactly (to bf16); "fp8 scaled" files (ComfyUI: a ``scaled_fp8``
  marker and ``<layer>.scale_weight`` scalars, or the newer ``<layer>.weight_scale`` with
  ``comfy_quant`` tensors / ``_quantization_metadata``) give ``W.float() * scale`` (fp32).
  A file marked as scaled whose scales are missing, or a scale with no weight, is a
  ``ValueError`` naming the file: ignoring the ~1e-3 scales gives saturated white video with no
  error at all.

``open_component`` returns a ``MappedStore``: the ``TensorStore`` interface over the file's own
store, keyed by our names, so a ``Component`` loads it with an identity rename and no special
case.  Without a model config, ``recognise`` reads the size from the tensors and accepts only the
Wan2.1 T2V 1.3B (``configs.FULL``), naming what it found otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from ..models import dit as dit_mod
from ..models import t5 as t5_mod
from ..models import vae as vae_mod
from ..models.configs import FULL
from .tensorstore import Entry, TensorStore

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLAGS = {"transformer": "--transformer", "text_encoder": "--text-encoder", "vae": "--vae"}
WHAT = {"transformer": "a Wan DiT", "text_encoder": "a umT5 text encoder", "vae": "a Wan VAE"}
# Prefixes some tools put before every key (stripped only when every key has it).
PREFIXES = (
    *("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "vae.", "model."),
    "net.",  # NVlabs rCM checkpoints (rcm/inference/wan2pt1_t2v_rcm_infer.py strips it too)
)
NOT_WEIGHTS = ("scaled_fp8", "spiece_model")  # a marker, an embedded tokenizer
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation-side only


# --- containers --------------------------------------------------------------------------------


def container(path: Path) -> str:
    """``safetensors``, ``gguf`` or ``pth``, from the first bytes of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:2] == b"PK":
        return "pth"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 30:
        return "safetensors"
    if head[:1] == b"\x80":
        raise ValueError(
            f"{path}: a legacy (non-zip) torch pickle, which cannot be memory-mapped; re-save it "
            "with torch.save(torch.load(path, weights_only=True), new_path)"
        )
    raise ValueError(f"{path}: not a safetensors, GGUF or zip .pth file (starts with {head!r})")


def open_base(path: Path):
    """The file's own store (its keys as written)."""
    kind = container(path)
    if kind == "gguf":
        from .gguf_reader import GGUFStore

        return GGUFStore(path)
    if kind == "pth":
        from .pthstore import PthStore

        return PthStore(path)
    return TensorStore([Path(path)])


# --- fp8 scales ----------------------------------------------------------------------------------


def _marked_scaled(entries: dict[str, Entry], metadata: dict[str, str]) -> str | None:
    """Why the file says it is fp8-scaled, or None."""
    if "scaled_fp8" in entries:
        return "a scaled_fp8 marker tensor"
    if any(k.endswith(".comfy_quant") for k in entries):
        return "comfy_quant tensors"
    if "_quantization_metadata" in metadata:
        return "_quantization_metadata in its header"
    return None


def pair_scales(base, path: Path) -> tuple[dict[str, str], set[str]]:
    """(weight key -> its scale key, keys that are not weights) of ``base``; raises on a file
    marked as scaled with missing scales, or on scales that belong to no weight."""
    entries = base.entries
    ignored = {k for k in entries if k in NOT_WEIGHTS or k.endswith(IGNORED_SUFFIXES)}
    scales = {}
    for k in entries:
        for suffix in SCALE_SUFFIXES:
            if k.endswith(suffix):
                scales[k[: -len(suffix)] + ".weight"] = k
    unused = sorted(s for w, s in scales.items() if w not in entries)
    marked = _marked_scaled(entries, base.metadata)
    fp8 = (k for k, e in entries.items() if e.dtype in FP8 and k not in ignored)
    unscaled = sorted(k for k in fp8 if k not in scales)
    if marked and not scales:
        raise ValueError(f"{path} is marked as fp8-scaled ({marked}) but has no scale tensors")
    if marked and unscaled:
        raise ValueError(
            f"{path} is marked as fp8-scaled ({marked}) but these fp8 weights have no scale: "
            f"{unscaled[:10]}{' ...' if len(unscaled) > 10 else ''}"
        )
    if unused:
        raise ValueError(f"{path}: scales with no weight to apply them to: {unused[:10]}")
    _check_comfy_quant(base, path)
    return scales, ignored | set(scales.values())


def _check_comfy_quant(base, path: Path) -> None:
    """Newer ComfyUI files name each layer's format; only per-tensor/row fp8 is read here."""
    for k in (k for k in base.entries if k.endswith(".comfy_quant")):
        try:
            fmt = json.loads(bytes(base.get(k).view(torch.uint8).tolist()).decode()).get("format")
        except (ValueError, AttributeError, UnicodeDecodeError):
            continue  # an unreadable note: the dtype checks below still apply
        if fmt is not None and not str(fmt).startswith("float8"):
            raise ValueError(f"{path}: {k} uses ComfyUI's {fmt!r} quantization, not supported")


# --- the renamed store ---------------------------------------------------------------------------


class MappedStore:
    """``base``'s tensors under our names (``names``: ours -> base key), each delivered in a
    floating dtype: as stored, fp8 upcast to bf16 (exact), or ``weight * scale`` in fp32;
    ``shapes`` (ours -> shape) reshapes a few (rCM's Linear patch embedding to our Conv3d)."""

    def __init__(self, base, names, scales, path: Path, shapes: dict | None = None):
        self.base, self.names, self.scales, self.path = base, names, scales, Path(path)
        self.shapes = {names[k]: tuple(v) for k, v in (shapes or {}).items()}  # by base key
        # Whatever it stores, this store delivers dequantized weights: never "pre-quantized".
        self.metadata = {k: v for k, v in base.metadata.items() if k != "wanlite_quant"}
        self.entries = {ours: self._entry(key) for ours, key in names.items()}

    def _entry(self, key: str) -> Entry:
        e = self.base.entries[key]
        if key in self.shapes:
            e = dataclasses.replace(e, shape=self.shapes[key])
        if key in self.scales:
            return dataclasses.replace(e, dtype=torch.float32)
        if e.dtype in FP8:
            return dataclasses.replace(e, dtype=torch.bfloat16)
        if e.dtype not in FLOATS:
            raise ValueError(f"{self.path}: {key} is {e.dtype} with no scale to dequantize it")
        return e

    def _decoded(self, key: str) -> bool:
        return key in self.scales or self.base.entries[key].dtype in FP8

    def _decode(self, w: torch.Tensor, key: str, dtype, rows=None) -> torch.Tensor:
        if key not in self.scales:
            return w.to(dtype)
        s = self.base.get(self.scales[key]).float()
        if s.numel() == 1:
            s = s.reshape(())
        elif s.numel() == self.base.entries[key].shape[0]:
            s = s.reshape(-1)[rows] if rows is not None else s.reshape(-1)
            s = s.reshape(-1, *[1] * (w.dim() - 1))
        else:
            raise ValueError(f"{self.path}: scale {self.scales[key]} has shape {tuple(s.shape)}")
        return (w.float() * s).to(dtype)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = self.names[name]
        if not self._decoded(key):
            return self.base.get(key, dtype).view(self.entries[name].shape)
        w = self._decode(self.base.get(key), key, dtype or self.entries[name].dtype)
        return w.view(self.entries[name].shape)

    def view(self, name: str) -> torch.Tensor:
        key = self.names[name]
        if self._decoded(key):
            return self.get(name)
        return self.base.view(key).view(self.entries[name].shape)

    def get_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        key = self.names[name]
        raw = self.base.get_rows(key, rows)
        if not self._decoded(key):
            return raw
        return self._decode(raw, key, self.entries[name].dtype, rows)

    def unmap(self) -> None:
        self.base.unmap()

    def close(self) -> None:
        self.base.close()


# --- names -------------------------------------------------------------------------------------


def _identity(key: str) -> str:
    return key


# llama.cpp's T5 tensor names (city96's umT5 GGUF) -> HF-T5 names, as ComfyUI-GGUF maps them.
_LLAMA_T5 = (
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
)


def llama_t5_to_hf(key: str) -> str:
    for a, b in _LLAMA_T5:
        key = key.replace(a, b)
    return key


def _dit_names(keys: set[str], cfg) -> Callable[[str], str]:
    return (
        _identity
        if "patch_embedding.weight" in keys and "head.head.weight" in keys
        else (dit_mod.from_diffusers_key)
    )


def _t5_names(keys: set[str], cfg) -> Callable[[str], str]:
    if "token_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return _identity
    if "token_embd.weight" in keys or any(k.startswith("enc.") for k in keys):
        return lambda k: t5_mod.from_diffusers_key(llama_t5_to_hf(k))
    return t5_mod.from_diffusers_key


def _vae_names(keys: set[str], cfg) -> Callable[[str], str]:
    if "quant_conv.weight" in keys or "encoder.conv_in.weight" in keys:
        vcfg = cfg or FULL.vae  # only the block counts matter for the names
        return lambda k: vae_mod.from_diffusers_key(k, vcfg)
    return _identity


NAMERS = {"transformer": _dit_names, "text_encoder": _t5_names, "vae": _vae_names}
_T5_KEYS = {"token_embedding.weight", "shared.weight", "encoder.embed_tokens.weight"}


def identify(keys: set[str]) -> str | None:
    """Which component the (prefix-stripped) keys are, or None."""
    if {"patch_embedding.weight", "condition_embedder.time_proj.weight"} & keys:
        return "transformer"
    if _T5_KEYS & keys or "token_embd.weight" in keys:
        return "text_encoder"
    if any(k.startswith(("encoder.block.", "enc.blk.")) for k in keys):
        return "text_encoder"
    if any(k.startswith("decoder.") for k in keys):
        return "vae"
    return None


def _prefix(keys: list[str]) -> str:
    for p in PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def _check_kind(component: str, keys: set[str], path: Path) -> None:
    i2v = sorted(k for k in keys if re.search(r"(^|\.)(img_emb|k_img|v_img|image_embedder)\.", k))
    if i2v:
        raise ValueError(
            f"{path} is an image-conditioned (I2V) Wan model ({i2v[0]}, ...); wanlite runs the "
            "Wan2.1 text-to-video 1.3B"
        )
    found = identify(keys)
    if found is None:
        raise ValueError(
            f"{path}: not a Wan DiT, umT5 encoder or Wan VAE (first keys: {sorted(keys)[:5]})"
        )
    if found != component:
        raise ValueError(
            f"{path} is {WHAT[found]}, not {WHAT[component]}: pass it as {FLAGS[found]}"
        )


def open_component(component: str, path: Path, cfg=None):
    """(``MappedStore`` of ``path`` under our names, the component's config): ``cfg`` (from a
    model folder) if given, else recognised from the tensors (``recognise``)."""
    path = Path(path)
    base = open_base(path)
    try:
        scales, skip = pair_scales(base, path)
        prefix = _prefix([k for k in base.entries if k not in skip])
        keys = {k[len(prefix) :]: k for k in base.entries if k not in skip}
        _check_kind(component, set(keys), path)
        rename = NAMERS[component](set(keys), cfg)
        names = {}
        for short, key in keys.items():
            try:
                ours = rename(short)
            except KeyError:  # left as it is: the strict key check names it, with the file
                ours = short
            names[ours] = key
        shapes = _linear_patch_embedding(base, names, cfg) if component == "transformer" else {}
        store = MappedStore(base, names, scales, path, shapes)
        return store, cfg or recognise(component, store, path)
    except BaseException:
        base.close()
        raise


def _linear_patch_embedding(base, names: dict[str, str], cfg) -> dict[str, tuple[int, ...]]:
    """rCM (NVlabs/rcm ``rcm/networks/wan2pt1.py``) embeds patches with a Linear [D, C*pt*ph*pw]
    on patches flattened (c, kt, kh, kw): the same numbers as Wan's Conv3d weight
    [D, C, pt, ph, pw] in row-major order, so a reshape converts it exactly."""
    key = names.get("patch_embedding.weight")
    shape = base.entries[key].shape if key is not None else ()
    patch = (cfg or FULL.dit).patch_size
    volume = patch[0] * patch[1] * patch[2]
    if len(shape) != 2 or shape[1] % volume:
        return {}
    return {"patch_embedding.weight": (shape[0], shape[1] // volume, *patch)}


# --- sizes -------------------------------------------------------------------------------------


def _blocks(shapes: dict[str, tuple[int, ...]]) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _need(shapes, key: str, path: Path, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{path}: no {key}: not {what}")
    return shapes[key]


def _dit_config(shapes, path: Path):
    w = _need(shapes, "patch_embedding.weight", path, "a Wan DiT")
    found = f"width {w[0]}, {w[1]} input channels, {_blocks(shapes)} blocks"
    if w[0] == 5120:
        raise ValueError(f"{path} is a Wan 14B DiT ({found}); wanlite runs the T2V 1.3B")
    d = FULL.dit
    if (w[0], w[1], _blocks(shapes)) != (d.dim, d.in_channels, d.num_layers):
        raise ValueError(
            f"{path} is not the Wan2.1 T2V 1.3B DiT: found {found}, expected width {d.dim}, "
            f"{d.in_channels} input channels, {d.num_layers} blocks"
        )
    return d


def _t5_config(shapes, path: Path):
    e = _need(shapes, "token_embedding.weight", path, "a umT5 encoder")
    t = FULL.t5
    found = f"{e[0]} x {e[1]} embedding, {_blocks(shapes)} layers"
    if (*e, _blocks(shapes)) != (t.vocab_size, t.d_model, t.num_layers):
        raise ValueError(
            f"{path} is not Wan2.1's umT5-XXL encoder: found {found}, expected "
            f"{t.vocab_size} x {t.d_model} embedding, {t.num_layers} layers"
        )
    return t


def _vae_config(shapes, path: Path):
    z = _need(shapes, "conv1.weight", path, "a Wan VAE")
    base = _need(shapes, "encoder.conv1.weight", path, "a Wan VAE")
    v = FULL.vae
    if (z[0], base[0]) != (2 * v.z_dim, v.base_dim):
        raise ValueError(
            f"{path} is not the Wan2.1 VAE: found {z[0] // 2} latent channels, base width "
            f"{base[0]} (expected {v.z_dim}, {v.base_dim}; the Wan2.2 VAE has 48 channels)"
        )
    return v


RECOGNISERS = {"transformer": _dit_config, "text_encoder": _t5_config, "vae": _vae_config}


def recognise(component: str, store: MappedStore, path: Path):
    """The config of ``component`` from its tensors' shapes: only the 1.3B's is accepted."""
    shapes = {k: e.shape for k, e in store.entries.items()}
    return RECOGNISERS[component](shapes, path)
