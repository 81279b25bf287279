"""NAG, Normalized Attention Guidance: the negative prompt applied inside cross-attention.

Chen et al., "Normalized Attention Guidance: Universal Negative Guidance for Diffusion Models"
(arXiv 2505.21179, Algorithm 1).  CFG steers with the negative prompt by extrapolating two whole
forwards; with guidance 1 (accelerator LoRAs, few steps) there is no second forward and the
negative prompt does nothing.  NAG steers inside the conditional forward instead: in every
block's cross-attention the image tokens' queries attend to the prompt (``z_pos``) and to the
negative prompt (``z_neg``), and the output is pushed away from the negative:

    g     = z_pos * scale - z_neg * (scale - 1)              extrapolate away from the negative
    ratio = |g|_1 / |z_pos|_1          (per token, over the D = heads * head_dim features)
    g     = g * (|z_pos|_1 * tau / (|g|_1 + 1e-7))   where ratio > tau     cap the growth at tau
    z     = g * alpha + z_pos * (1 - alpha)                  blend back toward the positive

then the output projection ``o`` as usual.  The order, the L1 norm, the 1e-7 and the 0/0 ratio
counted as 10 (capped: such a token's g is 0 already) follow Kijai's ``WanVideoNAG``
(ComfyUI-KJNodes, ``normalized_attention_guidance``); the authors' ComfyUI-NAG
(``utils.nag``) writes the cap as ``g * min(ratio, tau) / ratio``, the same up to rounding.
Defaults as in Kijai's Wan node: tau 2.5, alpha 0.25 (and scale 11 there; here the scale has no
default: ``None`` means NAG is off).  The unconditional pass of CFG, when there is one, is not
touched.  Self-attention is not touched.

Precision: the combination runs in fp32 whatever the attention dtype (the L1 norms sum D values;
bf16 would round each ratio to 3 significant digits), and the result is returned in
``z_pos``'s dtype for the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EPS = 1e-7  # added to |g|_1 in the cap, as in the reference
NAN_RATIO = 10.0  # a 0/0 ratio (z_pos and g both zero) counts as above tau, as in the reference


@dataclass(frozen=True)
class NAG:
    """NAG's parameters (checked by ``wanlite.options.Options``: scale > 1, tau > 0, alpha in
    [0, 1])."""

    scale: float
    tau: float = 2.5
    alpha: float = 0.25


def guide(z_pos: Tensor, z_neg: Tensor, p: NAG) -> Tensor:
    """NAG's combination of two cross-attention outputs [B, L, D] (heads flattened, before the
    output projection) -> [B, L, D] in ``z_pos``'s dtype.  Computed in fp32; the inputs are
    not modified."""
    pos = z_pos.float()
    g = torch.mul(pos, p.scale).sub_(z_neg.float(), alpha=p.scale - 1)
    n_pos = torch.linalg.vector_norm(pos, 1, dim=-1, keepdim=True)  # [B, L, 1]
    n_g = torch.linalg.vector_norm(g, 1, dim=-1, keepdim=True)
    ratio = torch.nan_to_num(n_g / n_pos, nan=NAN_RATIO)
    # A per-token factor, 1 where the cap does not bite (a multiply by 1.0 is exact).
    cap = torch.where(ratio > p.tau, n_pos * p.tau / (n_g + EPS), 1.0)
    return g.mul_(cap).mul_(p.alpha).add_(pos, alpha=1 - p.alpha).to(z_pos.dtype)
