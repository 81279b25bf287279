"""A causal model served while it grows (``wanlite.server.streaming``): the stream file's boxes
and codecs string, then real ``wanlite serve --transformer self_forcing.pt`` processes: chunk
events, the growing stream URL (partial while running, complete after), the result equal to
the streamed frames, the hosted and OpenAI routes unchanged; last, on a real Redis, a worker
killed with SIGKILL mid-stream: the reader's stream ends short and says partial, another
worker reruns the job from the start, and the result is whole.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_server import MODEL, Server, download_video  # noqa: I001 - test_server's helper

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")

from wanlite.server.streaming import codecs_of, live_name, remux, whole_boxes_end  # noqa: E402
from wanlite.video import read_mp4, write_fragmented_mp4  # noqa: E402
from wanlite.weights.random_checkpoint import (  # noqa: E402
    ensure_random_checkpoint,
    write_causal_file,
)

FPS = 16
JOB = {"height": 64, "width": 64, "num_frames": 45}  # 4 chunks: 9, 12, 12, 12 frames


def frames(n: int, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def boxes(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 8 <= len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        out.append(data[i + 4 : i + 8])
        i += n
    assert i == len(data), "a cut box"
    return out


def test_whole_boxes_stop_before_a_cut_fragment_and_the_codecs_string(tmp_path):
    path = write_fragmented_mp4(tmp_path / "f.mp4", [frames(3), frames(4, seed=1)], 32, 48)
    data = path.read_bytes()
    kinds = boxes(data)
    assert kinds[:2] == [b"ftyp", b"moov"] and kinds.count(b"moof") == 7, kinds
    with open(path, "rb") as f:
        fd = f.fileno()
        assert whole_boxes_end(fd, 0, len(data)) == len(data)
        for cut in (len(data) - 1, len(data) // 2, 9, 7, 0):  # a file cut anywhere
            end = whole_boxes_end(fd, 0, cut)
            assert end <= cut and boxes(data[:end]) == kinds[: len(boxes(data[:end]))]
            assert whole_boxes_end(fd, end, cut) == end  # nothing more until it grows
    assert whole_boxes_end(os.open(path, os.O_RDONLY), 0, 7) == 0
    # x264's High profile for 4:2:0 (0x64), High 4:4:4 for an odd size (0xf4), level byte last
    codecs = codecs_of(path)
    assert codecs.startswith("avc1.6400") and len(codecs) == 11, codecs
    odd = write_fragmented_mp4(tmp_path / "odd.mp4", [frames(2, 33, 47)], 33, 47)
    assert codecs_of(odd).startswith("avc1.f400"), codecs_of(odd)


def test_remux_keeps_every_frame_and_the_tags(tmp_path):
    src = write_fragmented_mp4(
        tmp_path / "f.mp4", [frames(5), frames(7, seed=2)], 32, 48, metadata={"prompt": "a fox"}
    )
    remux(src, tmp_path / "r.mp4")
    assert np.array_equal(read_mp4(tmp_path / "r.mp4"), read_mp4(src))
    assert oct((tmp_path / "r.mp4").stat().st_mode & 0o777) == "0o600"
    import av

    with av.open(str(tmp_path / "r.mp4")) as c:
        assert c.metadata.get("title") == "a fox"
        assert abs(c.duration / 1e6 - 12 / FPS) < 0.5 / FPS  # an ordinary MP4's duration
    assert not list(tmp_path.glob(".*.part"))


class Events:
    """The SSE events of a server, collected by a thread."""

    def __init__(self, server: Server):
        import json

        self.events: list[tuple[str, dict]] = []
        resp = server.req("GET", "/api/events", stream=True)

        def read() -> None:
            name = None
            try:
                for line in resp.iter_lines(decode_unicode=True):
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((name, json.loads(line[6:])))
            except Exception:  # noqa: BLE001 - the stream ends with the server
                pass

        threading.Thread(target=read, daemon=True).start()

    def of(self, gen_id: str, name: str) -> list[dict]:
        return [d for n, d in self.events if n == name and d["generation_id"] == gen_id]

    def wait_for(self, gen_id: str, name: str, timeout: float = 120, count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.of(gen_id, name)
            if len(got) >= count:
                return got[count - 1]
            time.sleep(0.02)
        pytest.fail(f"no {name} event for {gen_id}: {self.events[-5:]}")


def read_stream(url: str, out: dict) -> None:
    """Read a stream URL to its end into ``out`` (headers, bytes, how it ended)."""
    try:
        with requests.get(url, stream=True, timeout=60) as r:
            out["status"], out["headers"] = r.status_code, dict(r.headers)
            out["data"] = b""
            for part in r.iter_content(None):
                out["data"] += part
        out["ended"] = "clean"
    except requests.RequestException as e:
        out["ended"] = f"error: {type(e).__name__}"


@pytest.fixture(scope="module")
def causal_server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    causal = write_causal_file(tiny_checkpoint, folder / "self_forcing.pt")
    extra = ("--transformer", str(causal), "--limit-concurrency", "6")
    s = Server(folder / "data", extra=extra).start().wait_ready()
    yield s
    s.stop()


def test_chunks_are_published_and_served_while_the_job_runs(causal_server, tmp_path):
    s = causal_server
    model = s.req("GET", f"/api/ai/models/{MODEL}").json()
    assert model["streaming"] is True and model["ready"] is True
    events = Events(s)
    gen_id = s.enqueue(**JOB, seed=5)[0]
    first = events.wait_for(gen_id, "media_generation_chunk")
    assert (first["frames"], first["num_frames"], first["status"]) == (9, 45, "processing")
    assert first["codecs"].startswith("avc1.64"), first
    url = first["stream_url"]
    assert url.startswith(f"{s.base}/api/ai/results/{gen_id}.stream.mp4?expires="), url
    partial: dict = {}
    reader = threading.Thread(target=read_stream, args=(url, partial))
    reader.start()  # no key: the link is signed
    bare = url.split("?")[0]
    assert requests.get(bare, timeout=10).status_code == 401  # the signature is needed
    assert s.req("HEAD", bare.removeprefix(s.base)).headers["x-wanlite-stream"] == "partial"
    done = events.wait_for(gen_id, "media_generation_completed")
    reader.join(60)
    assert done["status"] == "succeeded", done
    assert partial["status"] == 200 and partial["ended"] == "clean", partial.get("ended")
    assert partial["headers"]["x-wanlite-stream"] == "partial"
    assert "content-length" not in {k.lower() for k in partial["headers"]}  # it grew
    chunks = events.of(gen_id, "media_generation_chunk")
    assert [c["frames"] for c in chunks] == [9, 21, 33, 45], chunks
    steps = [c["step"] for c in chunks]
    assert steps == sorted(steps) and steps[-1] == chunks[-1]["total"], steps
    # the streamed bytes are whole boxes and the very frames of the finished result
    kinds = boxes(partial["data"])
    assert kinds[:2] == [b"ftyp", b"moov"] and kinds.count(b"moof") == 45, kinds[:6]
    (tmp_path / "streamed.mp4").write_bytes(partial["data"])
    result = download_video(done["result_url"], tmp_path)
    streamed = read_mp4(tmp_path / "streamed.mp4")
    assert streamed.shape == (45, 64, 64, 3) and np.array_equal(streamed, result)
    # after the end: the same URL serves the finished file; the live file is gone
    r = requests.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["x-wanlite-stream"] == "complete"
    assert int(r.headers["content-length"]) == len(r.content) and r.content[4:8] == b"ftyp"
    results = s.data_dir / "results"
    assert not (results / live_name(gen_id)).exists()
    assert oct((results / f"{gen_id}.mp4").stat().st_mode & 0o777) == "0o600"
    st = s.status(gen_id)
    assert st["stream_url"] is None and st["progress"]["step"] == st["progress"]["total"], st


def test_streams_that_do_not_exist_and_the_hosted_routes_unchanged(causal_server, tmp_path):
    s = causal_server
    r = s.req("GET", "/api/ai/results/00000000-0000-4000-8000-000000000000.stream.mp4")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    # the sync call and OpenAI's create on a causal model: the whole video, as before
    body = {"model": MODEL, "prompt": "a fox", **JOB, "num_frames": 17}
    r = s.req("POST", "/api/ai/videos/generate", json=body)
    assert r.status_code == 200, r.text
    v = r.json()["videos"][0]
    assert read_mp4_bytes(requests.get(v["url"], timeout=30).content, tmp_path).shape[0] == 17
    r = s.req("POST", "/v1/videos", json={"prompt": "a fox", "size": "64x64", "seconds": "1"})
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    deadline = time.monotonic() + 120
    while s.req("GET", f"/v1/videos/{vid}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    content = s.req("GET", f"/v1/videos/{vid}/content").content
    assert read_mp4_bytes(content, tmp_path).shape[0] == 17
    # a cancelled stream: its live file goes, its URL is a 404
    events = Events(s)
    gen_id = s.enqueue(**{**JOB, "height": 128, "width": 128, "num_frames": 120})[0]
    events.wait_for(gen_id, "media_generation_chunk")
    assert s.req("POST", f"/api/ai/queue/{gen_id}/cancel").status_code == 200
    assert s.wait(gen_id)["status"] == "cancelled"
    assert s.req("GET", f"/api/ai/results/{gen_id}.stream.mp4").status_code == 404
    assert not (s.data_dir / "results" / live_name(gen_id)).exists()


def test_a_reader_that_leaves_frees_its_place(causal_server):
    """Streams are long-lived requests (``--limit-concurrency 6`` here, two event streams of
    the tests before open): ten readers that hang up one after another all get in, so each
    one's place was given back when it left, not when the job ended."""
    s = causal_server
    events = Events(s)
    gen_id = s.enqueue(height=128, width=128, num_frames=120)[0]
    url = events.wait_for(gen_id, "media_generation_chunk")["stream_url"]
    for _ in range(10):
        with requests.get(url, stream=True, timeout=30) as r:
            assert r.status_code == 200, r.text
            assert next(r.iter_content(1000))[4:8] == b"ftyp"
    assert s.status(gen_id)["status"] == "processing"
    assert s.req("POST", f"/api/ai/queue/{gen_id}/cancel").status_code == 200
    assert s.wait(gen_id)["status"] == "cancelled"


