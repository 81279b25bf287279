"""The Wan2.1 text-to-video diffusion transformer (DiT), written for inference.

Data flow and shapes (B batch, C=in_channels, patch (pt, ph, pw), grid (f, h, w) = latent
(F/pt, H/ph, W/pw), L = f*h*w tokens, D = dim = heads * head_dim, Lc = context tokens):

    x [B, C, F, H, W] --patch_embedding (Conv3d, stride = kernel = patch)--> [B, L, D]
    t [B] --sinusoid(freq_dim, [cos | sin])--> time_embedding --> e [B, D]
          --time_projection (SiLU, Linear D -> 6D)--> e0 [B, 6, D]
    context [B, Lc, text_dim] --text_embedding (Linear, GELU-tanh, Linear)--> [B, Lc, D]
    each block (adaLN with shift/scale/gate = block.modulation + e0):
        x += gate1 * self_attn(norm1(x) * (1 + scale1) + shift1)   (3D RoPE on q, k)
        x += cross_attn(norm3(x), context)                          (norm3: affine LayerNorm)
        x += gate2 * ffn(norm2(x) * (1 + scale2) + shift2)
    head: Linear(norm(x) * (1 + scale) + shift), (shift, scale) = head.modulation + e
    unpatchify --> [B, out_channels, F, H, W]

Attention: q/k are RMS-normalised over the whole D ("across heads", eps 1e-6, with weight);
RoPE rotates the interleaved pairs (2i, 2i+1) of each head; head_dim is split into
(t, h, w) = (hd - 4*(hd//6), 2*(hd//6), 2*(hd//6)) channels, each with angles
pos / 10000^(2j/axis_dim).  Cross-attention attends to every context token (no mask), as
diffusers does; the pipeline passes the prompts' lengths so that the identical padding tokens are
attended to as one merged key (``TextState``: same result, n + 1 keys instead of 512).  With
NAG on (``TextState.nag``, ``wanlite.ops.nag``), the conditional rows' queries also attend to the
negative prompt's keys and the two outputs are combined before the output projection.
A VSA-trained checkpoint (FastWan; ``cfg.vsa_gate``) has one more projection per self-attention,
``self_attn.gate_compress`` (diffusers ``blocks.N.to_gate_compress``): with ``vsa_sparsity`` set
its self-attention is Video Sparse Attention (``wanlite.ops.vsa``), the gate weighting VSA's
coarse branch; without, the gate is unused and attention is dense.

Precision (the fp32 islands of diffusers' ``_keep_in_fp32_modules`` and of the original code):
the sinusoid, the time MLPs, the modulation tables, adaLN arithmetic (norm, scale/shift,
gated residual adds), the LayerNorms and RoPE are computed in fp32 whatever the weight dtype
(small weights are upcast on the fly).  Every other linear layer, the patch conv and attention
run in the weight dtype; the residual stream is kept in the dtype of ``patch_embedding`` (as in
diffusers), except with fp16 weights: then it is fp32, as in the original Wan (its gated adds run
under fp32 autocast, so its stream is fp32 from the first block on), since an fp16 stream can
overflow (65504).  Each block casts its inputs to the weight dtype (``kv``'s).  The output has
the weight dtype.  With fp32 weights everything is fp32.
``keep_in_fp32(name)`` lists the parameters a low-precision loader should keep in fp32 (as
diffusers' ``from_pretrained`` does) and a quantization pass should skip.

Inference only: ``forward`` runs under ``torch.no_grad`` and updates the residual stream in
place.  Parameter names are the original Wan checkpoint keys; ``to_diffusers_key`` /
``from_diffusers_key`` translate to and from ``WanTransformer3DModel``.  The module holds no
buffers: RoPE tables are built lazily per (grid, device), so it can be built on the meta device
and filled with ``load_state_dict(..., assign=True)``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import AttnFn, chunked, function
from ..ops.nag import NAG, guide
from ..ops.quant import fuse_linears, fused_linear
from .configs import DiTConfig

log = logging.getLogger(__name__)


def keep_in_fp32(name: str) -> bool:
    """Whether parameter (or module) ``name`` should be stored in fp32 even when the rest of the
    model is loaded in bf16/fp16, and be left alone by quantization: the small tables and MLPs
    that forward() computes in fp32 anyway (diffusers' ``_keep_in_fp32_modules`` plus
    ``time_projection``, which the original code also runs in fp32).  Costs ~60 MB at 1.3B."""
    return (
        name.startswith(("time_embedding", "time_projection"))
        or name.endswith("modulation")
        or name.split(".")[2:3] == ["norm3"]
    )


# --- key renaming ------------------------------------------------------------------------------

_WB = ("weight", "bias")
# (our name, diffusers name, parameter leaves); "{}" is the block index; leaves None: a bare
# parameter.
_RENAMES: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("patch_embedding", "patch_embedding", _WB),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1", _WB),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2", _WB),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1", _WB),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2", _WB),
    ("time_projection.1", "condition_embedder.time_proj", _WB),
    *[
        (f"blocks.{{}}.{ours}_attn.{a}", f"blocks.{{}}.attn{n}.{b}", leaves)
        for ours, n in (("self", 1), ("cross", 2))
        for a, b, leaves in (
            ("q", "to_q", _WB),
            ("k", "to_k", _WB),
            ("v", "to_v", _WB),
            ("o", "to_out.0", _WB),
            ("norm_q", "norm_q", ("weight",)),
            ("norm_k", "norm_k", ("weight",)),
        )
    ],
    ("blocks.{}.self_attn.gate_compress", "blocks.{}.to_gate_compress", _WB),  # VSA (FastWan)
    ("blocks.{}.norm3", "blocks.{}.norm2", _WB),
    ("blocks.{}.ffn.0", "blocks.{}.ffn.net.0.proj", _WB),
    ("blocks.{}.ffn.2", "blocks.{}.ffn.net.2", _WB),
    ("blocks.{}.modulation", "blocks.{}.scale_shift_table", None),
    ("head.head", "proj_out", _WB),
    ("head.modulation", "scale_shift_table", None),
]


def _expand(pairs):
    for ours, theirs, leaves in pairs:
        for leaf in leaves or ("",):
            yield (ours + "." + leaf, theirs + "." + leaf) if leaf else (ours, theirs)


_TO_DIFFUSERS = dict(_expand(_RENAMES))
_FROM_DIFFUSERS = {v: k for k, v in _TO_DIFFUSERS.items()}
for _leaf in _WB:  # the VSA gate as some FastWan conversions name it
    _FROM_DIFFUSERS[f"blocks.{{}}.attn1.to_gate_compress.{_leaf}"] = (
        f"blocks.{{}}.self_attn.gate_compress.{_leaf}"
    )
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _rename(key: str, table: dict[str, str]) -> str:
    m = _BLOCK.match(key)
    pattern = _BLOCK.sub("blocks.{}.", key) if m else key
    if "{" in key or "}" in key or pattern not in table:
        raise KeyError(f"no Wan DiT counterpart for key {key!r}")
    return table[pattern].format(m.group(1)) if m else table[pattern]


def to_diffusers_key(key: str) -> str:
    """Our (original Wan) parameter name -> diffusers ``WanTransformer3DModel`` name."""
    return _rename(key, _TO_DIFFUSERS)


def from_diffusers_key(key: str) -> str:
    """Diffusers ``WanTransformer3DModel`` parameter name -> ours (original Wan)."""
    return _rename(key, _FROM_DIFFUSERS)


# --- fp32 helpers --------------------------------------------------------------------------------


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[B] timesteps -> [B, dim] fp32: [cos | sin] of t * 10000^(-j/(dim/2)) (diffusers' order
    and arithmetic, i.e. Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0))."""
    half = dim // 2
    freqs = torch.arange(half, dtype=torch.float32, device=t.device) * -math.log(10000.0) / half
    angles = t.float()[:, None] * freqs.exp()[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _mlp32(seq: nn.Sequential, x: Tensor) -> Tensor:
    """Run a small MLP in fp32, upcasting plain nn.Linear weights on the fly."""
    for m in seq:
        if type(m) is nn.Linear:
            bias = None if m.bias is None else m.bias.float()
            x = F.linear(x, m.weight.float(), bias)
        else:
            x = m(x).float()
    return x


def _norm32(norm: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm (affine or not) computed in fp32; fp32 result."""
    if isinstance(norm, nn.Identity):
        return x.float()
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


def _modulate(norm: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, dtype=None) -> Tensor:
    """adaLN: norm(x) * (1 + scale) + shift in fp32, returned in ``dtype`` (default x's)."""
    return _norm32(norm, x).mul_(1 + scale).add_(shift).to(dtype or x.dtype)


def _gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + y * gate in fp32, stored in x's dtype (in place when x is fp32)."""
    if x.dtype == torch.float32:
        return x.addcmul_(y, gate)
    return torch.addcmul(x.float(), y, gate).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (fp32 statistics, the result in x's dtype, then times the weight) in three
    passes over x on the CPU, where torch's kernel makes about seven (upcast, square, mean,
    rsqrt, scale, downcast, weight): 2.6x faster for the q/k norms at 25,200 tokens in fp32.
    The sum of squares is fp32-accumulated by ``vector_norm``; results agree with torch's to
    fp32 rounding (bf16: one rounding step at most).  Other devices use torch's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16):
            return super().forward(x)
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        scale = ms.square_().div_(x.shape[-1]).add_(self.eps or torch.finfo(x.dtype).eps)
        y = torch.mul(x, scale.rsqrt_())  # [..., D] fp32 (x bf16 is promoted, not copied)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if self.weight is None else y.mul_(self.weight)


# --- rotary position embedding ------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, device, theta: float = 10000.0, start: int = 0
):
    """(cos, sin), each [L, 1, head_dim // 2] fp32, for token order (f, h, w) row-major.
    Angles are computed in float64 (as diffusers and the original code do).  ``start``: the
    frame position of the grid's first frame (a causal chunk's; Self-Forcing's
    ``causal_rope_apply(start_frame=...)``): frames take positions start .. start + f - 1."""
    parts = []
    for axis, (n, d) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        pos = torch.arange(n, dtype=torch.float64) + (start if axis == 0 else 0)
        ang = torch.outer(pos, inv_freq)  # [n, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(ang.view(shape).expand(*grid, d // 2))
    angles = torch.cat(parts, dim=-1).reshape(-1, 1, head_dim // 2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (2i, 2i+1) of x [B, L, heads, d] in fp32; result in x's dtype."""
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    if torch.compiler.is_compiling():  # out= into strided views breaks Dynamo's graph; fused
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)
    out = torch.empty_like(xf)
    o1, o2 = out.unflatten(-1, (-1, 2)).unbind(-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x1, sin, out=o2).addcmul_(x2, cos)
    return out.to(x.dtype)


# --- text conditioning, prepared once per generation --------------------------------------------


@dataclass
class TextState:
    """The text side of a generation, computed once and reused at every step and by every block.

    ``ctx`` [B, Lk, D] is the text-embedded context.  When the prompts' real lengths are known,
    the zero padding after each prompt (the encoder output is zero-padded to 512 tokens, as in
    diffusers) is *merged*: all m padding tokens embed to the same vector, so their keys and values
    are identical and attending to them equals attending to one copy whose logit is raised by
    log(m).  ``bias`` [B, 1, 1, Lk] (fp32) holds that log(m), and -inf on filler rows when the
    batch's prompts differ in length.  Exact (up to float rounding), and cross-attention then
    costs n + 1 keys instead of 512.  ``kv`` caches each block's cross-attention K/V: the context
    does not change across steps."""

    ctx: Tensor
    bias: Tensor | None = None
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    nag: NagText | None = None  # NAG on this batch's conditional rows (None: off)


@dataclass
class NagText:
    """NAG (``wanlite.ops.nag``) for one branch: its parameters, the negative prompt's own text
    state (one row; its K/V cached in ``negative.kv`` like the prompt's, so once per generation
    whichever branches share it), and how many leading rows of the batch are conditional and
    get NAG (1: the prompt alone, or row 0 of the batched CFG pair [cond, uncond])."""

    params: NAG
    negative: TextState
    rows: int = 1


def merge_padding(
    context: Tensor, lengths: list[int], bucket: int = 1
) -> tuple[Tensor, Tensor | None]:
    """([B, Lk, C] rows: real tokens then one zero row for the padding; [B, 1, 1, Lk] bias).

    ``bucket`` > 1 rounds Lk up to a multiple of it with filler keys of bias -inf (weight
    exactly 0): a compiled graph then sees a few key lengths, not one per prompt."""
    total = context.shape[1]
    keys = [n + (n < total) for n in lengths]
    width = min(-(-max(keys) // bucket) * bucket, total)
    rows = context.new_zeros(context.shape[0], width, context.shape[2])
    bias = torch.full((context.shape[0], 1, 1, width), -math.inf, device=context.device)
    for b, n in enumerate(lengths):
        rows[b, :n] = context[b, :n]  # row n stays zero: the one copy of the padding token
        bias[b, ..., :n] = 0.0
        if n < total:
            bias[b, ..., n] = math.log(total - n)
    filler = width > max(keys) or len(set(keys)) > 1
    return rows, bias if any(n < total for n in lengths) or filler else None


# --- modules ---------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with RMS q/k norms across heads; self- or cross- (ctx given).

    The q/k/v projections (k/v for cross-attention) run as one GEMM when ``fuse_projections``
    has put their weights side by side in one buffer and registered it here (non-persistent
    buffers ``qkv_weight``, ``kv_weight``, ...: not in the state dict, and seen by
    torch.compile as inputs like the parameters)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)
        self.norm_rope = None  # a fused RMSNorm + RoPE (``use_triton_kernels``), or None

    def fuse(self, tag: str, names: tuple[str, ...]) -> None:
        for attr, t in fuse_linears([getattr(self, n) for n in names]).items():
            self.register_buffer(f"{tag}_{attr}", t, persistent=False)

    def _project(self, x: Tensor, tag: str, names: tuple[str, ...]) -> list[Tensor]:
        w = getattr(self, f"{tag}_weight", None)
        if w is None:
            return [getattr(self, n)(x) for n in names]
        b = getattr(self, f"{tag}_bias", None)
        s = getattr(self, f"{tag}_weight_scale", None)
        return fused_linear(x, w, s, b, [getattr(self, n).out_features for n in names])

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [B, L, D] -> [B, L, heads, d]

    def self_attention(self, x: Tensor, rope, attn: AttnFn) -> Tensor:
        q, k, v = self._project(x, "qkv", ("q", "k", "v"))
        if self.norm_rope is not None:  # one kernel: [B, L, D] -> [B, L, heads, d]
            q = self.norm_rope(q, self.norm_q.weight, *rope, self.heads, self.norm_q.eps)
            k = self.norm_rope(k, self.norm_k.weight, *rope, self.heads, self.norm_k.eps)
        else:
            q = apply_rope(self._heads(self.norm_q(q)), *rope)
            k = apply_rope(self._heads(self.norm_k(k)), *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), self._heads(v).transpose(1, 2)
        if getattr(attn, "gated", False):  # VSA: the gate of its coarse branch, per head
            gate = self.gate_compress(x) if hasattr(self, "gate_compress") else None
            out = attn(q, k, v, None if gate is None else self._heads(gate).transpose(1, 2))
        else:
            out = attn(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))

    def context_kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values [B, heads, Lk, d] of a text context."""
        k, v = self._project(ctx, "kv", ("k", "v"))
        return self._heads(self.norm_k(k)).transpose(1, 2), self._heads(v).transpose(1, 2)

    def cross_attention(self, x: Tensor, kv, bias: Tensor | None, attn: AttnFn, nag=None):
        """x [B, L, D] attends to the text keys ``kv`` -> [B, L, D].  ``nag`` (params, rows,
        negative kv, negative bias) or None: the first ``rows`` rows also attend to the negative
        prompt and the two outputs are combined by ``wanlite.ops.nag.guide`` before ``o``."""
        q = self._heads(self.norm_q(self.q(x))).transpose(1, 2)
        out = _attend(q, kv, bias, attn)
        if nag is not None:
            params, rows, (k, v), neg_bias = nag
            k, v = (t.expand(rows, -1, -1, -1) for t in (k, v))  # one negative row, shared
            out[:rows] = guide(out[:rows], _attend(q[:rows], (k, v), neg_bias, attn), params)
        return self.o(out)


def _attend(q: Tensor, kv, bias: Tensor | None, attn: AttnFn) -> Tensor:
    """Cross-attention of q [B, heads, L, d] on (k, v) [B, heads, Lk, d] -> [B, L, D]."""
    k, v = kv
    if bias is None:
        out = attn(q, k, v)
    else:  # the log-count bias needs a float mask: SDPA, in fp32 (Lk is small)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), bias)
        out = out.to(q.dtype)
    return out.transpose(1, 2).flatten(2)


FFN_CHUNK = 4096  # tokens per FFN chunk: bounds the [L, ffn_dim] intermediate (exact)


def _chunked_ffn(ffn: nn.Module, x: Tensor, chunk: int) -> Tensor:
    """ffn(x) over chunks of the sequence: the FFN is per token, so this is exact, and the
    [chunk, ffn_dim] intermediate replaces [L, ffn_dim] (2.3 GB fp32 at 480P's 32,760 tokens)."""
    if x.shape[1] <= chunk:
        return ffn(x)
    out = torch.empty_like(x)
    for s in range(0, x.shape[1], chunk):
        out[:, s : s + chunk] = ffn(x[:, s : s + chunk])
    return out


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.eps)
        if cfg.vsa_gate:  # FastWan's to_gate_compress (wanlite.ops.vsa)
            self.self_attn.gate_compress = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(
            torch.randn(1, 6, dim).div_(dim**0.5)
        )  # in place: cheap on meta
        self.chunk = FFN_CHUNK
        # adaLN and the gated adds: these functions, or Triton kernels (``use_triton_kernels``)
        self.modulate, self.gated_add = _modulate, _gated_add
        # ``compile_blocks`` sets a compiled ``_body``; a plain function, not a bound method, so
        # the block holds no reference cycle and is freed as soon as the DiT is released.
        self.compiled_body = None

    def forward(self, x: Tensor, e0: Tensor, text: TextState, index: int, rope, attn: AttnFn):
        """x [B, L, D] (stream dtype, updated in place if fp32), e0 [B or 1, 6, D] fp32.

        The cross-attention K/V come from ``text.kv`` (computed here on first use: with block
        offload this is where the block's weights are resident); with NAG on, the negative
        prompt's from ``text.nag.negative.kv`` likewise."""
        nag = None
        if text.nag is not None and text.nag.rows:
            neg = text.nag.negative
            nag = (text.nag.params, text.nag.rows, self._context_kv(neg, index), neg.bias)
        body = self.compiled_body or Block._body
        return body(self, x, e0, self._context_kv(text, index), text.bias, rope, attn, nag)

    def _context_kv(self, text: TextState, index: int) -> tuple[Tensor, Tensor]:
        kv = text.kv.get(index)
        if kv is None:
            kv = text.kv[index] = self.cross_attn.context_kv(text.ctx)
        return kv

    def _body(self, x: Tensor, e0: Tensor, kv, bias, rope, attn, nag=None) -> Tensor:
        # attn: one function, or (self-attention's, cross-attention's) under sequence parallel
        self_fn, cross_fn = attn if isinstance(attn, tuple) else (attn, attn)
        dt = kv[0].dtype  # the weight dtype; the stream x may be fp32 (fp16 weights)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, 1)
        y = self.modulate(self.norm1, x, shift1, scale1, dt)
        x = self.gated_add(x, self.self_attn.self_attention(y, rope, self_fn), gate1)
        y = _norm32(self.norm3, x).to(dt)
        y = self.cross_attn.cross_attention(y, kv, bias, cross_fn, nag)
        x = x.add_(y)
        y = _chunked_ffn(self.ffn, self.modulate(self.norm2, x, shift2, scale2, dt), self.chunk)
        return self.gated_add(x, y, gate2)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim).div_(cfg.dim**0.5))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return self.head(_modulate(self.norm, x, shift, scale, self.head.weight.dtype))


