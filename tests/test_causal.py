"""Causal generation (wanlite.causal, Pipeline.stream) on the tiny checkpoint's weights stored
as a Self-Forcing causal checkpoint (random weights: speed and exactness, no picture quality).

The loop's equations are Self-Forcing's (guandeh17/Self-Forcing):
- ``pipeline/causal_inference.py``, ``CausalInferencePipeline.inference``: chunks of
  ``num_frame_per_block`` = 3 latent frames; per step x0 = x_t - sigma_t * v
  (``utils/wan_wrapper.py``, ``WanDiffusionWrapper._convert_flow_pred_to_x0``), then
  ``scheduler.add_noise(x0, randn, t_next)`` = (1 - sigma') x0 + sigma' eps
  (``utils/scheduler.py``, ``FlowMatchScheduler.add_noise``); the last step's x0 is the chunk;
  then a rerun at ``context_noise`` (0) writes the chunk's clean K/V;
- the step list [1000, 750, 500, 250] warped as ``timesteps[1000 - t]`` of the shift-5
  ``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)`` (``warp_denoising_step``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import wanlite
from wanlite.causal import SELF_FORCING, causal_chunks
from wanlite.models.vae import StreamDecoder
from wanlite.runtime.kvcache import KVCache
from wanlite.weights.pthstore import is_causal_checkpoint
from wanlite.weights.random_checkpoint import write_causal_file

KW = dict(height=48, width=64, num_frames=21, seed=7)


@pytest.fixture(scope="module")
def causal_file(tiny_checkpoint, tmp_path_factory):
    return write_causal_file(tiny_checkpoint, tmp_path_factory.mktemp("sf") / "self_forcing.pt")


@pytest.fixture(scope="module")
def causal_pipe(tiny_checkpoint, causal_file):
    return wanlite.load(tiny_checkpoint, transformer=causal_file, device="cpu", dtype="float32")


def test_causal_checkpoints_are_detected(tiny_checkpoint, causal_file, tmp_path, causal_pipe):
    assert causal_pipe.causal and is_causal_checkpoint(causal_file)
    plain = write_causal_file(tiny_checkpoint, tmp_path / "generator.pt", wrapper="generator")
    assert is_causal_checkpoint(plain)
    assert not is_causal_checkpoint(tiny_checkpoint / "model_index.json")
    bidirectional = wanlite.load(tiny_checkpoint, device="cpu", dtype="float32")
    assert not bidirectional.causal
    with pytest.raises(ValueError, match="causal checkpoint"):
        next(bidirectional.stream("a fox", **KW))
    forced = wanlite.load(tiny_checkpoint, device="cpu", dtype="float32", causal=True)
    assert forced.causal


def test_stream_equals_generate_and_has_the_exact_size(causal_pipe):
    chunks = list(causal_pipe.stream("a red fox", progress=False, **KW))
    # 21 frames -> 6 latent frames -> 2 chunks of 3: 9 frames, then 12 (trimmed to 21 in all)
    assert [len(c) for c in chunks] == [9, 12]
    video = causal_pipe.generate("a red fox", progress=False, **KW)
    streamed = np.concatenate(chunks)
    assert streamed.shape == video.frames.shape == (21, 48, 64, 3)
    assert np.array_equal(streamed, video.frames)
    odd = list(causal_pipe.stream("x", height=40, width=50, num_frames=2, seed=1, progress=False))
    assert np.concatenate(odd).shape == (2, 40, 50, 3)


def test_the_chunk_loop_follows_self_forcing_equations(causal_pipe):
    """Two chunks, 2 steps: every x0 recomputed here from the DiT and the equations."""
    dit = causal_pipe._acquire("transformer", causal_pipe.place(*_plan(causal_pipe)))
    ctx = torch.randn(
        1, 5, causal_pipe.cfg.dit.text_dim, generator=torch.Generator().manual_seed(0)
    )
    text = dit.prepare_text(ctx)
    gen = torch.Generator("cpu").manual_seed(3)
    noise = torch.randn(1, 16, 6, 4, 6, generator=gen)
    got = list(causal_chunks(dit, text, noise, gen, SELF_FORCING, steps=2))
    t, s = SELF_FORCING.grid(2)
    assert torch.allclose(t, torch.tensor([1000.0, 937.5]))  # shift(1 - 250/1000, 5) * 1000
    replay = torch.Generator("cpu").manual_seed(3)
    torch.randn(1, 16, 6, 4, 6, generator=replay)  # the initial noise
    kv = KVCache(len(dit.blocks), 2 * 3, 6)
    for c in range(2):
        kv.begin_chunk(3)
        x = noise[:, :, 3 * c : 3 * c + 3]
        for i in range(2):
            temb = dit.time_embeddings(t[i : i + 1], 1)
            x0 = x - s[i] * dit.step(x, temb, text, kv=kv)
            if i == 0:
                eps = torch.randn(x0.shape, generator=replay)
                x = (1 - s[1]) * x0 + s[1] * eps
        assert (got[c] - x0).abs().max().item() <= 1e-5
        dit.step(x0, dit.time_embeddings(torch.zeros(1), 1), text, kv=kv)  # context_noise 0
        kv.commit()


def test_each_chunk_comes_before_its_rerun_and_the_caller_cannot_change_it(causal_pipe):
    """A chunk is yielded after its denoising steps, before the clean rerun (one forward
    sooner); zeroing a yielded chunk in place leaves the later chunks as they were."""
    dit = causal_pipe._acquire("transformer", causal_pipe.place(*_plan(causal_pipe)))
    text = dit.prepare_text(torch.randn(1, 5, causal_pipe.cfg.dit.text_dim))
    noise = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(0))

    def run(spoil: bool):
        forwards, seen, out = [], [], []
        gen = torch.Generator("cpu").manual_seed(5)
        for x0 in causal_chunks(
            dit, text, noise, gen, steps=2, on_step=lambda d, _: forwards.append(d)
        ):
            seen.append(len(forwards))
            out.append(x0.clone())
            if spoil:
                x0.zero_()
        return seen, out

    seen, clean = run(spoil=False)
    assert seen == [2, 5, 8]  # 2 steps per chunk, the reruns (3rd, 6th) after each yield
    _, spoiled = run(spoil=True)
    assert all(torch.equal(a, b) for a, b in zip(clean, spoiled))


def _plan(pipe):
    from wanlite.frames import Plan
    from wanlite.params import validate

    p = validate(prompt="x", height=32, width=48, num_frames=21)
    return Plan.for_request(p, pipe.cfg), p


def test_chunked_vae_decode_equals_one_decode(causal_pipe):
    vae = causal_pipe._acquire("vae", causal_pipe.place(*_plan(causal_pipe)))
    z = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(2))
    whole = vae.decode(z)
    stream = StreamDecoder(vae)
    pieces = torch.cat([stream(z[:, :, :3]), stream(z[:, :, 3:5]), stream(z[:, :, 5:])], dim=2)
    assert torch.equal(pieces, whole)


def test_long_streams_keep_a_bounded_cache_and_bad_values_are_refused(causal_pipe):
    assert causal_pipe.max_stream_frames == 1 + 4 * (causal_pipe.cfg.dit.rope_max_seq_len - 1)
    # 125 frames (32 latent -> 33 generated) > the hosted 120: stream() takes it
    n = sum(len(c) for c in causal_pipe.stream("x", 16, 16, 125, seed=0, progress=False))
    assert n == 125
    with pytest.raises(wanlite.ParamError, match="num_frames"):
        causal_pipe.generate("x", num_frames=125)  # generate() keeps the schema's limits
    with pytest.raises(wanlite.ParamError, match="guidance_scale"):
        next(causal_pipe.stream("x", guidance_scale=5.0))
    with pytest.raises(wanlite.ParamError, match="num_inference_steps"):
        next(causal_pipe.stream("x", num_inference_steps=5))
    with pytest.raises(ValueError, match="kv_window"):
        wanlite.Options(kv_window=2)


def test_cli_stream_writes_a_file_that_plays_after_a_kill(tiny_checkpoint, causal_file, tmp_path):
    """``generate --stream``: the MP4 grows fragment by fragment under its final name; killed
    with SIGKILL mid-run, the file still plays the frames written so far.  The tiny model
    streams ~200 frames a second here, so the run is made long (4,093 frames, the most
    ``stream()`` takes) for the kill to land mid-run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from wanlite.video import read_metadata, read_mp4

    frames_asked = 4093
    out = tmp_path / "stream.mp4"
    cmd = [sys.executable, "-m", "wanlite", "generate", "--model", str(tiny_checkpoint)]
    cmd += ["--transformer", str(causal_file), "--prompt", "a fox", "--size", "64x48"]
    cmd += ["--num-frames", str(frames_asked), "--seed", "5", "--out", str(out), "--stream", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen, deadline = 0, time.monotonic() + 300
        while seen < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:  # a fragment written so far can be read back while the file grows
                seen = len(read_mp4(out)) if out.exists() else 0
            except Exception:  # noqa: BLE001 - not even the first fragment yet
                seen = 0
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    frames = read_mp4(out)
    assert 20 <= len(frames) < frames_asked and frames.shape[1:] == (48, 64, 3)
    assert read_metadata(out)["num_frames"] == frames_asked


def test_the_tiny_vae_streams_too(tiny_checkpoint, causal_file, tmp_path):
    from wanlite.models.taehv import load_tiny_decoder
    from wanlite.weights.random_checkpoint import write_random_taehv

    tae_file = write_random_taehv(tmp_path / "taew2_1.safetensors")
    tae = load_tiny_decoder(str(tae_file), torch.device("cpu"), torch.float32)
    z = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(4))
    whole = torch.cat(list(tae.iter_decode(z)), dim=2)
    stream = tae.stream()
    assert torch.equal(torch.cat([stream(z[:, :, :3]), stream(z[:, :, 3:])], dim=2), whole)
    pipe = wanlite.load(
        tiny_checkpoint, transformer=causal_file, device="cpu", dtype="float32",
        decoder="taew2_1", tae=str(tae_file),
    )  # fmt: skip
    frames = np.concatenate(list(pipe.stream("a fox", progress=False, **KW)))
    assert frames.shape == (21, 48, 64, 3)


