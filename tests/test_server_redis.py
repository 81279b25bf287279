"""The Redis job store (``wanlite.server.redis_store``) against a real ``redis-server`` started by
a fixture on a free loopback port (AOF on, in a temp dir); skipped where ``redis-server`` or the
``redis`` package is missing.  Store level only: ``serve --store redis://`` and ``wanlite
worker`` are not wired yet, so the multi-process tests (two workers, two API processes, kill -9
of a worker mid-job) remain to be written with them.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

from test_server import free_port  # noqa: E402

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
