"""Connection-level limits, below the ASGI app: request timeout, connection cap, accept errors.

Design
------
* uvicorn's h11 protocol holds a request head that never ends for ever (its keep-alive timer
  only runs between requests, and any byte cancels it), so a client can hold any number of
  connections open until the process runs out of file descriptors.  :func:`guarded_h11`
  subclasses it with a deadline per request: armed when the connection opens and again when a
  response completes, disarmed only once a whole request (head and body) has arrived.  Data
  arriving meanwhile does not re-arm it, so sending a byte now and then does not help.
* Two budgets, so that neither kind of connection can lock the other out.  Connections still
  sending a request (or idle between two) are at most ``max_connections``: beyond that, the
  ones waiting longest are closed (no answer is owed; each first gets 50 ms, :class:`_Waiting`),
  so sockets that keep sending half a head and reconnecting cannot hold the door shut, while a
  real client, which sends its head at once, is read and served.  Connections whose request
  is being served (an SSE stream, a download, a sync call) are bounded by the app
  (:class:`~wanlite.server.guard.Guard`: ``--limit-concurrency`` long-lived requests,
  ``/health`` and ``/ready`` never counted).  Hard bounds: ``2 * max_connections`` waiting
  (then the oldest past its grace goes at once, and with none, the newcomer), and
  ``4 * max_connections`` open in all: a connection beyond them gets a short JSON 503 and is
  closed before anything is read (uvicorn's own ``limit_concurrency`` only answers requests
  that were completely received).
* At the descriptor limit asyncio logs every failed ``accept()`` with a traceback, many times a
  second; :func:`limit_accept_errors` makes that one warning line per interval.
"""

from __future__ import annotations

import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("wanlite.server")
ACCEPT_LOG_INTERVAL = 60.0
_BUSY = json.dumps(
    {
        "status": "error",
        "status_message": "too many connections: retry later",
        "error": {"type": "server_busy", "message": "too many connections: retry later"},
    }
).encode()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 5\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(_BUSY) + _BUSY
)
_WAITING = (h11.IDLE, h11.SEND_BODY)  # the client's request is not all here yet


class _Waiting:
    """The connections of one server still sending a request (or idle between two), oldest
    first, at most ``limit``: beyond it, the oldest that have had ``GRACE`` seconds are closed.
    The grace matters: asyncio accepts a burst of connections before it reads any of them, so
    a client that sent its whole head at once must not be closed for a flood that came in the
    same instant; after the grace its request has been read and it is not waiting any more."""

    GRACE = 0.05

    def __init__(self, limit: int):
        self.limit, self.since = limit, {}  # protocol -> monotonic time it began waiting
        self._sweep = None  # the scheduled trim, if any

    def add(self, conn) -> None:
        self.since.pop(conn, None)
        self.since[conn] = time.monotonic()
        if len(self.since) > self.limit and self._sweep is None:
            self._sweep = conn.loop.call_later(self.GRACE, self.trim, conn.loop)

    def trim(self, loop=None) -> None:
        """Close the oldest connections past their grace while there are too many (``loop``:
        look again when the next one's grace ends, if still too many)."""
        if loop is not None:
            self._sweep = None
        old = time.monotonic() - self.GRACE
        while len(self.since) > self.limit:
            conn, since = next(iter(self.since.items()))
            if since > old:  # all the rest are newer: look again when this one's grace ends
                if loop is not None:
                    self._sweep = loop.call_later(since - old, self.trim, loop)
                return
            conn.evict()


def guarded_h11(request_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class with a per-request deadline and connection budgets (one server)."""
    waiting = _Waiting(max_connections)

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(waiting.since) >= 2 * max_connections:  # a flood: no waiting for the trim
                waiting.trim()
            full = len(waiting.since) >= 2 * max_connections  # and all have just come
            if full or self._open() > 4 * max_connections:  # or nearly all are being served
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._wait()

        def _open(self) -> int:
            return sum(not c.transport.is_closing() for c in self.connections)

        def _wait(self) -> None:
            waiting.add(self)
            self._arm()

        def evict(self) -> None:
            waiting.since.pop(self, None)
            self._disarm()
            if not self.transport.is_closing():
                self.transport.close()  # an unfinished request: no answer owed

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            if self.conn.their_state in _WAITING:
                self.evict()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in _WAITING:  # a whole request: being served now
                waiting.since.pop(self, None)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state in _WAITING:
                self._wait()  # waiting for the next request on this connection

        def connection_lost(self, exc) -> None:
            waiting.since.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def limit_accept_errors(loop, interval: float = ACCEPT_LOG_INTERVAL) -> None:
    """Log asyncio's failing ``accept()`` once per ``interval``, in one line, no traceback."""
    previous = loop.get_exception_handler()
    last = [-interval]

    def handler(loop, context) -> None:
        if "accept" not in str(context.get("message", "")):
            return previous(loop, context) if previous else loop.default_exception_handler(context)
        now = time.monotonic()
        if now - last[0] >= interval:
            last[0] = now
            error = str(context.get("exception") or context.get("message"))
            msg = f"accept() failing (out of file descriptors?); logged once per {interval:g} s"
            log.warning(msg, extra={"fields": {"error": error}})

    loop.set_exception_handler(handler)
