"""End-to-end parity with diffusers' WanPipeline on the tiny random checkpoint (fp32, CPU)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wanlite.pipeline import Cancelled

CASES = [  # height, width, frames, steps, guidance
    (32, 32, 1, 1, 5.0),
    (48, 64, 5, 2, 5.0),
    (32, 48, 9, 3, 1.0),  # CFG off (guidance <= 1): one pass, no negative prompt
    (64, 32, 5, 4, 0.0),
    (16, 16, 13, 2, 7.5),
]


def _diffusers(pipe, prompt, neg, h, w, f, steps, g, seed, output_type):
    return pipe(
        prompt=prompt,
        negative_prompt=neg,
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=steps,
        guidance_scale=g,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).frames


@pytest.mark.parametrize("h,w,f,steps,g", CASES)
def test_latents_and_frames_match_diffusers(tiny_pipe, diffusers_pipe, h, w, f, steps, g):
    prompt, neg, seed = "a red fox running through snow", "blurry, low quality", 1234
    ours = tiny_pipe.generate(prompt, h, w, neg, steps, f, g, seed, progress=False)
    ref_lat = _diffusers(diffusers_pipe, prompt, neg, h, w, f, steps, g, seed, "latent")
    lat_diff = (ours.latents - ref_lat).abs().max().item()
    print(f"{h}x{w}x{f} steps={steps} g={g}: latents max abs diff {lat_diff:.2e}")
    assert lat_diff <= 1e-4
    ref = _diffusers(diffusers_pipe, prompt, neg, h, w, f, steps, g, seed, "np")[0]
    assert ours.frames.shape == (f, h, w, 3) == ref.shape
    frame_diff = np.abs(ours.frames.astype(np.float64) - ref.astype(np.float64) * 255).max()
    print(f"  frames max diff {frame_diff:.3f} uint8 levels")
    assert frame_diff <= 1.0


def test_same_seed_same_video_and_seed_reported(tiny_pipe):
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, progress=False)
    a = tiny_pipe.generate("a boat", seed=7, **kw)
    b = tiny_pipe.generate("a boat", seed=7, **kw)
    c = tiny_pipe.generate("a boat", seed=8, **kw)
    assert np.array_equal(a.frames, b.frames) and a.seed == 7
    assert not np.array_equal(a.frames, c.frames)
    d = tiny_pipe.generate("a boat", seed=None, **kw)
    assert isinstance(d.seed, int)
    assert np.array_equal(tiny_pipe.generate("a boat", seed=d.seed, **kw).frames, d.frames)


def test_any_size_is_generated_at_the_next_valid_size_and_cut(tiny_pipe):
    kw = dict(num_inference_steps=2, guidance_scale=3.0, seed=3, progress=False)
    odd = tiny_pipe.generate("a tree", height=17, width=35, num_frames=6, **kw)
    assert odd.frames.shape == (6, 17, 35, 3)
    # 17x35x6 is made at 32x48x9: the same noise, center-cropped and trimmed at the end.
    full = tiny_pipe.generate("a tree", height=32, width=48, num_frames=9, **kw)
    top, left = (32 - 17) // 2, (48 - 35) // 2
    assert np.array_equal(odd.frames, full.frames[:6, top : top + 17, left : left + 35])


@pytest.mark.parametrize("h,w,f", [(1, 1, 1), (480, 1, 2), (1, 640, 1), (15, 16, 4)])
def test_extreme_sizes(tiny_pipe, h, w, f):
    v = tiny_pipe.generate("x", h, w, num_frames=f, num_inference_steps=1, seed=0, progress=False)
    assert v.frames.shape == (f, h, w, 3) and v.frames.dtype == np.uint8


def test_bad_input_fails_before_any_model_work(tiny_pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(tiny_pipe, "encode_texts", boom)
    for bad in [dict(height=481), dict(num_frames=0), dict(guidance_scale=float("nan"))]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_pipe.generate("x", **bad)
    with pytest.raises(ValueError, match="prompt"):
        tiny_pipe.generate("")


def test_callback_sees_every_step_and_can_cancel(tiny_pipe):
    seen = []
    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=4, seed=0, progress=False)
    tiny_pipe.generate("x", callback=lambda i, n, lat: seen.append((i, n, lat.shape)), **kw)
    assert [s[:2] for s in seen] == [(i, 4) for i in range(4)]

    def cancel(i, n, lat):
        if i == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        tiny_pipe.generate("x", callback=cancel, **kw)


def test_timings_and_peak_memory_reported(tiny_pipe):
    v = tiny_pipe.generate("x", 16, 16, num_frames=1, num_inference_steps=1, progress=False)
    assert set(v.timings) == {"encode", "denoise", "decode"} == set(v.peak_memory)
    assert all(t > 0 for t in v.timings.values())
    assert all(m > 10 * 1024**2 for m in v.peak_memory.values())  # RSS of a torch process


def test_batched_and_sequential_cfg_agree(tiny_checkpoint):
    import wanlite

    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=3, seed=2, progress=False)
    out = {}
    for mode in ("on", "off"):
        pipe = wanlite.load(str(tiny_checkpoint), device="cpu", cfg_batch=mode, embed_cache=False)
        out[mode] = pipe.generate("a fox", negative_prompt="blurry, dark", **kw)
        assert out[mode].stats["cfg_batched"] == (mode == "on")
        assert out[mode].stats["dit_forwards"] == 6
    diff = (out["on"].latents - out["off"].latents).abs().max().item()
    print(f"batched vs sequential CFG: latents max abs diff {diff:.1e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("batch", ["on", "off"])
def test_cfg_gating_skips_the_unconditional_pass(tiny_checkpoint, batch):
    import wanlite

    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=4, seed=2, progress=False)
    exact = wanlite.load(str(tiny_checkpoint), device="cpu", cfg_batch=batch).generate("x", **kw)
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", cfg_batch=batch, cfg_skip_last=0.5)
    gated = pipe.generate("x", **kw)
    assert gated.stats["cfg_steps"] == 2 and gated.stats["dit_forwards"] == 2 * 2 + 2
    assert exact.stats["dit_forwards"] == 8
    assert gated.frames.shape == exact.frames.shape
    assert not torch.equal(gated.latents, exact.latents)
    off = pipe.generate("x", guidance_scale=1.0, **kw)  # no CFG at all: one pass per step
    assert off.stats["dit_forwards"] == 4 and off.stats["cfg_steps"] == 0


def test_second_call_keeps_its_resident_model_and_reads_no_weights(tiny_checkpoint, monkeypatch):
    """The planner must not count the pipeline's own resident weights as memory in use: on a
    machine with room for offload="none", every call keeps it (no re-reads after the first)."""
    import wanlite
    from wanlite.runtime import planner

    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", embed_cache=False)
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=1, progress=False)
    plan_none = planner.estimate(
        pipe.cfg, (16, 2, 4, 4), compute_bytes=4, quant="none", offload="none", tiled=False
    )
    machine = plan_none.peak + 2**20  # room for "none", and 1 MiB more

    def available(device):  # what the OS reports: the machine minus what we hold
        return machine - sum(c.resident_bytes() for c in pipe.components.values())

    monkeypatch.setattr(planner, "available_memory", available)
    first = pipe.generate("x", **kw)
    assert pipe.placement.offload == "none" and first.weights_seconds > 0
    held = sum(c.resident_bytes() for c in pipe.components.values())
    assert held > machine - plan_none.peak  # without `held` the budget would not fit "none"
    second = pipe.generate("x", **kw)
    assert pipe.placement.offload == "none" and second.weights_seconds == 0
    assert torch.equal(first.latents, second.latents)


def test_onednn_and_aten_linears_agree(tiny_checkpoint):
    """The packed oneDNN GEMMs (the CPU fp32 default) against torch's own, end to end."""
    import wanlite
    from wanlite.ops.quant import PackedLinear

    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=3, seed=3, progress=False)
    out = {}
    for linear in ("aten", "onednn"):
        pipe = wanlite.load(
            str(tiny_checkpoint), device="cpu", dtype="float32", linear=linear, embed_cache=False
        )
        out[linear] = pipe.generate("a fox", **kw)
        packed = isinstance(pipe.components["transformer"].module.blocks[0].ffn[0], PackedLinear)
        assert packed == (linear == "onednn")
    diff = (out["aten"].latents - out["onednn"].latents).abs().max().item()
    print(f"onednn vs aten linears: latents max abs diff {diff:.1e}")
    assert diff <= 1e-5


