"""The tiny VAE decoder (TAEHV taew2_1): file layout, loading checks, frame counts, streaming,
an independent transcription of the reference algorithm, bf16 and channels-last on CPU, and the
pipeline's decoder choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wanlite.models.taehv import TinyDecoder, file_shapes, load_tiny_decoder
from wanlite.weights.random_checkpoint import write_random_taehv


@pytest.fixture(scope="module")
def tae_file(tmp_path_factory):
    return write_random_taehv(tmp_path_factory.mktemp("tae") / "taew2_1.safetensors")


@pytest.fixture(scope="module")
def tae(tae_file):
    return load_tiny_decoder(tae_file)


def test_random_file_has_the_real_layout(tae_file):
    from safetensors import safe_open

    with safe_open(str(tae_file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert shapes == file_shapes()
    assert len(shapes) == 128 and dtypes == {"F16"}
    assert sum(math.prod(s) for s in shapes.values()) == 11_315_539  # 11.3 M, as published
    decoder = {k: s for k, s in shapes.items() if k.startswith("decoder.")}
    assert len(decoder) == 64 and sum(math.prod(s) for s in decoder.values()) == 9_844_611
    assert shapes["decoder.7.conv.weight"] == (256, 256, 1, 1)  # stride-1 TGrow
    assert shapes["decoder.13.conv.weight"] == (256, 128, 1, 1)


def test_pth_and_safetensors_load_the_same(tmp_path, tae):
    pth = load_tiny_decoder(write_random_taehv(tmp_path / "taew2_1.pth"))
    z = torch.randn(1, 16, 2, 4, 6)
    assert torch.equal(pth.decode(z), tae.decode(z))
    assert sum(p.numel() for p in pth.parameters()) == 9_844_611  # the encoder is not loaded


# -- an independent transcription of taehv.py's parallel decode (file order, no reordering) --
LAYOUT = ["clamp", "conv", "relu"]
for _stage in range(3):
    LAYOUT += ["mem"] * 3 + ["up", "tgrow", "conv"]
LAYOUT += ["relu", "conv"]


def reference_decode(state: dict, z: torch.Tensor) -> torch.Tensor:
    """[N, 16, T, h, w] -> [N, 3, 4T - 3, 8h, 8w]: every frame through each layer at once."""
    n, t = z.shape[0], z.shape[2]
    x = z.permute(0, 2, 1, 3, 4).reshape(n * t, *z.shape[1:2], *z.shape[3:])
    for i, kind in enumerate(LAYOUT):
        prefix = f"decoder.{i}."
        w = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        if kind == "clamp":
            x = torch.tanh(x / 3) * 3
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "conv":
            x = F.conv2d(x, w["weight"], w.get("bias"), padding=1)
        elif kind == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        elif kind == "tgrow":
            c, stride = x.shape[1], w["conv.weight"].shape[0] // x.shape[1]
            x = F.conv2d(x, w["conv.weight"]).reshape(-1, c, *x.shape[2:])
            t *= stride
        else:  # MemBlock: past = the same block's input one frame earlier, zeros first
            seq = x.view(n, t, *x.shape[1:])
            past = F.pad(seq, (0, 0, 0, 0, 0, 0, 1, 0))[:, :t].reshape(x.shape)
            h = torch.cat([x, past], 1)
            h = F.relu(F.conv2d(h, w["conv.0.weight"], w["conv.0.bias"], padding=1))
            h = F.relu(F.conv2d(h, w["conv.2.weight"], w["conv.2.bias"], padding=1))
            x = F.relu(F.conv2d(h, w["conv.4.weight"], w["conv.4.bias"], padding=1) + x)
    x = x.view(n, t, *x.shape[1:])[:, 3:].clamp(0, 1)
    return x.permute(0, 2, 1, 3, 4)


def test_matches_a_transcription_of_the_reference(tae_file, tae):
    from safetensors.torch import load_file

    state = load_file(str(tae_file))
    z = torch.randn(2, 16, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    ref = reference_decode(state, z)
    ours = tae.decode(z)
    assert ours.shape == ref.shape == (2, 3, 9, 40, 56)
    inside = ((ref > 0) & (ref < 1)).float().mean().item()
    assert inside > 0.5, inside  # not a comparison of clamped constants
    diff = (ours - ref).abs().max().item()
    print(f"\ntiny VAE vs reference transcription: max abs diff {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_frame_counts_sizes_and_streaming(tae, latent_frames):
    z = torch.randn(1, 16, latent_frames, 6, 10, generator=torch.Generator().manual_seed(1))
    whole = tae.decode(z)
    chunks = list(tae.iter_decode(z))
    assert [c.shape[2] for c in chunks] == [1] + [4] * (latent_frames - 1)  # like the full VAE
    assert all(c.shape[:2] == (1, 3) and c.shape[3:] == (48, 80) for c in chunks)
    streamed = torch.cat(chunks, 2)
    assert whole.shape == streamed.shape == (1, 3, 1 + 4 * (latent_frames - 1), 48, 80)
    assert whole.min() >= 0 and whole.max() <= 1
    diff = (whole - streamed).abs().max().item()
    assert diff < 1e-5, diff
    if latent_frames > 1:  # the memory matters: a later chunk alone is not the same
        alone = list(tae.iter_decode(z[:, :, 1:]))[0][:, :, -1]
        assert (alone - chunks[1][:, :, -1]).abs().max() > 1e-3


def _conv_input_layouts(model, run) -> set[bool]:
    """{is channels-last} over every conv input of ``run()``."""
    seen: set[bool] = set()
    hooks = [
        m.register_forward_pre_hook(
            lambda m, a: seen.add(a[0].is_contiguous(memory_format=torch.channels_last))
        )
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of frames in [0, 1]."""
    return 10 * math.log10(1 / (a.float() - b.float()).pow(2).mean().item())


