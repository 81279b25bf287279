import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import wanlite
from wanlite.frames import model_label
from wanlite.video import (
    Video,
    made_by,
    move_into_place,
    pixel_format,
    read_metadata,
    read_mp4,
)


@pytest.mark.parametrize("h,w", [(32, 48), (33, 17), (1, 1), (1, 640), (480, 640)])
def test_save_keeps_exact_size_and_frame_count(tmp_path, h, w):
    rng = np.random.default_rng(0)
    # Smooth frames so that lossy coding is close to the input.
    base = rng.integers(0, 255, (1, 1, 1, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(np.repeat(base, 5, 0), h, 1), w, 2)
    path = Video(frames, seed=1).save(tmp_path / "sub" / "v.mp4")
    back = read_mp4(path)
    assert back.shape == (5, h, w, 3)
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 4
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]  # no temp file left


def test_pixel_format_only_444_for_odd_sizes():
    assert pixel_format(480, 640) == "yuv420p"
    assert pixel_format(481, 640) == "yuv444p"
    assert pixel_format(480, 1) == "yuv444p"


def test_failed_write_leaves_nothing(tmp_path):
    bad = np.zeros((2, 8, 8), np.uint8)  # missing channel axis: the encoder refuses it
    with pytest.raises(Exception):  # noqa: B017 - PyAV raises its own types
        Video(bad, seed=0).save(tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_gets_the_usual_mode_under_the_umask(tmp_path, umask):
    """Written through a 0600 temp file, the MP4 still gets 0666 & ~umask, like open()."""
    import os

    old = os.umask(umask)
    try:
        path = Video(np.zeros((1, 8, 8, 3), np.uint8), seed=0).save(tmp_path / f"{umask}.mp4")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask


# -- metadata: how the video was made, in the MP4's tags -------------------------------------------
def _frames(n=2, h=8, w=8):
    return np.zeros((n, h, w, 3), np.uint8)


def test_metadata_round_trips_through_the_mp4_tags(tmp_path):
    import av

    request = dict(prompt="un chat 猫, été", height=8, width=8, negative_prompt=" ")
    request |= dict(num_inference_steps=4, num_frames=2, guidance_scale=5.0, seed=None)
    meta = made_by(request, 1234, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert meta["seed"] == 1234 and meta["wanlite"] == wanlite.__version__
    path = Video(_frames(), seed=1234, metadata=meta).save(tmp_path / "v.mp4")
    assert read_metadata(path) == meta
    with av.open(str(path)) as container:
        tags = dict(container.metadata)
    assert tags["title"] == "un chat 猫, été"
    assert json.loads(tags["comment"])["model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_a_video_without_metadata_writes_no_tags(tmp_path):
    import av

    path = Video(_frames(), seed=0).save(tmp_path / "v.mp4")
    assert read_metadata(path) == {}
    with av.open(str(path)) as container:
        assert "comment" not in container.metadata and "title" not in container.metadata


def test_save_without_overwrite_refuses_an_existing_file(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        Video(_frames(), seed=0).save(path, overwrite=False)
    assert path.read_bytes() == b"keep me" and list(tmp_path.iterdir()) == [path]
    Video(_frames(), seed=0).save(path)  # the default replaces, as open(path, "w") does
    assert read_mp4(path).shape == (2, 8, 8, 3)


def test_move_into_place_without_overwrite_keeps_both_files(tmp_path):
    src, dst = tmp_path / "new", tmp_path / "old"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        move_into_place(src, dst, overwrite=False)
    assert (src.read_bytes(), dst.read_bytes()) == (b"new", b"old")
    move_into_place(src, tmp_path / "free", overwrite=False)
    assert (tmp_path / "free").read_bytes() == b"new" and not src.exists()
    move_into_place(tmp_path / "free", dst)
    assert dst.read_bytes() == b"new"


def test_the_pipeline_fills_metadata_and_writes_it(tiny_pipe, tiny_checkpoint, tmp_path):
    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=1, guidance_scale=2.0)
    video = tiny_pipe.generate("a boat", progress=False, **kw)  # seed drawn: recorded
    assert video.metadata == {
        "prompt": "a boat",
        "height": 16,
        "width": 16,
        "negative_prompt": " ",
        "num_inference_steps": 1,
        "num_frames": 1,
        "guidance_scale": 2.0,
        "seed": video.seed,
        "model": tiny_checkpoint.name,
        "wanlite": wanlite.__version__,
    }
    assert read_metadata(video.save(tmp_path / "a.mp4")) == video.metadata
    streamed = tiny_pipe.generate(
        "a boat", seed=3, progress=False, save_to=tmp_path / "b.mp4", **kw
    )
    assert read_metadata(streamed.path) == streamed.metadata and streamed.metadata["seed"] == 3


def test_model_label_names_hub_ids_and_files_without_their_folders():
    hub = Path("/home/u/.cache/huggingface/hub/models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers")
    source = SimpleNamespace(folder=hub / "snapshots" / "0123abc", files={})
    assert model_label(source) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    files = {"transformer": Path("/data/private/wan2.1_t2v_1.3B_fp16.safetensors")}
    source = SimpleNamespace(folder=Path("/data/private/my-wan"), files=files)
    assert model_label(source) == "my-wan + transformer=wan2.1_t2v_1.3B_fp16.safetensors"
    assert model_label(SimpleNamespace(folder=None, files=files)).startswith("transformer=wan2")
