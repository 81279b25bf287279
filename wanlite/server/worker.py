"""The model thread and the event broadcast.

Design
------
* :class:`Worker` is the only owner of the model: one daemon thread loads it (so the HTTP side
  is up at once and ``/ready`` tells when loading is done), then runs generations one at a time,
  always the oldest queued row of the :class:`~wanlite.server.store.Store` (FIFO).  The HTTP
  side never touches torch, so it stays responsive while a video renders.
* Cancelling: a queued row is cancelled in the store directly; a running one gets a flag that
  the pipeline's step callback checks, raising out of ``generate`` at the next denoising
  step, or at the next decoded chunk (``on_decode``) once decoding has started.
* A clean shutdown stops the running generation at its next step and puts it back in the queue
  (it runs again after restart); a crash leaves it ``processing``, which the store's recovery
  turns into ``failed`` with a clear message (SQLite), or which another worker takes over once
  the claim goes stale (Redis).
* On a shared store (Redis: ``store.shared``) a heartbeat thread runs beside the model thread:
  it keeps the running job's claim fresh (``store.touch``, decode included), polls the store
  for a cancel or delete made by any API process (``store.poll``: the step callback only
  reads a flag), notices a job taken over by another worker, and announces this worker's
  state (``store.announce``) for the readiness of HTTP-only processes.
* :class:`JobControl` is what the HTTP side calls (cancel, delete, state): :class:`Worker`
  when the model runs in this process, :class:`RemoteWorkers` for ``--workers 0`` (no model,
  readiness from the workers' announcements).  Events go to ``hub``: the local
  :class:`EventHub`, or on Redis a bus to every API process.
* A causal model (``pipe.causal``) runs each job chunk by chunk instead
  (:mod:`wanlite.server.streaming`): every chunk goes into a growing fragmented MP4 served at
  the job's stream URL, with a ``media_generation_chunk`` event; cancel and shutdown are
  checked before each chunk.
* :class:`EventHub` fans events out to subscribers (SSE streams, waiting sync requests): the
  worker thread publishes through ``loop.call_soon_threadsafe``; each subscriber owns an
  ``asyncio.Queue``.  Events are ``(name, data)`` with data a JSON-able dict; result URLs in
  them are server-relative paths (``/api/ai/results/<id>.mp4``) that the HTTP layer makes
  absolute for each client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .private import private_file
from .store import ACTIVE, Store
from .streaming import CHUNK, run_stream, stream_path, unlink_if_ours

log = logging.getLogger("wanlite.server")

PROGRESS = "media_generation_progress"
COMPLETED = "media_generation_completed"  # every terminal status (check data["status"])
FAILED = "media_generation_failed"
CANCELLED = "media_generation_cancelled"
CLOSED = "server_shutting_down"  # sent to every subscriber once, at shutdown (never to clients)
SUBSCRIBER_BACKLOG = 10_000  # events kept for a slow subscriber before progress ones are dropped


_QUOTED_PATH = re.compile(r"""(['"])(?:[A-Za-z]:)?[/\\].*?\1""")
_PATH = re.compile(r"""(?<![\w.-])(?:[A-Za-z]:)?[/\\][^\s'"]*""")


def public_error(e: BaseException) -> str:
    """An exception as clients see it: type and message with file paths left out (the full
    text goes to the server log)."""
    text = _QUOTED_PATH.sub(r"\1<path>\1", str(e))
    return f"{type(e).__name__}: {_PATH.sub('<path>', text)}"


def result_path(gen_id: str) -> str:
    return f"/api/ai/results/{gen_id}.mp4"


def event_data(row: dict[str, Any]) -> dict[str, Any]:
    """The payload of an event about ``row`` (a store dict)."""
    ok = row["status"] == "succeeded"
    return {
        "generation_id": row["id"],
        "model": row["model"],
        "status": row["status"],
        "result_url": result_path(row["id"]) if ok else None,
        "error_message": row["error_message"],
        "step": row["step"],
        "total": row["total_steps"],
        "seed": row["seed"],
    }


def terminal_events(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    data = event_data(row)
    specific = {"failed": FAILED, "cancelled": CANCELLED}.get(row["status"])
    return ([(specific, data)] if specific else []) + [(COMPLETED, data)]


class EventHub:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._subs.add(q)
        if self.closed:
            q.put_nowait((CLOSED, {}))
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subs.discard(q)

    def publish(self, name: str, data: dict[str, Any]) -> None:
        """Thread-safe: callable from the worker thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between, so nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fanout, name, data)

    def close(self) -> None:
        """Thread- and signal-safe: every subscriber gets ``CLOSED`` (and later ones at once)."""
        self.closed = True
        self.publish(CLOSED, {})

    def _fanout(self, name: str, data: dict[str, Any]) -> None:
        for q in list(self._subs):
            if name == PROGRESS and q.qsize() >= SUBSCRIBER_BACKLOG:
                continue
            q.put_nowait((name, data))


class _Shutdown(Exception):
    """Raised from the step callback when the server stops: the job goes back to the queue."""


class _CancelRequested(Exception):
    """Raised from the step callback to stop a cancelled generation at the next step (the
    pipeline stops on any exception from its callback, as with ``wanlite.pipeline.Cancelled``)."""


class JobControl:
    """Cancel and delete, for the HTTP side, wherever the job runs; alone (no model) it is the
    base of :class:`RemoteWorkers`."""

    state = "ready"
    load_error: str | None = None

    def __init__(self, store: Store, results_dir: Path, hub) -> None:
        self.store = store
        self.results_dir = Path(results_dir)
        self.hub = hub  # anything with publish(name, data): EventHub, or the Redis bus
        self._cancel: set[str] = set()

    def start(self) -> None:
        pass

    def notify(self) -> None:
        """New work was queued."""

    def interrupt(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> bool:
        return True

    def cancel(self, gen_id: str) -> tuple[dict[str, Any] | None, str]:
        row, outcome = self.store.cancel(gen_id)
        if outcome == "requested":
            self._cancel.add(gen_id)  # here; a worker elsewhere sees the store's flag
        elif outcome == "cancelled":
            log.info("generation cancelled", extra={"fields": {"generation_id": gen_id}})
            for name, data in terminal_events(row):
                self.hub.publish(name, data)
        return row, outcome

    def delete(self, gen_id: str) -> dict[str, Any] | None:
        """Remove a generation and its file (None if unknown).  A running one is stopped at its
        next step; one still active ends for its waiters as cancelled (the row is gone)."""
        row = self.store.delete(gen_id)
        if row is None:
            return None
        if row["status"] == "processing":
            self._cancel.add(gen_id)
        if row["status"] in ACTIVE:
            gone = {**row, "status": "cancelled", "error_message": "deleted by request"}
            for name, data in terminal_events(gone):
                self.hub.publish(name, data)
        elif row["result_file"]:
            (self.results_dir / row["result_file"]).unlink(missing_ok=True)
        log.info("generation deleted", extra={"fields": {"generation_id": gen_id}})
        return row


class RemoteWorkers(JobControl):
    """``--workers 0``: the HTTP side alone.  Ready when a worker process announced ``ready``
    in the store recently; ``failed`` when every live worker failed to load."""

    _cached: tuple[float, str, str | None] = (0.0, "loading", None)

    def _status(self) -> tuple[str, str | None]:
        at, state, error = self._cached
        if time.monotonic() - at > 1.0:
            try:
                live = list(self.store.workers().values())
                states = [w["state"] for w in live]
                errors = [w["error"] for w in live if w["error"]]
            except Exception as e:  # noqa: BLE001 - the store is away: not ready
                states, errors = [], [f"the job store is unreachable: {type(e).__name__}"]
            if "ready" in states:
                state, error = "ready", None
            elif states and all(s == "failed" for s in states):
                state, error = "failed", errors[0] if errors else None
            else:
                state = "loading"
                error = None if states else (errors or ["no worker is connected yet"])[0]
            self._cached = (time.monotonic(), state, error)
        return state, error

    @property
    def state(self) -> str:  # type: ignore[override]
        return self._status()[0]

    @property
    def load_error(self) -> str | None:  # type: ignore[override]
        return self._status()[1]


def load_model(model: str, options: dict, threads: int = 0):
    """``wanlite.load(model, **options)`` with ``threads`` torch threads (0: torch's default)."""
    import wanlite

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    return wanlite.load(model, **options)


class Worker(JobControl):
    def __init__(
        self,
        store: Store,
        results_dir: Path,
        loader: Callable[[], Any],
        hub,
        previews: int = 0,
    ):
        super().__init__(store, results_dir, hub)
        self.loader = loader
        self.previews = previews  # a preview in the progress event every N steps; 0 = none
        self.state = "loading"  # loading | ready | failed
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.pipe = None
        self.current: str | None = None
        self._why: dict[str, str] = {}  # gen_id -> why the heartbeat stopped it
        self._live: dict[str, tuple[Path, int]] = {}  # gen_id -> its stream file (and inode)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()  # the model thread has ended
        self._thread = threading.Thread(target=self._main, name="wanlite-worker", daemon=True)
        self._beat: threading.Thread | None = None
        if store.shared:
            self._beat = threading.Thread(target=self._heartbeat, name="wanlite-beat", daemon=True)

    # -- called from the HTTP side ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self._beat is not None:
            self._beat.start()

    def notify(self) -> None:
        """New work was queued."""
        self._wake.set()

    def interrupt(self) -> None:
        """Ask the thread to stop (signal-safe, returns at once): a running job stops at its
        next step and goes back to the queue."""
        self._stop.set()
        self._wake.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread (a running job goes back to the queue); True if it has ended."""
        self.interrupt()
        if self._thread.is_alive():
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended and self._beat is not None:
            self._done.set()
            self._beat.join(timeout)
            with contextlib.suppress(Exception):
                self.store.retire()
        return ended

    def _finish(self, gen_id, status, result_file, error, metrics) -> dict[str, Any] | None:
        """``store.finish``; a shared store that is away is retried for a few seconds (after
        that the job is left to be taken over and run again)."""
        for attempt in range(6 if self.store.shared else 1):
            try:
                return self.store.finish(
                    gen_id, status, result_file=result_file, error_message=error, metrics=metrics
                )
            except Exception:
                if attempt == 5 or not self.store.shared:
                    raise
                self._stop.wait(1.0)
        return None  # unreachable

    @property
    def _me(self) -> str | None:
        return getattr(self.store, "consumer", None)

    # -- the heartbeat (shared stores) -------------------------------------------------------
    def _heartbeat(self) -> None:
        period = min(0.25, self.store.claim_timeout / 8)
        touch_every = max(period, self.store.claim_timeout / 5)
        announced = touched = 0.0
        while not self._done.is_set():
            try:
                now = time.monotonic()
                if now - announced >= 2.0:
                    self.store.announce(self.state, self.load_error)
                    announced = now
                gen_id = self.current
                if gen_id is not None:
                    why = self.store.poll(gen_id)
                    if why is not None and gen_id == self.current:
                        self._why[gen_id] = why
                        self._cancel.add(gen_id)
                    elif now - touched >= touch_every:
                        self.store.touch(gen_id)
                        touched = now
            except Exception as e:  # noqa: BLE001 - the store is away for a while: go on
                log.warning("heartbeat failed", extra={"fields": {"error": str(e)}})
                self._done.wait(1.0)
            self._done.wait(period)

    # -- the thread -------------------------------------------------------------------------
    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pipe = self.loader()
        except BaseException as e:  # noqa: BLE001 - any load error must reach /ready and jobs
            self.load_error = public_error(e)  # /ready is open: no server paths in it
            self.state = "failed"
            log.error("model load failed", extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
            for row in self.store.fail_queued(f"the model failed to load: {self.load_error}"):
                for name, data in terminal_events(row):
                    self.hub.publish(name, data)
            self._thread_ended()
            return
        self.load_seconds = time.perf_counter() - t0
        self.state = "ready"
        log.info("model ready", extra={"fields": {"load_seconds": round(self.load_seconds, 2)}})
        while not self._stop.is_set():
            try:
                row = self.store.claim_next(lambda: secrets.randbelow(2**32))
                if row is None:
                    if not self.store.shared:  # Redis's claim_next waited for work already
                        self._wake.wait(1.0)
                        self._wake.clear()
                    continue
                self._run(row)
            except Exception as e:  # noqa: BLE001 - e.g. a full disk: log, wait, go on
                if self.store.shared and self.store.unreachable(e):  # one line a second
                    log.warning("job store unreachable", extra={"fields": {"error": str(e)}})
                else:
                    log.exception("worker error")
                self.current = None  # no heartbeat for a job left behind: it is taken over
                self._stop.wait(1.0)
        self._thread_ended()

    def _thread_ended(self) -> None:
        if self._beat is None:
            return
        with contextlib.suppress(Exception):  # announce the end now (a failed load stays shown)
            self.store.announce(self.state, self.load_error)

    def _run(self, row: dict[str, Any]) -> None:
        gen_id = row["id"]
        if self.store.shared:  # a flag left from an earlier run of this id (a lost claim)
            self._cancel.discard(gen_id)
            self._why.pop(gen_id, None)
        self.current = gen_id
        fields = {**row["params"], "generation_id": gen_id, "seed": row["seed"]}
        log.info("generation started", extra={"fields": fields})
        self.hub.publish(PROGRESS, event_data(row))
        t0 = time.perf_counter()
        outcome = self._execute(row)
        self.current = None
        if outcome is not None:  # None: requeued at shutdown
            self._conclude(gen_id, *outcome, seconds=round(time.perf_counter() - t0, 3))
        live = self._live.pop(gen_id, None)
        if live is not None:  # a stream's file: gone once the store says how the job ended
            unlink_if_ours(*live)

    def _stop_check(self, gen_id: str) -> Callable[..., None]:
        """A callable that raises when the server stops or ``gen_id`` is to be cancelled."""

        def stop_if_asked(*_) -> None:
            if self._stop.is_set():
                raise _Shutdown
            if gen_id in self._cancel:
                raise _CancelRequested

        return stop_if_asked

    def _hooks(self, row: dict[str, Any]) -> dict[str, Any]:
        """``generate``'s callbacks for ``row``: stop when asked (after each step and each
        decoded chunk), store and publish progress, and previews when the server makes them."""
        gen_id = row["id"]
        stop_if_asked = self._stop_check(gen_id)

        previews: dict[str, str] = {}  # the step's new preview, made just before its callback

        def on_preview(step: int, total_: int, frames) -> None:
            from ..preview import data_url

            previews["url"] = data_url(frames)  # the middle frame, <= 256 px, JPEG

        def callback(step: int, total_: int, latents) -> None:
            stop_if_asked()
            self._progress(gen_id, step + 1)
            event = {**event_data(row), "step": step + 1, "total": total_}
            if "url" in previews:
                event["preview"] = previews.pop("url")
            self.hub.publish(PROGRESS, event)

        hooks = dict(callback=callback, on_decode=stop_if_asked)
        if self.previews:
            hooks |= dict(preview_every=self.previews, on_preview=on_preview)
        return hooks

    def _progress(self, gen_id: str, step: int) -> None:
        try:
            self.store.progress(gen_id, step)
        except Exception as e:  # shared store away for a moment: the job goes on
            if not self.store.shared:
                raise
            log.warning("progress not stored", extra={"fields": {"error": str(e)}})

    def _stream(self, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A causal model's job (:mod:`wanlite.server.streaming`): each chunk into the live
        file, then a progress and a ``media_generation_chunk`` event; the step shown is the
        share of frames done, in the row's steps (rounded up).  Returns (result file, metrics)."""
        gen_id, t0 = row["id"], time.perf_counter()
        total_steps = row["total_steps"]

        def on_chunk(done: int, total: int, codecs: str | None) -> None:
            step = -(-done * total_steps // total)  # rounded up: 0 only before any frame
            self._progress(gen_id, step)
            event = {**event_data(row), "step": step, "total": total_steps}
            self.hub.publish(PROGRESS, event)
            chunk = {"frames": done, "num_frames": total, "codecs": codecs}
            self.hub.publish(CHUNK, {**event, **chunk, "stream_url": stream_path(gen_id)})

        check = self._stop_check(gen_id)
        result, live, ino = run_stream(self.pipe, row, self.results_dir, check, on_chunk)
        self._live[gen_id] = (live, ino)
        return result, {"timings": {"stream": round(time.perf_counter() - t0, 3)}}

    def _execute(self, row: dict[str, Any]) -> tuple | None:
        """Run the generation: (status, result file, error, metrics), or None when the server
        stops and the job went back to the queue."""
        gen_id = row["id"]
        status, result_file, error, metrics = "failed", None, None, None
        try:
            if getattr(self.pipe, "causal", False):  # served chunk by chunk as it grows
                result_file, metrics = self._stream(row)
            else:
                params = {**row["params"], "seed": row["seed"]}
                video = self.pipe.generate(**params, progress=False, **self._hooks(row))
                result_file = f"{gen_id}.mp4"
                video.save(self.results_dir / result_file)
                private_file(self.results_dir / result_file)  # 0600, in a 0700 folder
                metrics = {"timings": video.timings, "peak_memory": video.peak_memory}
            status = "succeeded"
        except _Shutdown:
            self.store.requeue(gen_id)
            log.info("generation requeued at shutdown", extra={"fields": {"generation_id": gen_id}})
            return None
        except _CancelRequested:
            status, error = "cancelled", "cancelled by request"
        except Exception as e:  # noqa: BLE001 - a failed job must not kill the worker
            error = public_error(e)
            log.exception("generation failed", extra={"fields": {"generation_id": gen_id}})
        finally:
            self._cancel.discard(gen_id)
        return status, result_file, error, metrics

    def _conclude(self, gen_id: str, status, result_file, error, metrics, seconds: float) -> None:
        """Store the outcome and publish its events, unless the job is not this worker's any
        more (taken over by another worker, or deleted while it ran)."""
        if self._why.pop(gen_id, None) == "lost":  # another worker runs it now: hands off
            log.warning("generation taken over", extra={"fields": {"generation_id": gen_id}})
            return
        done = self._finish(gen_id, status, result_file, error, metrics)
        if done is None:  # deleted while running (Worker.delete): its file goes too
            self._cancel.discard(gen_id)
            if result_file:
                (self.results_dir / result_file).unlink(missing_ok=True)
            return
        if done["status"] != status or done.get("worker", self._me) != self._me:
            log.warning("generation taken over", extra={"fields": {"generation_id": gen_id}})
            return  # not this worker's to end any more (its file, the same video, stays)
        log.info(
            "generation finished",
            extra={"fields": {"generation_id": gen_id, "status": status, "seconds": seconds}},
        )
        for name, data in terminal_events(done):
            self.hub.publish(name, data)
