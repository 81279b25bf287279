import numpy as np
import pytest

from wanlite.video import Video, pixel_format, read_mp4


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
