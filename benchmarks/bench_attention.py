"""One DiT block's self-attention at the full 1.3B shapes: dense SDPA against radial attention.

B=1, 12 heads of 128, q/k/v laid out as the DiT passes them ([B, H, L, d] views of
[B, L, H, d]); random values (attention time does not depend on them).  Variants:

- ``dense``: ``F.scaled_dot_product_attention`` (what ``attention="sdpa"`` runs);
- ``gather``: ``wanlite.ops.radial.sparse_attention`` (the CPU path of ``attention="radial"``:
  query blocks grouped by their kept key blocks, keys gathered, SDPA);
- ``flex``: ``torch.compile(flex_attention)`` with the same mask as a ``BlockMask`` (its
  compile time is reported apart and not counted).

Rounds are interleaved (one call of each variant per round) and medians reported, since other
work may load the host.  Prints the CPU features, a table and one JSON line.

    python benchmarks/bench_attention.py                      # 480x640x81 and 832x480x81
    python benchmarks/bench_attention.py --sizes 256x256x17 --rounds 1 --variants dense,gather
    python benchmarks/bench_attention.py --device cuda   # SDPA vs the Triton kernel (bf16)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from wanlite.ops import radial
from wanlite.options import cpu_flags

HEADS, HEAD_DIM = 12, 128
FEATURES = ("avx2", "fma3", "avx512", "avx512_bf16", "amx_bf16", "amx_tile")


def grid_of(size: str) -> tuple[int, int, int]:
    """ "HxWxF" pixels and frames -> the DiT's token grid (latent frames, H/16, W/16)."""
    h, w, f = (int(x) for x in size.lower().split("x"))
    return 1 + (f - 1) // 4, h // 16, w // 16


def flex_runner(mask: torch.Tensor, length: int, block: int):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    counts = mask.sum(-1, dtype=torch.int32)
    cols = torch.arange(mask.shape[1])
    order = torch.argsort((~mask).int() * mask.shape[1] + cols, dim=-1, stable=True).int()
    bm = BlockMask.from_kv_blocks(
        counts[None, None], order[None, None], BLOCK_SIZE=block, seq_lengths=(length, length)
    )
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v, block_mask=bm)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def bench_size(
    size: str, variants: list[str], rounds: int, decay: float, dtype, heads: int = HEADS
) -> dict:
    grid = grid_of(size)
    length = grid[0] * grid[1] * grid[2]
    t = time.perf_counter()
    mask = radial.grid_mask(grid, decay, radial.BLOCK)
    groups = radial.plan(mask, length, radial.BLOCK)
    mask_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, length, heads, HEAD_DIM, generator=gen, dtype=dtype).transpose(1, 2)
        for _ in range(3)
    )
    fns = {
        "dense": F.scaled_dot_product_attention,
        "gather": lambda q, k, v: radial.sparse_attention(q, k, v, mask, radial.BLOCK, groups),
    }
    compile_s = None
    if "flex" in variants:
        fns["flex"] = flex_runner(mask, length, radial.BLOCK)
        compile_s, _ = timed(fns["flex"], q[:, :, :], k, v)  # first call: compile
    times = {name: [] for name in variants}
    outs = {}
    for _ in range(rounds):
        for name in variants:
            sec, outs[name] = timed(fns[name], q, k, v)
            times[name].append(sec)
    ref = outs.get("gather")
    diff = {
        n: (o.float() - ref.float()).abs().max().item() for n, o in outs.items() if n != "gather"
    }
    row = {
        "size": size, "grid": list(grid), "tokens": length, "heads_timed": heads,
        "kept_blocks": round(radial.kept_fraction(mask), 4),
        "kept_pairs": round(radial.kept_fraction(mask, length), 4),
        "mask_s": round(mask_s, 3), "flex_compile_s": compile_s and round(compile_s, 1),
        "median_s": {n: round(statistics.median(ts), 3) for n, ts in times.items()},
        # every head does the same work, so time is linear in heads: the 12-head block
        "block_s": {n: round(statistics.median(ts) * HEADS / heads, 2) for n, ts in times.items()},
        "all_s": {n: [round(x, 3) for x in ts] for n, ts in times.items()},
        "max_abs_diff_vs_gather": diff,
    }  # fmt: skip
    return row


