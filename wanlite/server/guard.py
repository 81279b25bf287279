"""Request guards: Host, Origin, auth, the body bound, unhandled errors and the access log.

Design
------
* :class:`Guard` is one small ASGI middleware in front of every route, unknown ones included,
  checking in this order: the ``Host`` header and the ``Origin`` policy (see
  :mod:`wanlite.server.origin`; allowed preflights are answered here), the bearer token
  (``/health`` and ``/ready`` stay open; a result URL may instead carry its signature), then
  a bound on the request body (413 before the app reads anything: the body is read here,
  counted, and replayed to the app).
* Long-lived requests (SSE, downloads, the sync call: ``guard_paths.LONG_RE``) are at most
  ``max_active`` at once (``--limit-concurrency``; more get a JSON 503 with ``Retry-After``),
  counted after the key check, so they cannot starve ``/health``, ``/ready`` or the short API
  calls, and a client without the key holds nothing.  Connections still sending a request
  have their own budget (:mod:`wanlite.server.protocol`).
* Every response gets ``X-Content-Type-Options: nosniff`` and, unless the route set its own,
  ``Cache-Control: no-store`` (prompts, ids and videos stay out of shared caches).
* It also catches what the app did not handle: the client gets the JSON 500 of every other
  error, the log gets the traceback, and the access log line (one per request) always has the
  status actually sent.
* Every error is one JSON shape (:mod:`wanlite.server.errors`).
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.responses import Response

from .errors import error_response
from .guard_paths import LONG_RE, OPEN_PATHS, RESULT_RE, STREAM_RE
from .origin import OriginPolicy, host_ok

log = logging.getLogger("wanlite.server")
NO_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>'"
EXPIRED = "result link expired: get the generation again for a fresh link"
BUSY = "too many long-lived requests (event streams, downloads, sync calls): retry later"
SAFE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))


def _safe_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` plus nosniff and no-store, unless the response set those headers itself."""
    names = {name.lower() for name, _ in headers}
    return [*headers, *((n, v) for n, v in SAFE_HEADERS if n not in names)]


class Guard:
    def __init__(self, app, *, api_key, max_body, signer, hosts=None, origins=None, max_active=100):
        self.app, self.api_key, self.max_body, self.signer = app, api_key, max_body, signer
        self.hosts, self.origins = hosts, origins or OriginPolicy((), None)
        self.max_active, self.active = max_active, 0  # long-lived requests running (one loop)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": _safe_headers(list(message.get("headers", [])))}
            await send(message)

        try:
            await self._handle(scope, receive, send_)
        except Exception:  # noqa: BLE001 - any unhandled error: JSON 500, traceback in the log
            log.exception("unhandled error", extra={"fields": {"path": scope["path"]}})
            if "code" not in status:
                resp = error_response(500, "internal server error", "server_error")
                await resp(scope, receive, send_)
        finally:
            self._log(scope, status.get("code"), t0)

    @staticmethod
    def _log(scope, code: int | None, t0: float) -> None:
        fields = {
            "method": scope["method"],
            "path": scope["path"],
            "status": code if code is not None else 499,  # None: the client left first
            "ms": round((time.perf_counter() - t0) * 1000, 1),
        }
        quiet = scope["path"] in OPEN_PATHS and (code or 500) < 400
        log.log(logging.DEBUG if quiet else logging.INFO, "request", extra={"fields": fields})

    def _authorized(self, scope, headers: dict[bytes, bytes]) -> bool | str:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), self.api_key.encode()
        ):
            return True
        m = RESULT_RE.match(scope["path"]) or STREAM_RE.match(scope["path"])
        if not m:
            return False
        verdict = self.signer.verify(m.group(1), scope["query_string"])  # a signed result URL
        return True if verdict == "ok" else verdict

    def _refusal(self, scope, headers: dict[bytes, bytes]):
        """The error response for a request refused before the app, or (None, cors origin)."""
        if not host_ok(headers.get(b"host", b"").decode("latin-1"), self.hosts):
            return error_response(400, "invalid Host header for this server", "invalid_host"), None
        allowed, cors = self.origins.check(scope, headers)
        if not allowed:
            msg = "cross-site request refused: this origin is not allowed (--allow-origin)"
            return error_response(403, msg, "forbidden_origin"), None
        if scope["method"] == "OPTIONS" and cors:  # a preflight of an allowed origin: no key
            resp = Response(status_code=204)
            resp.raw_headers += OriginPolicy.cors_headers(cors, preflight=True)
            return resp, None
        verdict = self._authorized(scope, headers)
        if verdict is not True:
            msg = EXPIRED if verdict == "expired" else NO_KEY
            resp = error_response(401, msg, "authentication_error", {"WWW-Authenticate": "Bearer"})
            return resp, cors
        return None, cors

    async def _handle(self, scope, receive, send):
        headers = dict(scope["headers"])
        refusal, cors = self._refusal(scope, headers)
        if cors:
            send = _with_headers(send, OriginPolicy.cors_headers(cors))
        if refusal is not None:
            return await refusal(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 19:  # bytes.isdigit: ASCII digits only
                resp = error_response(400, "invalid Content-Length header", "invalid_request_error")
                return await resp(scope, receive, send)
            if int(length) > self.max_body:
                return await self._too_big()(scope, receive, send)
        if LONG_RE.match(scope["path"]):
            if self.active >= self.max_active:
                busy = error_response(503, BUSY, "server_busy", {"Retry-After": "5"})
                return await busy(scope, receive, send)
            self.active += 1
            try:
                return await self._app(scope, receive, send)
            finally:
                self.active -= 1
        return await self._app(scope, receive, send)

    async def _app(self, scope, receive, send):
        """The app, with the body read and bounded first for methods that carry one."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await self._read(receive)
        if body is None:
            return  # the client went away
        if len(body) > self.max_body:
            return await self._too_big()(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_, send)

    def _too_big(self):
        msg = f"request body too large: the limit is {self.max_body} bytes"
        return error_response(413, msg, "request_too_large")

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None if the client left; stops reading past the bound."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body or not message.get("more_body", False):
                return b"".join(chunks)


def _with_headers(send, extra: list[tuple[bytes, bytes]]):
    async def send_(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return send_