def test_a_stopped_call_leaves_nothing_loaded_in_offload_modes(tiny_checkpoint):
    """Cancelled (or out of memory) mid-denoise: the phases' releases are in a finally, so the
    DiT does not stay resident in an offload mode."""
    import wanlite
    from wanlite.pipeline import Cancelled

    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", offload="model")

    def cancel(i, n, latents):
        assert pipe.components["transformer"].module is not None  # loaded for the phase
        raise Cancelled()

    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=2, seed=0, progress=False)
    with pytest.raises(Cancelled):
        pipe.generate("x", callback=cancel, **kw)
    assert all(c.module is None for c in pipe.components.values())


def test_acquire_remakes_a_module_in_the_planned_mode(tiny_checkpoint):
    import wanlite

    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", offload="model")
    dit = pipe.components["transformer"]
    resident = dit.acquire(stream_blocks=False)
    assert dit.streamer is None and dit.acquire(stream_blocks=False) is resident
    streamed = dit.acquire(stream_blocks=True)  # not the cached resident module
    assert streamed is not resident and dit.streamer is not None
    assert all(p.is_meta for p in streamed.blocks.parameters())
    dit.release()


def test_on_decode_sees_every_chunk_and_can_stop_the_decode(tiny_pipe):
    """The server cancels a job during decode through ``on_decode``: it runs after every
    decoded chunk (1 frame, then 4 per latent frame) and raising from it stops there."""
    from wanlite.pipeline import Cancelled

    kw = dict(height=16, width=16, num_frames=13, num_inference_steps=1, seed=0, progress=False)
    seen = []
    tiny_pipe.generate("x", on_decode=lambda done, total: seen.append((done, total)), **kw)
    assert seen == [(1, 13), (5, 13), (9, 13), (13, 13)]

    def stop(done, total):
        if done >= 5:
            raise Cancelled()

    with pytest.raises(Cancelled):
        tiny_pipe.generate("x", on_decode=stop, **kw)


