"""CPU int8 linears (w8a8) against fp32 and bf16 on the DiT's linear shapes.

    python benchmarks/bench_int8.py                      # 25,200 tokens (480x832x81's grid)
    python benchmarks/bench_int8.py --tokens 4096 --reps 3
    python benchmarks/bench_int8.py --tokens 256 --block-tokens 4096   # + one whole DiT block

Shapes: 1536->1536 (q, k, v, o), 1536->8960 (FFN in), 8960->1536 (FFN out).  Rows (each a
``y = x @ W.T + b`` with fp32 in and out unless named):

- ``fp32 aten``: ``F.linear``; ``fp32 onednn``: the weight packed once for oneDNN
  (``wanlite.ops.quant.PackedLinear``, the default CPU fp32 path).
- ``int8 w-only``: today's ``quant="int8"`` in fp32 (``qlinear``: the int8 weight cast to fp32
  per call, one fp32 GEMM).
- ``w8a8 onednn``: ``quant="w8a8"``'s layer (``wanlite.ops.quant.W8A8Linear``): dynamic
  per-token activation scales, per-channel weight scales, the int8 weight packed once for
  oneDNN, u8 x s8 GEMM, both scales applied to its fp32 output.  On CPUs without VNNI the
  activations get 7 bits (oneDNN's int16 pair sums would saturate; the module docstring of
  ``wanlite.ops.quant``).  The activation quantization is inside the timing.
- ``bf16 aten`` and ``w8a8 _int_mm`` (torch's CPU ``_int_mm``) run at ``--small-tokens``
  only (both are far slower here); compare their GFLOP/s, not their ms.

Fidelity: output PSNR (peak = max |fp32 output|) against the fp32 linear, on synthetic data:
weights N(0, 0.02); inputs N(0, 1) with 1% of the channels x8 (transformer-like outlier
channels); the FFN-out input is GELU-tanh of N(0, 2) (the FFN's own activation).
Runs are interleaved (every row once per repetition), medians reported.  Prints the host's CPU
features; only ratios within one run compare.  Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from wanlite.bench import host_cpu, host_line
from wanlite.ops.quant import (
    PackedLinear,
    QLinear,
    W8A8Linear,
    _w8a8_qmax,
    qlinear,
    quantize_rows,
    quantize_weight,
)

SHAPES = ((1536, 1536), (1536, 8960), (8960, 1536))  # (in, out)


def inputs(m: int, k: int, gelu: bool, gen: torch.Generator) -> torch.Tensor:
    if gelu:
        return F.gelu(torch.randn(m, k, generator=gen) * 2, approximate="tanh")
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[: max(1, k // 100)]] *= 8
    return x


def psnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (y.float() - ref).pow(2).mean().item()
    return 10 * torch.log10(torch.tensor(ref.abs().max().item() ** 2 / max(mse, 1e-30))).item()


def rows_for(k: int, n: int, gen: torch.Generator):
    """{row name: callable(x) -> y} for one shape."""
    w = torch.randn(n, k, generator=gen) * 0.02
    b = torch.randn(n, generator=gen) * 0.02
    lin = torch.nn.Linear(k, n)
    lin.weight.data, lin.bias.data = w, b
    packed_fp32 = PackedLinear(lin)
    wq, sw = quantize_weight(w, "int8")
    w8a8 = W8A8Linear(QLinear.from_linear(lin, "int8"))
    wb, bb = w.bfloat16(), b.bfloat16()
    big = {
        "fp32 aten": lambda x: F.linear(x, w, b),
        "fp32 onednn": packed_fp32,
        "int8 w-only": lambda x: qlinear(x, wq, sw, b),
        "w8a8 onednn": w8a8,
    }
    small = {
        "bf16 aten": lambda x: F.linear(x.bfloat16(), wb, bb).float(),
        "w8a8 _int_mm": lambda x: _int_mm_linear(x, wq, sw, b),
    }
    return (w, b), big, small


def _int_mm_linear(x, wq, sw, b):
    q, sx = quantize_rows(x, "int8")
    return torch._int_mm(q, wq.T).float().mul_(sx).mul_(sw).add_(b)


def measure(fns: dict, wb, x: torch.Tensor, reps: int) -> dict:
    """{row: {"s": median seconds, "psnr_db": against the fp32 linear}}, rows interleaved."""
    with torch.no_grad():
        ref = F.linear(x, *wb)
        for f in fns.values():  # warm: first-call setup
            f(x[:64])
        times, last = {name: [] for name in fns}, {}
        for _ in range(reps):
            for name, f in fns.items():
                t0 = time.perf_counter()
                last[name] = f(x)
                times[name].append(time.perf_counter() - t0)
        out = {}
        for name in fns:
            out[name] = {"s": statistics.median(times[name]), "psnr_db": psnr(last[name], ref)}
    return out


def block_rows(tokens: int, reps: int) -> list[dict]:
    """One 1.3B DiT block's forward (random weights; self-attention by SDPA, 512 text keys) in
    fp32, in fp32 with the packed-oneDNN linears, and with quant="w8a8"'s layers: seconds and
    the output's PSNR against fp32 (the residual update, ``out - x``)."""
    import copy

    from wanlite.models import dit
    from wanlite.models.configs import DiTConfig
    from wanlite.ops.attention import function
    from wanlite.ops.quant import pack_linears, quantize, use_w8a8

    torch.manual_seed(0)
    cfg = DiTConfig()
    base = dit.Block(cfg).eval().requires_grad_(False)
    for p in base.parameters():
        p.data.normal_(0, 0.02)
    grid = (tokens // 16 // 16, 16, 16)
    length = grid[0] * 256
    rope = dit.rope_tables(grid, cfg.head_dim, "cpu")
    x = torch.randn(1, length, cfg.dim)
    e0 = torch.randn(1, 6, cfg.dim) * 0.1
    with torch.no_grad():
        kv = base.cross_attn.context_kv(torch.randn(1, 512, cfg.dim))
    packed = copy.deepcopy(base)
    pack_linears(packed, gelu_after=lambda n: n.endswith("ffn.0"))
    w8a8 = copy.deepcopy(base)
    quantize(w8a8, "int8")
    use_w8a8(w8a8)
    blocks = {"fp32 block": base, "fp32 onednn block": packed, "w8a8 block": w8a8}
    attn, times, outs = function("sdpa"), {n: [] for n in blocks}, {}
    with torch.no_grad():
        for _ in range(reps):
            for name, b in blocks.items():
                t0 = time.perf_counter()
                outs[name] = dit.Block._body(b, x.clone(), e0, kv, None, rope, attn) - x
                times[name].append(time.perf_counter() - t0)
    base_s = statistics.median(times["fp32 block"])
    return [dict(shape="block", row=n, tokens=length, ms=statistics.median(t) * 1e3,
                 vs_fp32=base_s / statistics.median(t),
                 psnr_db=psnr(outs[n], outs["fp32 block"])) for n, t in times.items()]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=25200)
    ap.add_argument("--small-tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--block-tokens", type=int, default=0, help="also time one DiT block")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(host_line(), f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"w8a8 activation range +-{_w8a8_qmax()}")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    results = []
    cols = ("shape", 11), ("row", 13), ("tokens", 6), ("ms", 9), ("GFLOP/s", 8), ("x fp32", 7)
    print(" ".join(f"{c:>{w}}" for c, w in (*cols, ("PSNR dB", 8))))
    for k, n in SHAPES:
        wb, big, small = rows_for(k, n, gen)
        for group, m in ((big, args.tokens), (small, args.small_tokens)):
            x = inputs(m, k, gelu=k > n, gen=gen)
            fns = {"fp32 aten": big["fp32 aten"], **group}  # every group has its fp32 bar
            res = measure(fns, wb, x, args.reps)
            base = res["fp32 aten"]["s"]
            for name, r in res.items():
                flops = 2 * m * k * n / r["s"] / 1e9
                row = dict(shape=f"{k}->{n}", row=name, tokens=m, ms=r["s"] * 1e3,
                           gflops=flops, vs_fp32=base / r["s"], psnr_db=r["psnr_db"])  # fmt: skip
                results.append(row)
                print(f"{row['shape']:>11} {name:>13} {m:>6} {row['ms']:9.1f} {flops:8.1f} "
                      f"{row['vs_fp32']:7.2f} {row['psnr_db']:8.1f}")  # fmt: skip
    if args.block_tokens:
        for row in block_rows(args.block_tokens, args.reps):
            results.append(row)
            print(f"{'block':>11} {row['row']:>17} {row['tokens']:>6} {row['ms']:9.1f} "
                  f"{'':>8} {row['vs_fp32']:7.2f} {row['psnr_db']:8.1f}")  # fmt: skip
    print(json.dumps({"bench": "int8", "host": host_cpu(), "tokens": args.tokens,
                      "threads": torch.get_num_threads(), "rows": results}))  # fmt: skip


if __name__ == "__main__":
    main()
