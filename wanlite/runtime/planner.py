"""Memory planner: a documented estimate of peak memory per phase, and the choice of offload
mode and VAE tiling that fits a budget.

The estimate (bytes) for each phase is weights resident + activations + a fixed runtime base:

- weights: parameter counts from the config times bytes per stored parameter (int8 / fp8: 1,
  otherwise the compute dtype; kept layers and the VAE in fp32; in fp16 the umT5's FFN output
  projections too).  The umT5 reads only the
  prompt's rows of its token embedding, always.  With offload on, it keeps two layers resident
  (the one running and the one prefetched); ``offload="blocks"`` does the same for the DiT's
  blocks.
- DiT activations, per forward with L tokens of width D (ffn width F, compute bytes s): the fp32
  residual stream and its modulated copy, q/k/v/attention output (~8 L D 4), and the FFN
  intermediate before and after GELU for one chunk of tokens (2 min(L, chunk) F s).  SDPA keeps
  attention memory linear in L.
- NAG (``nag_scale`` set): the negative prompt's cross-attention K/V, kept for every block the
  whole denoise (``nag_kv_bytes``).  NAG's second attention output and ``nag.guide``'s fp32
  temporaries live only inside cross-attention, where self-attention's are already freed: that
  stage (``nag_stage_bytes``) stays below the forward's activations above (measured: the
  forward's peak is unchanged), so it enters as a max, not a sum.
- umT5 activations for n tokens (both prompts): ~8 n d_model 4 + the fp32 position-bias buffer
  2 H n^2 4 + the FFN intermediates 3 n d_ff 4.
- VAE decode: ``VAE_BYTES_PER_PIXEL_CHANNEL`` x base_dim x pixels of the region decoded at once
  (the full frame, or one tile), calibrated from one untiled decode; plus the output chunk.

``choose`` takes the least offloaded placement that fits; when that is "model" (chosen by
"auto") and the budget also holds the DiT beside the streamed umT5 and the decode, the DiT stays
resident across phases and calls (``Placement.keep_dit``): a budget is used, not left idle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..models.configs import ModelConfig
from ..models.dit import FFN_CHUNK
from ..options import Options, parse_bytes

log = logging.getLogger(__name__)

RUNTIME_BASE = 400 * 2**20  # the torch runtime and Python objects (RSS on CPU, a calibration)
VAE_BYTES_PER_PIXEL_CHANNEL = 200  # peak decode bytes per output pixel per base_dim channel
VAE_TILE = 32  # latent pixels (256 output pixels) per tile side
VAE_OVERLAP = 8


def dit_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the blocks' linears, all other parameters) of the DiT."""
    d, f, c = cfg.dit.dim, cfg.dit.ffn_dim, cfg.dit
    per_block_linear = 8 * d * d + 2 * d * f + 8 * d + f + d  # weights + biases
    per_block_other = 6 * d + 2 * d + 2 * d  # modulation, q/k norms x2, norm3
    other = (
        c.in_channels * d * 4
        + d
        + c.text_dim * d
        + d * d
        + c.freq_dim * d
        + d * d
        + 6 * d * d
        + 2 * d * c.out_channels * 4
        + 2 * d
        + 10 * d
    )
    return c.num_layers * per_block_linear, c.num_layers * per_block_other + other


def t5_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters per layer, token embedding parameters) of the umT5 encoder."""
    t = cfg.t5
    inner = t.num_heads * t.d_kv
    layer = 4 * t.d_model * inner + 3 * t.d_model * t.d_ff + 2 * t.d_model
    return layer, t.vocab_size * t.d_model


@dataclass(frozen=True)
class Placement:
    """Where the weights live during one call, made once by :func:`choose` and passed down.

    ``offload`` is the mode picked ("none" | "model" | "blocks"); the questions below are the
    only places that interpret it."""

    offload: str
    vae_tiled: bool
    cfg_batched: bool
    estimate: Estimate
    pack: bool = True  # resident DiT GEMM weights packed for oneDNN where they can be
    keep_dit: bool = False  # "model": the DiT stays resident across phases and calls

    def streamed(self, component: str) -> bool:
        """Read layer by layer as it runs: the umT5 whenever offload is on (it runs once per new
        prompt), the DiT's blocks only in "blocks" mode."""
        if component == "text_encoder":
            return self.offload != "none"
        return component == "transformer" and self.offload == "blocks"

    def kept(self, component: str) -> bool:
        """Resident after its phase: everything without offload (the fastest repeated calls);
        with "model", the DiT when the budget holds it through encode and decode too
        (``keep_dit``): the next call does not read it again."""
        if component == "transformer" and self.offload == "model":
            return self.keep_dit
        return self.offload == "none"


