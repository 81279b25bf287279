"""LoRA files -> the DiT's weights plus their deltas, in fp32 (merged as weights are read).

A ``LoraSet`` is built from ``[(path, scale), ...]`` and the DiT's parameter shapes (ours: the
original Wan names).  Each file is read once; its low-rank factors are kept as stored and a
parameter is merged only when it is read (``merged(name, weight)``: one ``addmm`` per low-rank
term into the fp32 result, no full-size delta tensor), so the ~300 full-size deltas of a 1.3B
LoRA are never made, let alone held at once.  After construction nothing is mutated: calls are
thread-safe (the block streamer reads from a background thread).

Key families, detected per file (after the prefixes ``model.diffusion_model.``,
``diffusion_model.``, ``transformer.``, ``base_model.model.``):

===========  ========================================================  ========================
family       layer part of the key                                     resolved by
===========  ========================================================  ========================
original     ``blocks.3.self_attn.q`` (Wan / Kijai / ComfyUI)          the name itself
kohya        ``lora_unet_blocks_3_self_attn_q`` (musubi; or ``__``)    underscore form of ours
peft         ``blocks.3.attn1.to_q`` (diffusers)                       ``dit.from_diffusers_key``
===========  ========================================================  ========================

The kohya map is built from the expected names (``blocks.3.self_attn.q`` <- ``blocks_3_self_
attn_q``), so underscores inside names are never guessed.  The diffusers norm2 / norm3 swap is
``from_diffusers_key``'s.  Suffixes: ``lora_down.weight`` / ``lora_A.weight`` (down, [r, in,
...]), ``lora_up.weight`` / ``lora_B.weight`` (up, [out, r, ...]), ``alpha`` (float or int
scalar), ``diff`` (full weight delta), ``diff_b`` / ``lora_B.bias`` (bias delta).

    delta(W) = scale * alpha/r * up @ down   (alpha/r -> 1 without alpha)  +  scale * diff
    delta(b) = scale * diff_b

A conv weight (patch_embedding) takes ``up.flatten(1) @ down.flatten(1)`` reshaped to its shape.
PEFT files saved by diffusers carry ``lora_alpha`` / ``alpha_pattern`` in the safetensors
metadata (``lora_adapter_metadata``); they are honoured like PEFT does.

Differences from diffusers' loader (the parity tests use files both accept): wanlite applies
``.diff`` keys (diffusers drops them, or reads ``head.head.diff`` as a down matrix), norm
``diff`` / ``diff_b`` keys (dropped there as "zeroed") and files covering only some layers
(diffusers' musubi converter needs every projection of every block).

Every shape is checked at construction, without building a delta: a LoRA for another model
size fails before any generation work.  Unknown keys are a ``ValueError``; DoRA magnitudes and
I2V-only layers are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import dit as dit_mod
from ..ops.meta import on_meta

__all__ = ["LoraSet", "dit_shapes", "load_lora"]
log = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_SUFFIXES = {  # longest first is not needed: no suffix here ends with another one
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "lora_B.bias": "diff_b",
    "dora_scale": "dora",
}
# Layers that exist only in the image-to-video model (image cross-attention, CLIP projection).
_I2V = ("k_img", "v_img", "img_emb", "add_k_proj", "add_v_proj", "norm_added_k", "image_embedder")
_PEFT_HINTS = (".attn1.", ".attn2.", ".condition_embedder.", ".proj_out.", ".ffn.net.")


def dit_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Our DiT's parameter shapes for a ``DiTConfig`` (a meta-device skeleton: no memory)."""
    with on_meta():
        model = dit_mod.WanDiT(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@dataclass(frozen=True)
class _Term:
    """One file's contribution to one parameter: ``up @ down * scale`` or ``full * scale``."""

    up_or_full: torch.Tensor
    down: torch.Tensor | None
    scale: float

    def factors(self, total: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(up [total, r] fp32, down [r, in] fp32), or (the full delta [total, -1] as stored,
        None): made once per merge, not once per block of rows."""
        if self.down is None:
            return self.up_or_full.reshape(total, -1), None
        return self.up_or_full.flatten(1).float(), self.down.flatten(1).float()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file (bad input -> ValueError)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA {path}: only .safetensors files are supported")
    if not path.is_file():
        raise ValueError(f"LoRA {path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            keys = f.keys()  # (safe_open is not a dict: no ``in f``)
            return {k: f.get_tensor(k) for k in keys}, f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"LoRA {path}: not a readable safetensors file ({e})") from e


def _family(keys: Sequence[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    peft = any(k.startswith("transformer.") or any(h in "." + k for h in _PEFT_HINTS) for k in keys)
    return "peft" if peft else "original"


def _split(key: str) -> tuple[str, str] | None:
    """key -> (layer part without prefix, kind), or None for an unknown suffix."""
    for suffix, kind in _SUFFIXES.items():
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1]
            for p in _PREFIXES:
                stem = stem.removeprefix(p)
            return stem, kind
    return None


def _layers(shapes: Shapes) -> set[str]:
    """Module paths with a weight/bias, plus bare parameters (modulation tables)."""
    return {n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n for n in shapes}


def _resolver(family: str, shapes: Shapes) -> Callable[[str], str | None]:
    """Layer part of a key -> our layer name (module path or bare parameter), or None."""
    layers = _layers(shapes)
    if family == "original":
        return lambda stem: stem if stem in layers else None
    if family == "kohya":
        table = {layer.replace(".", "_"): layer for layer in layers}
        if len(table) != len(layers):
            raise RuntimeError("internal: two DiT layers share an underscore name")
        return lambda stem: table.get(stem.removeprefix("lora_unet_").lstrip("_"))

    def peft(stem: str) -> str | None:
        for leaf in (".weight", ""):  # a module, else a bare parameter (scale_shift_table)
            try:
                ours = dit_mod.from_diffusers_key(stem + leaf)
            except KeyError:
                continue
            return ours.removesuffix(leaf) if leaf else ours
        return None

    return peft


def _target(layer: str, kind: str, shapes: Shapes) -> str | None:
    """The parameter a term of ``kind`` on ``layer`` changes."""
    name = layer + (".bias" if kind == "diff_b" else ".weight")
    if name in shapes:
        return name
    return layer if kind != "diff_b" and layer in shapes else None


@dataclass
class _Parsed:
    """A file's keys sorted out: per our layer, kind -> (key, tensor)."""

    family: str
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]]
    unknown: list[str]
    skipped: dict[str, list[str]]  # reason -> keys


