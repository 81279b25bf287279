"""The umT5-XXL text encoder of Wan2.1 (our own implementation).

umT5 is the T5 v1.1 encoder with one difference: every layer owns its relative position bias
table instead of sharing layer 0's.  Per layer (pre-norm residual blocks)::

    x = x + o(Attn(q(n1(x)), k(n1(x)), v(n1(x))))   n1, n2: T5 RMSNorm, weight only
    x = x + fc2(gelu_tanh(gate(n2(x))) * fc1(n2(x)))  gated-GELU FFN, no biases anywhere

    Attn: softmax(q k^T + pos_bias + mask_bias) v     no 1/sqrt(d) scaling (T5 convention)

and a final RMSNorm.  ``pos_bias[h, i, j]`` is ``table[bucket(j - i), h]`` with T5's
bidirectional buckets (half the buckets per direction; exact below ``num_buckets / 4``, then
logarithmic up to ``max_distance``).  Padded keys get a large negative bias.

Efficiency: the [L, L] bucket indices are computed once per forward; each layer gathers its own
[H, L, L] bias from its 32-row table with one ``index_select`` (no [L, L, H] intermediate, no
permute) into a [B, H, L, L] buffer allocated once per forward, then adds the key mask in place.
The forward is inference-only (``no_grad``), which these in-place writes need.

Precision: the linears and the residual stream run in the weight dtype, except in fp16, where
the FFN output projection runs in fp32 and the residual stream becomes fp32 after the first FFN
(transformers' ``_keep_in_fp32_modules = ["wo"]``; ``keep_in_fp32`` names that weight for a
loader).  RMSNorm statistics are fp32 (as in transformers and the original code).  The
attention core (q k^T, biases, softmax, times v) runs in fp32 through SDPA whatever the weight
dtype: T5 logits are unscaled and large, so bf16 rounding of them would matter, and this core is
~2% of the FLOPs at 512 tokens.  While the residual stream is fp16 it is clamped away from inf
after each sub-block, as transformers and the Wan code do (T5 overflows fp16).
With fp32 weights everything is fp32.

Useful property (tested): outputs at real tokens do not depend on how many pad tokens follow, so
a caller may run the encoder on ``ids[:, :max_real_len]`` and zero-fill the rest.

Parameter names are the original Wan checkpoint's (``wan/modules/t5.py``, ``T5Encoder``);
``to_diffusers_key`` / ``from_diffusers_key`` translate to and from transformers'
``UMT5EncoderModel``.  That model ties ``encoder.embed_tokens.weight`` to ``shared.weight``;
its ``save_pretrained`` writes only ``shared.weight`` (checked with transformers 5.24), and
``TIED_ALIASES`` lets a loader skip the alias when a checkpoint has both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import T5Config

# ---- key names: ours (original Wan) <-> transformers UMT5EncoderModel -----------------------

_BLOCK = "encoder.block.{i}.layer"
_RENAMES = [  # (ours, transformers); "{i}" is the layer index
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.{i}.norm1.weight", _BLOCK + ".0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", _BLOCK + ".0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", _BLOCK + ".0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", _BLOCK + ".0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", _BLOCK + ".0.SelfAttention.o.weight"),
    (
        "blocks.{i}.pos_embedding.embedding.weight",
        _BLOCK + ".0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{i}.norm2.weight", _BLOCK + ".1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", _BLOCK + ".1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", _BLOCK + ".1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", _BLOCK + ".1.DenseReluDense.wo.weight"),
]
# transformers ties the encoder's embedding to the shared one: same tensor, two names.
TIED_ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_TO = [(_compile(ours), theirs) for ours, theirs in _RENAMES]
_FROM = [(_compile(theirs), ours) for ours, theirs in _RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]], what: str) -> str:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.replace("{i}", m.group(1)) if m.groups() else template
    raise KeyError(f"{what} key with no counterpart: {key!r}")


def to_diffusers_key(key: str) -> str:
    """Our (original Wan) parameter name -> transformers ``UMT5EncoderModel`` name."""
    return _rename(key, _TO, "umT5 encoder")


def from_diffusers_key(key: str) -> str:
    """transformers ``UMT5EncoderModel`` name (including the tied alias) -> ours."""
    return _rename(TIED_ALIASES.get(key, key), _FROM, "transformers UMT5EncoderModel")


def keep_in_fp32(name: str) -> bool:
    """Parameters to load in fp32 when the compute dtype is fp16: the FFN output projection
    (transformers' ``_keep_in_fp32_modules = ["wo"]``; see ``FeedForward``)."""
    return name.endswith(".ffn.fc2.weight")


# ---- modules ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5 LayerNorm: x / rms(x) * weight; no mean subtraction, no bias, statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class RelativeBias(nn.Module):
    """A [num_buckets, num_heads] table.  ``forward(buckets [L*L], mask_bias [B, L], out)``
    writes ``out[b, h, i, j] = table[bucket(j - i), h] + mask_bias[b, j]`` (fp32) in place."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor, mask_bias: torch.Tensor, out: torch.Tensor):
        heads = self.embedding.weight.shape[1]
        table = self.embedding.weight.float().t()  # [H, num_buckets]
        torch.index_select(table, 1, buckets, out=out[0].view(heads, -1))
        key_bias = mask_bias[:, None, None, :]
        for b in range(1, out.shape[0]):
            torch.add(out[0], key_bias[b], out=out[b])
        out[0].add_(key_bias[0])
        return out


def relative_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """[L, L] bucket of relative position ``j - i`` (key j, query i), bidirectional."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2  # one half per direction
    exact = half // 2  # distances below this get their own bucket
    dist = rel.abs()
    # Same float op order as mesh-tensorflow / transformers / Wan, so boundaries agree exactly.
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, large)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2).float()
            for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1).to(x.dtype))


