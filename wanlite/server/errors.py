"""The one error shape, and the JSON response class that can always be sent.

Every error, whatever raised it, is::

    {"status": "error", "status_message": "...",
     "error": {"type": "invalid_request_error", "message": "...", "param": "height",
               "code": null}}

The ``error`` object is OpenAI's error shape (``message``, ``type``, ``param``, ``code``, the
last two null when they do not apply), so the ``openai`` client raises its typed errors with
our message; the two top-level keys are the hosted API's.

JSON bodies are written ASCII-only (``\\uXXXX`` escapes): text that is not valid Unicode (a lone
surrogate such as ``"\\ud800"``, which JSON can carry but UTF-8 cannot) then still makes a valid
body instead of an unhandled ``UnicodeEncodeError``.  The parameters reject such text; this is
the second line, for rows stored before that check and for error messages quoting user input.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("wanlite.server")


class AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", **kw):
        super().__init__(message)
        self.headers: dict[str, str] | None = kw.pop("headers", None)
        self.status, self.message, self.type, self.extra = status, message, type_, kw


def error_response(
    status: int, message: str, type_: str, headers: dict | None = None, **extra: Any
) -> JSONResponse:
    err = {"type": type_, "message": message, "param": None, "code": None, **extra}
    body = {"status": "error", "status_message": message, "error": err}
    return AsciiJSONResponse(body, status_code=status, headers=headers)


async def _api_error(request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.type, exc.headers, **exc.extra)


def _methods(routes, scope) -> set[str]:
    methods: set[str] = set()
    for route in routes:
        if hasattr(route, "original_router"):  # an included APIRouter
            methods |= _methods(route.original_router.routes, scope)
        elif route.matches(scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return methods


def _allowed_methods(request) -> str:
    """Every method some route takes on this path (Starlette names only the first route's)."""
    return ", ".join(sorted(_methods(request.app.routes, request.scope)))


async def _http_error(request, exc: StarletteHTTPException):
    type_ = "not_found" if exc.status_code == 404 else "invalid_request_error"
    message = "not found" if exc.status_code == 404 else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return error_response(exc.status_code, message, type_, headers)


async def _validation_error(request, exc: RequestValidationError):
    e = exc.errors()[0]
    where = ".".join(map(str, e["loc"]))
    return error_response(400, f"{where}: {ascii(e['msg'])[1:-1]}", "invalid_request_error")


async def _store_unreachable(request, exc: Exception):
    """Redis down, or too slow to answer: a 503 to retry, not a 500 with a traceback."""
    log.warning("job store unreachable", extra={"fields": {"error": type(exc).__name__}})
    msg = "the job store is unreachable: retry later"
    return error_response(503, msg, "server_error", {"Retry-After": "5"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    try:
        from redis.exceptions import ConnectionError as RedisDown
        from redis.exceptions import TimeoutError as RedisSlow
    except ImportError:  # no Redis store possible
        return
    app.add_exception_handler(RedisDown, _store_unreachable)
    app.add_exception_handler(RedisSlow, _store_unreachable)
