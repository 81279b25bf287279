"""``limits="model"`` (issue 21, section 5) through the CLI and a real server process: the wider
ranges (height and width 1-1280, frames 1-1001) only when asked for, the hosted schema exactly
otherwise.  The library side is in test_params.py and test_pipeline.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_server import CLEAN_EXIT, MODEL, Server, download_video  # noqa: E402

from wanlite.cli import main  # noqa: E402
from wanlite.params import json_schema  # noqa: E402
from wanlite.video import read_mp4  # noqa: E402

TALL = ["--height", "496", "--width", "16", "--num-frames", "2", "--num-inference-steps", "1"]


def test_cli_generate_with_model_limits(tmp_path, tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "a cat", *TALL]
    base += ["--seed", "1", "--device", "cpu", "--dtype", "float32"]
    assert main([*base, "--out", str(tmp_path / "hosted.mp4")]) == 2  # 496 > 480: refused
    err = capsys.readouterr().err
    assert "height must be an integer in [1, 480], got 496" in err
    assert not (tmp_path / "hosted.mp4").exists()
    out = tmp_path / "model.mp4"
    assert main([*base, "--out", str(out), "--limits", "model"]) == 0
    assert read_mp4(out).shape == (2, 496, 16, 3)
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--limits", "model", "--height", "1281"]) == 2
    assert "height must be an integer in [1, 1280], got 1281" in capsys.readouterr().err


def test_cli_schema_with_model_limits(capsys):
    assert main(["schema", "--limits", "model"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema("model")
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema("hosted")


@pytest.fixture(scope="module")
def model_server(tiny_checkpoint, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve-limits") / "data"
    s = Server(data, extra=("--limits", "model")).start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


def test_served_schema_shows_the_wider_ranges(model_server):
    model = model_server.req("GET", f"/api/ai/models/{MODEL}").json()
    assert model["json_request_schema"] == json_schema("model") != json_schema()
    props = model["json_request_schema"]["properties"]
    assert (props["height"]["maximum"], props["width"]["maximum"]) == (1280, 1280)
    assert props["num_frames"]["maximum"] == 1001 and props["num_inference_steps"]["maximum"] == 100
    listed = model_server.req("GET", "/api/ai/models").json()["data"][0]
    assert listed["json_request_schema"] == json_schema("model")


def test_server_generates_beyond_the_hosted_ranges(model_server, tmp_path):
    [gen_id] = model_server.enqueue(height=496, width=16, num_frames=2, num_inference_steps=1)
    d = model_server.wait(gen_id)
    assert d["status"] == "succeeded", d
    assert download_video(d["result_url"], tmp_path).shape == (2, 496, 16, 3)


@pytest.mark.parametrize(
    "path,body,param,text",
    [
        ("/api/ai/queue", {"height": 1281}, "height", "height must be an integer in [1, 1280]"),
        ("/api/ai/queue", {"num_frames": 1002}, "num_frames", "[1, 1001], got 1002"),
        ("/api/ai/queue", {"num_inference_steps": 101}, "num_inference_steps", "[1, 100]"),
        ("/v1/videos", {"size": "1281x16"}, "size", "width in [1, 1280]"),
        ("/v1/videos", {"seconds": "63"}, "seconds", "[0, 62.5] (frames = seconds*16+1"),
    ],
)
def test_server_errors_name_the_field_and_the_active_range(model_server, path, body, param, text):
    r = model_server.req("POST", path, json={"model": MODEL, "prompt": "a fox", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"], error
