"""OpenAI's video API on ``wanlite serve``, driven by the official ``openai`` client against a real
server process on 127.0.0.1 with the micro random model (tiny sizes, one step via
``extra_body``).  The same jobs are checked through the hosted routes: one store, one queue.
"""

from __future__ import annotations

import io
import json
import time

import pytest

requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
av = pytest.importorskip("av")

from test_server import CLEAN_EXIT, KEY, MODEL, Server  # noqa: E402
from test_server_hardening import EVIL, raw  # noqa: E402

from wanlite.video import read_mp4  # noqa: E402

# the client marks the video API deprecated (a Sora shutdown date): not this server's concern
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ONE_STEP = {"num_inference_steps": 1}
SLOW = {"num_inference_steps": 100, "num_frames": 33}  # ~5 s on the micro model at 256x256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("openai") / "data", model="random:micro")
    s.start().wait_ready(timeout=300)
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


def decode_jpeg(data: bytes):
    with av.open(io.BytesIO(data)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_create_poll_download_thumbnail_and_delete(server, client, tmp_path):
    video = client.videos.create_and_poll(
        prompt="a red fox",
        size="32x24",
        seconds="0.25",  # 0.25 * 16 + 1 = 5 frames
        extra_body={**ONE_STEP, "seed": 11, "guidance_scale": 1.5, "negative_prompt": "blur"},
        poll_interval_ms=50,
    )
    assert video.status == "completed" and video.progress == 100, video
    assert (video.object, video.model) == ("video", MODEL)
    assert (video.size, video.seconds) == ("32x24", "0.25")
    assert video.error is None and video.completed_at >= video.created_at
    assert video.expires_at == video.completed_at + 7 * 86400  # the default --retention

    path = tmp_path / "v.mp4"
    path.write_bytes(client.videos.download_content(video.id).content)
    frames = read_mp4(path)
    assert frames.shape == (5, 24, 32, 3)
    thumb = client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.response.headers["content-type"] == "image/jpeg"
    image = decode_jpeg(thumb.content)
    assert image.shape == (24, 32, 3)
    diffs = [abs(image.astype(float) - f).mean() for f in frames]
    assert diffs[2] == min(diffs) and diffs[2] < 20, diffs  # the middle frame (noisy: JPEG loses)

    hosted = server.status(video.id)  # the same job through the hosted API
    assert hosted["status"] == "succeeded" and hosted["seed"] == 11
    assert (hosted["num_frames"], hosted["num_inference_steps"], hosted["guidance_scale"]) == (
        5,
        1,
        1.5,
    )
    assert hosted["negative_prompt"] == "blur"

    result = server.data_dir / "results" / f"{video.id}.mp4"
    assert result.is_file()
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    assert not result.exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)
    assert server.req("GET", f"/api/ai/queue/{video.id}").status_code == 404


def bad_request(client, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt=kw.pop("prompt", "a fox"), **kw)
    err = info.value.body
    assert set(err) >= {"message", "type", "param", "code"}, err
    return err


