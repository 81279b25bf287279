"""Speed: diffusers' WanPipeline vs wanlite, same checkpoint, request and seed, each run in its
own process, in one invocation (rows interleaved when repeated; medians reported).

    python benchmarks/bench_speed.py                       # the default comparison (below)
    python benchmarks/bench_speed.py --size full:2 --references fp32,documented \\
        --dtype float32 --modes exact,exact:aten,compile  # the exact mode against fp32

References (``--references``, comma-separated):
- ``documented``: diffusers as its Wan docs load it, the transformer and text encoder in bf16,
  the VAE in fp32 (``torch_dtype=torch.bfloat16`` with an fp32 ``AutoencoderKLWan``).
- ``fp32``: diffusers entirely in fp32 (the exact mode's bar).  With all 24 umT5 layers this holds
  22.7 GB of text encoder: use ``--size full:2`` (2 umT5 layers) on a 24 GiB machine.

wanlite runs with ``--dtype`` (default ``auto``: bf16 where the CPU multiplies bf16 natively,
AMX or AVX512-BF16, else fp32) and the speed ``--modes`` of ``wanlite bench`` (default
``exact``), every prompt encoded (fresh embedding cache).  Both engines read their weights
inside the timed call: wanlite at first use of each component, diffusers through the memory
map that ``from_pretrained`` leaves its safetensors in.  "weights s" is wanlite's share of its
call; diffusers' is not separable ("-").  Before every run the checkpoint is read once into the
page cache, so each starts warm (as far as the machine's memory holds it).

Prints the host's CPU features (figures from different hosts are not comparable; ratios in one
run are), a table (seconds per phase, s/step, total, weight reads, peak memory, ratios to the
first reference), the fidelity of wanlite's first mode against each reference, load + first call
totals, a PNG chart, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness import bench_params, diffusers_phases, save_result

from wanlite.bench import (
    add_fidelity,
    chart,
    compare,
    host_cpu,
    host_line,
    mode_jobs,
    parse_modes,
    run_jobs,
    table,
)

REFERENCES = {"documented": "bfloat16", "fp32": "float32"}  # diffusers' dtype of DiT + umT5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=sorted(REFERENCES))
    p.add_argument("--out", type=Path)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--references", default="documented", help="documented, fp32 or both")
    p.add_argument("--dtype", default="auto", help="wanlite's dtype (auto | float32 | bfloat16)")
    p.add_argument("--modes", default="exact", help="wanlite modes, as for `wanlite bench`")
    p.add_argument("--size", default="full", help="random checkpoint (full, full:2, tiny)")
    p.add_argument("--chart", type=Path, default=Path("bench_speed.png"))
    p.add_argument("--repeat", type=int, default=1, help="runs per row, interleaved; medians")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    from wanlite.loading import resolve_model

    params = bench_params(a.height, a.width, a.num_frames, a.steps, 5.0)
    path = str(resolve_model(f"random:{a.size}"))  # built once, outside the timed workers
    if a.worker:
        save_result(diffusers_phases(path, params, REFERENCES[a.worker]), a.out)
        return
    refs = [r.strip() for r in a.references.split(",") if r.strip()]
    if not refs or any(r not in REFERENCES for r in refs):
        raise SystemExit(f"--references must name some of {sorted(REFERENCES)}")
    tmp = Path(tempfile.mkdtemp())
    argv = [x for x in sys.argv[1:]]
    jobs = {
        f"diffusers-{r}": [__file__, "--worker", r, *argv, "--out", str(tmp / f"{r}.npz")]
        for r in refs
    }
    base = dict(device="cpu", dtype=a.dtype, embed_cache=False)
    jobs |= mode_jobs(path, params, parse_modes(a.modes), tmp, base)
    res = run_jobs(jobs, a.steps, a.repeat, warm=path)  # each run from a warm page cache
    report(a, params, {f"diffusers-{r}": res.pop(f"diffusers-{r}") for r in refs}, res, tmp)


def report(a, params: dict, refs: dict[str, dict], mine: dict[str, dict], tmp: Path) -> None:
    first = next(iter(mine))
    add_fidelity(mine, first)
    vs = {name: compare(Path(r["npz"]), Path(mine[first]["npz"])) for name, r in refs.items()}
    for name, r in refs.items():
        r["fidelity_vs_exact"] = vs[name]
    rows = refs | mine
    ref = next(iter(refs))
    print(
        f"\nrandom:{a.size} checkpoint, {a.width}x{a.height}x{a.num_frames}, {a.steps} steps, "
        f"CFG 5.0, CPU; wanlite dtype {a.dtype} -> {mine[first]['dtype']}"
    )
    print(host_line())
    print(table(rows, ref=ref))
    for name, f in vs.items():
        print(
            f"{first} vs {name}: latents max abs diff {f['latents_max_abs_diff']:.2e}, "
            f"frames max diff {f['frames_max_diff']} levels, PSNR {f['psnr_db']:.1f} dB"
        )
    cold = {n: r["load_s"] + r["generate_s"] for n, r in rows.items()}
    print(
        f"load + first call: {ref} {cold[ref]:.1f} s, {first} {cold[first]:.1f} s "
        f"({mine[first]['weights_s']:.1f} s of weight reads in the call): "
        f"{cold[first] / cold[ref]:.3f}x"
    )
    title = f"wanlite vs diffusers, {a.width}x{a.height}x{a.num_frames}, {a.steps} steps, CPU"
    png = chart(rows, a.chart, title)
    print(f"chart: {png or 'skipped (no matplotlib)'}")
    summary = {
        "params": params,
        "host": host_cpu(),
        "reference": ref,
        "time_ratio_vs_reference": mine[first]["generate_s"] / refs[ref]["generate_s"],
        "results": rows,
        "fidelity_vs_references": vs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
