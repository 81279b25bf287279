"""CFG-parallel and Ulysses sequence parallel (``wanlite.runtime.parallel``) in real
multi-process runs.

Each world size is one ``torchrun`` launch (gloo, CPU, OMP_NUM_THREADS=1 per rank) running every
case of ``CASES[world]`` with this file as the worker script; each rank saves its latents,
frames and stats.  The tests compare every rank with a single-process run of the same request
(no torch.distributed at all): latents within 1e-5, frames within one level (uint8 rounding),
step-cache skips equal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ODD = dict(height=17, width=35, num_frames=6)  # 32x48 generated: 3x2x3 = 18 tokens
SHORT = dict(height=16, width=48, num_frames=1)  # 1x1x3 = 3 tokens: padding on every degree
CFG_ON, CFG_OFF = dict(guidance_scale=5.0), dict(guidance_scale=1.0)
FIRSTBLOCK = dict(cache="firstblock", cache_threshold=1.0)  # skips some steps of the tiny model
TEACACHE = dict(cache="teacache", cache_threshold=1500.0)

# name: (parallel, checkpoint, request, options).  "heads4": the tiny DiT with 4 heads.
CASES: dict[int, dict[str, tuple]] = {
    2: {
        "cfg2_odd": ("cfg=2", "tiny", ODD | CFG_ON, {}),
        "cfg2_nocfg_short": ("cfg=2", "tiny", SHORT | CFG_OFF, {}),
        "cfg2_firstblock": ("cfg=2", "tiny", ODD | CFG_ON, FIRSTBLOCK),
        "u2_short": ("ulysses=2", "tiny", SHORT | CFG_ON, {}),
        "u2_nocfg_odd": ("ulysses=2", "tiny", ODD | CFG_OFF, {}),
        "u2_firstblock": ("ulysses=2", "tiny", ODD | CFG_ON, FIRSTBLOCK),
        "u2_teacache_sequential": ("ulysses=2", "tiny", ODD | CFG_ON, TEACACHE),
    },
    4: {
        "cfg2_u2_odd": ("cfg=2,ulysses=2", "tiny", ODD | CFG_ON, {}),
        "cfg2_u2_firstblock": ("cfg=2,ulysses=2", "tiny", SHORT | CFG_ON, FIRSTBLOCK),
        "u4_short": ("ulysses=4", "heads4", SHORT | CFG_ON, {}),
        "u4_firstblock_nocfg": ("ulysses=4", "heads4", ODD | CFG_OFF, FIRSTBLOCK),
    },
}
STEPS, SEED = 6, 3
SAVED = {2: "cfg2_odd", 4: "cfg2_u2_odd"}  # also generated with save_to: rank 0 writes


def checkpoint(name: str) -> Path:
    from wanlite.models.configs import TINY
    from wanlite.paths import cache_dir
    from wanlite.weights.random_checkpoint import ensure_random_checkpoint, write_checkpoint

    if name == "tiny":
        return ensure_random_checkpoint("tiny")
    out = cache_dir() / "random-tiny-heads4-v1"
    if not (out / "model_index.json").is_file():
        dit = dataclasses.replace(TINY.dit, num_heads=4, head_dim=16)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        write_checkpoint(tmp, dataclasses.replace(TINY, dit=dit), shard_bytes=64 * 1024)
        tmp.rename(out)
    return out


def options(name: str, parallel: str | None = None) -> dict:
    _, _, _, extra = _find(name)
    # One CFG batch in the reference: the parallel step-cache decision is the batched pair's.
    return dict(device="cpu", dtype="float32", cfg_batch="on", parallel=parallel) | extra


def request(name: str) -> dict:
    return _find(name)[2] | dict(num_inference_steps=STEPS, seed=SEED, progress=False)


def _find(name: str) -> tuple:
    return next(cases[name] for cases in CASES.values() if name in cases)


# --- the worker (run by torchrun) -------------------------------------------------------------


def worker(out: Path, world: int) -> None:
    import torch

    import wanlite

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name, (parallel, ckpt, _, _) in CASES[world].items():
        pipe = wanlite.load(str(checkpoint(ckpt)), **options(name, parallel))
        video = pipe.generate("a red boat", **request(name))
        files = dict(latents=video.latents.numpy(), frames=video.frames)
        np.savez(out / f"{name}.{rank}.npz", **files)
        (out / f"{name}.{rank}.json").write_text(json.dumps(video.stats))
        if name == SAVED[world]:
            mp4 = out / f"{name}.mp4"
            saved = pipe.generate("a red boat", **request(name), save_to=mp4)
            info = dict(path=str(saved.path), frames=len(saved.frames), exists=mp4.is_file())
            (out / f"{name}.{rank}.saved.json").write_text(json.dumps(info))


# --- the tests -----------------------------------------------------------------------------------


def _launch(world: int, out: Path, torchrun) -> None:
    for ckpt in {c[1] for c in CASES[world].values()}:
        checkpoint(ckpt)  # written once, before the ranks race for it
    torchrun(__file__, [str(out), str(world)], world)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, torchrun):
    """world size -> the folder of its ranks' results (each world launched on first use)."""
    done: dict[int, Path] = {}

    def get(world: int) -> Path:
        if world not in done:
            done[world] = tmp_path_factory.mktemp(f"world{world}")
            _launch(world, done[world], torchrun)
        return done[world]

    return get


_REFERENCE: dict[str, tuple] = {}


