"""``wanlite serve`` hardening: each defect of the "server hardening" issue, probed against a real
server process on 127.0.0.1 (as an attacker or a careless client would), plus the decided
extras (expiring result links, case-insensitive ``Bearer``, ``HEAD``, ``Allow``, ``Retry-After``).
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import sqlite3
import threading
import time

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import AUTH, CLEAN_EXIT, KEY, LONG, MODEL, SMALL, Server  # noqa: E402

APP = "http://app.example"  # the one cross-site origin the open server allows
PUBLIC = "http://wan.example:9000"  # the open server's --public-url
EVIL = "http://evil.example"


def raw(server: Server, method: str, path: str, body: bytes = b"", headers=None, host=None):
    """One request sent as is (no client-side normalizing): (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    h = {"Host": host or f"127.0.0.1:{server.port}", **(headers or {})}
    conn.request(method, path, body=body or None, headers=h)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def json_error(body: bytes) -> dict:
    """The error object of a JSON error body (which must be valid UTF-8 JSON)."""
    return json.loads(body.decode("utf-8"))["error"]


def job(prompt: str = "a fox", **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, **SMALL, **extra}


JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def open_server(tiny_checkpoint, tmp_path_factory):
    """Keyless (the default), with short head timeout and a small connection cap."""
    extra = ("--request-timeout", "1", "--limit-concurrency", "12")
    extra += ("--allow-origin", APP, "--public-url", PUBLIC)
    s = Server(tmp_path_factory.mktemp("open") / "data", key=None, extra=extra)
    s.start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("keyed") / "data", extra=("--result-ttl", "4"))
    s.start().wait_ready()
    yield s
    assert s.stop() in CLEAN_EXIT, s.log_tail()


# --- 1. text that is not valid Unicode --------------------------------------------------------


def test_lone_surrogate_is_a_400_naming_the_field_and_the_listing_survives(open_server):
    s = open_server
    for field in ("prompt", "negative_prompt"):
        body = json.dumps(job(**{field: "a\ud800b"})).encode()  # the JSON escape \ud800
        status, _, out = raw(s, "POST", "/api/ai/queue", body, JSON)
        assert status == 400, out
        err = json_error(out)
        assert err["param"] == field and "not valid Unicode" in err["message"], err
        assert "\\ud800" in err["message"]  # quoted escaped, never raw
    status, _, out = raw(
        s, "POST", "/api/ai/queue", json.dumps(job(**{"\ud800": 1})).encode(), JSON
    )
    assert status == 400 and "unknown parameter" in json_error(out)["message"], out
    status, _, out = raw(s, "GET", "/api/ai/queue?status=all")
    assert status == 200, out
    # real non-ASCII text is fine and comes back as sent
    gen_id = s.enqueue(prompt="un café ☕, 狐")[0]
    assert s.status(gen_id)["prompt"] == "un café ☕, 狐"
    assert raw(s, "GET", "/api/ai/queue?status=all")[0] == 200


# --- 2. deep JSON ------------------------------------------------------------------------------