def test_a_server_killed_mid_stream_never_serves_a_cut_file_as_finished(tiny_checkpoint, tmp_path):
    """SQLite: SIGKILL the server while a client reads the stream: the body is cut (a broken
    chunked transfer, not a clean end) and was marked partial; after the restart the job is
    failed (as any job a crash interrupted), its live file is gone and its URLs are 404s."""
    causal = write_causal_file(tiny_checkpoint, tmp_path / "self_forcing.pt")
    s = Server(tmp_path / "data", extra=("--transformer", str(causal))).start().wait_ready()
    events = Events(s)
    gen_id = s.enqueue(height=128, width=128, num_frames=120)[0]
    first = events.wait_for(gen_id, "media_generation_chunk")
    cut: dict = {}
    reader = threading.Thread(target=read_stream, args=(first["stream_url"], cut))
    reader.start()
    time.sleep(0.5)
    s.kill()
    reader.join(60)
    assert cut["headers"]["x-wanlite-stream"] == "partial"
    assert cut["ended"].startswith("error"), cut["ended"]  # never a clean, "whole" end
    s.start().wait_ready()
    try:
        d = s.status(gen_id)
        assert d["status"] == "failed" and "restarted" in d["error_message"], d
        assert d["result_url"] is None and d["stream_url"] is None
        assert s.req("GET", f"/api/ai/results/{gen_id}.stream.mp4").status_code == 404
        assert not list((s.data_dir / "results").glob(".*.part"))
    finally:
        s.stop()


