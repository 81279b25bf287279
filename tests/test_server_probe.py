"""``wanlite serve`` against the second adversarial probe (issue 22), on a real server process on
127.0.0.1 with the tiny model: a multipart body that froze the event loop, files other local
users could read, the connection cap as a lockout, unhandled 500s (huge numbers, non-ASCII
digits, malformed ``Origin``, downloads racing a delete), missing ``nosniff`` / ``no-store``,
and paging after a deleted id.  The Redis findings are in tests/test_server_redis.py.
"""

from __future__ import annotations

import json
import select
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from test_server import AUTH, CLEAN_EXIT, MODEL, SMALL, Server  # noqa: E402
from test_server_hardening import json_error, raw  # noqa: E402

LIMIT = 15  # --limit-concurrency of the server below (the probe's figure)
FORM = "multipart/form-data; boundary=XyZ"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """Keyed, a small connection budget; its data dir is one an earlier version left: 0755,
    with a 0644 database and video, which the start must make private."""
    data = tmp_path_factory.mktemp("probe") / "data"
    (data / "results").mkdir(parents=True)
    (data / "results" / "old.mp4").write_bytes(b"not a video")
    for path, mode in ((data, 0o755), (data / "results", 0o755), (data / "results/old.mp4", 0o644)):
        path.chmod(mode)
    extra = ("--limit-concurrency", str(LIMIT), "--request-timeout", "2")
    s = Server(data, extra=extra).start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


def finished(s: Server, n: int = 1) -> list[str]:
    return [s.wait(i)["generation_id"] for i in s.enqueue(n)]


class HealthProbe:
    """A thread timing ``GET /health`` every 20 ms on its own connection."""

    def __init__(self, s: Server):
        self.s, self.latencies, self.statuses = s, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            r = session.get(self.s.base + "/health", timeout=30)
            self.latencies.append(time.perf_counter() - t0)
            self.statuses.append(r.status_code)
            self._stop.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


# --- 1. a multipart body that froze the server --------------------------------------------------


def test_pathological_multipart_bodies_are_quick_400s_and_health_stays_responsive(server):
    s = server
    head = b'--XyZ\r\nContent-Disposition: form-data; name="prompt"; '
    bodies = {
        "20,000 ';'": head + b";" * 20_000 + b"\r\n\r\nx\r\n--XyZ--",
        "40,000 ';'": head + b";" * 40_000 + b"\r\n\r\nx\r\n--XyZ--",
        "30,000 '('": head + b"(" * 30_000 + b"\r\n\r\nx\r\n--XyZ--",
        "60 ';' (under the line bound)": head + b";" * 60 + b"\r\n\r\nx\r\n--XyZ--",
        "100 parts": b"".join(
            b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i
            for i in range(100)
        )
        + b"--XyZ--\r\n",
        "no closing boundary": b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx',
    }
    headers = {**AUTH, "Content-Type": FORM}
    with HealthProbe(s) as health:
        for what, body in bodies.items():
            t0 = time.perf_counter()
            status, _, out = raw(s, "POST", "/v1/videos", body, headers)
            seconds = time.perf_counter() - t0
            assert status == 400, (what, out)
            assert "multipart" in json_error(out)["message"], (what, out)
            assert seconds < 0.5, f"{what}: {seconds:.3f} s"
            print(f"{what} ({len(body)} B): 400 in {seconds * 1000:.1f} ms")
    worst = max(health.latencies)
    print(f"/health meanwhile: {len(health.latencies)} calls, worst {worst * 1000:.1f} ms")
    assert set(health.statuses) == {200} and worst < 0.5, worst
    assert [r for r in s.log_records() if r.get("status") == 500] == []
    ok = b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nun caf\xc3\xa9\r\n'
    ok += b'--XyZ\r\nContent-Disposition: form-data; name="size"\r\n\r\n16x16\r\n'
    ok += b'--XyZ\r\nContent-Disposition: form-data; name="seconds"\r\n\r\n0\r\n--XyZ--\r\n'
    status, _, out = raw(s, "POST", "/v1/videos", ok, headers)
    assert status == 200 and json.loads(out)["prompt"] == "un café", out


# --- 2. files other local users could read ------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_dir_is_private(server):
    s = server
    gen_id = finished(s)[0]
    data = s.data_dir
    assert mode(data) == 0o700 and mode(data / "results") == 0o700
    files = [data / "wanlite.sqlite3", data / "wanlite.lock", data / "results" / f"{gen_id}.mp4"]
    files += [p for p in data.glob("wanlite.sqlite3-*")]  # WAL and SHM
    files += [data / "results" / "old.mp4"]  # an earlier version's file, fixed at start
    assert len(files) >= 5, sorted(p.name for p in data.iterdir())
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}


