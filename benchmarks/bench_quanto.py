"""optimum-quanto vs wanlite's own weight quantization (``wanlite.ops.quant``) on the DiT alone.

    python benchmarks/bench_quanto.py                      # 128x128x9 and 256x256x17, all rows
    python benchmarks/bench_quanto.py --repeat 3 --forwards 3 --variants dense,int8,quanto:qint8

One DiT forward per request size (``--sizes``, HxWxF: latents ``[1, 16, (F-1)/4+1, H/8, W/8]``,
timestep 500, a text context ``[1, 512, 4096]`` whose first ``--tokens`` rows are the prompt
and the rest zeros, padding merged as the pipeline does), at the full 1.3B shapes with random
weights.  The DiT is built on the meta device and materialized block by block (the values of
``wanlite.weights.random_checkpoint``: identical in every row); each quantized row quantizes a
block as soon as it is materialized, as wanlite's loader does, so no row ever holds the fp32
model beside its compact copy (no 17 GB checkpoint is written).  Rows (``--variants``):

- ``dense``: the weights as stored, run as wanlite runs resident blocks (``linear="auto"``:
  oneDNN-packed GEMM weights where oneDNN packs the dtype, else fused q/k/v projections);
- ``dense:aten``: the same weights through torch's GEMM (fused q/k/v): the path quantized rows
  take, so the cost of the quantization itself shows;
- ``int8`` / ``fp8``: ``quant.quantize`` on the block linears + fused q/k/v (``quant="int8"`` /
  ``"fp8"`` of ``wanlite.load``);
- ``quanto:qint8`` / ``quanto:qfloat8``: optimum-quanto's ``quantize(blocks, weights=...)`` and
  ``freeze`` (weights only, per output channel; the same layers as wanlite: the blocks).

Each row runs in its own process (its peak RSS is its own), rows interleaved ``--repeat``
times; inside a process one untimed warm-up forward at the first size, then ``--forwards``
timed ones per size, sizes interleaved.  Times are medians over all timed forwards of a row.
Fidelity is against the first row: relative error ``|y - y_ref| / |y_ref|`` of the DiT output
and its PSNR over the reference's range, and, with ``--frames``, the PSNR of frames decoded
(random-weight VAE) from the clean latents the output predicts (``x0 = x - sigma * v``,
sigma = t / 1000).

Prints the host's CPU features (figures from hosts with other features are not comparable;
ratios in one run are), a table, and one JSON line last.  Needs ``optimum-quanto`` for the
quanto rows (``pip install 'wanlite[bench-quanto]'``); ``--config tiny`` runs the tiny DiT (tests).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wanlite.bench import host_cpu, host_line

VARIANTS = ("dense", "dense:aten", "int8", "fp8", "quanto:qint8", "quanto:qfloat8")
TIMESTEP = 500.0
CONTEXT_LEN = 512  # umT5 output rows: the prompt's tokens, then zeros
INSTALL = "pip install 'wanlite[bench-quanto]'"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; first = ref")
    p.add_argument("--sizes", default="128x128x9,256x256x17", help="HxWxF, comma-separated")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tokens", type=int, default=32, help="prompt tokens in the context (1-512)")
    p.add_argument("--repeat", type=int, default=2, help="processes per row, interleaved")
    p.add_argument("--forwards", type=int, default=2, help="timed forwards per size and process")
    p.add_argument("--frames", action="store_true", help="also decode frames for their PSNR")
    p.add_argument("--config", default="full", choices=("full", "tiny", "micro"))
    p.add_argument("--workdir", type=Path, help="keep the outputs and runs.jsonl here")
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.variants:
        p.error(f"--variants must be taken from {', '.join(VARIANTS)}; got {bad or 'none'}")
    a.sizes = [parse_size(s) for s in a.sizes.split(",") if s]
    if not 1 <= a.tokens <= CONTEXT_LEN:
        p.error(f"--tokens must be in [1, {CONTEXT_LEN}], got {a.tokens}")
    return a


def parse_size(spec: str) -> tuple[int, int, int]:
    """ "HxWxF" -> (H, W, F); H and W multiples of 16, F = 4k + 1 (the VAE's strides)."""
    try:
        h, w, f = (int(s) for s in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"size must be HxWxF, got {spec!r}") from None
    if h % 16 or w % 16 or f % 4 != 1:
        raise SystemExit(f"size {spec!r}: H and W must be multiples of 16 and F = 4k + 1")
    return h, w, f


def label(size: tuple[int, int, int]) -> str:
    return "x".join(map(str, size))


# --- worker: one row, in its own process -------------------------------------------------------


def _materialize(module, prefix: str, dtype, skip: str | None = None) -> None:
    """Random values (``random_checkpoint.random_tensor``, keyed by the full parameter name) for
    the meta parameters of ``module``; fp32 where the loader keeps fp32, else ``dtype``."""
    import torch

    from wanlite.models.dit import keep_in_fp32
    from wanlite.weights.random_checkpoint import random_tensor

    state = {}
    for name, p in module.named_parameters():
        if skip is not None and name.startswith(skip):
            continue
        full = prefix + name
        target = torch.float32 if keep_in_fp32(full) else dtype
        state[name] = random_tensor("transformer", full, tuple(p.shape)).to(target)
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"internal: unexpected {result.unexpected_keys}")