def test_deeply_nested_json_is_the_json_400_of_a_malformed_body(open_server):
    for body in (b"[" * 2000, b'{"model": "x", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"):
        status, headers, out = raw(open_server, "POST", "/api/ai/queue", body, JSON)
        assert status == 400 and headers["content-type"] == "application/json", out[:200]
        assert "malformed JSON" in json_error(out)["message"]


# --- 3. cross-site requests and DNS rebinding --------------------------------------------------


def test_post_bodies_must_be_json(open_server):
    s = open_server
    before = len(s.all_generations())
    for ctype in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        status, _, out = raw(s, "POST", "/api/ai/queue", json.dumps(job()).encode(), headers)
        assert status == 415 and "application/json" in json_error(out)["message"], (ctype, out)
    assert len(s.all_generations()) == before


def test_cross_site_browser_requests_are_refused(open_server):
    s = open_server
    before = len(s.all_generations())
    body = json.dumps(job("csrf")).encode()
    for headers in (
        {"Origin": EVIL, "Content-Type": "text/plain;charset=UTF-8"},  # the no-preflight fetch
        {"Origin": EVIL, **JSON},
        {"Origin": "null", **JSON},  # sandboxed frames, file:// pages
        {"Origin": f"http://127.0.0.1:{s.port + 1}", **JSON},  # another local port
        {"Sec-Fetch-Site": "cross-site", **JSON},  # a browser that sent no Origin
    ):
        status, h, out = raw(s, "POST", "/api/ai/queue", body, headers)
        assert status == 403, (headers, out)
        assert "access-control-allow-origin" not in h
        assert "origin" in json_error(out)["message"].lower()
    assert raw(s, "GET", "/api/ai/queue?status=all", headers={"Origin": EVIL})[0] == 403
    status, _, out = raw(s, "DELETE", "/api/ai/queue/x", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403, out
    assert len(s.all_generations()) == before  # nothing was queued
    # same origin, and the allowed origin (which also gets CORS headers), are fine
    same = {"Origin": f"http://127.0.0.1:{s.port}", "Sec-Fetch-Site": "same-origin", **JSON}
    assert raw(s, "POST", "/api/ai/queue", body, same)[0] == 200
    status, h, out = raw(s, "POST", "/api/ai/queue", body, {"Origin": APP, **JSON})
    assert status == 200 and h["access-control-allow-origin"] == APP, out
    pre = {"Origin": APP, "Access-Control-Request-Method": "POST"}
    pre["Access-Control-Request-Headers"] = "content-type,authorization"
    status, h, _ = raw(s, "OPTIONS", "/api/ai/queue", headers=pre)
    assert status == 204 and h["access-control-allow-origin"] == APP
    assert "POST" in h["access-control-allow-methods"]
    assert "authorization" in h["access-control-allow-headers"].lower()
    status, h, _ = raw(s, "OPTIONS", "/api/ai/queue", headers={**pre, "Origin": EVIL})
    assert status == 403 and "access-control-allow-origin" not in h


def test_dns_rebinding_hosts_are_refused_on_a_loopback_bind(open_server):
    s = open_server
    gen_id = s.wait(s.enqueue()[0])["generation_id"]
    for host in ("rebind.evil.example", f"rebind.evil.example:{s.port}", "127.0.0.2"):
        for path in ("/api/ai/queue?status=all", f"/api/ai/results/{gen_id}.mp4", "/ready"):
            status, _, out = raw(s, "GET", path, host=host)
            assert status == 400 and "Host" in json_error(out)["message"], (host, path, out)
    for host in (
        f"localhost:{s.port}",
        f"127.0.0.1:{s.port}",
        f"[::1]:{s.port}",
        "wan.example:9000",
    ):
        assert raw(s, "GET", "/api/ai/queue?status=all", host=host)[0] == 200, host


# --- 4. stalled connections --------------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closed ``sock`` (sending ``trickle`` a byte at a time meanwhile),
    or None if it is still open after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if trickle:
                sock.sendall(trickle[:1])
                trickle = trickle[1:]
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed too
            return time.monotonic() - t0
    return None


def test_unfinished_request_heads_are_closed_after_the_timeout(open_server):
    s = open_server
    socks = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(3)]
    socks[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never ends
    socks[1].sendall(b"G")
    slow = b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100  # a byte every 0.2 s: still a stall
    try:
        assert closed_within(socks[0], 4) is not None
        assert closed_within(socks[1], 4) is not None
        assert closed_within(socks[2], 4, trickle=slow) is not None
    finally:
        for sock in socks:
            sock.close()
    assert raw(s, "GET", "/health")[0] == 200


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_stalled_heads_beyond_the_budget_make_room_for_new_clients(open_server):
    """--limit-concurrency 12 connections may be sending a request at once; one more closes
    the one that has waited longest (issue 22: a full budget of stalled heads was a lockout)."""
    s = open_server
    stalled = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(12)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.1)
        assert raw(s, "GET", "/health")[0] == 200  # read within its grace, served: not a 503
        stalled.append(socket.create_connection(("127.0.0.1", s.port)))  # a 13th that stalls
        stalled[-1].sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.2)  # its grace (50 ms) is over; well within the 1 s request timeout
        assert is_closed(stalled[0]), "the oldest stalled head was not closed"
        assert not any(map(is_closed, stalled[1:])), "more than the oldest was closed"
        time.sleep(1.5)  # the other stalled heads time out
        assert all(map(is_closed, stalled[1:]))
        assert raw(s, "GET", "/health")[0] == 200
    finally:
        for sock in stalled:
            sock.close()


def _low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))


