# ruff: noqa: E501  (the hosted page's examples below are kept verbatim, long lines included)
"""``wanlite serve`` end to end: a real server process on 127.0.0.1 with the tiny random model.

The hosted page's Python examples run unchanged except for the base URL: the "All parameters"
ones (sync, async polling, SSE) with small sizes in place of the defaults (and a shorter poll
interval), and the minimal sync one exactly as written, defaults included (480x640, 81 frames,
30 steps; marked slow: it takes minutes on 2 CPU cores even with the tiny model).
"""

from __future__ import annotations

import ast
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from wanlite.params import json_schema  # noqa: E402
from wanlite.video import read_mp4  # noqa: E402

MODEL = "wan-ai-wan2-1-t2v-1-3b-diffusers"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
SMALL = {"height": 16, "width": 16, "num_frames": 2, "num_inference_steps": 1}
LONG = {"height": 256, "width": 256, "num_frames": 33, "num_inference_steps": 100}  # ~0.5 s/step
TERMINAL = {"succeeded", "failed", "cancelled"}
NO_SUCH_ID = "00000000-0000-4000-8000-000000000000"
CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn shuts down cleanly, then re-raises SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m wanlite.server`` subprocess with its own data dir and log file."""

    def __init__(
        self,
        data_dir: Path,
        max_queue: int = 25,
        port: int | None = None,
        model="random:tiny",
        key: str | None = KEY,
        extra: tuple[str, ...] = (),
        preexec_fn=None,
    ):
        self.data_dir, self.max_queue, self.model = Path(data_dir), max_queue, model
        self.key, self.extra, self.preexec_fn = key, tuple(extra), preexec_fn
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "wanlite.server", "--model", self.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        cmd += ["--data-dir", str(self.data_dir), "--max-queue", str(self.max_queue)]
        cmd += ["--api-key", self.key] if self.key else []
        cmd += ["--threads", "1"]  # tiny tensors: one thread is many times faster on 2 busy cores
        cmd += self.extra
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        env = {k: v for k, v in os.environ.items() if k != "WANLITE_API_KEY"}
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=self.preexec_fn
        )
        log.close()
        return self

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def log_records(self) -> list[dict]:
        """The JSON log lines so far (other lines, e.g. a crash's traceback, are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.base + "/ready", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    # -- client helpers ---------------------------------------------------------------------
    def req(self, method: str, path: str, auth: bool = True, **kw) -> requests.Response:
        auth = auth and self.key is not None
        headers = {**({"Authorization": f"Bearer {self.key}"} if auth else {})}
        headers.update(kw.pop("headers", {}))
        return requests.request(method, self.base + path, headers=headers, timeout=60, **kw)

    def enqueue(self, n: int = 1, **params) -> list[str]:
        body = {"model": MODEL, "prompt": "a red fox", **SMALL, **params}
        if n != 1:
            body["num_generations"] = n
        r = self.req("POST", "/api/ai/queue", json=body)
        assert r.status_code == 200, r.text
        gens = r.json()["generations"]
        assert [g["status"] for g in gens] == ["queued"] * n
        return [g["generation_id"] for g in gens]

    def status(self, gen_id: str) -> dict:
        r = self.req("GET", f"/api/ai/queue/{gen_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, gen_id: str, until=TERMINAL, timeout: float = 120, step: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.status(gen_id)
            if d["status"] in until and d["progress"]["step"] >= step:
                return d
            time.sleep(0.05)
        pytest.fail(f"{gen_id} still {d['status']} after {timeout} s:\n{self.log_tail()}")

    def all_generations(self) -> list[dict]:
        """Every generation, result links without their query (a fresh signature each time)."""
        gens = self.req("GET", "/api/ai/queue?status=all").json()["generations"]
        for g in gens:
            g["result_url"] = g["result_url"] and g["result_url"].split("?")[0]
        return gens


def download_video(url: str, tmp_path: Path) -> object:
    """GET a result URL (no auth header: result URLs are signed) and decode it."""
    r = requests.get(url, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{time.monotonic_ns()}.mp4"
    path.write_bytes(r.content)
    return read_mp4(path)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "data").start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


@pytest.fixture
def hosted_env(monkeypatch):
    monkeypatch.setenv("OXEN_API_KEY", KEY)


def run_example(source: str, server: Server, timeout: float, **replace) -> None:
    """Run a hosted-page example with only the base URL (and the given strings) replaced."""
    source = source.replace("https://hub.oxen.ai", server.base)
    for old, new in replace.items():
        assert old in source
        source = source.replace(old, new)
    errors: list[BaseException] = []

    def target():
        try:
            exec(compile(source, "hosted-example", "exec"), {"__name__": "hosted_example"})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the example did not finish in {timeout} s"
    if errors:
        raise errors[0]


# --- the hosted page's Python examples, verbatim ---------------------------------------------

SYNC_MINIMAL = """
import os
import requests

response = requests.post(
    "https://hub.oxen.ai/api/ai/videos/generate",
    headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {os.environ['OXEN_API_KEY']}",
    },
    json={
        "model": "wan-ai-wan2-1-t2v-1-3b-diffusers",
        "prompt": "A beautiful landscape painting of a serene lake with mountains in the background and an ox in the foreground."
    },
)
response.raise_for_status()
print(response.json())
"""

SYNC_ALL_PARAMETERS = """
import os
import requests

response = requests.post(
    "https://hub.oxen.ai/api/ai/videos/generate",
    headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {os.environ['OXEN_API_KEY']}",
    },
    json={
        "model": "wan-ai-wan2-1-t2v-1-3b-diffusers",
        "prompt": "A beautiful landscape painting of a serene lake with mountains in the background and an ox in the foreground.",
        "height": 480,
        "width": 640,
        "negative_prompt": " ",
        "num_inference_steps": 30,
        "num_frames": 81,
        "guidance_scale": 5.0
    },
)
response.raise_for_status()
print(response.json())
"""

ASYNC_ALL_PARAMETERS = """
import os
import time
import requests

HEADERS = {
    "Content-Type": "application/json",
    "Authorization": f"Bearer {os.environ['OXEN_API_KEY']}",
}

enqueue = requests.post(
    "https://hub.oxen.ai/api/ai/queue",
    headers=HEADERS,
    json={
        "model": "wan-ai-wan2-1-t2v-1-3b-diffusers",
        "prompt": "A beautiful landscape painting of a serene lake with mountains in the background and an ox in the foreground.",
        "height": 480,
        "width": 640,
        "negative_prompt": " ",
        "num_inference_steps": 30,
        "num_frames": 81,
        "guidance_scale": 5.0
    },
)
enqueue.raise_for_status()
generation_id = enqueue.json()["generations"][0]["generation_id"]

while True:
    data = requests.get(
        f"https://hub.oxen.ai/api/ai/queue/{generation_id}",
        headers=HEADERS,
    ).json()
    if data["status"] in {"succeeded", "failed", "cancelled"}:
        break
    time.sleep(5)

if data["status"] == "succeeded":
    print(f"Result: {data['result_url']}")
else:
    print(f"Generation {data['status']}: {data.get('error_message')}")
"""

SSE_ALL_PARAMETERS = """
import json
import os
import requests

API_KEY = os.environ["OXEN_API_KEY"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}

enqueue = requests.post(
    "https://hub.oxen.ai/api/ai/queue",
    headers={**AUTH, "Content-Type": "application/json"},
    json={
        "model": "wan-ai-wan2-1-t2v-1-3b-diffusers",
        "prompt": "A beautiful landscape painting of a serene lake with mountains in the background and an ox in the foreground.",
        "height": 480,
        "width": 640,
        "negative_prompt": " ",
        "num_inference_steps": 30,
        "num_frames": 81,
        "guidance_scale": 5.0
    },
)
enqueue.raise_for_status()
generation_id = enqueue.json()["generations"][0]["generation_id"]

with requests.get(
    "https://hub.oxen.ai/api/events",
    headers=AUTH,
    stream=True,
) as stream:
    event_name = None
    for line in stream.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event_name = line.removeprefix("event: ")
        elif line.startswith("data: ") and event_name == "media_generation_completed":
            payload = json.loads(line.removeprefix("data: "))
            if payload.get("generation_id") == generation_id:
                print(payload)
                break
"""

# Small sizes for the async and SSE examples: the same code, other numbers.
SMALL_EXAMPLE = {
    '"height": 480': '"height": 24',
    '"width": 640': '"width": 32',
    '"num_inference_steps": 30': '"num_inference_steps": 2',
    '"num_frames": 81': '"num_frames": 5',
}


@pytest.fixture(scope="module")
def micro_server(tmp_path_factory):
    # The defaults (480x640, 81 frames, 30 steps) take ~13 min with the tiny model on 2 cores;
    # the micro model runs the same pipeline with the smallest shapes.
    s = Server(tmp_path_factory.mktemp("serve-micro") / "data", model="random:micro")
    s.start().wait_ready(timeout=300)
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


def test_hosted_sync_minimal_example_with_defaults(micro_server, hosted_env, capsys, tmp_path):
    server = micro_server
    t0 = time.perf_counter()
    run_example(SYNC_MINIMAL, server, timeout=3600)
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    result = ast.literal_eval(out.strip())  # the example prints the response's dict
    video = result["videos"][0]
    assert result["model"] == MODEL and isinstance(result["created"], int)
    frames = download_video(video["url"], tmp_path)
    assert frames.shape == (81, 480, 640, 3)
    d = server.status(video["generation_id"])
    assert (d["height"], d["width"], d["num_frames"], d["num_inference_steps"]) == (
        480,
        640,
        81,
        30,
    )
    assert d["guidance_scale"] == 5.0 and d["seed"] == video["seed"]
    with capsys.disabled():
        print(f"\n[sync minimal example, 480x640, 81 frames, 30 steps: {seconds:.1f} s]")


def test_hosted_sync_example(server, hosted_env, capsys, tmp_path):
    run_example(SYNC_ALL_PARAMETERS, server, 120, **SMALL_EXAMPLE)
    result = ast.literal_eval(capsys.readouterr().out.strip())
    assert result["model"] == MODEL and isinstance(result["created"], int)
    video = result["videos"][0]
    assert download_video(video["url"], tmp_path).shape == (5, 24, 32, 3)
    d = server.status(video["generation_id"])
    assert d["status"] == "succeeded" and d["seed"] == video["seed"]
    assert d["parameters"]["seed"] is None  # none requested; the one used is in "seed"
    assert d["num_inference_steps"] == 2 and d["guidance_scale"] == 5.0


def test_hosted_async_polling_example(server, hosted_env, capsys, tmp_path):
    run_example(
        ASYNC_ALL_PARAMETERS, server, 120, **SMALL_EXAMPLE, **{"time.sleep(5)": "time.sleep(0.2)"}
    )
    out = capsys.readouterr().out.strip()
    assert out.startswith("Result: "), out
    assert download_video(out.removeprefix("Result: "), tmp_path).shape == (5, 24, 32, 3)


def test_hosted_sse_example(server, hosted_env, capsys, tmp_path):
    run_example(SSE_ALL_PARAMETERS, server, 120, **SMALL_EXAMPLE)
    payload = ast.literal_eval(capsys.readouterr().out.strip())
    assert payload["status"] == "succeeded"
    assert download_video(payload["result_url"], tmp_path).shape == (5, 24, 32, 3)


# --- more of the API ---------------------------------------------------------------------------


def test_health_ready_and_models(server):
    assert server.req("GET", "/health", auth=False).json() == {"status": "ok"}
    assert server.req("GET", "/ready", auth=False).json()["status"] == "ready"
    r = server.req("GET", f"/api/ai/models/{MODEL}")
    assert r.status_code == 200
    model = r.json()
    assert model["id"] == MODEL and model["json_request_schema"] == json_schema()
    assert server.req("GET", "/api/ai/models").json()["data"] == [model]
    r = server.req("GET", "/api/ai/models/some-other-model")
    assert r.status_code == 404 and "some-other-model" in r.json()["error"]["message"]
    jsonschema = pytest.importorskip("jsonschema")
    schema = model["json_request_schema"]
    jsonschema.validate({"prompt": "a fox", **SMALL}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"prompt": "a fox", "height": 481}, schema)


def test_sync_b64_json(server):
    body = {"model": MODEL, "prompt": "a fox", **SMALL, "seed": 7, "response_format": "b64_json"}
    r = server.req("POST", "/api/ai/videos/generate", json=body)
    assert r.status_code == 200, r.text
    video = r.json()["videos"][0]
    assert video["seed"] == 7 and "url" not in video
    assert base64.b64decode(video["b64_json"])[4:8] == b"ftyp"  # an MP4


def test_twenty_concurrent_enqueues(server, tmp_path):
    sizes = [(16, 16, 1, 1), (24, 32, 5, 2), (17, 23, 3, 1), (32, 16, 2, 2)]
    jobs = [sizes[i % len(sizes)] for i in range(20)]

    def submit(job):
        h, w, f, s = job
        return server.enqueue(height=h, width=w, num_frames=f, num_inference_steps=s)[0]

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(submit, jobs))
    assert len(set(ids)) == 20
    for gen_id, (h, w, f, s) in zip(ids, jobs):
        d = server.wait(gen_id, timeout=180)
        assert d["status"] == "succeeded", d
        assert d["progress"] == {"step": s, "total": s}
        assert d["started_at"] >= d["enqueued_at"] and d["completed_at"] >= d["started_at"]
        assert download_video(d["result_url"], tmp_path).shape == (f, h, w, 3)