def _quantize_block(block, variant: str) -> None:
    """Quantize one materialized block in place as ``variant`` does (dense: nothing)."""
    if variant in ("int8", "fp8"):
        from wanlite.ops.quant import quantize

        quantize(block, variant)
    elif variant.startswith("quanto:"):
        from optimum import quanto

        qtype = getattr(quanto, variant.split(":")[1])
        quanto.quantize(block, weights=qtype)
        quanto.freeze(block)


def build_dit(config: str, variant: str, dtype):
    """The DiT of ``config`` with random weights, prepared as ``variant`` runs it."""
    from wanlite.models import configs, dit
    from wanlite.ops.meta import on_meta
    from wanlite.ops.quant import pack_linears, resolve_linear
    from wanlite.runtime.memory import trim

    cfg = configs.SIZES[config].dit
    with on_meta():
        model = dit.WanDiT(cfg, attn="sdpa")
    _materialize(model, "", dtype, skip="blocks.")
    for i, block in enumerate(model.blocks):
        _materialize(block, f"blocks.{i}.", dtype)
        _quantize_block(block, variant)
        trim()  # return the freed fp32 pages: the compact blocks sit between them on the heap
    linear = resolve_linear("auto", model.patch_embedding.weight.device, dtype, fits=True)
    if variant == "dense" and linear == "onednn":  # as lifecycle._prepare_dit
        pack_linears(model.blocks, gelu_after=lambda name: name.endswith(".ffn.0"))
    elif not variant.startswith("quanto:"):  # quanto's layers are its own: not fusable
        dit.fuse_projections(model)
    trim()
    return model.eval().requires_grad_(False), linear


def inputs(size: tuple[int, int, int], tokens: int, cfg) -> tuple:
    """(latents, timestep, context, lengths) of one forward; seeded, the same in every row."""
    import torch

    h, w, f = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, (f - 1) // 4 + 1, h // 8, w // 8, generator=g)
    ctx = torch.zeros(1, CONTEXT_LEN, cfg.text_dim)
    ctx[:, :tokens] = torch.randn(1, tokens, cfg.text_dim, generator=g)
    return x, torch.tensor([TIMESTEP]), ctx, [tokens]


def forward(model, x, t, ctx, lengths):
    """One denoising forward as the pipeline's first step runs it (text K/V computed)."""
    import torch

    with torch.inference_mode():
        temb = model.time_embeddings(t, x.shape[0])
        return model.step(x, temb, model.prepare_text(ctx, lengths)).float()


