"""The host side of ``offload="blocks"``: what one full-width DiT block costs per forward.

    python benchmarks/bench_offload.py [--reps 5] [--rank 32]

One Wan2.1-1.3B block (dim 1536, ffn 8960: 46.4 M parameters) is written to a temporary
safetensors file twice (fp32 as the checkpoint stores it, bf16 as the cast cache does) and,
with the page cache warm, each step of the path a streamed block takes on the host is timed:

- ``read_cast``: read the fp32 file, cast to bf16 while reading (no cast cache);
- ``read_bf16``: read the bf16 copy (the cast cache), as stored;
- ``lora_merge``: merge a rank-``--rank`` LoRA into every linear of the block (bf16 result);
- ``stage_copy``: copy the bf16 block into a second host buffer: the memcpy that
  ``pin_memory()`` does on every forward when the block is not kept pinned (on CUDA);
- ``kept``: the host work per forward for a block kept pinned (``BlockStreamer.keep_bytes``):
  looking its tensors up; its device copy is queued asynchronously and overlaps compute.

Medians of ``--reps`` runs in ms per block, and GB/s of bf16 block bytes.  The host's CPU
features are printed: only ratios from one run compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanlite.bench import host_cpu
from wanlite.models.configs import FULL
from wanlite.models.dit import Block
from wanlite.weights.tensorstore import TensorStore


def block_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 tensors with the shapes of one full-width block (our names, block 0)."""
    with torch.device("meta"):
        block = Block(FULL.dit)
    g = torch.Generator().manual_seed(seed)
    return {
        f"blocks.0.{n}": torch.randn(p.shape, generator=g) * 0.02
        for n, p in block.named_parameters()
    }


def lora_file(tensors: dict[str, torch.Tensor], rank: int, path: Path) -> Path:
    from wanlite.models.dit import to_diffusers_key

    g, sd = torch.Generator().manual_seed(1), {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(".weight") and "modulation" not in name:
            k = "transformer." + to_diffusers_key(name).removesuffix(".weight")
            sd[f"{k}.lora_A.weight"] = torch.randn(rank, t.shape[1], generator=g)
            sd[f"{k}.lora_B.weight"] = torch.randn(t.shape[0], rank, generator=g) * 0.01
    save_file(sd, str(path))
    return path


def timed(fn, reps: int) -> float:
    fn()  # warm: page cache, allocator
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args(argv)
    from wanlite.weights.lora import LoraSet, dit_shapes

    tensors = block_tensors()
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    nbytes = sum(t.numel() * 2 for t in bf16.values())
    with tempfile.TemporaryDirectory() as tmp:
        f32, b16 = Path(tmp) / "fp32.safetensors", Path(tmp) / "bf16.safetensors"
        save_file(tensors, str(f32))
        save_file(bf16, str(b16))
        s32, s16 = TensorStore([f32]), TensorStore([b16])
        lora = LoraSet([(str(lora_file(tensors, args.rank, Path(tmp) / "l.safetensors")), 1.0)],
                       dit_shapes(FULL.dit))  # fmt: skip
        linears = [n for n in tensors if n in lora.names]
        stage = {k: torch.empty_like(v) for k, v in bf16.items()}
        kept = dict(bf16)
        steps = {
            "read_cast": lambda: [s32.get(k, torch.bfloat16) for k in tensors],
            "read_bf16": lambda: [s16.get(k) for k in tensors],
            "lora_merge": lambda: [lora.merged(n, bf16[n], torch.bfloat16) for n in linears],
            "stage_copy": lambda: [stage[k].copy_(v) for k, v in bf16.items()],
            "kept": lambda: [kept[k] for k in tensors],
        }
        ms = {name: 1e3 * timed(fn, args.reps) for name, fn in steps.items()}
        s32.close()
        s16.close()
    result = dict(
        host=host_cpu(),
        threads=torch.get_num_threads(),
        block_bf16_bytes=nbytes,
        lora_rank=args.rank,
        ms_per_block={k: round(v, 3) for k, v in ms.items()},
        gb_per_s={k: round(nbytes / (v / 1e3) / 1e9, 2) for k, v in ms.items() if v > 0.01},
        per_forward_30_blocks_s={k: round(30 * v / 1e3, 3) for k, v in ms.items()},
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
