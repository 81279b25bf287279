"""How far bf16 lands from fp32, per phase and per prompt, for wanlite and for diffusers.

    python benchmarks/bench_fidelity.py [--t5-layers 24] [--prompts "a;b"] [--size 128x128x9]
        [--runs "wanlite bf16 (fp32 VAE),diffusers bf16"] [--workdir DIR]

The same random full-shape checkpoint (``random:full:<t5_layers>``), request and seed for every
run; each engine runs in its own process:

- ``reference``: wanlite in fp32 (fp32 umT5, DiT and VAE), which matches diffusers' fp32 pipeline
  (``bench_parity_full.py``: frames 85.6 dB apart at these shapes);
- ``wanlite bf16``: ``dtype="bfloat16"``, its default bf16 VAE, and again with an fp32 VAE (on
  a CPU without native bf16 the bf16 VAE is very slow: leave it out with ``--runs``);
- ``diffusers bf16``: ``WanPipeline`` as its documentation loads it (bf16, fp32 VAE).

For each prompt it compares, against the reference: the text embeddings of the prompt and of
the negative prompt (relative L2 error over the real tokens), the final latents (relative L2
error) and the frames (PSNR), and the two bf16 engines' frames with each other.  Random weights:
this measures rounding drift, not picture quality.  Ends with a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import bench_params, psnr, run_worker

from wanlite.bench import host_line

PROMPTS = (
    "a red fox running through snow, cinematic",
    "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
    "spotlighted stage, the crowd cheering in the dark around them.",
)


RUNS = {  # name -> worker: "diffusers", or wanlite's "DTYPE:VAE_DTYPE"
    "reference": "float32:float32",
    "wanlite bf16": "bfloat16:bfloat16",
    "wanlite bf16 (fp32 VAE)": "bfloat16:float32",
    "diffusers bf16": "diffusers",
}


def diffusers_worker(path: str, prompts: list[str], params: dict, out: Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=torch.bfloat16)
    arrays = {}
    with torch.inference_mode():
        # The negative prompt once: encode_prompt encodes each text on its own (padded to 512).
        enc = dict(do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
        npe, _ = pipe.encode_prompt(params["negative_prompt"], **enc)
        for i, prompt in enumerate(prompts):
            pe, _ = pipe.encode_prompt(prompt, **enc)
            video = pipe(
                prompt_embeds=pe,
                negative_prompt_embeds=npe,
                **_request(params),
                generator=torch.Generator("cpu").manual_seed(params["seed"]),
                output_type="latent",
            ).frames
            z = video.float() * torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            z = z + torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            frames = pipe.video_processor.postprocess_video(vae.decode(z).sample, output_type="np")
            arrays |= {
                f"emb{i}": pe[0].float().numpy(),
                f"neg{i}": npe[0].float().numpy(),
                f"latents{i}": video.float().numpy(),
                f"frames{i}": (np.asarray(frames[0], np.float64) * 255).round().astype(np.uint8),
            }
    np.savez(out, **arrays)
    print(json.dumps({"engine": "diffusers"}))


def _request(params: dict) -> dict:
    keys = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
    return {k: params[k] for k in keys}


def wanlite_worker(path: str, prompts: list[str], params: dict, opts: dict, out: Path) -> None:
    import wanlite
    from wanlite.models.tokenizer import clean_prompt

    pipe = wanlite.load(path, embed_cache=False, **opts)
    arrays = {}
    for i, prompt in enumerate(prompts):
        pipe.embeddings.memory.clear()
        video = pipe.generate(**(params | {"prompt": prompt}), progress=False)
        emb = pipe.embeddings.get(clean_prompt(prompt))
        neg = pipe.embeddings.get(clean_prompt(params["negative_prompt"]))
        arrays |= {
            f"emb{i}": _padded(emb),
            f"neg{i}": _padded(neg),
            f"latents{i}": video.latents.float().numpy(),
            f"frames{i}": video.frames,
        }
    np.savez(out, **arrays)
    print(json.dumps({"engine": "wanlite", "dtype": str(pipe.dtype)}))


def _padded(e) -> np.ndarray:
    """[n, d] real tokens -> [512, d] zero-padded, as diffusers returns them."""
    out = np.zeros((512, e.shape[1]), np.float32)
    out[: e.shape[0]] = e.float().numpy()
    return out


def drift_by_layer(path: str, prompt: str) -> list[float]:
    """The umT5 run layer by layer on ``prompt``'s real tokens in fp32 and in bf16 from the same
    bf16 weights: the relative L2 distance of the two hidden states after each layer.  One
    layer in memory at a time."""
    import torch
    from safetensors import safe_open

    from wanlite.models import t5
    from wanlite.models.configs import T5Config
    from wanlite.models.tokenizer import Tokenizer, clean_prompt

    folder = Path(path) / "text_encoder"
    cfg = T5Config.from_diffusers(json.loads((folder / "config.json").read_text()))
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    def tensor(key: str, rows=None) -> torch.Tensor:
        with safe_open(folder / index[key], "pt") as f:
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]

    ids, mask = Tokenizer.from_dir(Path(path) / "tokenizer")([clean_prompt(prompt)], max_length=512)
    n = int(mask.sum())
    ids, mask = ids[:, :n], mask[:, :n]
    emb = torch.stack([tensor("shared.weight", int(i)) for i in ids[0]])[None]
    fp32, bf16 = torch.float32, torch.bfloat16
    seq = {dt: t5.start_tokens(cfg, ids, mask, lambda _, dt=dt: emb.to(dt)) for dt in (fp32, bf16)}
    out = []
    for i in range(cfg.num_layers):
        block = t5.Block(cfg).requires_grad_(False)
        state = {k: tensor(k) for k in index if k.startswith(f"encoder.block.{i}.")}
        block.load_state_dict(
            {t5.from_diffusers_key(k).removeprefix(f"blocks.{i}."): v for k, v in state.items()}
        )
        for dt, s in seq.items():  # (bf16 -> fp32 -> bf16 weights: exact)
            block.to(dt)([s])  # updates s.x
        out.append(rel(seq[bf16].x.float().numpy(), seq[fp32].x.numpy()))
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker")
    p.add_argument("--out", type=Path)
    p.add_argument("--t5-layers", type=int, default=24)
    p.add_argument("--size", default="128x128x9", help="HxWxF")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--prompts", default=";".join(PROMPTS), help="';'-separated")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of: " + ", ".join(RUNS))
    p.add_argument("--workdir", type=Path, help="keep each run's arrays here; reuse those found")
    p.add_argument("--by-layer", action="store_true", help="only the umT5's bf16 drift by layer")
    a = p.parse_args()
    from wanlite.weights.loading import resolve_model

    path = str(resolve_model(f"random:full:{a.t5_layers}"))
    h, w, f = (int(x) for x in a.size.split("x"))
    params = bench_params(h, w, f, a.steps, a.guidance)
    prompts = a.prompts.split(";")
    if a.by_layer:
        return by_layer(path, [params["negative_prompt"], *prompts])
    if a.worker == "diffusers":
        return diffusers_worker(path, prompts, params, a.out)
    if a.worker:
        dtype, vae = a.worker.split(":")
        return wanlite_worker(path, prompts, params, {"dtype": dtype, "vae_dtype": vae}, a.out)
    tmp = a.workdir or Path(tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    res = {}
    for name in ["reference", *(r for r in a.runs.split(",") if r != "reference")]:
        worker = RUNS[name]
        npz = tmp / f"{worker.replace(':', '-')}.npz"  # (the worker names the request's runs)
        if not npz.is_file():
            run_worker(Path(__file__), [worker, "--out", str(npz), *sys.argv[1:]])
        res[name] = np.load(npz)
    print(host_line())
    print(f"umT5 {a.t5_layers} layers, {a.size}, {a.steps} steps, CFG {a.guidance}, seed 42\n")
    rows = table(res, prompts)
    print(json.dumps({"bench": "fidelity", "size": a.size, "t5_layers": a.t5_layers, "rows": rows}))


def by_layer(path: str, prompts: list[str]) -> None:
    import torch

    with torch.inference_mode():
        rows = {p: drift_by_layer(path, p) for p in prompts}
    print(host_line())
    print("umT5 hidden state, bf16 against fp32 (same bf16 weights), relative L2 error:\n")
    marks = [i for i in (0, 1, 3, 7, 11, 15, 23) if i < len(next(iter(rows.values())))]
    print("| prompt | " + " | ".join(f"after layer {i + 1}" for i in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for p, errs in rows.items():
        print(f"| {p[:30]!r} | " + " | ".join(f"{errs[i]:.2e}" for i in marks) + " |")
    print(json.dumps({"bench": "fidelity-by-layer", "rows": rows}))


def table(res: dict, prompts: list[str]) -> list[dict]:
    ref, rows = res["reference"], []
    print(
        "| prompt | tokens | run | prompt emb err | negative emb err | latents err "
        "| frames PSNR vs fp32 | vs diffusers bf16 |\n|---|---|---|---|---|---|---|---|"
    )
    for i, prompt in enumerate(prompts):
        n = int((np.abs(ref[f"emb{i}"]).sum(-1) > 0).sum())
        for name, r in res.items():
            if name == "reference":
                continue
            row = dict(
                prompt=prompt,
                tokens=n,
                run=name,
                emb_err=rel(r[f"emb{i}"], ref[f"emb{i}"]),
                neg_err=rel(r[f"neg{i}"], ref[f"neg{i}"]),
                latents_err=rel(r[f"latents{i}"], ref[f"latents{i}"]),
                psnr_ref=psnr(r[f"frames{i}"], ref[f"frames{i}"]),
                psnr_diffusers=psnr(r[f"frames{i}"], res["diffusers bf16"][f"frames{i}"])
                if "diffusers bf16" in res
                else float("nan"),
            )
            rows.append(row)
            print(
                f"| {prompt[:28]} | {n} | {name} | {row['emb_err']:.2e} | {row['neg_err']:.2e} "
                f"| {row['latents_err']:.2e} | {row['psnr_ref']:.1f} "
                f"| {row['psnr_diffusers']:.1f} |"
            )
    return rows


if __name__ == "__main__":
    main()
