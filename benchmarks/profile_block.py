"""Where one DiT block's time goes at the full 1.3B shapes: attention, linears, and the rest.

One ``Block`` of the 1.3B DiT (random weights: time does not depend on the values), one branch
(B = 1), a 13-token prompt merged with its padding as the pipeline passes it, run once to warm up
and once under ``torch.profiler``.  Each aten operator's self time is put in one of four groups:

- ``self-attention``: the attention kernel over the video tokens (SDPA, or radial's gather path);
- ``linears``: every GEMM (q/k/v/o of both attentions, the FFN);
- ``cross-attention``: the attention kernel over the text keys (tiny: ~14 keys);
- ``other``: norms, modulation, RoPE, GELU, casts, copies, the gated adds.

The table lists the groups and the operators of ``other`` by self time; the last line is JSON.
Multiply by 30 blocks for one forward of one branch.

    python benchmarks/profile_block.py --size 480x640x17
    python benchmarks/profile_block.py --size 480x640x81 --dtype bfloat16 --attention radial
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from bench_attention import grid_of

from wanlite.bench import host_cpu, host_line
from wanlite.models.configs import DiTConfig
from wanlite.models.dit import WanDiT
from wanlite.ops.radial import RadialConfig

LINEAR_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::_int_mm"}
ATTN_OPS = ("scaled_dot_product", "flash_attention", "_efficient_attention", "flex_attention")


def build(dtype: torch.dtype, attention: str) -> WanDiT:
    """A one-block 1.3B DiT (the other modules are needed for the text and time inputs)."""
    cfg = DiTConfig(num_layers=1)
    model = WanDiT(cfg, attn=attention).to(dtype).eval()
    if attention == "radial":  # sparse from step 0 and block 0: time the sparse block itself
        model.radial.config = RadialConfig(dense_steps=0, dense_blocks=0)
    return model


def inputs(model: WanDiT, grid, dtype: torch.dtype, prompt_tokens: int = 13):
    gen = torch.Generator().manual_seed(0)
    length = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, length, model.cfg.dim, generator=gen).to(dtype)
    context = torch.zeros(1, 512, model.cfg.text_dim)
    context[:, :prompt_tokens] = torch.randn(1, prompt_tokens, model.cfg.text_dim, generator=gen)
    text = model.prepare_text(context, [prompt_tokens])
    _, e0 = model.time_embeddings(torch.tensor([900.0]), 1)
    model._grid = grid
    return x, e0, text, model.rope(grid, "cpu")


SELF = "self-attention kernel"


def group_of(name: str, in_cross: bool) -> str:
    if name in LINEAR_OPS or name.startswith("mkldnn::_linear"):
        return "linears"
    if any(a in name for a in ATTN_OPS):
        return "cross-attention" if in_cross else "self-attention"
    return "other"


def marked_attention(model: WanDiT):
    """(self-attention, cross-attention) functions for block 0, the first inside a profiler
    range: its whole time counts as self-attention whatever it runs (SDPA, radial's gather,
    a compiled flex_attention graph)."""
    attn = model._radial_attn(0, model.attn, None) if model.radial else model.attn
    self_fn, cross_fn = attn if isinstance(attn, tuple) else (attn, attn)

    def marked(*args, **kwargs):
        with torch.profiler.record_function(SELF):
            return self_fn(*args, **kwargs)

    return marked, cross_fn


def profile(model: WanDiT, x, e0, text, rope) -> tuple[float, dict, dict]:
    """Wall seconds of one block call, seconds per group and per operator of ``other``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    block, attn = model.blocks[0], marked_attention(model)
    with torch.no_grad():
        block(x.clone(), e0, text, 0, rope, attn)  # warm-up (and the cached text K/V)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            block(x.clone(), e0, text, 0, rope, attn)
            wall = time.perf_counter() - t
    groups, other = defaultdict(float), defaultdict(float)
    for ev in prof.events():
        if ev.name == SELF:
            groups["self-attention"] += ev.cpu_time_total / 1e6
            continue
        if not ev.name.startswith(("aten::", "mkldnn::")) or _under(ev, SELF):
            continue
        g = group_of(ev.name, _under(ev, "cross"))
        secs = ev.self_cpu_time_total / 1e6
        groups[g] += secs
        if g == "other":
            other[ev.name] += secs
    return wall, dict(groups), dict(other)


def _under(ev, label: str) -> bool:
    """Whether the event runs inside a ``record_function`` range whose name has ``label``."""
    p = ev.cpu_parent
    while p is not None:
        if label in p.name:
            return True
        p = p.cpu_parent
    return False


def prepare(model: WanDiT, linear: str) -> str:
    """The block's GEMMs as the pipeline runs them (``runtime.lifecycle._prepare_dit``):
    oneDNN-packed with the FFN's GELU fused where that applies, else fused q/k/v projections."""
    from wanlite.models.dit import fuse_projections
    from wanlite.ops.quant import pack_linears, resolve_linear

    dtype = model.patch_embedding.weight.dtype
    linear = resolve_linear(linear, torch.device("cpu"), dtype, True)
    if linear == "onednn":
        pack_linears(model.blocks, gelu_after=lambda name: name.endswith(".ffn.0"))
    else:
        fuse_projections(model)
    return linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="480x640x17", help="HxWxF of the request")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "radial"])
    p.add_argument("--linear", default="auto", choices=["auto", "aten", "onednn"])
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    grid = grid_of(a.size)
    print(f"{host_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = build(dtype, a.attention)
    linear = prepare(model, a.linear)
    x, e0, text, rope = inputs(model, grid, dtype)
    _mark_cross(model.blocks[0])
    wall, groups, other = profile(model, x, e0, text, rope)
    total = sum(groups.values())
    tokens = grid[0] * grid[1] * grid[2]
    print(f"\none block, {a.size} ({tokens:,} tokens), B=1, {a.dtype}, {a.attention}, {linear}")
    print(f"wall {wall:.2f} s; profiled self time {total:.2f} s\n")
    print("| group | s | share |\n|---|---|---|")
    for g in ("self-attention", "linears", "cross-attention", "other"):
        print(f"| {g} | {groups.get(g, 0):.3f} | {groups.get(g, 0) / total:.1%} |")
    top = sorted(other.items(), key=lambda kv: -kv[1])[: a.top]
    print("\n| operator in `other` | s | share of block |\n|---|---|---|")
    for name, s in top:
        print(f"| {name} | {s:.3f} | {s / total:.1%} |")
    print(
        json.dumps(
            dict(
                bench="profile_block",
                size=a.size,
                tokens=tokens,
                dtype=a.dtype,
                attention=a.attention,
                linear=linear,
                wall_s=round(wall, 3),
                groups={g: round(s, 4) for g, s in groups.items()},
                other_top={n: round(s, 4) for n, s in top},
                cpu=host_cpu()["features"],
            )
        )
    )


def _mark_cross(block) -> None:
    """Run the block's cross-attention inside a ``record_function("cross")`` range."""
    fn = block.cross_attn.cross_attention

    def marked(*args, **kwargs):
        with torch.profiler.record_function("cross"):
            return fn(*args, **kwargs)

    block.cross_attn.cross_attention = marked


if __name__ == "__main__":
    main()