def reference(name: str):
    """(latents, frames, stats) of the single-process run (no torch.distributed)."""
    if name not in _REFERENCE:
        import wanlite

        _, ckpt, _, _ = _find(name)
        video = wanlite.load(str(checkpoint(ckpt)), **options(name)).generate(
            "a red boat", **request(name)
        )
        _REFERENCE[name] = (video.latents.numpy(), video.frames, video.stats)
    return _REFERENCE[name]


@pytest.mark.parametrize(
    "world,name", [(w, n) for w, cases in CASES.items() for n in cases], ids=lambda x: str(x)
)
def test_ranks_match_single_process(runs, world, name):
    from wanlite.options import Options

    folder = runs(world)
    latents, frames, stats = reference(name)
    for rank in range(world):
        got = np.load(folder / f"{name}.{rank}.npz")
        got_stats = json.loads((folder / f"{name}.{rank}.json").read_text())
        np.testing.assert_allclose(got["latents"], latents, rtol=0, atol=1e-5)
        # uint8 frames: a latent 1e-6 away can round a pixel to the next level, no further
        diff = np.abs(got["frames"].astype(np.int16) - frames)
        assert got["frames"].shape == frames.shape and diff.max() <= 1, f"rank {rank}"
        assert (diff > 0).mean() < 1e-3
        # The step cache took the same decisions on every rank, and as the single process.
        for key in ("dit_forwards", "dit_forwards_skipped", "cfg_steps"):
            assert got_stats[key] == stats[key], (rank, key)
        assert got_stats["parallel"] == Options(parallel=_find(name)[0]).parallel
        if rank:  # every rank returns the same video, bit for bit
            first = np.load(folder / f"{name}.0.npz")
            assert np.array_equal(got["latents"], first["latents"])
    if "cache" in _find(name)[3]:
        assert stats["dit_forwards_skipped"] > 0  # the case exercises a skip decision


@pytest.mark.parametrize("world", sorted(SAVED))
def test_rank0_writes_the_file(runs, world):
    folder, name = runs(world), SAVED[world]
    infos = [json.loads((folder / f"{name}.{r}.saved.json").read_text()) for r in range(world)]
    assert (folder / f"{name}.mp4").stat().st_size > 0
    assert {i["path"] for i in infos} == {str(folder / f"{name}.mp4")}
    assert all(i["frames"] == 0 for i in infos)


def test_comm_bytes_formula(runs):
    """The bytes counted per rank match the documented per-step volume (ulysses=2, no CFG:
    every block's all-to-alls (q, k, v out; attention back) and the head's gather)."""
    folder = runs(2)
    stats = json.loads((folder / "u2_nocfg_odd.0.json").read_text())
    from wanlite.models.configs import TINY

    tokens, dim, blocks = 18, TINY.dit.dim, TINY.dit.num_layers  # 18 tokens: no padding
    # this rank's L/u tokens: (u-1)/u of their q, k, v out and of the attention output back
    per_block = 4 * (tokens // 2) * dim * 4 // 2
    head = tokens // 2 * TINY.dit.out_channels * 4 * 4  # its half of the head output (patch 1x2x2)
    assert stats["comm_bytes"] == STEPS * (blocks * per_block + head)


def test_parallel_needs_torchrun(tiny_checkpoint, monkeypatch):
    import wanlite

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", parallel="cfg=2")
    with pytest.raises(ValueError, match="divide"):
        wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", parallel="ulysses=4")


def test_parse_parallel():
    from wanlite.options import Options, parse_parallel

    assert parse_parallel("cfg=2,ulysses=2") == (2, 2)
    assert parse_parallel("ulysses=3") == (1, 3)
    assert parse_parallel({"cfg": 2}) == (2, 1)
    assert Options(parallel="ulysses=2, cfg=2").parallel == "cfg=2,ulysses=2"
    assert Options(parallel="cfg=1").parallel is None
    for bad in ("cfg=3", "ring=2", "cfg=0", "cfg", "cfg=2,cfg=2", "ulysses=two"):
        with pytest.raises(ValueError):
            parse_parallel(bad)


def test_sequence_shard_and_all_to_all_layout():
    """One process, degree 1 group emulated: the token split, RoPE slice and padding rules."""
    import torch

    from wanlite.runtime.parallel import ParallelState, SequenceParallel

    state = ParallelState(1, 4, 3, 4, torch.device("cpu"))
    sp = SequenceParallel(state)
    h = torch.arange(3 * 5, dtype=torch.float32).view(1, 3, 5)
    local = sp.shard(h)  # 3 tokens over 4 ranks: rank 3 holds one padding token
    assert local.shape == (1, 1, 5) and not local.any()
    assert sp.valid(local).shape[1] == 0
    state.rank = 1
    sp = SequenceParallel(state)
    assert torch.equal(sp.shard(h), h[:, 1:2])
    cos = torch.arange(3.0).view(3, 1, 1)
    assert torch.equal(sp.shard_rope((cos, cos))[0], cos[1:2])


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))


def test_each_rank_gets_its_local_cuda_device():
    """Under torchrun an explicit ``cuda:N`` must not put every rank on GPU N: each rank takes
    ``cuda:LOCAL_RANK``.  Only device names are built: no GPU needed."""
    import torch

    from wanlite.runtime.parallel import rank_device

    for asked in ("cuda", "cuda:0", "cuda:3"):
        devices = [rank_device(torch.device(asked), {"LOCAL_RANK": str(r)}) for r in range(4)]
        assert devices == [torch.device("cuda", r) for r in range(4)]
    assert rank_device(torch.device("cuda:2"), {}) == torch.device("cuda", 2)  # no torchrun
