"""Reading a JSON request body: ``Content-Type`` first, then the JSON, as one 4xx shape.

Only ``application/json`` bodies are read (415 otherwise): a browser page can send a
``text/plain`` body to any server without a CORS preflight, but not a JSON one.  A body nested
too deeply for Python's ``json`` (``RecursionError``) is malformed JSON like any other.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from .errors import ApiError


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request) -> dict[str, Any]:
    if _media_type(request) != "application/json":
        msg = "the request body must be JSON: send 'Content-Type: application/json'"
        raise ApiError(415, msg, "unsupported_media_type")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON in the request body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