def test_channels_last_on_cpu_and_both_layouts_agree(tae_file):
    """Channels-last by default on CPU (as the full VAE), every conv fed NHWC; the usual layout
    on request; the same frames (fp32), whole or streamed."""
    model = load_tiny_decoder(tae_file)
    z = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(4))
    assert model.channels_last is None and model.layout(z) == torch.channels_last
    out = {}
    assert _conv_input_layouts(model, lambda: out.setdefault("nhwc", model.decode(z))) == {True}
    model.channels_last = False
    assert _conv_input_layouts(model, lambda: out.setdefault("nchw", model.decode(z))) == {False}
    torch.testing.assert_close(out["nhwc"], out["nchw"], atol=2e-5, rtol=0)
    streamed = torch.cat(list(model.iter_decode(z)), 2)
    model.channels_last = None
    torch.testing.assert_close(
        torch.cat(list(model.iter_decode(z)), 2), streamed, atol=2e-5, rtol=0
    )


@pytest.mark.parametrize("channels_last", [True, False])
def test_bf16_decoder_close_to_fp32(tae_file, tae, channels_last):
    model = load_tiny_decoder(tae_file, dtype=torch.bfloat16)
    model.channels_last = channels_last
    assert model.decoder[1].weight.dtype == torch.bfloat16
    z = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(5))
    ref, got = tae.decode(z), model.decode(z)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    psnr = _psnr(got, ref)
    assert psnr > 35, psnr  # measured ~45 dB on random weights (bf16 rounding)
    assert _psnr(tae.decode(z * 1.05), ref) < psnr  # the bar discriminates a small change


def test_pipeline_tiny_vae_dtype_follows_the_vae(tiny_checkpoint, tae_file):
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    def tae_dtype(**kw):
        o = Options(device="cpu", decoder="taew2_1", tae=str(tae_file), **kw)
        return Pipeline(tiny_checkpoint, o).tae.decoder[1].weight.dtype

    assert tae_dtype(dtype="bfloat16") == torch.bfloat16  # as the full VAE ("auto")
    assert tae_dtype(dtype="bfloat16", vae_dtype="float32") == torch.float32
    assert tae_dtype(dtype="float32") == torch.float32


