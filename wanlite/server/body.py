"""Reading a request body: ``Content-Type`` first, then the JSON (or form), as one 4xx shape.

Only ``application/json`` bodies are read (415 otherwise): a browser page can send a
``text/plain`` body to any server without a CORS preflight, but not a JSON one.  A body nested
too deeply for Python's ``json`` (``RecursionError``) is malformed JSON like any other.

One exception, :func:`read_json_or_form` for ``POST /v1/videos``: OpenAI's client sends its
``create`` as ``multipart/form-data`` even without a file, so that route reads forms too.  A
form is what a cross-site page *can* send without a preflight, so this relies on the
``Origin`` / ``Sec-Fetch-Site`` checks (:mod:`wanlite.server.origin`), which run before any
route and refuse cross-site browser requests whatever their body.  Forms are parsed with the
standard library's ``email`` parser (no extra dependency; the body is at most 64 KiB).
"""

from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser
from typing import Any

from fastapi import Request

from .errors import ApiError


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request) -> dict[str, Any]:
    if _media_type(request) != "application/json":
        msg = "the request body must be JSON: send 'Content-Type: application/json'"
        if request.url.path == "/v1/videos":
            msg += " (or multipart/form-data)"
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


class FormFile:
    """A file part of a form (its name only: no route here takes files)."""

    def __init__(self, filename: str):
        self.filename = filename


def parse_form(content_type: str, raw: bytes) -> dict[str, str | FormFile]:
    """A ``multipart/form-data`` body as {name: text, or FormFile for a file part}."""
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
    if not msg.is_multipart() or msg.defects:
        raise ApiError(400, "malformed multipart/form-data body")
    fields: dict[str, str | FormFile] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "malformed multipart/form-data body: a part has no name")
        if name in fields:
            raise ApiError(400, f"form field {ascii(name)} given twice", param=name)
        if part.get_filename() is not None:
            fields[name] = FormFile(part.get_filename())
            continue
        try:
            fields[name] = (part.get_payload(decode=True) or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"form field {ascii(name)} is not UTF-8 text", param=name) from None
    return fields


async def read_json_or_form(request: Request) -> tuple[dict[str, Any], bool]:
    """(body, is_form): a JSON object, or a multipart form whose values are all strings."""
    if _media_type(request) != "multipart/form-data":
        return await read_body(request), False
    return parse_form(request.headers["content-type"], await request.body()), True