# --- 4. the connection cap as a lockout ---------------------------------------------------------


class HalfHeads:
    """The probe's attacker: ``n`` sockets that send half a request head and, whenever the
    server closes one (or answers it), reconnect at once."""

    def __init__(self, s: Server, n: int):
        self.s, self.n, self.reconnects = s, n, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.s.port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        return sock

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.n)]
        while not self._stop.is_set():
            for sock in select.select(socks, [], [], 0.05)[0]:  # closed (or a 503)
                socks.remove(sock)
                sock.close()
                socks.append(self._open())
                self.reconnects += 1
        for sock in socks:
            sock.close()

    def __enter__(self) -> HalfHeads:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def test_streams_and_half_heads_cannot_lock_out_health_or_keyed_calls(server):
    """The probe's two lockouts, with its figures: --limit-concurrency 15 and 15 open event
    streams, then 16 sockets sending half a head and reconnecting."""
    s = server
    streams = [s.req("GET", "/api/events", stream=True) for _ in range(LIMIT)]
    try:
        assert all(r.status_code == 200 for r in streams)
        r = s.req("GET", "/api/events", stream=True)  # one stream more than the budget
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        r.close()
        assert requests.get(s.base + "/health", timeout=10).status_code == 200
        with HalfHeads(s, LIMIT + 1) as attack:
            t0 = time.perf_counter()
            for _ in range(10):
                assert requests.get(s.base + "/health", timeout=10).status_code == 200
                assert requests.get(s.base + "/ready", timeout=10).status_code == 200
                assert s.req("GET", "/api/ai/queue?status=all").status_code == 200
            seconds = (time.perf_counter() - t0) / 30
            deadline = time.monotonic() + 20  # a loaded machine: the attacker may lag behind
            while attack.reconnects <= LIMIT and time.monotonic() < deadline:
                assert requests.get(s.base + "/health", timeout=10).status_code == 200
                time.sleep(0.2)
            assert attack.reconnects > LIMIT  # the server kept closing the oldest
        print(f"under attack: 30 calls, {seconds * 1000:.1f} ms each on average")
    finally:
        for r in streams:
            r.close()
    time.sleep(0.3)
    r = s.req("GET", "/api/events", stream=True)  # the streams' places are free again
    assert r.status_code == 200
    r.close()


# --- 5. unhandled 500s ---------------------------------------------------------------------------


def test_huge_numbers_are_400s_naming_the_field(server):
    s = server
    huge = "9" * 400
    cases = [
        (
            "/api/ai/queue",
            {"model": MODEL, "prompt": "x", "guidance_scale": huge},
            "guidance_scale",
        ),
        ("/v1/videos", {"prompt": "x", "guidance_scale": huge}, "guidance_scale"),
        ("/v1/videos", {"prompt": "x", "seconds": huge}, "seconds"),
    ]
    for path, body, field in cases:
        text = json.dumps(body).replace(f'"{huge}"', huge).encode()  # a JSON number
        status, _, out = raw(s, "POST", path, text, {**AUTH, "Content-Type": "application/json"})
        assert status == 400 and json_error(out)["param"] == field, (path, out[:300])
    form = '--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
    form += f'--XyZ\r\nContent-Disposition: form-data; name="seconds"\r\n\r\n{huge}\r\n--XyZ--\r\n'
    status, _, out = raw(s, "POST", "/v1/videos", form.encode(), {**AUTH, "Content-Type": FORM})
    assert status == 400 and json_error(out)["param"] == "seconds", out[:300]


def test_non_ascii_and_overlong_digits_are_400s(server):
    s = server
    for query in (
        "/api/ai/queue?limit=%C2%B2",  # '²' passes str.isdigit
        "/api/ai/queue?before=%C2%B2",
        "/api/ai/queue?limit=%D9%A3",  # Arabic-Indic 3: int() would read it
        "/api/ai/queue?before=" + "9" * 5000,  # int() refuses this many digits
        "/v1/videos?limit=%C2%B2",
        "/v1/videos?limit=" + "1" * 5000,
    ):
        status, _, out = raw(s, "GET", query, headers=AUTH)
        assert status == 400, (query[:60], out)
        assert json_error(out)["param"] in ("limit", "before"), out
    url = s.status(finished(s)[0])["result_url"]
    expires = url.split("expires=")[1].split("&")[0]
    for bad in ("%C2%B2", "9" * 5000, "%D9%A3" * 3):
        r = requests.get(url.replace(f"expires={expires}", f"expires={bad}"), timeout=30)
        assert r.status_code == 401, (bad[:20], r.text)