def test_cancel_queued_and_running(server):
    events: list[tuple[str, dict]] = []
    stop = threading.Event()
    stream = requests.get(server.base + "/api/events", headers=AUTH, stream=True, timeout=60)

    def listen():  # closes the stream itself: a close from another thread would block
        name = None
        with stream:
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                if stop.is_set():
                    break

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    running = server.enqueue(**LONG)[0]
    queued = server.enqueue()[0]
    server.wait(running, until={"processing"}, step=1)
    for path in ("/health", "/api/ai/queue", f"/api/ai/queue/{running}", "/api/ai/models"):
        t0 = time.monotonic()  # the HTTP side stays responsive while a video renders
        assert server.req("GET", path).status_code == 200
        assert time.monotonic() - t0 < 2.0, path
    r = server.req("DELETE", f"/api/ai/queue/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = server.req("POST", f"/api/ai/queue/{running}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    d = server.wait(running, timeout=60)
    assert d["status"] == "cancelled" and 1 <= d["progress"]["step"] < 100
    assert d["result_url"] is None and "cancel" in d["error_message"]
    assert server.status(queued)["status"] == "cancelled"
    assert server.status(queued)["started_at"] is None  # it never ran
    r = server.req("DELETE", f"/api/ai/queue/{running}")
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]
    assert server.req("DELETE", f"/api/ai/queue/{NO_SUCH_ID}").status_code == 404
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        n == "media_generation_completed" and d["generation_id"] == running for n, d in events
    ):
        time.sleep(0.05)
    stop.set()
    # the server goes on: the next job runs (and its events end the listener)
    assert server.wait(server.enqueue()[0])["status"] == "succeeded"
    listener.join(10)
    names = {(n, d["generation_id"]) for n, d in events}
    assert ("media_generation_progress", running) in names
    assert ("media_generation_cancelled", running) in names
    assert ("media_generation_cancelled", queued) in names
    done = {d["generation_id"]: d["status"] for n, d in events if n == "media_generation_completed"}
    assert done[running] == "cancelled" and done[queued] == "cancelled"