@dataclass(frozen=True)
class Estimate:
    encode: int
    denoise: int
    decode: int

    @property
    def peak(self) -> int:
        return max(self.encode, self.denoise, self.decode)

    def as_dict(self) -> dict[str, int]:
        return {"encode": self.encode, "denoise": self.denoise, "decode": self.decode}


def estimate(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    *,
    compute_bytes: int,
    quant: str,
    offload: str,
    tiled: bool,
    t5_quant: str = "none",
    prompt_tokens: int = 512,
    cfg_batch: int = 1,
    vae_bytes: int = 4,
    nag: bool = False,
    fp16: bool = False,
    keep_dit: bool = False,
    dit_frames: int | None = None,
    kv_frames: int = 0,
) -> Estimate:
    """Peak bytes per phase; ``cfg_batch=2`` when both CFG passes run as one batch (the DiT
    activations double).  ``quant`` is the DiT's; ``t5_quant`` the umT5's as stored (it is
    never quantized in RAM: it runs once per new prompt).  ``nag``: NAG is on.  ``fp16``: the
    compute dtype is float16, where the umT5's FFN output projections stay in fp32
    (``t5.keep_in_fp32``, as transformers does): 2 more bytes for each of their weights.
    ``keep_dit`` ("model"): the DiT stays resident while the umT5 encodes and the VAE decodes.
    ``dit_frames``: latent frames one DiT forward sees (a causal chunk, a context window; None:
    the whole video); ``kv_frames``: latent frames whose self-attention keys and values a causal
    call keeps for every block (``runtime.kvcache``)."""
    qb = 1 if quant in ("int8", "fp8", "w8a8") else compute_bytes
    if quant == "w8a8" and offload != "blocks":  # CPU: oneDNN's packed copy beside the int8
        qb = 2  # weights the component keeps (on CUDA w8a8 is int8: 1 byte, counted as 2)
    blocks_lin, dit_other = dit_params(cfg)
    per_block = blocks_lin // cfg.dit.num_layers
    dit_w = (2 * per_block if offload == "blocks" else blocks_lin) * qb + dit_other * 4
    layer, _ = t5_params(cfg)
    t = cfg.t5
    rows = 2 * prompt_tokens * t.d_model * 4  # the token embedding's rows, read on demand
    # fp16: the FFN output projection (d_ff x d_model) is kept in fp32 (unless stored quantized)
    wo32 = t.d_ff * t.d_model * (4 - compute_bytes) if fp16 and t5_quant == "none" else 0
    if offload != "none":  # streamed: two layers (cast to the compute dtype)
        t5_w = 2 * (layer * compute_bytes + wo32) + rows
    else:
        t5_bytes = 1 if t5_quant != "none" else compute_bytes
        t5_w = t.num_layers * (layer * t5_bytes + wo32) + rows
    n = 2 * prompt_tokens
    t5_act = 8 * n * t.d_model * 4 + 2 * t.num_heads * prompt_tokens**2 * 4
    t5_act += 3 * prompt_tokens * t.d_ff * 4
    c, lf, lh, lw = latent_shape
    pt, ph, pw = cfg.dit.patch_size
    frame_tokens = (lh // ph) * (lw // pw)
    tokens = (min(lf, dit_frames or lf) // pt) * frame_tokens
    d = cfg.dit.dim
    dit_act = 8 * tokens * d * 4 + 2 * min(tokens, FFN_CHUNK) * cfg.dit.ffn_dim * compute_bytes
    dit_act += 3 * c * lf * lh * lw * 4 + 2 * 512 * cfg.dit.text_dim * compute_bytes
    dit_act *= cfg_batch
    dit_act += 2 * cfg.dit.num_layers * min(kv_frames, lf) * frame_tokens * d * compute_bytes
    if nag:
        dit_act = max(dit_act, nag_stage_bytes(tokens, d, compute_bytes, cfg_batch))
        dit_act += nag_kv_bytes(cfg, compute_bytes, prompt_tokens)
    # fp32-sized even for a bf16 VAE: measured (bench_memory --vae-dtype bfloat16), its decode
    # peak sits that much above the activations (the fp32 file is read to cast it)
    vae_w = vae_params(cfg) * 4
    vae_act = vae_decode_bytes(cfg, latent_shape, tiled, vae_bytes)
    keep_all = offload == "none"
    dit_kept = dit_w if keep_dit and offload == "model" else 0
    return Estimate(
        encode=RUNTIME_BASE + t5_w + t5_act + (dit_w + vae_w if keep_all else dit_kept),
        denoise=RUNTIME_BASE + dit_w + dit_act + (t5_w + vae_w if keep_all else 0),
        decode=RUNTIME_BASE + vae_w + vae_act + (dit_w + t5_w if keep_all else dit_kept),
    )


def nag_stage_bytes(tokens: int, dim: int, compute_bytes: int, batch: int = 1) -> int:
    """Bytes live at the peak of a block's cross-attention with NAG on (``dit.Attention.
    cross_attention``), the first subtraction in ``nag.guide``.  Counted in [B, L, D] tensors:

    - per row, in the compute dtype: the block's input stream and its copy updated by
      self-attention (one tensor in fp32: updated in place), the normed input y, the queries
      q and the prompt's attention output: 5 (4 in fp32);
    - for the one conditional row: the negative prompt's output z_neg, and in ``guide`` the
      fp32 copies of z_pos and z_neg and the fp32 g (``.float()`` of an fp32 tensor is the
      tensor itself: only g is new in fp32).

    bf16: 10 + 14 = 24 bytes per token and channel, fp32: 16 + 8 = 24; measured 24.0 both
    (one full-width block, 8,400 and 25,200 tokens, torch profiler).  Self-attention peaks at
    24.0 in bf16 too (36 in fp32), and the forward's estimate counts 8 x 4 = 32 per row: so
    this binds only if that estimate is ever tightened below it."""
    s = compute_bytes
    per_row = (5 if s < 4 else 4) * s
    nag_row = s + (3 * 4 if s < 4 else 4)
    return tokens * dim * (batch * per_row + nag_row)


def nag_kv_bytes(cfg: ModelConfig, compute_bytes: int, prompt_tokens: int = 512) -> int:
    """The negative prompt's cross-attention K and V [1, Lk, D] of every block, made at its
    first forward and kept to the end of the denoise (``dit.NagText``).  Lk is its tokens + 1
    (the padding merged into one key), at most 512: counted as ``prompt_tokens``.  At guidance
    <= 1, NAG's use, nothing else makes them (measured: 6,291,456 bytes for 2 blocks, bf16,
    a 511-token negative prompt, as counted here)."""
    return cfg.dit.num_layers * 2 * prompt_tokens * cfg.dit.dim * compute_bytes


def vae_decode_bytes(
    cfg: ModelConfig, latent_shape: tuple[int, ...], tiled: bool, vae_bytes: int = 4
) -> int:
    """VAE decode activations and causal caches: ``VAE_BYTES_PER_PIXEL_CHANNEL`` (fp32; scaled
    by ``vae_bytes`` / 4 for a bf16 VAE) x base_dim x the output pixels decoded at once (the
    frame, or one tile: tiles are decoded one at a time), plus the output: one chunk of 4
    frames untiled, the whole fp32 video tiled (the tiles are blended into it)."""
    _, lf, lh, lw = latent_shape
    s, t = cfg.vae.spatial_stride, cfg.vae.temporal_stride
    region = (min(lh, VAE_TILE) * min(lw, VAE_TILE) if tiled else lh * lw) * s * s
    frames = 1 + t * (lf - 1) if tiled else t
    per_pixel = VAE_BYTES_PER_PIXEL_CHANNEL * vae_bytes // 4
    return per_pixel * cfg.vae.base_dim * region + 3 * frames * lh * lw * s * s * 4


def vae_params(cfg: ModelConfig) -> int:
    """~127 M at base_dim 96; scales with base_dim squared."""
    return int(127e6 * (cfg.vae.base_dim / 96) ** 2)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return cuda_available(
            free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        )
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown: assume a small machine


# Packing the DiT's GEMM weights for oneDNN (CPU) is paid once, at first use, and saves a share
# of every forward's GEMM time after that.  Measured on a 2-core AMX CPU in bf16: packing the 30
# blocks cost about as much as 25 forwards of 2 x 192 tokens save, and a few percent of one
# forward at 480P.  So "auto" packs when the call runs at least this many token-forwards (tokens
# per forward x forwards, both CFG passes counted): the break-even point, rounded down.
PACK_MIN_TOKEN_FORWARDS = 8192


def packing_pays(tokens: int, forwards: int) -> bool:
    return tokens * forwards >= PACK_MIN_TOKEN_FORWARDS


def cuda_available(free: int, reserved: int, allocated: int) -> int:
    """Free device memory for this process: the driver's free bytes plus what PyTorch's caching
    allocator holds but no tensor uses (reserved - allocated).  Without that, memory freed by
    the previous call still looks used, and a second call may switch to offload it does not
    need."""
    return free + max(reserved - allocated, 0)


def choose(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    options: Options,
    device: torch.device,
    compute_bytes: int,
    held: int = 0,
    t5_quant: str = "none",
    vae_bytes: int = 4,
    dtype: torch.dtype | None = None,
    dit_frames: int | None = None,
    kv_frames: int = 0,
) -> Placement:
    """Offload mode, tiled decode and CFG batching for one request under the options' budget:
    the first (least offloaded, untiled) setting that fits; CFG is batched only if it still
    fits with the doubled activations ("auto"), or as forced.

    Without ``max_memory`` the budget is the memory available now plus ``held``, the bytes of
    weights this pipeline already holds: the estimate counts them too, so without adding them
    back a second call would see its own resident model as used memory and flip to offload.
    ``dtype``: the compute dtype (float16 keeps some umT5 weights in fp32: see ``estimate``).
    ``dit_frames``, ``kv_frames``: a causal or windowed call's (see ``estimate``)."""
    budget = (
        parse_bytes(options.max_memory)
        if options.max_memory is not None
        else available_memory(device) + held
    )
    modes = ("none", "model", "blocks") if options.offload == "auto" else (options.offload,)
    tilings = {"on": (True,), "off": (False,), "auto": (False, True)}[options.vae_tiling]
    kw = dict(compute_bytes=compute_bytes, quant=options.quant, t5_quant=t5_quant)
    kw["vae_bytes"] = vae_bytes
    kw["nag"] = options.nag_scale is not None
    kw["fp16"] = dtype == torch.float16
    kw |= dict(dit_frames=dit_frames, kv_frames=kv_frames)

    def est2(mode: str, tiled: bool, keep: bool = False) -> Estimate:
        return estimate(
            cfg, latent_shape, offload=mode, tiled=tiled, cfg_batch=2, keep_dit=keep, **kw
        )

    for mode in modes:
        for tiled in tilings:
            est = estimate(cfg, latent_shape, offload=mode, tiled=tiled, **kw)
            if est.peak <= budget:
                keep = _keeps_dit(options, mode, budget, cfg, latent_shape, tiled, kw)
                doubled = est2(mode, tiled, keep)
                batched = _batched(options, budget, doubled)
                single = estimate(cfg, latent_shape, offload=mode, tiled=tiled, keep_dit=keep, **kw)
                return Placement(
                    mode, tiled, batched, doubled if batched else single, keep_dit=keep
                )
    mode, tiled = modes[-1], tilings[-1]
    est = estimate(cfg, latent_shape, offload=mode, tiled=tiled, **kw)
    batched = options.cfg_batch == "on"
    log.warning(
        "estimated peak %.1f GiB exceeds the memory budget %.1f GiB; using offload=%s, tiling=%s",
        est.peak / 2**30,
        budget / 2**30,
        mode,
        tiled,
    )
    return Placement(mode, tiled, batched, est)


def _keeps_dit(options: Options, mode: str, budget: int, cfg, latent_shape, tiled, kw) -> bool:
    """ "model" chosen by "auto": keep the DiT resident across phases and calls when the budget
    holds it next to the streamed umT5 and the VAE decode too.  A budgeted server then reads the
    DiT once, not once per call; "model" asked for by name keeps its documented release."""
    if options.offload != "auto" or mode != "model":
        return False
    kept = estimate(cfg, latent_shape, offload=mode, tiled=tiled, keep_dit=True, **kw)
    return kept.peak <= budget


def _batched(options: Options, budget: int, batched_estimate: Estimate) -> bool:
    if options.cfg_batch != "auto":
        return options.cfg_batch == "on"
    return batched_estimate.peak <= budget