@pytest.mark.parametrize("options", [{"offload": "blocks"}, {"quant": "int8"}])
def test_causal_runs_with_offload_and_quantized_weights(tiny_checkpoint, causal_file, options):
    """Blocks streamed from disk give the resident model's frames exactly; int8 weights run the
    same chunk loop (its own, quantized, numbers)."""
    kw = dict(device="cpu", dtype="float32")
    resident = wanlite.load(tiny_checkpoint, transformer=causal_file, **kw)
    other = wanlite.load(tiny_checkpoint, transformer=causal_file, **kw, **options)
    assert other.causal
    want = np.concatenate(list(resident.stream("a fox", progress=False, **KW)))
    got = np.concatenate(list(other.stream("a fox", progress=False, **KW)))
    assert got.shape == want.shape == (21, 48, 64, 3)
    if "offload" in options:
        assert np.array_equal(got, want)


def test_causal_refuses_what_its_kv_cache_replaces(tiny_checkpoint, causal_file):
    for options in ({"compile": True}, {"cache": "teacache"}, {"preset": "causvid"}):
        with pytest.raises(ValueError, match="causal model"):
            wanlite.load(tiny_checkpoint, transformer=causal_file, device="cpu", **options)


def test_the_planner_sizes_a_causal_call_by_its_chunk_and_window(causal_pipe):
    """481 frames cost the planner what 81 do, up to the latent buffers: one chunk of 3 latent
    frames runs at a time beside a KV cache of at most ``kv_window`` frames."""
    from wanlite.frames import Plan
    from wanlite.params import validate

    def denoise(frames):
        p = validate(prompt="x", height=32, width=48, num_frames=frames, limits="model")
        size = Plan.for_request(p, causal_pipe.cfg)
        place = causal_pipe.place(size, p)
        return place.estimate.denoise, size.latent_shape, 2 if place.cfg_batched else 1

    (short, (c, f1, h, w), batch), (long, (_, f2, _, _), _) = denoise(81), denoise(481)
    assert long - short == batch * 3 * c * (f2 - f1) * h * w * 4
