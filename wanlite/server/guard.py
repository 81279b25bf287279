"""Request guards and the error shape: auth, body bound, JSON bodies, the access log.

Design
------
* :class:`Guard` is one small ASGI middleware in front of every route, unknown ones included:
  bearer-token auth (``/health`` and ``/ready`` stay open; a result URL may instead carry its
  signature), a bound on the request body (413 before the app reads anything: the body is read
  here, counted, and replayed to the app), and one JSON log line per request.
* Every error is one JSON shape (:mod:`wanlite.server.errors`).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from typing import Any

from fastapi import Request

from .errors import ApiError, error_response

log = logging.getLogger("wanlite.server")

OPEN_PATHS = ("/health", "/ready")
RESULT_RE = re.compile(r"^/api/ai/results/([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.mp4$")


class Guard:
    """ASGI middleware: bearer auth, request-body bound (413), one JSON log line per request."""

    def __init__(self, app, *, api_key: str | None, max_body: int, signer):
        self.app, self.api_key, self.max_body, self.signer = app, api_key, max_body, signer

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
        finally:
            fields = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status.get("code"),
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            }
            quiet = scope["path"] in OPEN_PATHS and status.get("code", 500) < 400
            log.log(logging.DEBUG if quiet else logging.INFO, "request", extra={"fields": fields})

    def _authorized(self, scope, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        given = headers.get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return True
        m = RESULT_RE.match(scope["path"])
        return bool(m) and self.signer.verify(m.group(1), scope["query_string"])

    async def _handle(self, scope, receive, send):
        headers = dict(scope["headers"])
        if not self._authorized(scope, headers):
            msg = "missing or invalid API key: send 'Authorization: Bearer <key>'"
            resp = error_response(
                401, msg, "authentication_error", headers={"WWW-Authenticate": "Bearer"}
            )
            return await resp(scope, receive, send)
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
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await error_response(413, too_big, "request_too_large")(scope, receive, send)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_, send)


async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