@pytest.mark.parametrize("linear", ["aten", "onednn"])
def test_bf16_frames_match_diffusers_as_documented(tiny_checkpoint, linear):
    """dtype bf16 (what "auto" picks on CPUs with AMX / AVX512-BF16) against diffusers loaded
    as its Wan docs load it (bf16 transformer and text encoder, fp32 VAE): frames >= 40 dB."""
    from diffusers import AutoencoderKLWan, WanPipeline

    import wanlite
    from wanlite.ops.quant import onednn_available

    if linear == "onednn" and not onednn_available(torch.bfloat16):
        pytest.skip("this CPU has no oneDNN bf16 GEMM (needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    kw = dict(height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    prompt, seed = "a red fox running through snow, cinematic", 42
    vae = AutoencoderKLWan.from_pretrained(
        str(tiny_checkpoint), subfolder="vae", dtype=torch.float32
    )
    ref_pipe = WanPipeline.from_pretrained(str(tiny_checkpoint), vae=vae, dtype=torch.bfloat16)
    ref_pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(seed)
    ref = ref_pipe(prompt=prompt, negative_prompt=" ", generator=gen, output_type="np", **kw)
    ref = (np.asarray(ref.frames[0], dtype=np.float64) * 255).round()
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", linear=linear,
                        embed_cache=False)  # fmt: skip
    ours = pipe.generate(prompt, seed=seed, progress=False, **kw).frames.astype(np.float64)
    mse = np.mean((ours - ref) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    print(f"bf16 ({linear}) vs diffusers bf16 as documented: PSNR {psnr:.1f} dB")
    assert ours.shape == ref.shape and psnr >= 40


def test_auto_packs_the_gemm_weights_only_when_it_pays(tiny_checkpoint, monkeypatch):
    """linear="auto": packing costs about as much as many small forwards save, so a call packs
    the resident DiT only when it runs enough token-forwards; a packed DiT stays packed."""
    import wanlite
    from wanlite.runtime import planner

    monkeypatch.setattr(planner, "PACK_MIN_TOKEN_FORWARDS", 64)
    pipe = wanlite.load(str(tiny_checkpoint), device="cpu", dtype="float32", embed_cache=False)
    dit = pipe.components["transformer"]
    small = dict(height=16, width=16, num_frames=1, num_inference_steps=1, guidance_scale=1.0)
    pipe.generate("x", seed=0, progress=False, **small)  # 1 token x 1 forward
    assert pipe.placement.offload == "none" and not pipe.placement.pack and not dit.packed
    big = dict(height=64, width=64, num_frames=5, num_inference_steps=4)  # 32 tokens x 8
    pipe.generate("x", seed=0, progress=False, **big)
    assert pipe.placement.pack and dit.packed
    pipe.generate("x", seed=0, progress=False, **small)
    assert not pipe.placement.pack and dit.packed  # kept: its cost is paid


# --- output types as diffusers' (issue 21, section 4) ------------------------------------------

OUT_REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=5.0)


