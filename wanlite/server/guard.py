"""Request guards: Host, Origin, auth, the body bound, unhandled errors and the access log.

Design
------
* :class:`Guard` is one small ASGI middleware in front of every route, unknown ones included,
  checking in this order: the ``Host`` header and the ``Origin`` policy (see
  :mod:`wanlite.server.origin`; allowed preflights are answered here), the bearer token
  (``/health`` and ``/ready`` stay open; a result URL may instead carry its signature), then
  a bound on the request body (413 before the app reads anything: the body is read here,
  counted, and replayed to the app).
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
from .guard_paths import OPEN_PATHS, RESULT_RE
from .origin import OriginPolicy, host_ok

log = logging.getLogger("wanlite.server")
NO_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>'"
EXPIRED = "result link expired: get the generation again for a fresh link"


class Guard:
    def __init__(self, app, *, api_key, max_body, signer, hosts=None, origins=None):
        self.app, self.api_key, self.max_body, self.signer = app, api_key, max_body, signer
        self.hosts, self.origins = hosts, origins or OriginPolicy((), None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
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
        m = RESULT_RE.match(scope["path"])
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
        too_big = f"request body too large: the limit is {self.max_body} bytes"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                resp = error_response(400, "invalid Content-Length header", "invalid_request_error")
                return await resp(scope, receive, send)
            if int(length) > self.max_body:
                return await error_response(413, too_big, "request_too_large")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await self._read(receive)
        if body is None:
            return  # the client went away
        if len(body) > self.max_body:
            return await error_response(413, too_big, "request_too_large")(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_, send)

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