def test_bad_input_is_a_400_in_openais_shape_and_queues_nothing(server, client):
    before = len(server.all_generations())
    cases = [
        ({"size": "720x1280"}, "size", "width in [1, 640]"),
        ({"size": "32"}, "size", "WIDTHxHEIGHT"),
        ({"seconds": "8"}, "seconds", "at most 120"),
        ({"seconds": "soon"}, "seconds", "'soon'"),
        ({"model": "sora-2"}, "model", "'sora-2'"),
        ({"extra_body": {"num_inference_steps": "0"}}, "num_inference_steps", "[1, 100]"),
        ({"extra_body": {"guidance_scale": "lots"}}, "guidance_scale", "'lots'"),
        ({"extra_body": {"seed": "1.5"}}, "seed", "'1.5'"),
        ({"extra_body": {"upscale": "2"}}, "upscale", "unknown parameter"),
        ({"seconds": "1", "extra_body": {"num_frames": 17}}, "seconds", "not both"),
        ({"prompt": " "}, "prompt", "non-empty"),
    ]
    for kw, param, text in cases:
        err = bad_request(client, **kw)
        assert err["param"] == param and text in err["message"], (kw, err)
        assert err["type"] == "invalid_request_error"
    assert bad_request(client, model="sora-2")["code"] == "model_not_found"
    # numbers from a form are parsed, but a JSON body keeps strict types
    body = {"prompt": "x", "num_inference_steps": "1"}
    r = server.req("POST", "/v1/videos", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_inference_steps", r.text
    # a file is refused (text-to-video only)
    png = {"input_reference": b"\x89PNG"}
    r = server.req("POST", "/v1/videos", data={"prompt": "x"}, files=png)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference", r.text
    assert len(server.all_generations()) == before


def test_bad_auth_is_an_authentication_error(server):
    for key in ("wrong", KEY + "x"):
        other = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            other.videos.create(prompt="a fox", size="16x16", extra_body=ONE_STEP)
        with pytest.raises(openai.AuthenticationError):
            other.videos.list()
    r = requests.get(server.base + "/v1/videos", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_json_body_and_hosted_fields(server, client):
    body = {"model": MODEL, "prompt": "json", "width": 24, "height": 16, "num_frames": 3}
    r = server.req("POST", "/v1/videos", json={**body, **ONE_STEP, "seed": 5})
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["status"] == "queued" and video["size"] == "24x16" and video["seconds"] == "0.125"
    done = client.videos.poll(video["id"], poll_interval_ms=50)
    assert done.status == "completed"
    assert server.status(video["id"])["seed"] == 5
    # the hosted routes still refuse forms
    r = server.req("POST", "/api/ai/queue", data={"model": MODEL, "prompt": "x"}, files={"a": b""})
    assert r.status_code == 415


def test_statuses_progress_and_delete_while_running(server, client):
    running = client.videos.create(prompt="slow", size="256x256", extra_body=SLOW)
    waiting = client.videos.create(prompt="next", size="16x16", seconds="0", extra_body=ONE_STEP)
    assert waiting.seconds == "0" and waiting.status == "queued" and waiting.progress == 0
    server.wait(running.id, until={"processing"}, step=2)
    v = client.videos.retrieve(running.id)
    assert v.status == "in_progress" and 1 <= v.progress <= 99, v
    assert client.videos.retrieve(waiting.id).status == "queued"
    with pytest.raises(openai.ConflictError):  # no content before it is completed
        client.videos.download_content(running.id)
    client.videos.delete(running.id)  # stops it at its next step
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(running.id)
    assert client.videos.poll(waiting.id, poll_interval_ms=50).status == "completed"
    assert not (server.data_dir / "results" / f"{running.id}.mp4").exists()
    assert not [r for r in server.log_records() if r["msg"] == "worker error"]

    cancelled = client.videos.create(prompt="c", size="256x256", extra_body=SLOW)
    assert server.req("DELETE", f"/api/ai/queue/{cancelled.id}").status_code == 200
    v = client.videos.poll(cancelled.id, poll_interval_ms=50)
    assert v.status == "failed" and v.error.code == "cancelled", v


def test_list_pages_with_after_limit_and_order(server, client):
    ids = [
        client.videos.create(prompt=f"p{i}", size="16x16", seconds="0", extra_body=ONE_STEP).id
        for i in range(3)
    ]
    page = client.videos.list(limit=2)  # newest first
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    rest = client.videos.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == ids[0]
    newest = [v.id for v in client.videos.list(limit=2)]  # the client follows the cursor
    assert newest[:3] == ids[::-1] and len(newest) == len(set(newest))
    oldest_first = [v.id for v in client.videos.list(limit=2, order="asc")]
    assert oldest_first == newest[::-1]
    assert set(newest) >= {g["generation_id"] for g in server.all_generations()}
    for query in ("limit=0", "limit=101", "order=up", "after=nope"):
        r = server.req("GET", f"/v1/videos?{query}")
        assert r.status_code == 400, (query, r.text)
    for i in ids:
        client.videos.poll(i, poll_interval_ms=50)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("openai-open") / "data", model="random:micro", key=None)
    s.start().wait_ready(timeout=300)
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


def form(fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body, as a browser's <form enctype="multipart/form-data"> sends."""
    boundary = "----wanliteformboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_cross_site_forms_are_refused_on_a_keyless_server(open_server):
    s = open_server
    body, headers = form({"prompt": "csrf", "size": "16x16", "seconds": "0", **ONE_STEP})
    for extra in ({"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        status, _, out = raw(s, "POST", "/v1/videos", body, {**headers, **extra})
        assert status == 403, (extra, out)
    assert raw(s, "GET", "/v1/videos", headers={"Origin": EVIL})[0] == 403
    assert raw(s, "GET", "/v1/videos")[2].count(b'"id"') == 0  # nothing was queued
    # the same form from a non-browser client (or the same origin) is served
    same = {"Origin": f"http://127.0.0.1:{s.port}", "Sec-Fetch-Site": "same-origin"}
    status, _, out = raw(s, "POST", "/v1/videos", body, {**headers, **same})
    assert status == 200, out
    video = json.loads(out)
    assert video["size"] == "16x16" and video["seconds"] == "0"
    deadline = time.monotonic() + 60
    while s.status(video["id"])["status"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.status(video["id"])["status"] == "succeeded"
    # a form is still no JSON for the hosted routes, and text/plain none for this one
    assert raw(s, "POST", "/api/ai/queue", body, headers)[0] == 415
    status, _, out = raw(s, "POST", "/v1/videos", b'{"prompt":"x"}', {"Content-Type": "text/plain"})
    assert status == 415, out