def _ours_and_diffusers(tiny_pipe, diffusers_pipe, output_type):
    prompt, neg, seed = "a red fox running through snow", "blurry", 99
    ours = tiny_pipe.generate(
        prompt, negative_prompt=neg, seed=seed, progress=False, output_type=output_type,
        **OUT_REQUEST,
    )  # fmt: skip
    r = OUT_REQUEST
    args = (r["height"], r["width"], r["num_frames"], r["num_inference_steps"])
    ref = _diffusers(diffusers_pipe, prompt, neg, *args, r["guidance_scale"], seed, output_type)
    return ours, ref[0]  # diffusers' frames are batched: [0] is the one video


def test_np_output_is_diffusers_float_frames(tiny_pipe, diffusers_pipe):
    ours, ref = _ours_and_diffusers(tiny_pipe, diffusers_pipe, "np")
    assert isinstance(ours.frames, np.ndarray) and ours.frames.dtype == ref.dtype == np.float32
    assert ours.frames.shape == ref.shape == (5, 32, 48, 3)
    assert ours.frames.min() >= 0 and ours.frames.max() <= 1
    diff = np.abs(ours.frames - ref).max()
    print(f"np: max abs diff {diff:.2e}")
    assert diff <= 1e-4  # fp32 on both sides (measured 4e-6); one uint8 level is 4e-3
    # Not rounded to bytes on the way: "np" keeps the decoder's float values.
    assert not np.allclose(ours.frames * 255, np.round(ours.frames * 255), atol=1e-3)


def test_pt_output_is_diffusers_tensor_layout(tiny_pipe, diffusers_pipe):
    ours, ref = _ours_and_diffusers(tiny_pipe, diffusers_pipe, "pt")
    assert isinstance(ours.frames, torch.Tensor) and ours.frames.device.type == "cpu"
    assert ours.frames.dtype == ref.dtype == torch.float32
    assert tuple(ours.frames.shape) == tuple(ref.shape) == (5, 3, 32, 48)  # [F, C, H, W]
    assert (ours.frames - ref.cpu()).abs().max().item() <= 1e-4
    assert (ours.num_frames, ours.height, ours.width) == (5, 32, 48)


def test_pil_output_is_a_list_of_rgb_images_as_diffusers(tiny_pipe, diffusers_pipe):
    from PIL import Image

    ours, ref = _ours_and_diffusers(tiny_pipe, diffusers_pipe, "pil")
    assert isinstance(ours.frames, list) and len(ours.frames) == len(ref) == 5
    for a, b in zip(ours.frames, ref):
        assert isinstance(a, Image.Image) and a.mode == b.mode == "RGB"
        assert a.size == b.size == (48, 32)  # PIL sizes are (width, height)
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
        assert diff <= 1  # one rounding level, as the uint8 parity test
    assert (ours.num_frames, ours.height, ours.width) == (5, 32, 48)


