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
  Lua script (:mod:`wanlite.server.redis_scripts`), so no two processes ever see a half-done
  change.
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
* Durability is Redis's: with ``appendonly yes`` the queue survives a Redis restart.  Without
  it (or after ``FLUSHALL``) the stream and its group are gone: a worker whose read fails with
  ``NOGROUP`` recreates the group (from the stream's start, so jobs queued meanwhile run), and
  ``/ready`` says 503 while Redis cannot be reached or the group cannot be made
  (:meth:`RedisStore.health`).
* Poison is dropped, never retried or served: a stream entry without a job id is acknowledged
  and deleted; a job hash that does not decode (not JSON, fields missing) is taken out of the
  index and queue sets, and its entry dropped, with one log line each.  Listings skip it.
* A deleted job leaves its ``seq`` (``wanlite:gone:<id>``, for a day), so an id cursor still
  pages after its video is gone.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from . import redis_scripts as lua
from .ints import ascii_uint
from .store import STATUSES, TERMINAL, QueueFull

log = logging.getLogger("wanlite.server")
P = "wanlite:"
QUEUE, GROUP = P + "queue", "workers"
EVENTS, WORKERS = P + "events", P + "workers"
WORKER_FRESH = 10.0  # seconds a worker's announcement stays valid
DIED = "its worker stopped responding {n} times (crashed or killed); giving up"

_INT = ("seq", "seed", "step", "total_steps")
_FLOAT = ("enqueued_at", "started_at", "completed_at")
_NEEDED = ("id", "model", "status", "params", "seq", "total_steps", "enqueued_at")
GONE_TTL = 86400  # seconds a deleted id still works as a listing cursor
HEALTH_CACHE = 1.0  # seconds a health verdict is reused (/ready may be polled hard)


class BadRow(ValueError):
    """A job hash that does not decode (poison: written by something else, or damaged)."""


def _decode(h: dict[bytes, bytes]) -> dict[str, Any] | None:
    if not h:
        return None
    try:
        d = _fields(h)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError included
        raise BadRow(f"{type(e).__name__}: {e}") from None
    if d["status"] not in STATUSES or not isinstance(d["params"], dict):
        raise BadRow(f"status {d['status']!r}, params {type(d['params']).__name__}")
    return d


def _fields(h: dict[bytes, bytes]) -> dict[str, Any]:
    d: dict[str, Any] = {k.decode(): v.decode() for k, v in h.items()}
    missing = [k for k in _NEEDED if d.get(k, "") == ""]
    if missing:
        raise KeyError(", ".join(missing))
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


def _redis():
    """The redis package, or ImportError naming the extra that brings it."""
    try:
        import redis
    except ImportError as e:
        msg = "the Redis job store needs the redis package: pip install 'wanlite[redis]'"
        raise ImportError(msg, name="redis") from e
    return redis


class RedisStore:
    """The :class:`~wanlite.server.store.Store` interface on Redis, plus :meth:`touch`,
    :meth:`poll`, events (:meth:`publish_event`), the worker registry, and a ``consumer`` name
    per worker process."""

    shared = True  # other processes use it too: poll for cancels, keep claims fresh

    def __init__(self, url: str, consumer: str | None = None, **kw: Any):
        redis = _redis()
        # a Redis that hangs is an error after a while, not a request held for ever (reads
        # block for at most a second: claim_next's block_ms)
        self.r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=15)
        self._health: tuple[float, str | None] = (-HEALTH_CACHE, None)
        self.consumer = consumer or f"worker-{uuid.uuid4().hex[:8]}"
        self.claim_timeout = float(kw.get("claim_timeout", 30.0))
        self.max_attempts = int(kw.get("max_attempts", 3))
        self._enqueue = self.r.register_script(lua.ENQUEUE)
        self._claim = self.r.register_script(lua.CLAIM)
        self._finish = self.r.register_script(lua.FINISH)
        self._cancel = self.r.register_script(lua.CANCEL)
        self._touch = self.r.register_script(lua.TOUCH)
        self._requeue = self.r.register_script(lua.REQUEUE)
        self.ensure_group()

    def close(self) -> None:
        self.r.close()

    def ensure_group(self) -> bool:
        """Create the queue's stream and consumer group if missing; True if it was missing.
        From id 0: entries added while the group was missing are delivered too."""
        redis = _redis()
        try:
            self.r.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:  # BUSYGROUP: it exists (another process made it)
            if "BUSYGROUP" not in str(e):
                raise
            return False
        return True

    def _regroup(self) -> None:
        """The group vanished under a read (FLUSHALL, a restart without persistence)."""
        if self.ensure_group():
            msg = "queue consumer group was missing (Redis flushed or restarted): recreated"
            log.warning(msg, extra={"fields": {"consumer": self.consumer}})

    @staticmethod
    def unreachable(e: BaseException) -> bool:
        """Whether ``e`` says Redis cannot be reached now (worth a line, not a traceback)."""
        redis = _redis()
        return isinstance(e, (redis.ConnectionError, redis.TimeoutError))

    def health(self) -> str | None:
        """Why the queue cannot be served now, or None; the group is recreated if missing.
        Cached for :data:`HEALTH_CACHE` seconds."""
        at, error = self._health
        if time.monotonic() - at < HEALTH_CACHE:
            return error
        try:
            self._regroup()
            error = None
        except Exception as e:  # noqa: BLE001 - any failure: not ready, and why
            error = f"the job store is unreachable: {type(e).__name__}"
        self._health = (time.monotonic(), error)
        return error

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

    def _next_entry(self, block_ms: int) -> tuple[str, str | None, int] | None:
        """(entry id, generation id or None if the entry has none, deliveries): a dead
        worker's entry first, else a new one."""
        try:
            _, claimed, *_ = self.r.xautoclaim(
                QUEUE, GROUP, self.consumer, int(self.claim_timeout * 1000), "0-0", count=1
            )
            if claimed:
                entry, fields = claimed[0]
                info = self.r.xpending_range(QUEUE, GROUP, entry, entry, 1)
                deliveries = info[0]["times_delivered"] if info else 1
            else:
                got = self.r.xreadgroup(GROUP, self.consumer, {QUEUE: ">"}, count=1, block=block_ms)
                if not got:
                    return None
                (entry, fields), deliveries = got[0][1][0], 1
        except _redis().ResponseError as e:  # the stream or group went (FLUSHALL) before or
            if not str(e).startswith(("NOGROUP", "UNBLOCKED")):  # while this read blocked
                raise
            self._regroup()
            return None
        gen_id = (fields or {}).get(b"id")
        return entry.decode(), gen_id.decode("utf-8", "replace") if gen_id else None, deliveries

    def _drop(self, entry: str) -> None:
        self.r.xack(QUEUE, GROUP, entry)
        self.r.xdel(QUEUE, entry)

    def claim_next(self, pick_seed, block_ms: int = 1000) -> dict[str, Any] | None:
        """The next job for this worker (None if none within ``block_ms``); entries of jobs
        cancelled or deleted while queued, or failed for too many attempts, are passed over."""
        while (got := self._next_entry(block_ms)) is not None:
            if got[1] is None:  # poison: nothing to run
                fields = {"entry": got[0]}
                log.warning("queue entry without a job id dropped", extra={"fields": fields})
                self._drop(got[0])
                continue
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
            pipe.set(P + "gone:" + gen_id, row["seq"], ex=GONE_TTL)  # for id cursors
            pipe.execute()
        return row

    def purge(self, cutoff: float) -> list[dict[str, Any]]:
        ids = [i.decode() for i in self.r.zrangebyscore(P + "finished", "-inf", f"({cutoff}")]
        return [row for row in map(self.delete, ids) if row is not None]

    # -- queries -----------------------------------------------------------------------------
    def get(self, gen_id: str) -> dict[str, Any] | None:
        """The job, or None if unknown or unreadable (poison: see :meth:`_quarantine`)."""
        try:
            return _decode(self.r.hgetall(P + "gen:" + gen_id))
        except BadRow as e:
            self._quarantine(gen_id, str(e))
            return None

    def _quarantine(self, gen_id: str, why: str) -> None:
        """Take an unreadable job hash out of the listings and the queue bound (the hash stays,
        for whoever wants to look at it); logged once, when it is first found."""
        pipe = self.r.pipeline()
        for key in ("index", "finished"):
            pipe.zrem(P + key, gen_id)
        pipe.srem(P + "queued", gen_id)
        if any(pipe.execute()):
            fields = {"generation_id": gen_id, "error": why[:200]}
            log.warning("unreadable job hash dropped from the listings", extra={"fields": fields})

    def seq_of(self, gen_id: str) -> int | None:
        """The queue sequence of ``gen_id``, also for a job deleted in the last day."""
        row = self.get(gen_id)
        if row is not None:
            return row["seq"]
        gone = self.r.get(P + "gone:" + gen_id)
        return ascii_uint(gone.decode("latin-1")) if gone else None

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
            try:
                info = json.loads(value)
                stale = now - float(info["at"]) > WORKER_FRESH
            except (ValueError, KeyError, TypeError):  # poison: not an announcement
                stale = True
            if stale:
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


def _relay_one(hub, raw: bytes) -> None:
    try:
        event = json.loads(raw)
        name, data = event["name"], event["data"]
        if not isinstance(name, str) or not {"status", "generation_id"} <= set(data):
            raise ValueError("not an event")
    except (ValueError, KeyError, TypeError) as e:  # poison: not ours; the relay goes on
        log.warning("event relay: message dropped", extra={"fields": {"error": str(e)[:200]}})
        return
    hub.publish(name, data)


def relay_events(url: str, hub, stop) -> None:
    """Run until ``stop`` (a ``threading.Event``) is set: every event published on Redis goes
    to ``hub.publish`` (thread-safe).  Reconnects after a Redis restart."""
    redis = _redis()

    client = redis.Redis.from_url(url)
    while not stop.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(EVENTS)
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.5)
                if msg is not None and msg["type"] == "message":
                    _relay_one(hub, msg["data"])
        except redis.RedisError as e:
            log.warning("event relay: Redis unreachable", extra={"fields": {"error": str(e)}})
            stop.wait(1.0)
        finally:
            pubsub.close()
    client.close()