def test_accept_failures_at_the_fd_limit_are_logged_once(tiny_checkpoint, tmp_path):
    extra = ("--request-timeout", "2", "--limit-concurrency", "1000")
    s = Server(tmp_path / "data", key=None, extra=extra, preexec_fn=_low_fd_limit)
    s.start().wait_ready()
    socks = []
    try:
        for _ in range(150):  # more than the server's descriptors
            sock = socket.socket()
            sock.settimeout(2)
            try:
                sock.connect(("127.0.0.1", s.port))
                sock.sendall(b"GET /health HTTP/1.1\r\n")
            except OSError:
                pass
            socks.append(sock)
        time.sleep(4)  # the stalled heads time out; accept() fails meanwhile, then recovers
        for sock in socks:
            sock.close()
        assert requests.get(s.base + "/health", timeout=10).status_code == 200
        accept = [r for r in s.log_records() if "accept" in r["msg"].lower()]
        assert 1 <= len(accept) <= 2, accept[:5]
        assert all("exc" not in r for r in accept)
        assert s.log_path.stat().st_size < 200_000
    finally:
        for sock in socks:
            sock.close()
        assert s.stop() in CLEAN_EXIT, s.log_tail()


# --- 5. unhandled errors -----------------------------------------------------------------------


def test_unhandled_errors_get_the_json_shape_and_their_status_in_the_log(keyed_server):
    s = keyed_server
    gen_id = s.wait(s.enqueue()[0])["generation_id"]
    db = sqlite3.connect(s.data_dir / "wanlite.sqlite3")
    params = db.execute("SELECT params FROM generations WHERE id=?", (gen_id,)).fetchone()[0]
    db.execute("UPDATE generations SET params='{' WHERE id=?", (gen_id,))  # a broken row
    db.commit()
    try:
        status, headers, out = raw(s, "GET", f"/api/ai/queue/{gen_id}", headers=AUTH)
        assert status == 500 and headers["content-type"] == "application/json", out
        err = json_error(out)
        assert err["type"] == "server_error" and "JSONDecodeError" not in err["message"]
    finally:
        db.execute("UPDATE generations SET params=? WHERE id=?", (params, gen_id))
        db.commit()
        db.close()
    time.sleep(0.2)
    logged = [r for r in s.log_records() if r.get("path") == f"/api/ai/queue/{gen_id}"]
    assert logged and logged[-1]["status"] == 500, logged[-1:]
    assert all(r.get("status") is not None for r in s.log_records() if r["msg"] == "request")


# --- 7. result links ---------------------------------------------------------------------------


def test_result_links_ignore_the_clients_host_and_forwarded_headers(keyed_server, open_server):
    s = keyed_server
    gen_id = s.wait(s.enqueue()[0])["generation_id"]
    lying = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example", **AUTH}
    lying["X-Forwarded-For"] = "203.0.113.9"
    status, _, out = raw(
        s, "GET", f"/api/ai/queue/{gen_id}", headers=lying, host=f"localhost:{s.port}"
    )
    assert status == 200, out
    url = json.loads(out)["result_url"]
    assert url.startswith(f"http://127.0.0.1:{s.port}/api/ai/results/{gen_id}.mp4?"), url
    o = open_server
    gen_id = o.wait(o.enqueue()[0])["generation_id"]
    out = raw(o, "GET", f"/api/ai/queue/{gen_id}", headers=lying, host=f"localhost:{o.port}")[2]
    assert json.loads(out)["result_url"] == f"{PUBLIC}/api/ai/results/{gen_id}.mp4"


@pytest.fixture(scope="module")
def proxied_server(tiny_checkpoint, tmp_path_factory):
    """Trusts X-Forwarded-* from 127.0.0.1.  The SIGTERM test below stops it (it comes last)."""
    extra = ("--forwarded-allow-ips", "127.0.0.1")
    s = Server(tmp_path_factory.mktemp("proxied") / "data", extra=extra)
    s.start().wait_ready()
    yield s
    s.stop()


def test_forwarded_proto_is_trusted_only_from_the_allowed_ips(proxied_server):
    s = proxied_server
    gen_id = s.wait(s.enqueue()[0])["generation_id"]
    headers = {"X-Forwarded-Proto": "https", **AUTH}
    url = json.loads(raw(s, "GET", f"/api/ai/queue/{gen_id}", headers=headers)[2])["result_url"]
    assert url.startswith(f"https://127.0.0.1:{s.port}/api/ai/results/"), url