def _save(tmp_path, state, name="bad.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_bad_files_are_refused_clearly(tmp_path, tae_file):
    from safetensors.torch import load_file

    state = load_file(str(tae_file))
    cases = {
        "missing": {k: v for k, v in state.items() if k != "decoder.8.weight"},
        "shape": state | {"decoder.1.weight": torch.zeros(256, 48, 3, 3)},  # taew2_2's latents
        "unexpected": state | {"decoder.23.weight": torch.zeros(3)},
    }
    words = {"missing": "1 missing (decoder.8.weight)", "shape": "wrong shapes: decoder.1.weight"}
    words["unexpected"] = "unexpected (decoder.23.weight)"
    for case, bad in cases.items():
        with pytest.raises(ValueError, match="not a TAEHV taew2_1") as e:
            load_tiny_decoder(_save(tmp_path, bad, f"{case}.safetensors"))
        assert words[case] in str(e.value)
    with pytest.raises(ValueError, match="not found"):
        load_tiny_decoder(tmp_path / "nope.pth")
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=".pth or .safetensors"):
        load_tiny_decoder(tmp_path / "x.bin")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        load_tiny_decoder(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_tiny_decoder(tmp_path / "list.pth")


def test_bad_latents(tae):
    with pytest.raises(ValueError, match="latents must be"):
        tae.decode(torch.zeros(1, 48, 1, 4, 4))


# -- in the pipeline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tae_pipe(tiny_checkpoint, tae_file):
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    options = Options(device="cpu", dtype="float32", decoder="taew2_1", tae=str(tae_file))
    return Pipeline(tiny_checkpoint, options)


def test_pipeline_decodes_with_the_tiny_vae(tae_pipe, tae, monkeypatch):
    kw = dict(num_inference_steps=2, guidance_scale=3.0, seed=3, progress=False)
    full = tae_pipe.generate("a tree", height=32, width=48, num_frames=9, **kw)
    assert full.frames.shape == (9, 32, 48, 3)
    # The frames are the tiny VAE's of the final latents, as they are (no latents_mean/std).
    expected = (tae.decode(full.latents)[0] * 255).round().to(torch.uint8).permute(1, 2, 3, 0)
    assert np.abs(full.frames.astype(int) - expected.numpy().astype(int)).max() <= 1
    # Any size: made at the next valid size, center-cropped and trimmed, like the full VAE.
    odd = tae_pipe.generate("a tree", height=17, width=35, num_frames=6, **kw)
    top, left = (32 - 17) // 2, (48 - 35) // 2
    assert np.array_equal(odd.frames, full.frames[:6, top : top + 17, left : left + 35])

    real = tae_pipe._acquire

    def acquire(name, place):
        assert name != "vae", "the full VAE was acquired"
        return real(name, place)

    monkeypatch.setattr(tae_pipe, "_acquire", acquire)
    again = tae_pipe.generate("a tree", height=32, width=48, num_frames=9, **kw)
    assert np.array_equal(again.frames, full.frames)


def test_pipeline_streams_the_tiny_vae_to_mp4(tae_pipe, tmp_path):
    from wanlite.video import read_mp4

    chunks = []
    kw = dict(num_inference_steps=1, seed=5, progress=False)
    out = tmp_path / "o.mp4"
    done = lambda n, total: chunks.append(n)  # noqa: E731
    v = tae_pipe.generate("a boat", 32, 32, num_frames=13, save_to=out, on_decode=done, **kw)
    assert chunks == [1, 5, 9, 13]  # streamed chunk by chunk
    assert read_mp4(v.path).shape == (13, 32, 32, 3)


def test_options_need_the_file():
    from wanlite import Options

    with pytest.raises(ValueError, match="needs tae"):
        Options(decoder="taew2_1")
    with pytest.raises(ValueError, match="decoder must be one of"):
        Options(decoder="tiny", tae="x.pth")


def test_decoder_module_layout():
    with torch.device("meta"):
        keys = set(TinyDecoder().state_dict())
    assert keys == {k for k in file_shapes() if k.startswith("decoder.")}
