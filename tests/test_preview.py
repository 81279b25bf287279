"""Live previews: the x0 prediction of a step as frames (linear map or tiny VAE), their cost,
the PNG contact sheet of ``wanlite generate --preview`` and the JPEG data URL of the server."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from wanlite.preview import (
    LATENT_RGB_BIAS,
    LATENT_RGB_FACTORS,
    Crop,
    contact_sheet,
    data_url,
    encode_png,
    preview_frames,
    resize,
    write_png,
)
from wanlite.weights.random_checkpoint import write_random_taehv

Image = pytest.importorskip("PIL.Image")


def _collect():
    got = []
    return got, lambda step, total, frames: got.append((step, total, frames))


def test_linear_map_colours_and_crop():
    """x0 = 0 gives the bias colour, one channel alone adds its row; cropped to the request."""
    assert np.array(LATENT_RGB_FACTORS).shape == (16, 3) and len(LATENT_RGB_BIAS) == 3
    x0 = torch.zeros(1, 16, 3, 4, 6)
    x0[0, 2, 1] = 1.0  # latent frame 1: channel 2 on
    frames = preview_frames(x0, Crop((32, 48), (17, 35), num_frames=9))
    assert frames.shape == (3, 17, 35, 3) and frames.dtype == np.uint8  # a frame per latent
    bias = np.array(LATENT_RGB_BIAS)
    expected0 = np.round((bias / 2 + 0.5) * 255)
    expected1 = np.round(((bias + np.array(LATENT_RGB_FACTORS[2])) / 2 + 0.5) * 255)
    assert (frames[0] == expected0).all() and (frames[2] == expected0).all()
    assert (frames[1] == expected1).all()


@pytest.mark.parametrize("tae", [False, True])
def test_last_preview_is_the_final_video(tiny_pipe, tmp_path, tae):
    """With UniPC the last step's x0 prediction *is* the final latents (sigma_n = 0), so the
    last preview must show them: this pins x0 = x - sigma_i * v to the right sigma."""
    pipe = tiny_pipe
    if tae:
        from wanlite import Options
        from wanlite.pipeline import Pipeline

        file = write_random_taehv(tmp_path / "taew2_1.safetensors")
        pipe = Pipeline(tiny_pipe.path, Options(device="cpu", dtype="float32", tae=str(file)))
    got, on_preview = _collect()
    kw = dict(num_inference_steps=3, guidance_scale=4.0, seed=11, progress=False)
    video = pipe.generate(
        "a lake", 17, 35, num_frames=6, preview_every=1, on_preview=on_preview, **kw
    )  # noqa: E501
    assert [(s, t) for s, t, _ in got] == [(0, 3), (1, 3), (2, 3)]
    last = got[-1][2]
    if tae:  # the tiny VAE's frames, every requested frame; the video itself is the full VAE's
        assert last.shape == (6, 17, 35, 3)
        direct = preview_frames(video.latents, Crop((32, 48), (17, 35), 6), pipe.tae)
    else:
        assert last.shape == (3, 17, 35, 3)  # 6 frames, made as 9 = 3 latent frames
        direct = preview_frames(video.latents, Crop((32, 48), (17, 35), 6))
    assert np.abs(last.astype(int) - direct.astype(int)).max() <= 1
    assert not np.array_equal(got[0][2], last)  # earlier steps predict something else
    seconds = video.stats["preview_seconds"]
    step = video.timings["denoise"] / 3
    print(f"\npreview ({'tiny VAE' if tae else 'linear'}): {np.mean(seconds) * 1e3:.1f} ms each,"
          f" denoise step {step * 1e3:.1f} ms (tiny random DiT)")  # fmt: skip
    if not tae:  # even next to the tiny random DiT, the linear map is far cheaper than a step
        assert np.mean(seconds) < step / 3


def test_tiny_vae_preview_equals_its_decode(tiny_pipe, tmp_path):
    from wanlite import Options
    from wanlite.pipeline import Pipeline

    file = write_random_taehv(tmp_path / "taew2_1.pth")
    opts = Options(device="cpu", dtype="float32", decoder="taew2_1", tae=str(file))
    pipe = Pipeline(tiny_pipe.path, opts)
    got, on_preview = _collect()
    kw = dict(num_inference_steps=4, seed=2, progress=False)
    video = pipe.generate(
        "a cat", 32, 32, num_frames=9, preview_every=2, on_preview=on_preview, **kw
    )  # noqa: E501
    assert [s for s, _, _ in got] == [1, 3]  # every 2nd step
    assert np.abs(got[-1][2].astype(int) - video.frames.astype(int)).max() <= 1


def test_bad_preview_every_fails_before_work(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "encode_texts", lambda *a, **k: pytest.fail("work started"))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="preview_every"):
            tiny_pipe.generate("x", 16, 16, num_frames=1, num_inference_steps=1,
                               preview_every=bad, on_preview=lambda *a: None)  # fmt: skip


# -- images --------------------------------------------------------------------------------------


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(
        np.uint8
    )


def test_png_roundtrip_and_atomic_write(tmp_path):
    img = _gradient(37, 53)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(img)))), img)
    path = tmp_path / "p.png"
    path.write_bytes(b"old")
    write_png(path, img)
    assert np.array_equal(np.asarray(Image.open(path)), img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]  # no temp file left
    with pytest.raises(ValueError):
        encode_png(img.astype(np.float32))


def test_contact_sheet_and_resize():
    frames = np.stack([np.full((60, 80, 3), 10 * i, np.uint8) for i in range(9)])
    sheet = contact_sheet(frames, count=4, max_side=40)
    assert sheet.shape == (30, 4 * 40 + 3 * 2, 3)
    assert [sheet[0, k * 42, 0] for k in range(4)] == [0, 30, 50, 80]  # frames 0, 3, 5, 8
    assert (sheet[:, 40:42] == 0).all()  # the gap
    assert contact_sheet(frames[:1]).shape == (60, 80, 3)  # small frames are not enlarged
    assert resize(_gradient(300, 100), 256).shape == (256, 85, 3)


def test_jpeg_data_url_is_small_and_faithful():
    frames = np.stack([_gradient(481, 641)] * 3)
    url = data_url(frames, max_side=256)
    assert url.startswith("data:image/jpeg;base64,")
    data = base64.b64decode(url.split(",", 1)[1])
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert img.shape == (192, 256, 3) and len(data) < 40_000
    ref = resize(frames[1], 256)[:192, :256]
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 6
    tiny = data_url(np.zeros((1, 1, 1, 3), np.uint8))  # odd and 1-pixel sizes still encode
    assert Image.open(io.BytesIO(base64.b64decode(tiny.split(",", 1)[1]))).size == (2, 2)


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_preview_png(tmp_path, capsys):
    from wanlite.cli import main

    png, out = tmp_path / "live.png", tmp_path / "o.mp4"
    argv = ["generate", "--model", "random:tiny", "--prompt", "a fox", "--height", "48"]
    argv += ["--width", "64", "--num-frames", "9", "--num-inference-steps", "4", "--seed", "1"]
    argv += ["--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out)]
    assert main([*argv, "--preview", str(png), "--preview-every", "2"]) == 0
    sheet = np.asarray(Image.open(png))
    assert sheet.shape == (48, 3 * 64 + 2 * 2, 3)  # 3 latent frames side by side
    assert "previews: 2 to" in capsys.readouterr().out
    assert main([*argv, "--preview", str(tmp_path / "x.jpg")]) == 2
    assert "--preview must be a .png path" in capsys.readouterr().err