# --- 6. SIGTERM --------------------------------------------------------------------------------


def test_sigterm_stops_the_running_job_at_once_and_requeues_it(proxied_server):
    s = proxied_server
    running = s.enqueue(**LONG)[0]
    s.wait(running, until={"processing"}, step=1)
    stream = requests.get(s.base + "/api/events", headers=AUTH, stream=True, timeout=30)
    ended = threading.Event()

    def listen():
        with stream:
            for _ in stream.iter_lines():
                pass
        ended.set()

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(30)
    seconds = time.monotonic() - t0
    assert code in CLEAN_EXIT, s.log_tail()
    assert seconds < 2.5, f"shutdown took {seconds:.1f} s:\n{s.log_tail()}"
    assert ended.wait(5)  # the SSE stream ended
    records = s.log_records()
    assert any(r["msg"] == "generation requeued at shutdown" for r in records), s.log_tail()
    assert [r for r in records if r["level"] in ("error", "critical")] == []
    db = sqlite3.connect(s.data_dir / "wanlite.sqlite3")
    row = db.execute("SELECT status, error_message FROM generations WHERE id=?", (running,))
    assert row.fetchone() == ("queued", None)
    db.close()


# --- also decided: expiring links, Bearer, HEAD, Allow, Retry-After ----------------------------


def test_signed_result_links_expire(keyed_server):
    s = keyed_server  # --result-ttl 4
    d = s.wait(s.enqueue()[0])
    url = d["result_url"]
    assert "expires=" in url and "sig=" in url
    assert requests.get(url, timeout=30).status_code == 200
    expires = int(url.split("expires=")[1].split("&")[0])
    assert time.time() < expires <= time.time() + 5
    longer = url.replace(f"expires={expires}", f"expires={expires + 3600}")
    assert requests.get(longer, timeout=30).status_code == 401  # expires is signed
    time.sleep(max(0.0, expires - time.time()) + 1.1)
    r = requests.get(url, timeout=30)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    fresh = s.status(d["generation_id"])["result_url"]  # a new link is valid again
    assert requests.get(fresh, timeout=30).status_code == 200


def test_bearer_head_allow_and_retry_after(keyed_server, open_server):
    s = keyed_server
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = s.req("GET", "/api/ai/models", auth=False, headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, scheme
    gen_id = s.wait(s.enqueue()[0])["generation_id"]
    status, h, out = raw(s, "HEAD", f"/api/ai/results/{gen_id}.mp4", headers=AUTH)
    assert status == 200 and out == b"" and int(h["content-length"]) > 0
    assert h["content-type"] == "video/mp4"
    status, h, _ = raw(s, "PUT", "/api/ai/queue", b"{}", {**AUTH, **JSON})
    assert status == 405 and {"GET", "POST"} <= {m.strip() for m in h["allow"].split(",")}


def test_ready_and_job_errors_show_no_server_paths(tmp_path):
    missing = tmp_path / "secret-folder" / "no-such-model"
    s = Server(tmp_path / "data", model=str(missing)).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = requests.get(s.base + "/ready", timeout=5)
                if r.json()["status"] == "failed":
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        assert r.status_code == 503 and r.json()["error"], r.text
        assert "secret-folder" not in r.text and str(tmp_path) not in r.text
        r = s.req("POST", "/api/ai/queue", json=job())
        assert r.status_code == 503 and "secret-folder" not in r.text, r.text
    finally:
        assert s.stop() in CLEAN_EXIT, s.log_tail()


def test_an_unusable_data_dir_fails_in_one_line(tmp_path):
    """A data dir that cannot be written (read-only; or, as root, a plain file) is one
    line on stderr and exit code 2, not a traceback."""
    data = tmp_path / "data"
    if os.geteuid() == 0:  # root may write anywhere: a plain file stands in for the folder
        data.write_text("")
    else:
        (data / "results").mkdir(parents=True)
        (data / "wanlite.lock").touch()  # the lock opens; writing anything else fails
        data.chmod(0o555)
    try:
        s = Server(data, key=None).start()
        assert s.proc.wait(60) == 2, s.log_tail()
        lines = s.log_path.read_text().splitlines()
        assert lines[-1].startswith("error: data dir") and "Traceback" not in s.log_tail()
    finally:
        data.chmod(0o755)