def test_every_output_type_holds_the_same_video_and_saves(tiny_pipe, tmp_path):
    from wanlite.video import frames_uint8, read_mp4

    kw = dict(seed=5, progress=False, **OUT_REQUEST)
    default = tiny_pipe.generate("a boat", **kw)  # uint8 [F, H, W, 3]
    frames = default.frames
    assert frames.dtype == np.uint8 and frames.shape == (5, 32, 48, 3)
    reference = read_mp4(default.save(tmp_path / "frames.mp4"))
    for output_type in ("np", "pt", "pil"):
        v = tiny_pipe.generate("a boat", output_type=output_type, **kw)
        # The same rounding as the default output: x * 255, round half to even.
        assert np.array_equal(frames_uint8(v.frames), frames), output_type
        saved = read_mp4(v.save(tmp_path / f"{output_type}.mp4"))
        assert np.array_equal(saved, reference), output_type  # the same bytes went in
    latent = tiny_pipe.generate("a boat", output_type="latent", **kw)
    assert latent.num_frames == 0 and tuple(latent.latents.shape) == (1, 16, 2, 4, 6)


def test_bad_output_type_or_save_to_fails_before_any_model_work(tiny_pipe, monkeypatch, tmp_path):
    from wanlite import ParamError

    def boom(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(tiny_pipe, "encode_texts", boom)
    with pytest.raises(ParamError, match=r"output_type must be one of .*'np'.*got 'numpy'") as e:
        tiny_pipe.generate("x", output_type="numpy")
    assert e.value.field == "output_type"
    with pytest.raises(ParamError, match="save_to .* needs output_type 'frames'") as e:
        tiny_pipe.generate("x", output_type="np", save_to=tmp_path / "v.mp4")
    assert e.value.field == "save_to" and not (tmp_path / "v.mp4").exists()
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"pip install 'wanlite\[pil\]'"):
        tiny_pipe.generate("x", output_type="pil")


# --- Path and torch.dtype arguments; limits="model" (issue 21, sections 4 and 5) ---------------


def test_load_takes_a_path_and_torch_dtypes(tiny_checkpoint, tiny_pipe):
    import wanlite

    pipe = wanlite.load(Path(tiny_checkpoint), device="cpu", dtype=torch.float32)
    assert pipe.options == tiny_pipe.options and pipe.dtype is torch.float32
    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=1, seed=4, progress=False)
    assert np.array_equal(pipe.generate("x", **kw).frames, tiny_pipe.generate("x", **kw).frames)
    assert wanlite.load(Path(tiny_checkpoint), device="cpu", dtype=torch.bfloat16).dtype is (
        torch.bfloat16
    )


def test_model_limits_make_native_sizes_and_long_clips(tiny_checkpoint, tiny_pipe, monkeypatch):
    from wanlite import Options, ParamError
    from wanlite.pipeline import Pipeline

    pipe = Pipeline(tiny_checkpoint, Options(device="cpu", dtype="float32", limits="model"))
    kw = dict(num_inference_steps=1, seed=0, progress=False)
    tall = pipe.generate("x", height=832, width=16, num_frames=1, **kw)
    assert tall.frames.shape == (1, 832, 16, 3)
    long = pipe.generate("x", height=16, width=16, num_frames=241, **kw)
    assert long.frames.shape == (241, 16, 16, 3)
    with pytest.raises(ParamError, match=r"height must be .* \[1, 480\], got 832"):
        tiny_pipe.generate("x", height=832, width=16, num_frames=1, **kw)  # hosted: the default

    def boom(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(pipe, "encode_texts", boom)
    for name, bad, rng in (("width", 1281, "1, 1280"), ("num_frames", 1002, "1, 1001")):
        with pytest.raises(ParamError, match=rf"^{name} must be .* \[{rng}\], got {bad}") as e:
            pipe.generate("x", **{name: bad})
        assert e.value.field == name
    with pytest.raises(ParamError, match=r"num_inference_steps must be .* \[1, 100\]"):
        pipe.generate("x", num_inference_steps=101)  # the other fields keep their ranges
