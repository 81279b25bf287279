"""The Redis job store (``wanlite.server.redis_store``) against a real ``redis-server`` started by
a fixture on a free loopback port (AOF on, in a temp dir); skipped where ``redis-server`` or the
``redis`` package is missing.  First the store alone, then real processes on the micro random
model: two HTTP-only ``wanlite serve --store redis:// --workers 0`` and two ``wanlite worker``
sharing one results folder (submit through one API, stream and cancel through the other, kill -9
a worker mid-job, SIGTERM one), and one ``serve --store redis://`` with its own worker thread
across a Redis restart.  Last, issue 22's findings: a ``FLUSHALL`` that took the consumer group
away, poison entries and hashes, and a Redis that is down (503s and ``/ready``).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis")
requests = pytest.importorskip("requests")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

from test_server import CLEAN_EXIT, SMALL, Server, free_port  # noqa: E402
from test_server import MODEL as SERVED  # noqa: E402

from wanlite.server.redis_store import DIED, RedisStore  # noqa: E402
from wanlite.server.store import QueueFull  # noqa: E402

PARAMS = {"prompt": "a fox", "num_inference_steps": 2, "seed": None}
MODEL = "m"


class RedisServer:
    def __init__(self, tmp_path):
        self.dir, self.port = tmp_path, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    s = RedisServer(tmp_path).start()
    yield s
    s.kill()


def claim(store: RedisStore):
    return store.claim_next(lambda: 7, block_ms=50)


def test_each_job_is_claimed_by_exactly_one_worker_in_queue_order(redis_server):
    api = RedisStore(redis_server.url)
    ids = [r["id"] for r in api.enqueue(MODEL, PARAMS, 4, "url", 100)]
    ids += [r["id"] for r in api.enqueue(MODEL, PARAMS, 4, "url", 100)]
    with pytest.raises(QueueFull):
        api.enqueue(MODEL, PARAMS, 1, "url", 8)
    got: dict[str, list[str]] = {"a": [], "b": []}

    def work(name: str) -> None:
        store = RedisStore(redis_server.url, consumer=name)
        while (row := claim(store)) is not None:
            got[name].append(row["id"])
            assert row["status"] == "processing" and row["seed"] == 7
            store.finish(row["id"], "succeeded", result_file=f"{row['id']}.mp4")

    threads = [threading.Thread(target=work, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = got["a"] + got["b"]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert got["a"] and got["b"]
    assert [r["id"] for r in api.list(("succeeded",))] == ids  # oldest first
    assert redis.Redis.from_url(redis_server.url).xlen("wanlite:queue") == 0  # acked and gone


def test_a_dead_workers_job_is_reclaimed_then_failed_after_bounded_retries(redis_server):
    api = RedisStore(redis_server.url)
    gen_id = api.enqueue(MODEL, PARAMS, 1, "url", 10)[0]["id"]
    dead = RedisStore(redis_server.url, consumer="dead", claim_timeout=0.3, max_attempts=2)
    assert claim(dead)["id"] == gen_id  # ...and never touches it again
    alive = RedisStore(redis_server.url, consumer="alive", claim_timeout=0.3, max_attempts=2)
    assert claim(alive) is None  # still fresh: not taken over
    time.sleep(0.4)
    row = claim(alive)
    assert row["id"] == gen_id and row["status"] == "processing"  # re-run by the live one
    alive.touch(gen_id)
    assert claim(dead) is None  # a touched claim stays with its worker
    time.sleep(0.4)  # the second worker dies too: a third delivery is past the bound
    assert claim(dead) is None
    row = api.get(gen_id)
    assert row["status"] == "failed" and row["error_message"] == DIED.format(n=2), row


def test_the_queue_survives_a_redis_restart_with_aof(redis_server):
    api = RedisStore(redis_server.url)
    ids = [r["id"] for r in api.enqueue(MODEL, PARAMS, 3, "url", 10)]
    worker = RedisStore(redis_server.url, consumer="w")
    assert claim(worker)["id"] == ids[0]
    assert api.cancel(ids[1])[1] == "cancelled"
    redis_server.kill()
    redis_server.start()
    api = RedisStore(redis_server.url)
    assert [r["status"] for r in map(api.get, ids)] == ["processing", "cancelled", "queued"]
    worker = RedisStore(redis_server.url, consumer="w2")
    assert claim(worker)["id"] == ids[2]  # the cancelled entry is skipped
    assert api.list()[0]["id"] == ids[0] and len(api.list()) == 2
    assert [r["id"] for r in api.purge(time.time() + 1)] == [ids[1]]


def test_touch_and_finish_belong_to_the_owner_and_requeue_keeps_the_place(redis_server):
    api = RedisStore(redis_server.url)
    first, second = (r["id"] for r in api.enqueue(MODEL, {**PARAMS, "seed": 5}, 2, "url", 10))
    a = RedisStore(redis_server.url, consumer="a", claim_timeout=0.3)
    b = RedisStore(redis_server.url, consumer="b", claim_timeout=0.3)
    assert claim(a)["id"] == first and a.poll(first) is None
    time.sleep(0.4)
    assert claim(b)["id"] == first  # a went silent: b took it over
    assert a.poll(first) == "lost" and not a.touch(first)  # a cannot steal it back...
    assert a.finish(first, "succeeded")["status"] == "processing"  # ...nor end it
    assert b.touch(first) and api.cancel(first)[1] == "requested" and b.poll(first) == "cancelled"
    b.requeue(first)  # a clean stop: back in the queue, ahead of `second`, not an attempt
    row = api.get(first)
    assert (row["status"], row["started_at"], row["seed"], row["step"]) == ("queued", None, 5, 0)
    c = RedisStore(redis_server.url, consumer="c", claim_timeout=30)
    assert claim(c)["id"] == first  # at once, not after a claim timeout
    assert claim(c)["id"] == second
    api.delete(first)
    assert c.poll(first) == "deleted" and c.finish(first, "succeeded") is None


# -- processes -----------------------------------------------------------------------------------
JOB = {"height": 128, "width": 128, "num_frames": 17, "num_inference_steps": 40}  # ~2 s
LONG = {"height": 256, "width": 256, "num_frames": 33, "num_inference_steps": 100}


class WorkerProcess:
    """A ``python -m wanlite.server worker`` subprocess on the micro model, with a log file."""

    def __init__(self, tmp_path: Path, url: str, results: Path, name: str):
        self.name, self.log_path = name, tmp_path / f"{name}.log"
        self.cmd = [sys.executable, "-m", "wanlite.server", "worker", "--model", "random:micro"]
        self.cmd += ["--device", "cpu", "--threads", "1", "--store", url, "--name", name]
        self.cmd += ["--results", str(results), "--claim-timeout", "2"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # not a JSON record, or one still being written
                continue
        return out

    def ran(self, gen_id: str, msg: str = "generation started") -> int:
        return sum(r["msg"] == msg and r.get("generation_id") == gen_id for r in self.records())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


class EventLog:
    """Every SSE event of one server, collected by a thread."""

    def __init__(self, server: Server):
        self.events: list[tuple[str, dict]] = []
        self.resp = server.req("GET", "/api/events", stream=True)
        assert self.resp.status_code == 200
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        name = None
        try:
            for line in self.resp.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
        except Exception:  # noqa: BLE001 - the stream ends with the server
            pass

    def of(self, gen_id: str, name: str | None = None) -> list[dict]:
        return [d for n, d in self.events if d["generation_id"] == gen_id and name in (None, n)]

    def wait_for(self, gen_id: str, name: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if got := self.of(gen_id, name):
                return got[-1]
            time.sleep(0.05)
        pytest.fail(f"no {name} event for {gen_id}: {self.events[-5:]}")


def api_server(tmp_path: Path, name: str, url: str, results: Path, *extra: str) -> Server:
    flags = ("--store", url, "--results", str(results), "--claim-timeout", "2", *extra)
    return Server(tmp_path / name, model="random:micro", extra=flags)


def test_two_api_processes_and_two_workers_share_one_redis(redis_server, tmp_path):
    """Submit through A, stream and cancel through B; kill -9 the worker running a job and the
    other one re-runs it from the start; SIGTERM a worker and its job goes back to the queue;
    readiness follows the workers."""
    results = tmp_path / "results"
    a = api_server(tmp_path, "a", redis_server.url, results, "--workers", "0")
    b = api_server(tmp_path, "b", redis_server.url, results, "--workers", "0")  # same key
    workers = [WorkerProcess(tmp_path, redis_server.url, results, n) for n in ("w1", "w2")]
    procs = [a.start(), b.start(), *(w.start() for w in workers)]
    try:
        a.wait_ready(timeout=300), b.wait_ready(timeout=300)  # ready: a worker has loaded
        stream = EventLog(b)
        job1 = a.enqueue(**JOB)[0]
        b.wait(job1, until={"processing"}, step=1)
        runner = next(w for w in workers if w.ran(job1))
        other = next(w for w in workers if w is not runner)
        runner.proc.kill()  # kill -9 mid-job: its claim goes stale after --claim-timeout 2
        runner.proc.wait(10)

        job2 = a.enqueue(**LONG)[0]  # the survivor takes the new job first...
        b.wait(job2, until={"processing"}, step=1)
        job3 = a.enqueue()[0]
        assert b.status(job3)["status"] == "queued"  # (the only worker is busy)
        r = b.req("POST", f"/api/ai/queue/{job3}/cancel")  # queued through A, cancelled via B
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        r = b.req("DELETE", f"/api/ai/queue/{job2}")  # running on a worker process
        assert r.status_code == 200 and r.json()["cancel_requested"] is True, r.text
        assert a.wait(job2)["status"] == "cancelled"
        assert stream.wait_for(job3, "media_generation_cancelled")["status"] == "cancelled"
        assert stream.wait_for(job2, "media_generation_completed")["status"] == "cancelled"

        done = stream.wait_for(job1, "media_generation_completed", timeout=120)  # ...then job1
        assert done["status"] == "succeeded" and done["result_url"].startswith(b.base), done
        d = a.wait(job1)
        assert d["status"] == "succeeded" and d["progress"] == {"step": 40, "total": 40}, d
        assert other.ran(job1) == 1 and other.ran(job1, "generation finished") == 1
        steps = [e["step"] for e in stream.of(job1, "media_generation_progress")]
        assert steps.count(0) == 2 and steps[-1] == 40, steps  # started twice, from the start
        r = requests.get(d["result_url"], timeout=60)  # A's link to the shared results folder
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"
        assert (results / f"{job1}.mp4").is_file()

        job4 = a.enqueue(**LONG)[0]  # a clean stop: the job goes back to the queue
        b.wait(job4, until={"processing"}, step=1)
        assert other.stop() == 0, other.log_path.read_text()[-2000:]
        d = b.status(job4)
        assert (d["status"], d["started_at"], d["error_message"]) == ("queued", None, None), d
        deadline = time.monotonic() + 10  # no worker left: not ready (cache of 1 s)
        while a.req("GET", "/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "no worker" in a.req("GET", "/ready").json()["error"]
        r = b.req("DELETE", f"/v1/videos/{job4}")
        assert r.status_code == 200 and a.req("GET", f"/api/ai/queue/{job4}").status_code == 404
    finally:
        for w in workers:
            w.stop()
        for s in procs[:2]:
            assert s.stop() in CLEAN_EXIT, s.log_tail()


def test_serve_with_its_own_worker_on_redis_survives_a_redis_restart(redis_server, tmp_path):
    """``serve --store redis://`` (one process, a worker thread): a sync generation; then Redis
    restarts (AOF) with jobs queued, and they run once it is back."""
    s = api_server(tmp_path, "s", redis_server.url, tmp_path / "results").start()
    try:
        s.wait_ready(timeout=300)
        body = {"model": "wan-ai-wan2-1-t2v-1-3b-diffusers", "prompt": "a fox", **SMALL}
        r = s.req("POST", "/api/ai/videos/generate", json=body)
        assert r.status_code == 200, r.text
        ids = s.enqueue(2, **LONG)
        s.wait(ids[0], until={"processing"}, step=1)
        redis_server.kill()
        redis_server.start()
        assert [s.status(i)["status"] for i in ids] == ["processing", "queued"]
        r = s.req("DELETE", f"/api/ai/queue/{ids[0]}")  # through Redis, to the worker thread
        assert r.status_code == 200, r.text
        assert s.wait(ids[0])["status"] == "cancelled"
        assert s.wait(ids[1], until={"processing"})["status"] == "processing"
        assert s.req("POST", f"/api/ai/queue/{ids[1]}/cancel").status_code == 200
        assert s.wait(ids[1])["status"] == "cancelled"
    finally:
        assert s.stop() in CLEAN_EXIT, s.log_tail()


# -- issue 22: a flushed Redis, poison, an unreachable Redis --------------------------------------
def claim_soon(store: RedisStore, tries: int = 5):
    """``claim`` until a job comes (a read that found the group missing recreates it first)."""
    for _ in range(tries):
        if (row := claim(store)) is not None:
            return row
    return None


def test_a_flushed_queue_is_recreated_and_poison_is_dropped(redis_server, caplog):
    r = redis.Redis.from_url(redis_server.url)
    api, worker = RedisStore(redis_server.url), RedisStore(redis_server.url, consumer="w")
    r.flushall()  # the stream and its consumer group are gone (a restart without persistence)
    gen_id = api.enqueue(MODEL, PARAMS, 1, "url", 10)[0]["id"]  # XADD makes a bare stream
    assert claim_soon(worker)["id"] == gen_id  # the group is recreated, from the start
    worker.finish(gen_id, "succeeded")
    assert sum("recreated" in rec.getMessage() for rec in caplog.records) == 1

    r.xadd("wanlite:queue", {"junk": "1"})  # an entry without a job id
    r.hset("wanlite:gen:bad", mapping={"id": "bad", "params": "{not json", "status": "queued"})
    r.zadd("wanlite:index", {"bad": 10_000})
    r.sadd("wanlite:queued", "bad")
    r.xadd("wanlite:queue", {"id": "bad"})  # its entry
    good = api.enqueue(MODEL, PARAMS, 1, "url", 10)[0]["id"]
    caplog.clear()
    assert claim_soon(worker)["id"] == good  # both poison entries passed over...
    worker.finish(good, "succeeded")
    assert r.xlen("wanlite:queue") == 0 and r.xpending("wanlite:queue", "workers")["pending"] == 0
    assert [rec.getMessage() for rec in caplog.records] == [
        "queue entry without a job id dropped",
        "unreadable job hash dropped from the listings",
    ]  # ...acknowledged, deleted and logged once each
    assert [row["id"] for row in api.page()[0]] == [good, gen_id]  # listings skip it
    assert r.zscore("wanlite:index", "bad") is None and not r.sismember("wanlite:queued", "bad")
    assert api.get("bad") is None and len(caplog.records) == 2  # found again: no new line

    seq = api.get(good)["seq"]
    api.delete(good)
    assert api.get(good) is None and api.seq_of(good) == seq  # a cursor after the delete
    assert api.seq_of("never-was") is None


def test_serve_on_redis_survives_flushall_and_poison_and_says_when_redis_is_down(
    redis_server, tmp_path
):
    """One ``serve --store redis://`` with its worker thread: listings survive poison in Redis,
    a FLUSHALL does not stall the queue, and while Redis is down /ready is 503 and the API
    answers 503 (not 500), then all is well again once it is back."""
    s = api_server(tmp_path, "s", redis_server.url, tmp_path / "results").start()
    r = redis.Redis.from_url(redis_server.url)
    try:
        s.wait_ready(timeout=300)
        first = s.wait(s.enqueue()[0])["generation_id"]
        r.hset("wanlite:gen:bad", mapping={"id": "bad", "params": "[", "status": "succeeded"})
        r.zadd("wanlite:index", {"bad": 10_000})
        r.xadd("wanlite:queue", {"junk": "1"})
        for path, key in (("/api/ai/queue?status=all", "generations"), ("/v1/videos", "data")):
            got = s.req("GET", path)
            assert got.status_code == 200, (path, got.text)
            assert [g.get("generation_id", g.get("id")) for g in got.json()[key]] == [first]
        stream = EventLog(s)
        for junk in (b"{not json", b'{"name": "x", "data": {}}', b"[]"):
            r.publish("wanlite:events", junk)  # the relay drops them and goes on
        second = s.enqueue()[0]
        assert stream.wait_for(second, "media_generation_completed")["status"] == "succeeded"
        stream.resp.close()

        r.flushall()
        after = s.enqueue()[0]
        assert s.wait(after, timeout=60)["status"] == "succeeded"  # not stuck in "queued"
        assert s.req("GET", f"/api/ai/queue/{first}").status_code == 404  # flushed with the rest

        redis_server.kill()
        deadline = time.monotonic() + 10
        while (ready := s.req("GET", "/ready")).status_code != 503:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        assert ready.json()["status"] == "unavailable" and "unreachable" in ready.json()["error"]
        for method, path in (("GET", f"/api/ai/queue/{after}"), ("GET", "/v1/videos")):
            got = s.req(method, path)
            assert got.status_code == 503 and got.headers["retry-after"], (path, got.text)
        got = s.req("POST", "/api/ai/queue", json={"model": SERVED, "prompt": "x", **SMALL})
        assert got.status_code == 503, got.text

        redis_server.start()
        s.wait_ready(timeout=30)
        assert s.wait(s.enqueue()[0], timeout=60)["status"] == "succeeded"
        records = s.log_records()
        assert [x for x in records if x.get("status") == 500] == []
        assert [x for x in records if x["msg"] == "worker error"] == []  # no tracebacks
        assert any("recreated" in x["msg"] for x in records)
        assert sum(x["msg"] == "event relay: message dropped" for x in records) == 3
    finally:
        assert s.stop() in CLEAN_EXIT, s.log_tail()
