"""Reading a request body: ``Content-Type`` first, then the JSON (or form), as one 4xx shape.

Only ``application/json`` bodies are read (415 otherwise): a browser page can send a
``text/plain`` body to any server without a CORS preflight, but not a JSON one.  A body nested
too deeply for Python's ``json`` (``RecursionError``) is malformed JSON like any other.

One exception, :func:`read_json_or_form` for ``POST /v1/videos``: OpenAI's client sends its
``create`` as ``multipart/form-data`` even without a file, so that route reads forms too.  A
form is what a cross-site page *can* send without a preflight, so this relies on the
``Origin`` / ``Sec-Fetch-Site`` checks (:mod:`wanlite.server.origin`), which run before any
route and refuse cross-site browser requests whatever their body.

Forms are parsed by python-multipart (the parser Starlette and FastAPI use), a linear state
machine, in a worker thread, with bounds on everything a hostile body could make large: parts,
headers per part, the length of a header line and the parameters of ``Content-Disposition``.
The standard library's ``email`` parser, used before, slows down much faster than linearly on
long parameter lists (a 20 KB body of ``;`` held the event loop for seconds) and recurses on
nested comments (30,000 ``(``: a ``RecursionError``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .errors import ApiError

MAX_PARTS = 32  # the create request has a dozen fields at most
MAX_PART_HEADERS = 8  # Content-Disposition, Content-Type, ... per part
MAX_HEADER_BYTES = 1024  # one part header line (name and value), and the Content-Type header
MAX_PARAMS = 8  # ';'-separated parameters of a Content-Disposition
MAX_BOUNDARY = 70  # RFC 2046 section 5.1.1


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


def _malformed(why: str) -> ApiError:
    return ApiError(400, f"malformed multipart/form-data body: {why}")


def _params(value: str, what: str) -> tuple[str, dict[str, str]]:
    """A bounded header value with parameters (``form-data; name="x"``) -> (value, params)."""
    from python_multipart.multipart import parse_options_header

    if len(value) > MAX_HEADER_BYTES or value.count(";") > MAX_PARAMS:
        raise _malformed(f"{what} too long (at most {MAX_HEADER_BYTES} bytes, {MAX_PARAMS} ';')")
    main, params = parse_options_header(value)  # linear; no RFC 2231 decoding
    try:
        return main.decode("latin-1"), {k.decode(): v.decode("utf-8") for k, v in params.items()}
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not UTF-8") from None


class _Collector:
    """python-multipart's callbacks: the parts, each as (headers, data), within the bounds."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytearray]] = []
        self.ended = False
        self._field = self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._grow("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._grow("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": lambda d, s, e: self.parts[-1][1].extend(d[s:e]),
            "on_end": lambda: setattr(self, "ended", True),
        }

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        self.parts.append(({}, bytearray()))

    def _grow(self, attr: str, chunk: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + chunk)
        if len(self._field) + len(self._value) > MAX_HEADER_BYTES:
            raise _malformed(f"a part header is longer than {MAX_HEADER_BYTES} bytes")

    def _header_end(self) -> None:
        headers = self.parts[-1][0]
        if len(headers) >= MAX_PART_HEADERS:
            raise _malformed(f"a part has more than {MAX_PART_HEADERS} headers")
        headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1")
        self._field = self._value = b""


def parse_form(content_type: str, raw: bytes) -> dict[str, str | FormFile]:
    """A ``multipart/form-data`` body as {name: text, or FormFile for a file part}.  Blocking
    (linear in the body's size): call it from a worker thread."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser

    boundary = _params(content_type, "the Content-Type header")[1].get("boundary", "")
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise _malformed(f"the Content-Type needs a boundary of 1-{MAX_BOUNDARY} characters")
    collector = _Collector()
    try:
        parser = MultipartParser(boundary.encode("latin-1"), collector.callbacks())
        parser.write(raw)
        parser.finalize()
    except (FormParserError, ValueError, UnicodeEncodeError) as e:
        raise _malformed(str(e) or type(e).__name__) from None
    if not collector.ended:
        raise _malformed("it ends before its closing boundary")
    return _fields(collector.parts)


def _fields(parts: list[tuple[dict[str, str], bytearray]]) -> dict[str, str | FormFile]:
    fields: dict[str, str | FormFile] = {}
    for headers, data in parts:
        kind, params = _params(headers.get("content-disposition", ""), "a Content-Disposition")
        name = params.get("name")
        if kind.lower() != "form-data" or not name:
            raise _malformed("a part has no name")
        if name in fields:
            raise ApiError(400, f"form field {ascii(name)} given twice", param=name)
        if "filename" in params:
            fields[name] = FormFile(params["filename"])
            continue
        try:
            fields[name] = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"form field {ascii(name)} is not UTF-8 text", param=name) from None
    return fields


async def read_json_or_form(request: Request) -> tuple[dict[str, Any], bool]:
    """(body, is_form): a JSON object, or a multipart form whose values are all strings."""
    if _media_type(request) != "multipart/form-data":
        return await read_body(request), False
    raw = await request.body()  # at most --max-body bytes (the guard)
    return await run_in_threadpool(parse_form, request.headers["content-type"], raw), True
