"""Write a deterministic random-weight Wan2.1 T2V checkpoint in the exact diffusers layout.

    python scripts/make_random_checkpoint.py --size tiny --out /tmp/wan-tiny
    python scripts/make_random_checkpoint.py --size full --t5-layers 2 --out ~/.cache/wan-full-t5x2

``--size full`` has the real 1.3B shapes (DiT fp32 ~5.7 GB; umT5 bf16 ~11.4 GB with all 24
layers).  Without ``--out`` the checkpoint goes to wanlite's cache, where ``--model random:<size>``
finds it.  It proves the loading and compute paths, not the picture: the weights are noise.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from wanlite.weights.random_checkpoint import (
    checkpoint_config,
    ensure_random_checkpoint,
    write_checkpoint,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--t5-layers", type=int, default=None, help="shrink the text encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder (default: wanlite's cache)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    if args.out is None:
        out = ensure_random_checkpoint(args.size, args.t5_layers, args.seed)
    else:
        cfg = checkpoint_config(args.size, args.t5_layers)
        shard = 64 * 1024 if args.size == "tiny" else 2 * 1024**3
        out = write_checkpoint(args.out, cfg, seed=args.seed, shard_bytes=shard)
    print(f"{out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
