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
call; diffusers' is not separable ("-").  Before every run what that engine reads is read once
into the page cache, so each starts warm (as far as the machine's memory holds it), as after
a previous call of its own: for diffusers the whole checkpoint, for wanlite the byte ranges of
the tensors it loads (from its cast cache, see ``wanlite.weights.castcache``, where that holds them;
``wanlite.bench.read_set``).  The cast cache is written before the timed runs, as a user's
first call writes it; that first call is timed once on its own (an empty cast cache) and
printed after the table.

Prints the host's CPU features (figures from different hosts are not comparable; ratios in one
run are), a table (seconds per phase, s/step, total, weight reads, peak memory, ratios to the
first reference), the fidelity of wanlite's first mode against each reference, load + call
totals, the first call ever, a PNG chart, and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    read_set,
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
    p.add_argument("--no-first-call", action="store_true", help="skip the empty-cache call")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    from wanlite.weights.loading import resolve_model

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
    modes = parse_modes(a.modes)
    jobs |= mode_jobs(path, params, modes, tmp, base)
    first = None if a.no_first_call else first_call(path, params, modes, tmp, base, a.steps)
    # Each run from a warm page cache holding what that engine reads (see bench.read_set):
    # diffusers the whole checkpoint; wanlite its tensors' byte ranges, cast cache included.
    warm = {name: [path] for name in jobs} | {m: read_set(path, base | modes[m]) for m in modes}
    res = run_jobs(jobs, a.steps, a.repeat, warm=warm)
    refs_res = {f"diffusers-{r}": res.pop(f"diffusers-{r}") for r in refs}
    report(a, params, refs_res, res, tmp, first)


def first_call(path, params, modes, tmp: Path, base: dict, steps: int) -> dict:
    """wanlite's first mode once, with an empty cast cache: the first call ever on a machine,
    which casts the fp32 DiT and writes it to the cache (later calls map it in place)."""
    name, opts = next(iter(modes.items()))
    opts = opts | {"cast_cache": str(tmp / "cast-first-call")}
    job = mode_jobs(path, params, {f"{name} (first call)": opts}, tmp, base)
    r = next(iter(run_jobs(job, steps, 1, warm=path).values()))
    shutil.rmtree(tmp / "cast-first-call", ignore_errors=True)
    return r


def report(a, params: dict, refs: dict, mine: dict, tmp: Path, first_run: dict | None) -> None:
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
        f"load + call: {ref} {cold[ref]:.1f} s, {first} {cold[first]:.1f} s "
        f"({mine[first]['weights_s']:.1f} s of weight reads in the call): "
        f"{cold[first] / cold[ref]:.3f}x"
    )
    if first_run is not None:
        once = first_run["load_s"] + first_run["generate_s"]
        print(
            f"first call ever (an empty cast cache: the fp32 DiT is cast and written to it), "
            f"load + call: {once:.1f} s ({first_run['weights_s']:.1f} s of weight reads): "
            f"{once / cold[ref]:.3f}x {ref}"
        )
    # A preset row (its own steps and guidance) against the first mode's whole call
    presets = {}
    for name, r in mine.items():
        if name.startswith("preset:") and name != first:
            presets[name] = {
                "call_ratio": r["generate_s"] / mine[first]["generate_s"],
                "load_and_call_ratio": cold[name] / cold[first],
            }
            print(
                f"{name} vs {first}: whole call {presets[name]['call_ratio']:.3f}x "
                f"(load + call {presets[name]['load_and_call_ratio']:.3f}x)"
            )
        if r.get("lora_merge_s"):
            print(f"{name}: LoRA read + merge {r['lora_merge_s']:.1f} s of its weight reads")
    title = f"wanlite vs diffusers, {a.width}x{a.height}x{a.num_frames}, {a.steps} steps, CPU"
    png = chart(rows, a.chart, title)
    print(f"chart: {png or 'skipped (no matplotlib)'}")
    summary = {
        "params": params,
        "host": host_cpu(),
        "reference": ref,
        "time_ratio_vs_reference": mine[first]["generate_s"] / refs[ref]["generate_s"],
        "load_and_call_ratio_vs_reference": cold[first] / cold[ref],
        "first_call_ever": first_run,
        "presets_vs_first_mode": presets,
        "results": rows,
        "fidelity_vs_references": vs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