def _parse(tensors: dict[str, torch.Tensor], shapes: Shapes) -> _Parsed:
    family = _family(list(tensors))
    resolve = _resolver(family, shapes)
    out = _Parsed(family, {}, [], {})
    for key, t in tensors.items():
        split = _split(key)
        if split is not None and split[1] == "dora":
            out.skipped.setdefault("DoRA magnitudes are not supported", []).append(key)
            continue
        if any(tok in key for tok in _I2V):
            out.skipped.setdefault("image-to-video layers, absent from T2V", []).append(key)
            continue
        layer = None if split is None else resolve(split[0])
        if layer is None or _target(layer, split[1], shapes) is None:
            out.unknown.append(key)
            continue
        out.groups.setdefault(layer, {})[split[1]] = (key, t)
    return out


def _alpha_source(meta: dict[str, str]) -> Callable[[str, str], float | None]:
    """(our layer, file's layer stem) -> alpha from PEFT metadata (``lora_adapter_metadata``),
    or None when the file has none."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return lambda layer, stem: None
    cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError("DoRA / rsLoRA adapters are not supported")
    alpha, patterns = cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}

    def lookup(layer: str, stem: str) -> float | None:
        for pat, value in patterns.items():  # PEFT's rule: the pattern matches a name suffix
            if re.match(rf"(.*\.)?({pat})$", stem):
                return float(value)
        return None if alpha is None else float(alpha)

    return lookup


def _scalar(path: Path, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise ValueError(f"LoRA {path}: {key} should be a scalar, has shape {tuple(t.shape)}")
    return float(t.reshape(-1)[0].item())  # float or int64 in the wild


def _low_rank(path: Path, layer: str, g: dict, scale: float, meta_alpha) -> tuple[_Term, tuple]:
    """The low-rank term of one layer and the shape its delta will have (unchecked)."""
    if "up" not in g or "down" not in g:
        have = sorted(k for k, _ in g.values())
        raise ValueError(f"LoRA {path}: layer {layer} lacks lora_up or lora_down ({have})")
    (_, up), (down_key, down) = g["up"], g["down"]
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA {path}: layer {layer}: up {tuple(up.shape)} and down {tuple(down.shape)} "
            "do not multiply"
        )
    rank = down.shape[0]
    alpha = _scalar(path, g["alpha"][0], g["alpha"][1]) if "alpha" in g else None
    if alpha is None:
        alpha = meta_alpha(layer, _split(down_key)[0])
    s = scale if alpha is None else scale * alpha / rank
    return _Term(up, down, s), (up.shape[0], math.prod(down.shape[1:]))


def _check(path: Path, layer: str, name: str, got: tuple, want: tuple, flat: bool) -> None:
    ok = (want[0], math.prod(want[1:])) == got if flat else tuple(got) == tuple(want)
    if not ok:
        raise ValueError(
            f"LoRA {path}: layer {layer} gives a delta of shape {tuple(got)} for {name}, whose "
            f"shape is {tuple(want)} (a LoRA for another model size?)"
        )


def _terms(path: Path, parsed: _Parsed, scale: float, meta_alpha, shapes: Shapes):
    """Per parameter name, this file's terms; every shape checked."""
    out: dict[str, list[_Term]] = {}
    for layer, g in parsed.groups.items():
        if g.keys() & {"up", "down", "alpha"}:
            name = _target(layer, "up", shapes)
            term, got = _low_rank(path, layer, g, scale, meta_alpha)
            _check(path, layer, name, got, shapes[name], flat=True)
            out.setdefault(name, []).append(term)
        for kind in ("diff", "diff_b"):
            if kind in g:
                name, t = _target(layer, kind, shapes), g[kind][1]
                _check(path, layer, name, tuple(t.shape), shapes[name], flat=False)
                out.setdefault(name, []).append(_Term(t, None, scale))
    return out