class WanDiT(nn.Module):
    def __init__(
        self,
        cfg: DiTConfig,
        attn: str = "sdpa",
        vsa_sparsity: float | None = None,
        radial=None,
        fused: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        # ``attn`` is a backend already resolved for the device and dtype (the skeleton is built
        # on the meta device: ``attention.resolve_name`` decides, once, at load).
        # SDPA's kernels keep attention memory linear in L; the reference backend gets chunked.
        self.attn_name = attn
        self.text_bucket = 1  # cross-attention keys rounded up to a multiple (compile sets it)
        fn = function(attn)
        self.attn = chunked(fn, 1024) if self.attn_name == "math" else fn
        # VSA (``wanlite.ops.vsa``; a FastWan checkpoint): ``step`` makes ``self.attn`` the pair
        # (VSA of its token grid, the backend above for cross-attention).  None: the backend
        # above everywhere (the gates are then unused).
        if vsa_sparsity is not None and not cfg.vsa_gate:
            raise ValueError("VSA needs a checkpoint with to_gate_compress weights (FastWan)")
        self.vsa_sparsity = vsa_sparsity
        # Radial attention (``wanlite.ops.radial``; ``radial`` a ``RadialConfig``, None: the
        # published defaults): ``run_blocks`` picks dense or the sparse mask of the grid per block
        # from ``step_index`` (the denoising step, set by the pipeline before each forward).
        self.radial, self.step_index, self._grid = None, 0, None
        if attn == "radial":
            from ..ops.radial import Radial, RadialConfig

            self.radial = Radial(radial or RadialConfig(), fn)
        dim, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        if fused:  # Options.fused="triton"
            use_triton_kernels(self)
        self.head = Head(cfg)
        self._rope_cache: dict = {}
        # Sequence parallel (``runtime.parallel.SequenceParallel``), or None: each rank runs the
        # blocks on its slice of the tokens; self-attention gathers the whole sequence for its
        # share of the heads (all-to-all); the head's output is gathered back.
        self.sp = None

    def grid(self, shape) -> tuple[int, int, int]:
        """Token grid (f, h, w) of a latent of shape [B, C, F, H, W]."""
        sizes = tuple(shape[2:])
        if len(sizes) != 3 or any(s % p for s, p in zip(sizes, self.cfg.patch_size)):
            raise ValueError(f"latent {tuple(shape)} is not [B, C, F, H, W] divisible by patch")
        grid = tuple(s // p for s, p in zip(sizes, self.cfg.patch_size))
        if max(grid) > self.cfg.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len")
        return grid

    def rope(self, grid: tuple[int, int, int], device, start: int = 0) -> tuple[Tensor, Tensor]:
        if start + grid[0] > self.cfg.rope_max_seq_len:
            raise ValueError(f"frame positions up to {start + grid[0]} exceed rope_max_seq_len")
        key = (grid, torch.device(device), start)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_tables(grid, self.cfg.head_dim, device, start=start)
        return self._rope_cache[key]

    def time_embeddings(self, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """e [B, D] (head) and e0 [B, 6, D] (blocks), both fp32."""
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be [B] = [{batch}], got {tuple(t.shape)}")
        e = _mlp32(self.time_embedding, sinusoidal_embedding(t, self.cfg.freq_dim))
        return e, _mlp32(self.time_projection, e).unflatten(1, (6, -1))

    def prepare_text(self, context: Tensor, lengths: list[int] | None = None) -> TextState:
        """Text-embed a context [B, Lc, text_dim]; with ``lengths`` (real tokens per row, the
        rest zeros) the padding is merged into one key (see ``TextState``)."""
        dtype = self.patch_embedding.weight.dtype
        bias = None
        if lengths is not None:
            context, bias = merge_padding(context, lengths, self.text_bucket)
        return TextState(self.text_embedding(context.to(dtype)), bias)

    def run_blocks(
        self, x, e0, text: TextState, rope, start: int = 0, stop: int | None = None, kv=None
    ):
        """Blocks ``start`` to ``stop`` (exclusive; None = all) on the token stream x [B, L, D].
        ``kv`` (``runtime.kvcache.KVCache``): self-attention also attends to the keys and values
        of the frames before this chunk (causal generation), block by block."""
        attn = self.attn if self.sp is None else self.sp.attention(self.attn)
        for i in range(start, len(self.blocks) if stop is None else stop):
            a = attn if self.radial is None else self._radial_attn(i, attn, kv)
            a = a if kv is None else (kv.attention(i, a), a)  # (self-, cross-attention)
            x = self.blocks[i](x, e0, text, i, rope, a)
        return x

    def _radial_attn(self, i: int, attn, kv):
        """Block i's (self-attention, cross-attention) functions under radial attention."""
        if kv is not None:
            raise ValueError("radial attention does not run with a KV cache (causal chunks)")
        fn = self.radial.function(self._grid, self.step_index, i)
        if fn is self.radial.dense:
            return attn
        cross = attn[1] if isinstance(attn, tuple) else attn
        return (fn if self.sp is None else self.sp.attention(fn)[0], cross)

    def _bind_vsa(self, grid: tuple[int, int, int], causal: bool) -> None:
        from ..ops.vsa import VSA

        if self.sp is not None or causal:  # ulysses: the gate would be split by tokens
            raise ValueError("VSA runs neither under sequence parallelism nor KV-cached (causal)")
        sparse, dense = self.attn if isinstance(self.attn, tuple) else (None, self.attn)
        if sparse is None or sparse.grid != grid:  # (self-attention's, cross-attention's)
            self.attn = (VSA(grid, self.vsa_sparsity), dense)

    @torch.no_grad()
    def step(self, x: Tensor, temb: tuple[Tensor, Tensor], text: TextState, cache=None, kv=None):
        """One denoising forward with precomputed time embeddings (``time_embeddings``) and
        text (``prepare_text``).  ``cache`` (a ``stepcache`` policy) may replace the blocks by
        the residual it kept from an earlier step.  ``kv``: x is a causal chunk starting at
        latent frame ``kv.start_frame``, attending to the cached frames before it."""
        grid = self._grid = self.grid(x.shape)
        if self.vsa_sparsity is not None:
            self._bind_vsa(grid, kv is not None)
        e, e0 = temb
        if kv is not None and (cache is not None or self.sp is not None):
            raise ValueError("a KV-cached (causal) forward runs without step caches or Ulysses")
        rope = self.rope(grid, x.device, 0 if kv is None else kv.start_frame)
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        h = h.flatten(2).transpose(1, 2).contiguous()
        if h.dtype == torch.float16:  # the original's fp32 stream: fp16 would overflow
            h = h.float()
        if self.sp is not None:  # this rank's tokens (padded to a multiple of the degree)
            h, rope = self.sp.shard(h), self.sp.shard_rope(rope)
        if cache is None:
            h = self.run_blocks(h, e0, text, rope, kv=kv)
        else:
            h = cache(self, h, temb, text, rope)
        out = self.head(h, e) if self.sp is None else self.sp.gather(self.head(h, e))
        return unpatchify(out, grid, self.cfg.patch_size)

    @torch.no_grad()
    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """x [B, C, F, H, W] latents, t [B] timesteps (0..1000), context [B, Lc, text_dim]."""
        temb = self.time_embeddings(t.to(x.device), x.shape[0])
        return self.step(x, temb, self.prepare_text(context))


def check_fused(name: str, device: torch.device) -> bool:
    """Whether ``Options.fused`` (``name``) asks for the Triton kernels, which run on CUDA, or on
    the CPU in Triton's interpreter (``TRITON_INTERPRET=1``: tests); elsewhere a ValueError."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if name == "triton" and device.type != "cuda" and not interpreted:
        raise ValueError(f"fused='triton' runs on CUDA, not {device} (set fused='off')")
    return name == "triton"


def use_triton_kernels(model: WanDiT) -> None:
    """Run each block's adaLN (LayerNorm, scale, shift), gated residual adds and q/k RMSNorm +
    RoPE with the Triton kernels of ``wanlite.kernels`` (``fused_norm``, ``gated``): the same
    fp32 arithmetic in one pass over the activations each.  CUDA (or Triton's interpreter)."""
    try:
        from ..kernels import fused_norm, gated
    except ImportError as e:
        raise ImportError("fused='triton' needs triton: pip install triton") from e
    for block in model.blocks:
        block.modulate, block.gated_add = fused_norm.modulate, gated.gated_residual
        block.self_attn.norm_rope = fused_norm.qk_norm_rope


def fuse_projections(model: WanDiT) -> None:
    """Put each block's q/k/v (self-attention) and k/v (cross-attention) weights side by side in
    one buffer, so each runs as one GEMM.  Parameter names and values are unchanged."""
    for block in model.blocks:
        block.self_attn.fuse("qkv", ("q", "k", "v"))
        block.cross_attn.fuse("kv", ("k", "v"))


TEXT_BUCKET = 64  # compiled blocks: cross-attention key lengths rounded up to a multiple of this
_COMPILED: dict[tuple, CompiledBody] = {}  # one compiled block body per process and options
# Graphs per compiled body before Dynamo falls back to eager (its default: 8).  The text key
# length is dynamic (one graph for every prompt), so a graph is one (batch 1 | 2) x (bias or
# none) x (NAG on | off) variant of one output size: <= 8 per size; 64 covers 8 output sizes.
RECOMPILE_LIMIT = 64


class CompiledBody:
    """``Block._body`` under torch.compile, shared by every block and load.  The key length of
    the text K/V (and its bias) is marked dynamic; the token count stays static (dynamic token
    counts mis-compiled the FFN chunking, torch 2.13 CPU).  Past ``RECOMPILE_LIMIT`` graphs a
    new variant runs eagerly, logged once (Dynamo itself would fall back silently)."""

    def __init__(self, **kwargs):
        import inspect

        import torch._dynamo

        if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.13
            kwargs.setdefault("recompile_limit", RECOMPILE_LIMIT)
        else:  # the global limit, raised (never lowered); "cache_size_limit" before 2.7
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
        self.fn = torch.compile(Block._body, **kwargs)
        self.eager_calls = 0  # calls past the limit

    def __call__(self, block, x, e0, kv, bias, rope, attn, nag=None):
        import torch._dynamo

        texts = [(kv, bias)] + ([] if nag is None else [(nag[2], nag[3])])
        for (k, v), b in texts:  # [B, heads, Lk, d] and [B, 1, 1, Lk]
            for t, dim in ((k, 2), (v, 2), (b, 3)):
                if t is not None and t.shape[dim] > 1:  # (Dynamo specializes 0 and 1)
                    torch._dynamo.mark_dynamic(t, dim)
        limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
        if limit_hit is None or not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            return self.fn(block, x, e0, kv, bias, rope, attn, nag)  # older torch: its warning
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return self.fn(block, x, e0, kv, bias, rope, attn, nag)
        except limit_hit:
            if not self.eager_calls:
                log.warning(
                    "torch.compile: more than %d shape variants of the DiT block; new ones run "
                    "eagerly (slower).  Fewer output sizes per process avoid this.",
                    RECOMPILE_LIMIT,
                )
            self.eager_calls += 1
            return Block._body(block, x, e0, kv, bias, rope, attn, nag)


def compile_blocks(model: WanDiT, **kwargs) -> None:
    """torch.compile the body of the repeated block (``CompiledBody``), once per process for
    all 30 blocks and every later load (the blocks are passed in as inputs, so they share one
    compiled graph per variant).  Static shapes but the text key length; the text keys are also
    bucketed (``TEXT_BUCKET``, filler keys at -inf bias: exact), which bounds the kernels."""
    kwargs.setdefault("dynamic", False)
    key = tuple(sorted(kwargs.items()))
    if key not in _COMPILED:
        _COMPILED[key] = CompiledBody(**kwargs)
    for block in model.blocks:
        block.compiled_body = _COMPILED[key]
    model.text_bucket = TEXT_BUCKET


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """[B, L, pt*ph*pw*C] with channel innermost -> [B, C, f*pt, h*ph, w*pw]."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.view(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)
