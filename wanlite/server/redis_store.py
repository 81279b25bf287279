"""The job store on Redis, for several API and worker processes (``--store redis://HOST:PORT/DB``).

Status: the store itself (this module) is built and tested against a real ``redis-server``
(tests/test_server_redis.py); ``wanlite serve --store redis://...`` and ``wanlite worker`` are
not wired to it yet (see the server README, "Decided, not built yet").

Design
------
* One hash per generation (``wanlite:gen:<id>``), the same fields as a SQLite row; a sorted
  set ``wanlite:index`` (score: a sequence from ``INCR wanlite:seq``) for listing and paging,
  ``wanlite:finished`` (score: completed_at) for retention and the SSE replay, and a set
  ``wanlite:queued`` whose size bounds the queue.
* The queue is a Stream (``wanlite:queue``) read by one consumer group (``workers``): each
  entry is delivered to exactly one worker (``XREADGROUP``), which acknowledges and deletes it
  when the job ends.  A worker refreshes its claim while it runs (:meth:`RedisStore.touch`,
  ``XCLAIM ... JUSTID``); an entry idle longer than ``claim_timeout`` belongs to a dead worker
  and is taken over by another (``XAUTOCLAIM``), at most ``max_attempts`` deliveries in all,
  then the job ends ``failed`` saying why.  Entries of jobs cancelled or deleted while queued
  are skipped and acknowledged when they come up.
* Every state change that must be atomic (enqueue with the bound, claim, finish, cancel) is one
  Lua script, so no two processes ever see a half-done change.
* Durability is Redis's: with ``appendonly yes`` the queue survives a Redis restart.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .store import STATUSES, TERMINAL, QueueFull

P = "wanlite:"
QUEUE, GROUP = P + "queue", "workers"
DIED = "its worker stopped responding {n} times (crashed or killed); giving up"

_ENQUEUE = """
if redis.call('SCARD', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then
  return -1
end
for i = 2, #ARGV do
  local row = cjson.decode(ARGV[i])
  local seq = redis.call('INCR', KEYS[2])
  row['seq'] = tostring(seq)
  local flat = {}
  for k, v in pairs(row) do flat[#flat + 1] = k; flat[#flat + 1] = v end
  redis.call('HSET', KEYS[5] .. row['id'], unpack(flat))
  redis.call('ZADD', KEYS[3], seq, row['id'])
  redis.call('SADD', KEYS[1], row['id'])
  redis.call('XADD', KEYS[4], '*', 'id', row['id'])
end
return #ARGV - 1
"""

# KEYS: gen hash, queued set; ARGV: started_at, seed, consumer, entry id
_CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'processing', 'started_at', ARGV[1], 'seed', ARGV[2],
           'step', '0', 'worker', ARGV[3], 'entry', ARGV[4])
redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: gen hash, finished zset, stream; ARGV: status, completed_at, result_file, error, metrics
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'completed_at', ARGV[2], 'result_file', ARGV[3],
           'error_message', ARGV[4], 'metrics', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'id'))
if entry then
  redis.call('XACK', KEYS[3], 'workers', entry)
  redis.call('XDEL', KEYS[3], entry)
end
return 1
"""

# KEYS: gen hash, queued set, finished zset; ARGV: now
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel_requested', '1',
             'error_message', 'cancelled by request', 'completed_at', ARGV[1])
  redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
  redis.call('ZADD', KEYS[3], ARGV[1], redis.call('HGET', KEYS[1], 'id'))
  return 'cancelled'
end
if status == 'processing' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'requested'
end
return 'terminal'
"""

_INT = ("seq", "seed", "step", "total_steps")
_FLOAT = ("enqueued_at", "started_at", "completed_at")


def _decode(h: dict[bytes, bytes]) -> dict[str, Any] | None:
    if not h:
        return None
    d: dict[str, Any] = {k.decode(): v.decode() for k, v in h.items()}
    for k in (*_INT, *_FLOAT, "result_file", "error_message", "metrics"):
        if d.get(k, "") == "":
            d[k] = None
    for k in _INT:
        d[k] = None if d[k] is None else int(d[k])
    for k in _FLOAT:
        d[k] = None if d[k] is None else float(d[k])
    d["params"] = json.loads(d["params"])
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else None
    d["cancel_requested"] = d.get("cancel_requested") == "1"
    return d


class RedisStore:
    """The :class:`~wanlite.server.store.Store` interface on Redis, plus :meth:`touch` and a
    ``consumer`` name per worker process."""

    def __init__(self, url: str, consumer: str | None = None, **kw: Any):
        import redis

        self.r = redis.Redis.from_url(url)
        self.consumer = consumer or f"worker-{uuid.uuid4().hex[:8]}"
        self.claim_timeout = float(kw.get("claim_timeout", 30.0))
        self.max_attempts = int(kw.get("max_attempts", 3))
        self._enqueue = self.r.register_script(_ENQUEUE)
        self._claim = self.r.register_script(_CLAIM)
        self._finish = self.r.register_script(_FINISH)
        self._cancel = self.r.register_script(_CANCEL)
        try:
            self.r.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:  # BUSYGROUP: it exists (another process made it)
            if "BUSYGROUP" not in str(e):
                raise

    def close(self) -> None:
        self.r.close()

    # -- lifecycle ---------------------------------------------------------------------------
    def recover(self) -> list[str]:
        return []  # a dead worker's job is re-claimed (XAUTOCLAIM), not failed at start

    def enqueue(self, model, params, n, response_format, max_queued) -> list[dict[str, Any]]:
        now, rows = time.time(), []
        for _ in range(n):
            rows.append(
                {
                    "id": str(uuid.uuid4()),
                    "model": model,
                    "status": "queued",
                    "params": json.dumps(params),
                    "response_format": response_format,
                    "seed": "" if params.get("seed") is None else str(params["seed"]),
                    "step": "0",
                    "total_steps": str(params["num_inference_steps"]),
                    "cancel_requested": "0",
                    "enqueued_at": repr(now),
                }
            )
        keys = [P + "queued", P + "seq", P + "index", QUEUE, P + "gen:"]
        if self._enqueue(keys=keys, args=[max_queued, *map(json.dumps, rows)]) < 0:
            raise QueueFull(f"the queue is full ({max_queued} places); retry later")
        return [self.get(row["id"]) for row in rows]

    def _next_entry(self, block_ms: int) -> tuple[str, str, int] | None:
        """(entry id, generation id, deliveries): a dead worker's entry first, else a new one."""
        _, claimed, _ = self.r.xautoclaim(
            QUEUE, GROUP, self.consumer, int(self.claim_timeout * 1000), "0-0", count=1
        )
        if claimed:
            entry, fields = claimed[0]
            info = self.r.xpending_range(QUEUE, GROUP, entry, entry, 1)
            return entry.decode(), fields[b"id"].decode(), info[0]["times_delivered"]
        got = self.r.xreadgroup(GROUP, self.consumer, {QUEUE: ">"}, count=1, block=block_ms)
        if not got:
            return None
        entry, fields = got[0][1][0]
        return entry.decode(), fields[b"id"].decode(), 1

    def _drop(self, entry: str) -> None:
        self.r.xack(QUEUE, GROUP, entry)
        self.r.xdel(QUEUE, entry)

    def claim_next(self, pick_seed, block_ms: int = 1000) -> dict[str, Any] | None:
        """The next job for this worker (None if none within ``block_ms``); entries of jobs
        cancelled or deleted while queued, or failed for too many attempts, are passed over."""
        while (got := self._next_entry(block_ms)) is not None:
            row = self._take(*got, pick_seed)
            if row is not None:
                return row
        return None

    def _take(self, entry: str, gen_id: str, deliveries: int, pick_seed) -> dict | None:
        row = self.get(gen_id)
        if row is None or row["status"] in TERMINAL:  # deleted or cancelled while queued
            self._drop(entry)
            return None
        if row["status"] == "processing":  # its worker died: run it again, a bounded number
            if deliveries > self.max_attempts:
                self.finish(gen_id, "failed", error_message=DIED.format(n=deliveries - 1))
                return None
            self.r.hset(P + "gen:" + gen_id, mapping={"status": "queued"})
        seed = row["seed"] if row["seed"] is not None else pick_seed()
        keys = [P + "gen:" + gen_id, P + "queued"]
        if not self._claim(keys=keys, args=[repr(time.time()), seed, self.consumer, entry]):
            return None
        return self.get(gen_id)

    def touch(self, gen_id: str) -> None:
        """Keep this worker's claim on a running job fresh (else it is taken over)."""
        entry = self.r.hget(P + "gen:" + gen_id, "entry")
        if entry:
            self.r.xclaim(QUEUE, GROUP, self.consumer, 0, [entry], justid=True)

    def progress(self, gen_id: str, step: int) -> None:
        key = P + "gen:" + gen_id
        if self.r.hget(key, "status") == b"processing":
            self.r.hset(key, "step", step)
        self.touch(gen_id)

    def finish(self, gen_id, status, *, result_file=None, error_message=None, metrics=None):
        assert status in TERMINAL
        keys = [P + "gen:" + gen_id, P + "finished", QUEUE]
        args = [status, repr(time.time()), result_file or "", error_message or ""]
        self._finish(keys=keys, args=[*args, json.dumps(metrics) if metrics else ""])
        return self.get(gen_id)

    def requeue(self, gen_id: str) -> None:
        raise NotImplementedError("clean-shutdown requeue on Redis: not built yet")

    def fail_queued(self, error_message: str) -> list[dict[str, Any]]:
        return []  # one worker failing to load leaves the queue to the others

    def cancel(self, gen_id: str) -> tuple[dict[str, Any] | None, str]:
        keys = [P + "gen:" + gen_id, P + "queued", P + "finished"]
        outcome = self._cancel(keys=keys, args=[repr(time.time())]).decode()
        return self.get(gen_id), outcome

    def delete(self, gen_id: str) -> dict[str, Any] | None:
        row = self.get(gen_id)
        if row is not None:
            pipe = self.r.pipeline()
            pipe.delete(P + "gen:" + gen_id)
            for key in ("index", "finished"):
                pipe.zrem(P + key, gen_id)
            pipe.srem(P + "queued", gen_id)
            pipe.execute()
        return row

    def purge(self, cutoff: float) -> list[dict[str, Any]]:
        ids = [i.decode() for i in self.r.zrangebyscore(P + "finished", "-inf", f"({cutoff}")]
        return [row for row in map(self.delete, ids) if row is not None]

    # -- queries -----------------------------------------------------------------------------
    def get(self, gen_id: str) -> dict[str, Any] | None:
        return _decode(self.r.hgetall(P + "gen:" + gen_id))

    def page(self, statuses=STATUSES, model=None, limit=1000, *, below=None, above=None,
             descending=True):  # fmt: skip
        lo = "-inf" if above is None else f"({above}"
        hi = "+inf" if below is None else f"({below}"
        out: list[dict[str, Any]] = []
        start = 0
        while len(out) <= limit:
            if descending:
                ids = self.r.zrevrangebyscore(P + "index", hi, lo, start=start, num=limit + 1)
            else:
                ids = self.r.zrangebyscore(P + "index", lo, hi, start=start, num=limit + 1)
            if not ids:
                break
            start += len(ids)
            for row in (self.get(i.decode()) for i in ids):
                if row and row["status"] in statuses and model in (None, row["model"]):
                    out.append(row)
        return out[:limit], len(out) > limit

    def list(self, statuses=("queued", "processing"), model=None, limit=1000):
        return self.page(statuses, model, limit)[0][::-1]

    def finished_since(self, since: float) -> list[dict[str, Any]]:
        ids = self.r.zrangebyscore(P + "finished", since, "+inf")
        return [row for row in (self.get(i.decode()) for i in ids) if row is not None]