def worker(a: argparse.Namespace) -> None:
    import torch

    from wanlite.runtime.memory import cpu_current_bytes, cpu_peak_bytes, reset_cpu_peak

    dtype = getattr(torch, a.dtype)
    before, t0 = cpu_current_bytes(), time.perf_counter()
    import wanlite.models.dit  # noqa: F401  (what the row imports: its cost apart)
    import wanlite.ops.quant  # noqa: F401

    if a.worker.startswith("quanto:"):
        import optimum.quanto  # noqa: F401  (it imports transformers and diffusers too)
    import_s, import_rss = time.perf_counter() - t0, cpu_current_bytes() - before
    before, t0 = cpu_current_bytes(), time.perf_counter()
    model, linear = build_dit(a.config, a.worker, dtype)
    load_s, load_peak = time.perf_counter() - t0, cpu_peak_bytes()
    resident = cpu_current_bytes() - before
    cases = {label(s): inputs(s, a.tokens, model.cfg) for s in a.sizes}
    forward(model, *next(iter(cases.values())))  # warm-up (the smallest size goes first)
    times, peaks, outs = {k: [] for k in cases}, dict.fromkeys(cases, 0), {}
    for _ in range(a.forwards):
        for k, case in cases.items():
            reset_cpu_peak()
            t0 = time.perf_counter()
            out = forward(model, *case)
            times[k].append(time.perf_counter() - t0)
            peaks[k] = max(peaks[k], cpu_peak_bytes())
            if not torch.equal(out, outs.setdefault(k, out)):
                raise RuntimeError(f"{a.worker}: forwards at {k} are not deterministic")
    np.savez(a.out, **{k: v.numpy() for k, v in outs.items()})
    linear = linear if a.worker == "dense" else "aten"
    result = {"variant": a.worker, "linear": linear, "load_s": load_s, "load_peak": load_peak}
    result |= {"import_s": import_s, "import_rss": import_rss}
    print(json.dumps(result | {"resident": resident, "times": times, "peaks": peaks}))


# --- parent: interleave the rows, compare, report ----------------------------------------------


def run_rows(a: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    from wanlite.bench import run_worker

    common = ["--sizes", ",".join(map(label, a.sizes)), "--dtype", a.dtype, "--config", a.config]
    common += ["--tokens", str(a.tokens), "--forwards", str(a.forwards)]
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    for i in range(a.repeat):
        for v in a.variants:
            print(f"running {v} ({i + 1}/{a.repeat}) ...", file=sys.stderr, flush=True)
            npz = tmp / f"{v.replace(':', '_')}-{i}.npz"
            argv = [str(Path(__file__).resolve()), "--worker", v, *common, "--out", str(npz)]
            runs[v].append(run_worker(argv) | {"npz": str(npz)})
            with open(tmp / "runs.jsonl", "a") as f:  # each run kept as it ends (--workdir)
                f.write(json.dumps(runs[v][-1]) + "\n")
            print(f"  {v}: {runs[v][-1]['times']}", file=sys.stderr, flush=True)
    return {v: summarize(rs) for v, rs in runs.items()}


def summarize(rs: list[dict]) -> dict:
    """Medians over every timed forward of a row's processes; peaks the maximum."""
    out = {k: rs[0][k] for k in ("variant", "linear", "npz")}
    out["load_s"] = float(np.median([r["load_s"] for r in rs]))
    out["import_s"] = float(np.median([r["import_s"] for r in rs]))
    out["import_rss"] = float(np.median([r["import_rss"] for r in rs]))
    out["load_peak"] = max(r["load_peak"] for r in rs)
    out["resident"] = float(np.median([r["resident"] for r in rs]))
    out["forward_s"] = {
        k: float(np.median([t for r in rs for t in r["times"][k]])) for k in rs[0]["times"]
    }
    out["forward_s_each"] = {k: [t for r in rs for t in r["times"][k]] for k in rs[0]["times"]}
    out["forward_peak"] = {k: max(r["peaks"][k] for r in rs) for k in rs[0]["peaks"]}
    return out


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict:
    """Relative error and PSNR (over the reference's range) of a DiT output."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    rmse = float(np.sqrt(np.mean((out - ref) ** 2)))
    span = float(ref.max() - ref.min())
    return {"rel_err": err, "psnr_db": float("inf") if rmse == 0 else 20 * np.log10(span / rmse)}


@functools.cache
def random_vae(config: str):
    """The random-weight VAE of ``config`` (values of ``random_checkpoint``), built once."""
    from wanlite.models import configs, vae
    from wanlite.ops.meta import on_meta
    from wanlite.weights.random_checkpoint import random_tensor

    with on_meta():
        model = vae.WanVAE(configs.SIZES[config].vae)
    state = {n: random_tensor("vae", n, tuple(p.shape)) for n, p in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def decoded_frames(a: argparse.Namespace, outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 frames [T, H, W, 3] per size: the clean latents a DiT output predicts
    (flow matching: x0 = x - sigma * v), decoded by the random-weight VAE of ``--config``."""
    import torch

    from wanlite.frames import to_uint8
    from wanlite.models import configs

    cfg = configs.SIZES[a.config]
    model = random_vae(a.config)
    mean = torch.tensor(cfg.vae.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.vae.latents_std).view(1, -1, 1, 1, 1)
    frames = {}
    with torch.inference_mode():
        for size in a.sizes:
            x = inputs(size, a.tokens, cfg.dit)[0]
            x0 = x - TIMESTEP / 1000 * torch.from_numpy(outs[label(size)])
            frames[label(size)] = to_uint8(model.decode(x0 * std + mean))
    return frames


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def add_fidelity(a: argparse.Namespace, rows: dict[str, dict]) -> None:
    """Each row's fidelity per size against the first row (``rows[v]["fidelity"]``)."""
    outs = {v: dict(np.load(r["npz"])) for v, r in rows.items()}
    ref = a.variants[0]
    ref_frames = decoded_frames(a, outs[ref]) if a.frames else None
    for v, r in rows.items():
        r["fidelity"] = {k: fidelity(outs[ref][k], outs[v][k]) for k in outs[ref]}
        if ref_frames is not None:
            frames = ref_frames if v == ref else decoded_frames(a, outs[v])
            for k, f in frames.items():
                r["fidelity"][k]["frames_psnr_db"] = psnr_u8(ref_frames[k], f)


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f}"