class FeedForward(nn.Module):
    """fc2(gelu_tanh(gate(x)) * fc1(x)); ``gate`` is Sequential(Linear, GELU) as in Wan.

    In fp16 the output projection ``fc2`` runs in fp32 and returns fp32, as transformers runs
    T5's ``wo`` (the FFN output is where T5 exceeds the fp16 range); the caller's residual add
    then promotes the residual stream to fp32, as in transformers."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.GELU(approximate="tanh")
        )
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(x) * self.fc1(x)  # [B, L, d_ff] in x.dtype
        if h.dtype != torch.float16:
            return self.fc2(h)
        if isinstance(self.fc2, nn.Linear):  # the weight is fp32 if loaded with keep_in_fp32
            return F.linear(h.float(), self.fc2.weight.float())
        return self.fc2(h.float())  # a quantized layer computes in its input's dtype


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


@dataclass
class Tokens:
    """One text on its way through the encoder: x [1 or B, L, d_model] and what its layers need
    (relative-position buckets [L*L], key mask bias [B, L] and the [B, H, L, L] fp32 bias buffer
    that every layer rewrites)."""

    x: torch.Tensor
    buckets: torch.Tensor
    mask_bias: torch.Tensor
    bias: torch.Tensor


class Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, seqs: list[Tokens]) -> list[Tokens]:
        """Each sequence through this layer on its own (the arithmetic of encoding it alone), all
        in one call: a layer streamed from disk (``runtime.offload``) is read once for them all."""
        for s in seqs:
            bias = self.pos_embedding(s.buckets, s.mask_bias, out=s.bias)  # [B, H, L, L] fp32
            x = _fp16_clamp(s.x + self.attn(self.norm1(s.x), bias))
            s.x = _fp16_clamp(x + self.ffn(self.norm2(x)))
        return seqs


class UMT5Encoder(nn.Module):
    """umT5 encoder: ``forward(ids [B, L], mask [B, L]) -> [B, L, d_model]`` (final norm applied).

    ``mask`` is 1 (or True) for real tokens, 0 for padding; any integer/bool/float dtype.
    ``encode_each`` runs several (ids, mask) pairs of different lengths layer by layer, each on
    its own: the same results as one ``forward`` each, from one pass over the layers."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.eps)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode_each([(ids, mask)])[0]

    @torch.no_grad()
    def encode_each(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        seqs = [start_tokens(self.cfg, ids, mask, self.token_embedding) for ids, mask in pairs]
        for block in self.blocks:
            seqs = block(seqs)
        return [self.norm(s.x) for s in seqs]


def start_tokens(cfg: T5Config, ids: torch.Tensor, mask: torch.Tensor, embed) -> Tokens:
    """The ``Tokens`` of one text before the first layer: ``embed(ids)`` and what the layers
    need from ids [B, L] and mask [B, L]."""
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must be [B, L]")
    b, n = ids.shape
    buckets = relative_buckets(n, cfg.num_buckets, cfg.max_distance, ids.device).view(-1)
    # Additive key mask: 0 on real tokens, fp32 min on padding.
    neg = torch.finfo(torch.float32).min
    mask_bias = torch.zeros(b, n, dtype=torch.float32, device=ids.device).masked_fill(
        mask == 0, neg
    )
    # One [B, H, L, L] fp32 buffer rewritten by every layer: re-touching the same pages is
    # much faster on CPU than a fresh tensor per layer (64 MB at 512 tokens: page faults).
    bias = torch.empty(b, cfg.num_heads, n, n, dtype=torch.float32, device=ids.device)
    return Tokens(embed(ids), buckets, mask_bias, bias)
