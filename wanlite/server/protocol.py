"""Connection-level limits, below the ASGI app: request timeout, connection cap, accept errors.

Design
------
* uvicorn's h11 protocol holds a request head that never ends for ever (its keep-alive timer
  only runs between requests, and any byte cancels it), so a client can hold any number of
  connections open until the process runs out of file descriptors.  :func:`guarded_h11`
  subclasses it with a deadline per request: armed when the connection opens and again when a
  response completes, disarmed only once a whole request (head and body) has arrived.  Data
  arriving meanwhile does not re-arm it, so sending a byte now and then does not help.
* Connections beyond ``max_connections`` get a short JSON 503 and are closed at once, before
  anything is read: the cap holds whatever the clients send (uvicorn's own
  ``limit_concurrency`` only answers requests that were completely received).
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


def guarded_h11(request_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class with a per-request deadline and a connection cap."""

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            if self.conn.their_state in _WAITING and not self.transport.is_closing():
                self.transport.close()  # an unfinished request: no answer owed

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in _WAITING:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state in _WAITING:
                self._arm()  # waiting for the next request on this connection

        def connection_lost(self, exc) -> None:
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