def _milliseconds(fn, args, rounds: int, dev: torch.device) -> list[float]:
    times = []
    for _ in range(rounds):
        if dev.type != "cuda":
            sec, _ = timed(fn, *args)
            times.append(sec * 1e3)
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def cuda_timings(size: str = "480x640x81", dtype: str = "bfloat16", rounds: int = 5,
                 decay: float = 0.2, device: str = "cuda") -> dict:  # fmt: skip
    """On CUDA: SDPA (dense) against the Triton kernel (``wanlite.kernels.block_sparse``) with
    the radial mask and with a full mask (the kernel's own quality against SDPA's kernels);
    milliseconds (CUDA events, medians after two warm-up calls, the first compiles), the max
    |diff| of each against SDPA (under the token mask for radial), and whether the kernel
    beats dense SDPA: the radial backend's choice on this GPU.  ``device="cpu"`` runs it in
    Triton's interpreter (TRITON_INTERPRET=1; a smoke test at tiny sizes, times meaningless)."""
    from wanlite.kernels import block_sparse

    dev = torch.device(device)
    grid = grid_of(size)
    length = grid[0] * grid[1] * grid[2]
    mask = radial.grid_mask(grid, decay, radial.BLOCK)
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (1, length, HEADS, HEAD_DIM)
    q, k, v = (
        torch.randn(shape, generator=gen, device=dev, dtype=getattr(torch, dtype)).transpose(1, 2)
        for _ in range(3)
    )
    fns = {
        "sdpa": F.scaled_dot_product_attention,
        "triton_radial": block_sparse.function(mask, radial.BLOCK),
        "triton_full": block_sparse.function(torch.ones_like(mask), radial.BLOCK),
    }
    ms, outs = {}, {}
    for name, fn in fns.items():
        for _ in range(2):
            outs[name] = fn(q, k, v)
        ms[name] = round(statistics.median(_milliseconds(fn, (q, k, v), rounds, dev)), 3)
    tok = radial.token_mask(mask.to(dev), length, radial.BLOCK)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    del tok
    diff = {
        "triton_full_vs_sdpa": (outs["triton_full"] - outs["sdpa"]).abs().max().item(),
        "triton_radial_vs_masked_sdpa": (outs["triton_radial"] - masked).abs().max().item(),
    }
    speedup = ms["sdpa"] / ms["triton_radial"]
    return {
        "size": size, "tokens": length, "dtype": dtype,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "kept_blocks": round(radial.kept_fraction(mask), 4), "ms": ms,
        "radial_speedup_vs_sdpa": round(speedup, 3), "use_kernel": speedup > 1.0,
        "max_abs_diff": diff,
    }  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="480x640x81,832x480x81", help="HxWxF, comma-separated")
    p.add_argument("--variants", default="dense,gather,flex")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decay", type=float, default=radial.RadialConfig().decay)
    p.add_argument("--dtype", default="float32", help="float32 (AVX2 hosts) or bfloat16 (AMX)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--heads", type=int, default=HEADS, help="heads timed (scaled to 12)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: SDPA against the Triton kernel")
    a = p.parse_args(argv)
    if a.device == "cuda":
        dtype = (
            "bfloat16" if a.dtype == "float32" and "--dtype" not in (argv or sys.argv) else a.dtype
        )
        for size in a.sizes.split(","):
            print(
                json.dumps(
                    {"bench": "attention_cuda", **cuda_timings(size, dtype, max(a.rounds, 5))}
                )
            )
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    flags = cpu_flags()
    feats = {f: f in flags for f in FEATURES}
    print(f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
          f" torch {torch.__version__}, CPU features {feats}")  # fmt: skip
    variants = a.variants.split(",")
    rows = []
    for size in a.sizes.split(","):
        dtype = getattr(torch, a.dtype)
        rows.append(bench_size(size, variants, a.rounds, a.decay, dtype, a.heads))
    print(f"seconds for one block's self-attention (B=1, 12 heads of 128; {a.heads} timed)")
    head = f"{'size':<12}{'tokens':>8}{'kept':>7}" + "".join(f"{v + ' s':>10}" for v in variants)
    print(head + f"{'speedup':>9}")
    for r in rows:
        m = r["block_s"]
        best = min(m[v] for v in variants if v != "dense") if len(variants) > 1 else m["dense"]
        speed = m["dense"] / best if "dense" in m else float("nan")
        cells = "".join(f"{m[v]:>10.2f}" for v in variants)
        print(f"{r['size']:<12}{r['tokens']:>8}{r['kept_blocks']:>7.3f}{cells}{speed:>8.2f}x")
    print(json.dumps({"bench": "attention", "dtype": a.dtype, "decay": a.decay,
                      "threads": torch.get_num_threads(), "cpu_features": feats,
                      "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
