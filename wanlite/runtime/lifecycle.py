"""Component lifecycle: which weights are where, and when.

Each weight set (DiT, umT5, VAE) is a ``Component``: a module skeleton on the meta device, the
checkpoint's ``TensorStore`` and the map from our parameter names to checkpoint keys (checked
strictly once, at ``Pipeline`` creation, from the file headers only).  A component is made
resident (``acquire``) only for the phase that needs it and, depending on the offload mode,
released after it:

============  ==================================================================================
offload       behaviour
============  ==================================================================================
``none``      every component stays resident after first use (fastest repeated calls)
``model``     the umT5 is streamed (its 24 layers one ahead of use, ``offload.BlockStreamer``,
              and only the prompt's rows of its token embedding), the DiT is released before
              decoding (unless the planner keeps it: ``Placement.keep_dit``), the VAE after it
``blocks``    as ``model``, and the DiT's 30 blocks are streamed too: ~2 blocks resident; on
              CUDA their host copies are kept pinned (read, LoRA-merged and pinned once) up to
              half the available RAM (``offload.BlockStreamer``)
============  ==================================================================================

On a GPU, resident weights cross in a few large copies through pinned staging buffers
(``offload.to_device``), not one small pageable copy per tensor.

Quantization (``int8`` / ``fp8``, see ``quant``) swaps the Linear layers of the DiT blocks and
the umT5 blocks.  A checkpoint written by ``wanlite convert --quant`` is read as stored;
otherwise the weights are quantized layer by layer while loading, never holding the
full-precision model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..models import dit as dit_mod
from ..models import t5 as t5_mod
from ..models import vae as vae_mod
from ..ops.attention import resolve_name
from ..ops.meta import on_meta
from ..ops.quant import (
    QLinear,
    pack_linears,
    quantize,
    quantize_weight,
    resolve_linear,
    use_w8a8,
    w8a8_available,
)
from ..ops.radial import RadialConfig
from ..ops.vsa import choose_sparsity
from ..weights import castcache
from ..weights.loading import ModelSource, check_keys
from ..weights.tensorstore import TensorStore, weight_files
from .memory import trim
from .offload import BlockStreamer, RowEmbedding, cast, host_keep_bytes, to_device

__all__ = ["Component", "components", "quantize_checkpoint"]
log = logging.getLogger(__name__)
QUANT_META = "wanlite_quant"  # safetensors metadata key naming the quantization of a file


def dit_quant_keep(name: str) -> bool:
    """DiT layers kept in full precision: everything outside the blocks (patch, time and text
    embedders, output head) -- small, and feeding every block."""
    return not name.startswith("blocks.")


def with_scales(from_key: Callable[[str], str]) -> Callable[[str], str]:
    """Extend a rename to quantized files, where ``X.weight_scale`` sits beside ``X.weight``."""

    def rename(key: str) -> str:
        if key.endswith(".weight_scale"):
            return from_key(key[: -len("_scale")]) + "_scale"
        return from_key(key)

    return rename


class Component:
    """One weight set: skeleton + store + name map; materialized on demand."""

    def __init__(
        self,
        name: str,
        folder: Path,
        build: Callable[[], nn.Module],
        from_key: Callable[[str], str],
        *,
        device: torch.device,
        dtype: torch.dtype | None,
        quant: str = "none",
        keep: Callable[[str], bool] = lambda n: False,
        fp32: Callable[[str], bool] = lambda n: False,
        aliases: dict[str, str] | None = None,
        prepare: Callable[[nn.Module, bool, bool], bool] | None = None,
        store=None,
        cast_root: Path | None = None,
    ):
        self.name, self.build, self.device, self.dtype = name, build, device, dtype
        # prepare(module, blocks_streamed, pack) -> packed, after each materialization
        self.prepare = prepare
        self.keep, self.fp32 = keep, fp32
        # ``store``: an open store (a single file, ``formats.MappedStore``) instead of the
        # folder's safetensors; anything with the TensorStore interface.
        self.store = store if store is not None else TensorStore(weight_files(folder))
        self.stored_quant = self.store.metadata.get(QUANT_META, "none")
        if self.stored_quant != "none" and quant not in ("none", self.stored_quant):
            raise ValueError(
                f"{folder or ''} is stored as {self.stored_quant}; it cannot be loaded as {quant}"
            )
        self.quant = self.stored_quant if self.stored_quant != "none" else quant
        skeleton = self._skeleton(self.stored_quant)
        self.names = check_keys(self.store, skeleton, with_scales(from_key), aliases)
        self.module: nn.Module | None = None
        self.streamed = False  # how self.module was made: blocks streamed or resident
        self.packed = False  # and whether its GEMM weights were packed (see ``prepare``)
        self.packable = False  # set for the DiT when its GEMM weights can be packed
        # Streamed blocks' host copies kept across forwards (``offload.BlockStreamer``): for the
        # DiT (dozens of forwards per call), not the umT5 (one per prompt)
        self.keep_streamed = False
        self.streamer: BlockStreamer | None = None
        self._compact: dict[str, torch.Tensor] | None = None
        # LoRA (``weights.lora.LoraSet``): merged as each weight it changes is read, before any
        # quantization (see ``_merged``).
        self.lora = None
        self.lora_seconds = 0.0
        self.load_seconds = 0.0  # total time spent materializing weights (reads, casts, prep)
        # Streamed blocks: seconds of reads on the prefetch thread and of compute waiting for
        # them, summed over the streamers this component has had (``prefetch_seconds``)
        self._prefetch = (0.0, 0.0)
        # Narrowing casts written once to the cache folder (``castcache``); False: none
        self.cast_root = cast_root
        self._casts: TensorStore | None | bool = None if cast_root is not None else False

    def _skeleton(self, quant: str) -> nn.Module:
        with on_meta():
            module = self.build()
        return quantize(module, quant, self.keep)

    # -- weight sources ---------------------------------------------------------------------
    def _merged(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored tensor, or, if a LoRA changes it, the stored tensor plus its deltas,
        summed in fp32 and returned in ``dtype`` (a weight stored quantized is dequantized first,
        and quantized again by :meth:`quantized`).  A stored weight is merged from the file's
        memory map where the store has one (no copy), else from a plain read.

        When the cast cache holds the weight already in ``dtype`` (the fp32 DiT run in bf16),
        the merge starts from that copy: half the bytes to read (the fp32 file is 5.7 GB and
        rarely still in the page cache next to the 11 GB umT5), at the cost of a second
        rounding, as diffusers' bf16 ``fuse_lora`` (it differs from the fp32-source merge,
        which ``cast_cache="off"`` keeps, by at most W's bf16 rounding)."""
        key = self.names[name]
        if not self._lora(name):
            return self.store.get(key)
        t0 = time.perf_counter()
        store = self.store
        if self._casts and name in self._casts.entries and self._casts.entries[name].dtype == dtype:
            store, key = self._casts, name
        mapped = getattr(store, "mapped", None)
        with mapped(key) if mapped else contextlib.nullcontext(store.get(key)) as t:
            out = self.lora.merged(name, self._dequantized(name, t), dtype)
        self.lora_seconds += time.perf_counter() - t0  # reading + merging (part of load_seconds)
        return out

    def _lora(self, name: str) -> bool:
        return self.lora is not None and name in self.lora.names

    def _dequantized(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (parameter ``name``) in full precision: a stored int8 / fp8 weight times its
        per-row scale, a floating one as it is."""
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return t
        return t.float() * self.store.get(self.names[name + "_scale"]).float()[:, None]

    def _in_ram(self) -> bool:
        """Quantized in RAM: asked for on a full-precision checkpoint, or a pre-quantized one
        with a LoRA to merge (dequantize, add, quantize again)."""
        lora = self.lora is not None and self.stored_quant != "none"
        return self.quant != self.stored_quant or lora

    def load(self, name: str, in_place: bool = False) -> torch.Tensor:
        """Parameter ``name`` on the host, ready to use: floating weights in the compute dtype,
        or fp32 for the layers kept in fp32 (``fp32``); quantized weights as they are.

        ``in_place``: a weight already stored in that dtype, with nothing to merge, is used
        where it lies in the file's memory map (no copy: see ``tensorstore``).  Cast weights
        are cast while read, without a full-precision copy."""
        target = torch.float32 if self.fp32(name) else self.dtype
        if self._compact is not None:
            return cast(self._compact[name], target)
        key = self.names[name]
        if not self._lora(name):
            if self._casts and name in self._casts.entries:  # cast once, earlier
                return self._casts.view(name) if in_place else self._casts.get(name)
            if in_place and self.store.entries[key].dtype == target:
                return self.store.view(key)
            return self.store.get(key, target)
        return self._merged(name, target)

    def quantized(self, skeleton: nn.Module, mode: str, skip: str | None = None, source=None):
        """Yield (name, tensor) for every parameter of the ``mode``-quantized ``skeleton``:
        QLinear weights quantized from the stored full-precision ones (each followed by its
        ``weight_scale``), the rest from ``source`` (default :meth:`load`).  The module ``skip``
        is left out (its rows are read on demand).  Layer by layer: the full-precision model
        is never held.  The one quantization loop, for RAM and for ``wanlite convert --quant``."""
        source = source or self.load
        qlayers = {n for n, m in skeleton.named_modules() if isinstance(m, QLinear)}
        for name, _ in skeleton.named_parameters():
            layer, _, attr = name.rpartition(".")
            if skip is not None and layer == skip:
                continue
            if layer not in qlayers or attr == "bias":
                yield name, source(name)
            elif attr == "weight":
                full = self._dequantized(name, self._merged(name))
                w, s = quantize_weight(full, mode)
                yield name, w
                yield layer + ".weight_scale", s
                # Return the freed full-precision pages now: the kept int8 tensors sit between
                # them on the heap, so without this the peak can reach the fp32 model's size.
                trim()

    # -- lifecycle --------------------------------------------------------------------------
    def acquire(
        self, stream_blocks: bool = False, row_embedding: str | None = None, pack: bool = True
    ) -> nn.Module:
        """The module, resident (or with its blocks streamed).  A module made the other way
        (streamed vs resident) is released and made again as asked.  ``pack``: resident DiT
        blocks may have their GEMM weights packed (``prepare``); a module already packed is
        kept even when a call would not pack (the cost is paid), an unpacked one is remade
        when a call wants packing."""
        wants_packing = pack and self.packable and not stream_blocks
        made_as_asked = self.streamed == stream_blocks and (self.packed or not wants_packing)
        if self.module is not None and made_as_asked:
            return self.module
        self.release()
        t0 = time.perf_counter()
        in_ram = self._in_ram()
        if self._casts is None:
            self._casts = self._open_casts()
        module = self._skeleton(self.quant)
        if in_ram:
            self._compact = dict(self.quantized(module, self.quant, skip=row_embedding))
            trim()  # the full-precision temporaries are gone: return their pages
        names = [n for n, _ in module.named_parameters()]
        if stream_blocks:
            self._pin_compact()
            keep = host_keep_bytes(self.device) if self.keep_streamed else 0
            self.streamer = BlockStreamer(
                module.blocks, "blocks", self.load, self.device, keep, wrap=self.keep_streamed
            )
            names = [n for n in names if not n.startswith("blocks.")]
        if row_embedding is not None:
            key = self.names[row_embedding + ".weight"]
            rows = RowEmbedding(lambda r: self.store.get_rows(key, r), self.dtype)
            setattr(module, row_embedding, rows)
            names = [n for n in names if not n.startswith(row_embedding + ".")]
        # In place from the file for resident modules on the CPU; a preparation step that
        # re-lays weights out (the DiT's packed / fused GEMMs) reads them there too, and their
        # mapped pages are dropped afterwards (``_drop_relaid``).
        in_place = self.device.type == "cpu" and not stream_blocks
        # On a GPU: packed into a few large copies through pinned memory (``to_device``)
        state = to_device(((n, self.load(n, in_place)) for n in names), self.device)
        assign(module, state)
        del state
        if self.prepare is not None:
            self.packed = self.prepare(module, stream_blocks, pack)
            if in_place and self._compact is None:  # (a quantized copy is not mapped)
                self._drop_relaid(module, names)
            if self._compact is not None:  # keep one copy of re-laid-out weights
                for n, p in module.named_parameters():
                    if n in self._compact and not p.is_meta:
                        self._compact[n] = p.data
            trim()
        self.module, self.streamed = module.eval().requires_grad_(False), stream_blocks
        self.load_seconds += time.perf_counter() - t0
        return self.module

    def _pin_compact(self) -> None:
        """On CUDA, pin the streamed blocks' weights quantized in RAM once, in place of the
        unpinned copies, so that each forward only queues their copy (no re-pinning)."""
        if self._compact is None or self.device.type != "cuda":
            return
        for n, t in self._compact.items():
            if n.startswith("blocks.") and not t.is_pinned():
                self._compact[n] = t.pin_memory()

    def source_entry(self, name: str):
        """The stored entry (file, offset, bytes) parameter ``name`` is read from: its copy in
        the cast cache when that holds one (the cache opened, or written, first, as
        :meth:`acquire` does), else the checkpoint's; None when the store has no such entry."""
        if self._casts is None:
            self._casts = self._open_casts()
        if self._casts and name in self._casts.entries:
            return self._casts.entries[name]
        return self.store.entries.get(self.names[name])

    def _drop_relaid(self, module: nn.Module, names: list[str]) -> None:
        """Drop the mapped pages of the weights ``prepare`` replaced by re-laid-out copies (no
        longer parameters): read only, they would otherwise stay in RSS next to the copies.
        Safe even if a view were still alive: a private map re-reads dropped pages from disk."""
        kept = {n for n, _ in module.named_parameters()}
        for name in (n for n in names if n not in kept):
            if self._casts and name in self._casts.entries:
                self._casts.drop(name)
            elif hasattr(self.store, "drop") and self.names[name] in self.store.entries:
                self.store.drop(self.names[name])

    def _cast_args(self) -> tuple | None:
        """``castcache`` arguments for the full-precision weights used as stored, or None."""
        if self.cast_root is None or self.quant != "none":  # quantized from the source
            return None

        def target(name: str) -> torch.dtype:
            return torch.float32 if self.fp32(name) else self.dtype

        names = {n: self.names[n] for n in self.names if not n.endswith("_scale")}
        return self.name, self.store, names, target, self.cast_root

    def _open_casts(self) -> TensorStore | bool:
        """The cast cache (``castcache``), written now if it was not yet, or False."""
        args = self._cast_args()
        try:
            return (args is not None and castcache.cached_casts(*args)) or False
        except OSError as e:  # a read-only or full cache folder: cast while reading instead
            log.warning("%s: cast cache not used (%s)", self.name, e)
            return False

    def cast_file(self, write: bool = False) -> Path | None:
        """The cast cache file of this component (written first if ``write``), or None when
        it has none (nothing to cast, turned off) or it is not written yet."""
        if write and self._casts is None:
            self._casts = self._open_casts()
        args = self._cast_args()
        planned = None if args is None else castcache.plan(*args)
        return planned[0] if planned is not None and planned[0].is_file() else None

    def resident_bytes(self) -> int:
        """Bytes of weights this component holds now (the module's tensors and any quantized
        copy kept in RAM; streamed blocks are not counted)."""
        seen, total = set(), 0
        tensors = [] if self.module is None else [*self.module.parameters(), *self.module.buffers()]
        tensors += list((self._compact or {}).values())
        for t in tensors:
            if t.is_mkldnn:  # packed weights (quant.PackedLinear): opaque, no storage
                total += t.numel() * t.element_size()
                continue
            if t.is_meta or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return total

    def prefetch_seconds(self) -> tuple[float, float]:
        """(seconds the prefetch thread spent reading streamed blocks, seconds the compute
        waited for them), over this component's life."""
        read, wait = self._prefetch
        if self.streamer is not None:
            read, wait = read + self.streamer.read_seconds, wait + self.streamer.wait_seconds
        return read, wait

    def release(self) -> None:
        """Drop the module -- and weights quantized in RAM: offload is asked for to save memory,
        so they are quantized again on the next acquire (``wanlite convert --quant`` avoids
        that)."""
        if self.streamer is not None:
            self.streamer.close()
            self._prefetch = self.prefetch_seconds()
            self.streamer = None
        self.module = self._compact = None
        self.streamed = self.packed = False
        self.store.unmap()  # weights used in place are gone with the module
        if self._casts:
            self._casts.unmap()
        trim()


def assign(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Assign the tensors of ``state`` (full names) to ``module``'s parameters in place of the
    meta ones; every name must be one of its parameters."""
    result = module.load_state_dict(state, strict=False, assign=True)
    left = [k for k in result.missing_keys if k in state]
    if left or result.unexpected_keys:
        raise RuntimeError(f"internal: could not assign {left or result.unexpected_keys}")


def components(path, cfg, options, device, dtype) -> dict[str, Component]:
    """The three weight sets of the checkpoint at ``path`` (a folder, or a
    ``loading.ModelSource``: single files for some of them).  The DiT is quantized in RAM when
    asked for (it runs every step); the umT5 runs once per new prompt, so it is used as
    stored: quantizing its 5.7 B parameters in RAM costs more than it saves in one call."""
    source = ModelSource.of(path)
    # "w8a8": int8 weights (stored and loaded as "int8"), run by int8 GEMMs (``_prepare_dit``)
    quant = "int8" if options.quant == "w8a8" else options.quant
    if options.quant == "w8a8" and device.type == "cpu" and not w8a8_available():
        raise RuntimeError("quant='w8a8' needs a torch build with oneDNN's int8 linear (x86)")
    cast_root = options.resolve_cast_cache()
    attention = resolve_name(options.attention, device, dtype)  # "auto": decided (and logged) once
    vsa = choose_sparsity(cfg.dit.vsa_gate, options.attention, options.vsa_sparsity)
    if cfg.dit.vsa_gate:
        log.info("VSA-trained DiT: %s", f"VSA, sparsity {vsa}" if vsa is not None else "dense")
        if options.preset is None:
            log.warning("a FastWan (DMD) checkpoint: preset='fastwan' samples it as published")
    radial = RadialConfig.of(options) if attention == "radial" else None
    fits = quant == "none" and not options.compile and options.offload != "blocks"
    linear = resolve_linear(options.linear, device, dtype, fits)  # once, here too
    log.info("DiT block linears (%s): %s", options.linear, linear)
    fused = dit_mod.check_fused(options.fused, device)  # Triton norm / RoPE / gate kernels
    comps = {
        "text_encoder": Component(
            "text_encoder",
            _folder(source, "text_encoder"),
            lambda: t5_mod.UMT5Encoder(cfg.t5),
            _renamed(source, "text_encoder", t5_mod.from_diffusers_key),
            store=source.store("text_encoder"),
            cast_root=cast_root,
            device=device,
            dtype=dtype,
            # fp16: the FFN output projection is kept (and stored) in fp32, as transformers does
            fp32=t5_mod.keep_in_fp32 if dtype == torch.float16 else (lambda n: False),
            aliases=t5_mod.TIED_ALIASES,
        ),
        "transformer": Component(
            "transformer",
            _folder(source, "transformer"),
            lambda: dit_mod.WanDiT(
                cfg.dit, attn=attention, vsa_sparsity=vsa, radial=radial, fused=fused
            ),
            _renamed(source, "transformer", dit_mod.from_diffusers_key),
            store=source.store("transformer"),
            cast_root=cast_root,
            device=device,
            dtype=dtype,
            quant=quant,
            keep=dit_quant_keep,
            fp32=dit_mod.keep_in_fp32,
            prepare=lambda m, streamed, pack: _prepare_dit(m, streamed, pack, options, linear),
        ),
        "vae": Component(
            "vae",
            _folder(source, "vae"),
            lambda: vae_mod.WanVAE(cfg.vae),
            _renamed(source, "vae", lambda k: vae_mod.from_diffusers_key(k, cfg.vae)),
            store=source.store("vae"),
            cast_root=cast_root,
            device=device,
            dtype=options.resolve_vae_dtype(dtype),
        ),
    }
    comps["transformer"].packable = linear == "onednn"  # each call decides (Placement.pack)
    comps["transformer"].keep_streamed = True
    if options.lora:  # every file and shape is checked now, before any generation work
        from ..weights.lora import LoraSet, dit_shapes

        comps["transformer"].lora = LoraSet(options.lora, dit_shapes(cfg.dit))
    if quant != "none" and comps["text_encoder"].quant == "none":
        log.info(
            "the umT5 is used as stored (%s is for the DiT here); `wanlite convert --quant` "
            "writes a checkpoint whose umT5 is stored %s too",
            quant,
            quant,
        )
    return comps


def _folder(source: ModelSource, name: str) -> Path | None:
    return None if name in source.files else source.folder / name


def _renamed(source: ModelSource, name: str, from_key: Callable[[str], str]):
    """A single file's store is keyed by our names already (``formats``): no rename."""
    return (lambda k: k) if name in source.files else from_key


def _prepare_dit(module: dit_mod.WanDiT, streamed: bool, pack: bool, options, linear: str):
    """When the blocks are resident (streamed blocks are used as stored) and the call asks for
    it (``pack``: it runs enough forwards to pay back a re-layout): their weights packed for
    oneDNN (``linear`` resolved to "onednn": CPU, fp32 / bf16), else fused q/k/v projections.
    torch.compile of the repeated block when asked for.  Returns whether they were packed."""
    packed = not streamed and pack and linear == "onednn"
    if options.quant == "w8a8" and module.patch_embedding.weight.device.type == "cpu":
        if not streamed:  # oneDNN's int8 GEMM from weights packed once (q/k/v not fused)
            log.info("w8a8: %d int8 linears run by oneDNN", use_w8a8(module.blocks))
        else:  # packing per streamed block would cost more than it saves
            log.info("w8a8 with streamed blocks: int8 weights dequantized per call")
    elif packed:
        # A pre-quantized checkpoint's QLinear layers are left as they are (not nn.Linear).
        pack_linears(module.blocks, gelu_after=lambda name: name.endswith(".ffn.0"))
    elif not streamed and pack:  # fusing copies the q/k/v weights: it too pays over many calls
        dit_mod.fuse_projections(module)
    if options.compile:
        dit_mod.compile_blocks(module)
    return packed


# --- pre-quantized checkpoints ("wanlite convert --quant") -------------------------------------

_TO_KEY = {"transformer": dit_mod.to_diffusers_key, "text_encoder": t5_mod.to_diffusers_key}


def quantize_checkpoint(src: Path, out: Path, mode: str, shard_bytes: int = 2 * 2**30) -> Path:
    """Copy the checkpoint at ``src`` to ``out`` with the DiT and umT5 block linears stored
    quantized (``mode`` recorded in each safetensors file's metadata).  Tensor by tensor: the
    full-precision model is never in memory at once."""
    import shutil

    from ..models.configs import read_model_config
    from ..options import Options

    if mode not in ("int8", "fp8"):
        raise ValueError(f"quant must be 'int8' or 'fp8', got {mode!r}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out-dir {out} exists and is not empty")
    cfg = read_model_config(src)
    tmp = out.with_name(f".{out.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    # Configs, tokenizer and the VAE as they are; the two quantized weight sets written below.
    skip = shutil.ignore_patterns("*.safetensors*")
    shutil.copytree(
        src, tmp, ignore=lambda d, names: [] if Path(d).name == "vae" else skip(d, names)
    )
    comps = components(src, cfg, Options(quant=mode), torch.device("cpu"), None)
    for name in ("transformer", "text_encoder"):
        _write_quantized(comps[name], mode, tmp / name, shard_bytes)
    if out.exists():
        out.rmdir()  # empty: checked above
    tmp.rename(out)
    return out


def _write_quantized(comp: Component, mode: str, folder: Path, shard_bytes: int) -> None:
    """Write ``comp`` quantized as diffusers-named safetensors shards with an index."""
    import json

    from safetensors.torch import save_file

    to_key = _TO_KEY[comp.name]
    as_stored = lambda n: comp.store.get(comp.names[n])  # noqa: E731
    shards, current, size = [], {}, 0
    for name, t in comp.quantized(comp._skeleton(mode), mode, source=as_stored):
        scale = name.endswith(".weight_scale")
        key = to_key(name.removesuffix("_scale")) + ("_scale" if scale else "")
        current[key] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes and not name.endswith(".weight"):  # a weight stays with its scale
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    prefix = "model" if comp.name == "text_encoder" else "diffusion_pytorch_model"
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt", QUANT_META: mode})
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {QUANT_META: mode}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    comp.store.close()