BAD_BODIES = [
    ({"height": 0}, "height"),
    ({"height": 481}, "height"),
    ({"width": 0}, "width"),
    ({"width": 641}, "width"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 101}, "num_inference_steps"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 121}, "num_frames"),
    ({"guidance_scale": -0.5}, "guidance_scale"),
    ({"guidance_scale": 10.5}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"height": "480"}, "height"),
    ({"height": 16.5}, "height"),
    ({"height": True}, "height"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"negative_prompt": None}, "negative_prompt"),
    ({"seed": "42"}, "seed"),
    ({"fps": 24}, "fps"),
    ({"model": "wan-2.2-t2v-fast"}, "model"),
    ({"model": None}, "model"),
    ({"num_generations": 0}, "num_generations"),
    ({"num_generations": 5}, "num_generations"),
    ({"num_generations": "2"}, "num_generations"),
    ({"response_format": "gif"}, "response_format"),
]


def test_bad_inputs_get_clear_errors_and_leave_the_queue_alone(server):
    before = server.all_generations()
    for change, field in BAD_BODIES:
        body = {"model": MODEL, "prompt": "a fox", **SMALL, **change}
        body = {k: v for k, v in body.items() if not (k == "model" and v is None)}
        for path in ("/api/ai/queue", "/api/ai/videos/generate"):
            if path.endswith("generate") and field == "num_generations":
                continue
            r = server.req("POST", path, json=body)
            assert r.status_code == 400, (change, r.text)
            err = r.json()["error"]
            assert field in err["message"] and err.get("param") == field, (change, err)
    missing = server.req("POST", "/api/ai/queue", json={"model": MODEL})
    assert missing.status_code == 400 and "prompt is required" in missing.json()["error"]["message"]
    for raw, what in [
        (b'{"model": "x", "prompt": ', "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "empty"),
        (b"\xff\xfe", "malformed JSON"),
    ]:
        r = server.req("POST", "/api/ai/queue", data=raw, headers=JSON)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text
    big = {"model": MODEL, "prompt": "x" * 70_000}
    r = server.req("POST", "/api/ai/queue", json=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in [
            ("POST", "/api/ai/queue"),
            ("POST", "/api/ai/videos/generate"),
            ("GET", "/api/ai/queue"),
            ("GET", f"/api/ai/queue/{NO_SUCH_ID}"),
            ("DELETE", f"/api/ai/queue/{NO_SUCH_ID}"),
            ("GET", "/api/events"),
            ("GET", f"/api/ai/models/{MODEL}"),
            ("GET", "/api/ai/models"),
            ("GET", "/nowhere"),
        ]:
            body = {"model": MODEL, "prompt": "a fox", **SMALL}
            r = server.req(method, path, auth=False, headers=headers, json=body)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert "API key" in r.json()["error"]["message"]
    assert server.req("GET", "/api/ai/queue/no-such-id").status_code == 404
    assert server.req("GET", "/api/ai/queue?status=bogus").status_code == 400
    assert server.all_generations() == before  # nothing was queued, nothing changed


def test_result_urls_resist_path_traversal(server):
    good = server.wait(server.enqueue()[0])
    gen_id = good["generation_id"]
    signed = good["result_url"].removeprefix(server.base)
    assert requests.get(good["result_url"], timeout=30).status_code == 200
    forged = signed.split("?sig=")[0] + "?sig=" + "0" * 32
    assert server.req("GET", forged, auth=False).status_code == 401
    unsigned = signed.split("?")[0]
    assert server.req("GET", unsigned, auth=False).status_code == 401
    assert server.req("GET", unsigned).status_code == 200  # the bearer key works too
    cancelled = server.enqueue(**LONG)
    server.req("DELETE", f"/api/ai/queue/{cancelled[0]}")
    attempts = [
        "/api/ai/results/../wanlite.sqlite3",
        "/api/ai/results/..%2Fwanlite.sqlite3",
        "/api/ai/results/%2e%2e%2fwanlite.sqlite3",
        "/api/ai/results/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/ai/results/%2Fetc%2Fpasswd",
        "/api/ai/results//etc/passwd",
        "/api/ai/results/wanlite.sqlite3",
        f"/api/ai/results/{gen_id}.mp4/../../wanlite.sqlite3",
        f"/api/ai/results/{gen_id}.mp4%00.sqlite3",
        f"/api/ai/results/{gen_id}",
        f"/api/ai/results/.{gen_id}.mp4.part",
        f"/api/ai/results/{NO_SUCH_ID}.mp4",
        f"/api/ai/results/{cancelled[0]}.mp4",
        "/api/ai/results/..",
        "/api/ai/results/",
    ]
    for path in attempts:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", path, headers=AUTH)  # sent as is: no client-side normalizing
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 404, (path, resp.status, body[:200])
        assert b"SQLite" not in body and b"root:" not in body


def test_crash_restart_and_full_queue(tiny_checkpoint, tmp_path):
    """SIGKILL mid-job: the running job ends failed with a clear message, queued ones still
    run, old results stay downloadable.  A full queue answers 429 and is left as it was.
    A clean stop (SIGTERM) mid-job requeues the job; a second server on the data dir refuses."""
    s = Server(tmp_path / "data", max_queue=2).start().wait_ready()
    try:
        body = {"model": MODEL, "prompt": "old", **SMALL, "num_frames": 3}
        r = s.req("POST", "/api/ai/videos/generate", json=body)
        assert r.status_code == 200, r.text
        old = r.json()["videos"][0]
        long_job = s.enqueue(**LONG)[0]
        s.wait(long_job, until={"processing"}, step=1)
        queued = s.enqueue(2, num_frames=3, height=24, width=16)
        full = s.req("POST", "/api/ai/queue", json={"model": MODEL, "prompt": "x", **SMALL})
        assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
        assert int(full.headers["Retry-After"]) >= 1
        r = s.req("POST", "/api/ai/videos/generate", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 429
        assert [s.status(q)["status"] for q in queued] == ["queued", "queued"]
        s.kill()
    finally:
        s.stop()

    s2 = Server(tmp_path / "data", max_queue=2, port=s.port).start().wait_ready()
    try:
        d = s2.wait(long_job)
        assert d["status"] == "failed", d
        assert "server restarted while this generation was running" in d["error_message"]
        for q in queued:
            d = s2.wait(q)
            assert d["status"] == "succeeded", d
            assert download_video(d["result_url"], tmp_path).shape == (3, 24, 16, 3)
        assert download_video(old["url"], tmp_path).shape == (3, 16, 16, 3)
        again = s2.status(old["generation_id"])
        assert again["status"] == "succeeded"
        assert again["result_url"].split("?")[0] == old["url"].split("?")[0]  # a fresh link
        # one server per data dir: a second one refuses to start, in one line
        second = Server(tmp_path / "data").start()
        assert second.proc.wait(60) == 2
        assert "another wanlite server is using the data dir" in second.log_tail()
        # a clean stop (SIGTERM) puts the running generation back in the queue
        requeued = s2.enqueue(**LONG)[0]
        s2.wait(requeued, until={"processing"}, step=1)
    finally:
        assert s2.stop() in CLEAN_EXIT, s2.log_tail()

    s3 = Server(tmp_path / "data", port=s.port).start().wait_ready()
    try:
        d = s3.status(requeued)
        assert d["status"] in ("queued", "processing") and d["error_message"] is None, d
        assert s3.req("DELETE", f"/api/ai/queue/{requeued}").status_code == 200
        assert s3.wait(requeued)["status"] == "cancelled"
    finally:
        assert s3.stop() in CLEAN_EXIT, s3.log_tail()
