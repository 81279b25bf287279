"""The job store on Redis, for several API and worker processes (``--store redis://HOST:PORT/DB``).

Used by ``wanlite serve --store redis://...`` (API processes, with or without a worker thread)
and ``wanlite worker --store redis://...`` (worker processes, no HTTP); tested against a real
``redis-server`` (tests/test_server_redis.py).

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
* A job has one owner: the hash's ``worker`` field.  :meth:`RedisStore.touch`, ``finish`` and
  ``requeue`` act only for that owner, so a worker that lost its claim (taken over after a
  long pause) can neither steal it back nor end a job another worker is running.
* A clean stop (:meth:`RedisStore.requeue`) marks the job ``queued`` again and makes its entry
  look long idle without counting a delivery (``XCLAIM ... IDLE RETRYCOUNT``), so the next
  ``XAUTOCLAIM`` of any worker takes it at once, ahead of newer entries.
* Events go through pub/sub (channel ``wanlite:events``, :meth:`RedisStore.publish_event`);
  every API process relays them into its own :class:`~wanlite.server.worker.EventHub`
  (:func:`relay_events`), so any API process streams any job.  Pub/sub is fire-and-forget: an
  event sent while an API process is cut from Redis is lost for its streams, but the state is
  in the hashes (sync waits poll it, and SSE replays the last minute's completions).
* Workers announce themselves in the hash ``wanlite:workers`` (consumer -> state, error, time)
  every couple of seconds; an HTTP-only process is ready when a fresh entry says ``ready``.
* Durability is Redis's: with ``appendonly yes`` the queue survives a Redis restart.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from .store import STATUSES, TERMINAL, QueueFull

log = logging.getLogger("wanlite.server")
P = "wanlite:"
QUEUE, GROUP = P + "queue", "workers"
EVENTS, WORKERS = P + "events", P + "workers"
WORKER_FRESH = 10.0  # seconds a worker's announcement stays valid
DIED = "its worker stopped responding {n} times (crashed or killed); giving up"

_ENQUEUE = """
if redis.call('SCARD', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then
  return -1
end
local seqs = {}
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
  seqs[#seqs + 1] = seq
end
return seqs
"""

# KEYS: gen hash, queued set; ARGV: started_at, seed, consumer, entry id
_CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'processing', 'started_at', ARGV[1], 'seed', ARGV[2],
           'step', '0', 'worker', ARGV[3], 'entry', ARGV[4])
redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: gen hash, finished zset, stream; ARGV: status, completed_at, result_file, error, metrics,
# consumer (only its job is finished; '' = whoever runs it)
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[6] then return 0 end
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

# KEYS: gen hash, stream; ARGV: consumer
_TOUCH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
if not entry then return 0 end
redis.call('XCLAIM', KEYS[2], 'workers', ARGV[1], 0, entry, 'JUSTID')
return 1
"""

# KEYS: gen hash, queued set, stream; ARGV: consumer, seed ('' = pick again), idle ms
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'started_at', '', 'step', '0', 'seed', ARGV[2])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('SADD', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then
  local p = redis.call('XPENDING', KEYS[3], 'workers', entry, entry, 1)
  local n = 0
  if p[1] then n = math.max(tonumber(p[1][4]) - 1, 0) end
  redis.call('XCLAIM', KEYS[3], 'workers', ARGV[1], 0, entry, 'IDLE', ARGV[3], 'RETRYCOUNT', n,
             'JUSTID')
end
return 1
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
    """The :class:`~wanlite.server.store.Store` interface on Redis, plus :meth:`touch`,
    :meth:`poll`, events (:meth:`publish_event`), the worker registry, and a ``consumer`` name
    per worker process."""

    shared = True  # other processes use it too: poll for cancels, keep claims fresh

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
        self._touch = self.r.register_script(_TOUCH)
        self._requeue = self.r.register_script(_REQUEUE)
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
        seqs = self._enqueue(keys=keys, args=[max_queued, *map(json.dumps, rows)])
        if seqs == -1:
            raise QueueFull(f"the queue is full ({max_queued} places); retry later")
        # the rows as enqueued (a worker waiting for work may have claimed them already)
        return [
            _decode({k.encode(): str(v).encode() for k, v in {**row, "seq": seq}.items()})
            for row, seq in zip(rows, seqs, strict=True)
        ]

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
                message = DIED.format(n=deliveries - 1)
                done = self._end(gen_id, "failed", error_message=message, consumer="")
                if done is not None and done["status"] == "failed":
                    from .worker import terminal_events

                    for name, data in terminal_events(done):
                        self.publish_event(name, data)
                return None
            self.r.hset(P + "gen:" + gen_id, mapping={"status": "queued"})
        seed = row["seed"] if row["seed"] is not None else pick_seed()
        keys = [P + "gen:" + gen_id, P + "queued"]
        if not self._claim(keys=keys, args=[repr(time.time()), seed, self.consumer, entry]):
            return None
        return self.get(gen_id)

    def touch(self, gen_id: str) -> bool:
        """Keep this worker's claim on a running job fresh (else it is taken over); False if
        the job is no longer this worker's (ended, deleted, or taken over)."""
        return bool(self._touch(keys=[P + "gen:" + gen_id, QUEUE], args=[self.consumer]))

    def poll(self, gen_id: str) -> str | None:
        """Why this worker must stop ``gen_id`` (``"cancelled"``, ``"deleted"``, ``"lost"``: taken
        over by another worker), or None to go on."""
        status, cancel, worker = self.r.hmget(
            P + "gen:" + gen_id, "status", "cancel_requested", "worker"
        )
        if status is None:
            return "deleted"
        if status != b"processing" or worker != self.consumer.encode():
            return "lost"
        return "cancelled" if cancel == b"1" else None

    def progress(self, gen_id: str, step: int) -> None:
        key = P + "gen:" + gen_id
        if self.r.hget(key, "status") == b"processing":
            self.r.hset(key, "step", step)
        self.touch(gen_id)

    def finish(self, gen_id, status, *, result_file=None, error_message=None, metrics=None):
        """End this worker's ``processing`` job; returns the row as it is now (None if deleted;
        unchanged, e.g. another worker's, if it was not this worker's job to end)."""
        return self._end(gen_id, status, result_file, error_message, metrics, self.consumer)

    def _end(self, gen_id, status, result_file=None, error_message=None, metrics=None,
             consumer=""):  # fmt: skip
        assert status in TERMINAL
        keys = [P + "gen:" + gen_id, P + "finished", QUEUE]
        args = [status, repr(time.time()), result_file or "", error_message or ""]
        self._finish(keys=keys, args=[*args, json.dumps(metrics) if metrics else "", consumer])
        return self.get(gen_id)

    def requeue(self, gen_id: str) -> None:
        """Clean stop: this worker's running job goes back to the queue, first in line for the
        next worker, without counting as a delivery."""
        row = self.get(gen_id)
        if row is None:
            return
        seed = row["params"].get("seed")
        keys = [P + "gen:" + gen_id, P + "queued", QUEUE]
        idle = int(max(self.claim_timeout, 1.0) * 1000) * 1000  # far past any claim timeout
        self._requeue(keys=keys, args=[self.consumer, "" if seed is None else seed, idle])

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
            if row["status"] == "processing" and row.get("entry"):  # its worker stops, sees it gone
                pipe.xack(QUEUE, GROUP, row["entry"])
                pipe.xdel(QUEUE, row["entry"])
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

    # -- events and workers ------------------------------------------------------------------
    def publish_event(self, name: str, data: dict[str, Any]) -> None:
        """Send an event to every API process (see :func:`relay_events`)."""
        self.r.publish(EVENTS, json.dumps({"name": name, "data": data}))

    def announce(self, state: str, error: str | None = None) -> None:
        """Announce this worker's state (loading, ready, failed) for :data:`WORKER_FRESH` s."""
        value = json.dumps({"state": state, "error": error, "at": time.time()})
        self.r.hset(WORKERS, self.consumer, value)

    def retire(self) -> None:
        self.r.hdel(WORKERS, self.consumer)

    def workers(self) -> dict[str, dict[str, Any]]:
        """The workers announced in the last :data:`WORKER_FRESH` seconds (stale ones are
        removed)."""
        now, out = time.time(), {}
        for name, value in self.r.hgetall(WORKERS).items():
            info = json.loads(value)
            if now - info["at"] > WORKER_FRESH:
                self.r.hdel(WORKERS, name)
            else:
                out[name.decode()] = info
        return out


class RedisBus:
    """What a worker publishes to (``publish(name, data)``), here Redis pub/sub; a failure to
    publish is logged, never raised into the job."""

    def __init__(self, store: RedisStore):
        self.store = store

    def publish(self, name: str, data: dict[str, Any]) -> None:
        try:
            self.store.publish_event(name, data)
        except Exception:  # noqa: BLE001 - Redis away: the state is in the hashes anyway
            log.warning("event not published", extra={"fields": {"event": name}})


def relay_events(url: str, hub, stop) -> None:
    """Run until ``stop`` (a ``threading.Event``) is set: every event published on Redis goes
    to ``hub.publish`` (thread-safe).  Reconnects after a Redis restart."""
    import redis

    client = redis.Redis.from_url(url)
    while not stop.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(EVENTS)
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg is not None and msg["type"] == "message":
                    event = json.loads(msg["data"])
                    hub.publish(event["name"], event["data"])
        except redis.RedisError as e:
            log.warning("event relay: Redis unreachable", extra={"fields": {"error": str(e)}})
            stop.wait(1.0)
        finally:
            pubsub.close()
    client.close()