def _report(path: Path, parsed: _Parsed) -> None:
    n = sum(len(g) for g in parsed.groups.values())
    blocks = {
        int(m.group(1)) for layer in parsed.groups if (m := re.match(r"blocks\.(\d+)\.", layer))
    }
    others = sorted(layer for layer in parsed.groups if not layer.startswith("blocks."))
    log.info(
        "lora %s (%s): %d tensors -> %d layers in %d blocks + %d others%s",
        *(path.name, parsed.family, n, len(parsed.groups), len(blocks), len(others)),
        f" ({', '.join(others)})" if others else "",
    )
    for reason, keys in parsed.skipped.items():
        log.warning("lora %s: skipped %d keys (%s), e.g. %s", path.name, len(keys), reason, keys[0])


def load_lora(path: str | Path, scale: float, shapes: Shapes) -> dict[str, list[_Term]]:
    """One LoRA file -> per our parameter name, its (lazy) delta terms at ``scale``.

    Checks every key and shape now; ``ValueError`` names the file, the layer and the shapes."""
    path = Path(path)
    if not math.isfinite(scale):
        raise ValueError(f"LoRA {path}: scale must be finite, got {scale}")
    tensors, meta = _read(path)
    parsed = _parse(tensors, shapes)
    if parsed.unknown:
        few = ", ".join(parsed.unknown[:5])
        raise ValueError(
            f"LoRA {path} ({parsed.family} keys): {len(parsed.unknown)} keys match no layer of "
            f"this model, e.g. {few}"
        )
    if not parsed.groups:
        raise ValueError(f"LoRA {path}: no LoRA tensors for this model")
    terms = _terms(path, parsed, float(scale), _alpha_source(meta), shapes)
    _report(path, parsed)
    return terms


MERGE_BLOCK = 512 * 2**10  # bytes of fp32 rows merged at once (fits a core's L2)


class LoraSet:
    """Several LoRAs added up: ``merged(name, weight)`` is the weight plus every file's delta
    for the parameters in ``names`` (``delta(name)`` the deltas alone).  Stateless after
    construction (thread-safe)."""

    def __init__(self, loras: Sequence[tuple[str | Path, float]], shapes: Shapes):
        self.shapes = dict(shapes)
        self._terms: dict[str, list[_Term]] = {}
        for path, scale in loras:
            for name, terms in load_lora(path, scale, self.shapes).items():
                self._terms.setdefault(name, []).extend(terms)

    @property
    def names(self) -> frozenset[str]:
        """The parameters some LoRA changes."""
        return frozenset(self._terms)

    def __len__(self) -> int:
        return len(self._terms)

    def delta(self, name: str) -> torch.Tensor | None:
        """The fp32 sum of the deltas of parameter ``name``, or None when no file touches it
        (for inspection and tests; loading merges without making it)."""
        if name not in self._terms:
            return None
        return self.merged(name, torch.zeros(self.shapes[name]))

    def merged(self, name: str, base: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """``base`` (parameter ``name`` as stored, full precision; only read) plus every file's
        delta, summed in fp32 and returned in ``dtype``.  In blocks of rows: the fp32 sum of a
        block stays in the CPU's cache, so a bf16 result costs one pass over the weight."""
        shape = self.shapes[name]
        flat = base.reshape(shape[0] if len(shape) > 1 else 1, -1)
        out = torch.empty(flat.shape, dtype=dtype)
        step = max(1, MERGE_BLOCK // (flat.shape[1] * 4))
        terms = [(t.scale, *t.factors(flat.shape[0])) for t in self._terms[name]]
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            block = flat[rows].float() if flat.dtype != torch.float32 else flat[rows].clone()
            for scale, up_or_full, down in terms:  # low rank: one addmm, no full-size delta
                if down is None:
                    block.add_(up_or_full[rows].float(), alpha=scale)
                else:
                    block.addmm_(up_or_full[rows], down, alpha=scale)
            out[rows] = block
        return out.reshape(shape)