def read_mp4_bytes(data: bytes, tmp_path: Path) -> np.ndarray:
    path = tmp_path / f"v{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    return read_mp4(path)


def test_a_worker_killed_mid_stream_reruns_and_the_result_is_whole(tmp_path):
    """Real Redis: two ``wanlite worker`` processes on the micro causal model behind one
    HTTP-only ``serve``; SIGKILL the one streaming the job: its reader's stream ends short,
    marked partial; the other reruns the job from the start; the result is whole."""
    pytest.importorskip("redis")
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from test_server_redis import RedisServer, WorkerProcess, api_server

    redis_server = RedisServer(tmp_path).start()
    causal = write_causal_file(ensure_random_checkpoint("micro"), tmp_path / "sf.pt")
    results = tmp_path / "results"
    api = api_server(tmp_path, "api", redis_server.url, results, "--workers", "0")
    workers = [WorkerProcess(tmp_path, redis_server.url, results, n) for n in ("w1", "w2")]
    for w in workers:
        w.cmd += ["--transformer", str(causal)]
    try:
        api.start()
        for w in workers:
            w.start()
        api.wait_ready(timeout=300)
        events = Events(api)
        job = {"height": 128, "width": 128, "num_frames": 120, "seed": 11}
        gen_id = api.enqueue(**job)[0]
        first = events.wait_for(gen_id, "media_generation_chunk", timeout=120)
        partial: dict = {}
        reader = threading.Thread(target=read_stream, args=(first["stream_url"], partial))
        reader.start()
        time.sleep(0.3)
        runner = next(w for w in workers if w.ran(gen_id))
        other = next(w for w in workers if w is not runner)
        runner.proc.kill()  # kill -9 mid-stream
        runner.proc.wait(10)
        assert api.status(gen_id)["status"] == "processing"  # not finished, not failed
        done = events.wait_for(gen_id, "media_generation_completed", timeout=180)
        reader.join(60)
        assert done["status"] == "succeeded", done
        assert other.ran(gen_id) == 1 and other.ran(gen_id, "generation finished") == 1
        # the killed attempt's reader: a partial stream of whole boxes, ended short
        assert partial["headers"]["x-wanlite-stream"] == "partial"
        kinds = boxes(partial["data"])
        assert 0 < kinds.count(b"moof") < job["num_frames"], kinds.count(b"moof")
        # the rerun started from the start (progress 0 twice) and the result is whole
        steps = [e["step"] for e in events.of(gen_id, "media_generation_progress")]
        assert steps.count(0) == 2, steps
        frames_done = [c["frames"] for c in events.of(gen_id, "media_generation_chunk")]
        assert frames_done[-1] == 120 and frames_done.count(frames_done[0]) == 2, frames_done
        result = download_video(done["result_url"], tmp_path)
        assert result.shape == (120, 128, 128, 3)
        r = api.req("GET", f"/api/ai/results/{gen_id}.stream.mp4")
        assert r.headers["x-wanlite-stream"] == "complete" and r.content[4:8] == b"ftyp"
        assert not list(results.glob(".*.live.mp4.part"))
    finally:
        for w in workers:
            w.stop()
        api.stop()
        redis_server.kill()