def test_malformed_origins_are_refused_cleanly_even_on_health(server):
    s = server
    for origin in (
        "http://a:b",
        f"http://localhost:{s.port}.evil.example",
        "http://[::1",
        "http://a:99999",
    ):
        for method, path in (
            ("GET", "/health"),
            ("GET", "/api/ai/queue"),
            ("POST", "/api/ai/queue"),
        ):
            status, _, out = raw(s, method, path, b"{}", {**AUTH, "Origin": origin})
            assert status == 403, (origin, path, out)
            assert json_error(out)["type"] == "forbidden_origin"
    assert [r for r in s.log_records() if r.get("status") == 500] == []


def test_downloads_racing_a_delete_are_whole_or_404(server):
    """Download each result over and over while it is deleted: every answer is the whole file
    (its ``Content-Length`` worth) or a 404, never a cut 200 or a 500."""
    s = server
    ids = finished(s, 4)
    for gen_id in ids:
        url = s.status(gen_id)["result_url"]
        whole = requests.get(url, timeout=30).content
        seen: list[int] = []

        def download(url=url, whole=whole, seen=seen) -> None:
            while True:
                r = requests.get(url, timeout=30)
                seen.append(r.status_code)
                if r.status_code == 404:
                    return
                assert r.status_code == 200 and r.content == whole, (r.status_code, len(r.content))

        with ThreadPoolExecutor(4) as pool:
            downloads = [pool.submit(download) for _ in range(4)]
            time.sleep(0.05)
            assert s.req("DELETE", f"/v1/videos/{gen_id}").status_code == 200
            for d in downloads:
                d.result(60)
        assert seen.count(200) >= 4 and seen.count(404) == 4, seen
    assert [r for r in s.log_records() if r.get("status") == 500] == []
    # one byte range, as <video> seeking asks for, from the same handle-based response
    gen_id = finished(s)[0]
    whole = s.req("GET", f"/api/ai/results/{gen_id}.mp4").content
    r = s.req("GET", f"/api/ai/results/{gen_id}.mp4", headers={"Range": "bytes=4-11"})
    assert r.status_code == 206 and r.content == whole[4:12] and r.content[:4] == b"ftyp"
    assert r.headers["content-range"] == f"bytes 4-11/{len(whole)}"
    r = s.req("GET", f"/v1/videos/{gen_id}/content", headers={"Range": f"bytes={len(whole)}-"})
    assert r.status_code == 416
    r = s.req("GET", f"/v1/videos/{gen_id}/content", params={"variant": "thumbnail"})
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"  # a JPEG


# --- 7. headers and paging ---------------------------------------------------------------------


def test_api_responses_say_nosniff_and_no_store(server):
    s = server
    gen_id = finished(s)[0]
    for path in (
        "/health",
        "/ready",
        "/api/ai/queue",
        f"/api/ai/queue/{gen_id}",
        f"/api/ai/results/{gen_id}.mp4",
        "/v1/videos",
        "/api/ai/queue/00000000-0000-4000-8000-000000000000",  # a 404
    ):
        r = s.req("GET", path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["cache-control"] == "no-store", path
    r = s.req("GET", "/api/ai/queue", auth=False)  # a 401 too
    assert r.status_code == 401 and r.headers["cache-control"] == "no-store"
    r = requests.get(s.base + "/", timeout=30)  # the page keeps its own (it holds no data)
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-content-type-options"]


def test_paging_after_a_deleted_id_goes_on(server):
    s = server
    ids = finished(s, 4) + finished(s, 1)
    page = s.req("GET", "/v1/videos", params={"limit": 2}).json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2]
    assert s.req("DELETE", f"/v1/videos/{page['last_id']}").status_code == 200
    r = s.req("GET", "/v1/videos", params={"limit": 2, "after": page["last_id"]})
    assert r.status_code == 200, r.text
    assert [v["id"] for v in r.json()["data"]] == ids[::-1][2:4]
    r = s.req("GET", "/v1/videos", params={"limit": 2, "after": ids[0], "order": "asc"})
    assert [v["id"] for v in r.json()["data"]] == [ids[1], ids[2]]
    r = s.req("GET", "/v1/videos", params={"after": "00000000-0000-4000-8000-000000000000"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"  # never existed


def test_small_jobs_still_run(server):
    """The fixture's server still does its job after everything above."""
    r = server.req("POST", "/api/ai/videos/generate", json={"model": MODEL, "prompt": "x", **SMALL})
    assert r.status_code == 200 and r.json()["videos"][0]["url"], r.text