def table(a: argparse.Namespace, rows: dict[str, dict]) -> str:
    sizes = [label(s) for s in a.sizes]
    ref = rows[a.variants[0]]
    head = ["variant", "GEMM", "import s", "import MiB", "build s", "resident GiB"]
    head += ["build peak GiB"]
    for k in sizes:
        head += [f"{k} s", "x ref", "peak GiB", "rel err", "PSNR dB"]
        head += ["frames dB"] if a.frames else []
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for v, r in rows.items():
        cells = [v, r["linear"], f"{r['import_s']:.1f}", f"{r['import_rss'] / 2**20:.0f}"]
        cells += [f"{r['load_s']:.1f}", gib(r["resident"]), gib(r["load_peak"])]
        for k in sizes:
            f = r["fidelity"][k]
            cells += [f"{r['forward_s'][k]:.2f}", f"{r['forward_s'][k] / ref['forward_s'][k]:.2f}"]
            cells += [gib(r["forward_peak"][k]), f"{f['rel_err']:.2e}", f"{f['psnr_db']:.1f}"]
            cells += [f"{f['frames_psnr_db']:.1f}"] if a.frames else []
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    if any(v.startswith("quanto:") for v in a.variants):  # fail before any run
        try:
            import optimum.quanto  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"the quanto rows need optimum-quanto: {INSTALL} ({e})") from e
    print(host_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_quanto.") as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_rows(a, work)
        add_fidelity(a, rows)
    import torch

    print(
        f"\nDiT forward ({a.config}, random weights), {a.dtype}, timestep {TIMESTEP:.0f}, "
        f"{a.tokens} prompt tokens; {a.repeat} processes x {a.forwards} timed forwards per row "
        f"(medians); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(host_line())
    print(table(a, rows))
    for r in rows.values():
        r.pop("npz")
    sizes = [label(s) for s in a.sizes]
    print(json.dumps({"host": host_cpu(), "sizes": sizes, "dtype": a.dtype, "results": rows}))


if __name__ == "__main__":
    main()
