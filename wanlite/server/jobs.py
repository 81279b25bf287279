"""From a request body to queued rows: the checks shared by the queue and the sync endpoint.

Parameters are validated when the request arrives (``wanlite.params.validate``, the same
definitions as ``json_request_schema``), so a bad request is a 400 naming the field and never
reaches the queue.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from wanlite.params import FIELDS_BY_NAME, ParamError, validate

from .context import ServerContext, ctx
from .errors import ApiError
from .store import QueueFull

log = logging.getLogger("wanlite.server")
RETRY_AFTER = "10"  # seconds a client should wait after a 429: a small job's time, roughly


def _pop_extras(c: ServerContext, body: dict[str, Any], queue: bool) -> tuple[int, str]:
    """Take the non-parameter fields out of ``body``: (num_generations, response_format)."""
    model = body.pop("model", None)
    if model is None:
        raise ApiError(400, "model is required", param="model")
    if model != c.config.model_id:
        msg = f"unknown model {model!r}: this server serves {c.config.model_id!r}"
        raise ApiError(400, msg, "model_not_found", param="model")
    body.pop("target_namespace", None)  # hosted-API billing namespace: accepted, unused
    n = body.pop("num_generations", 1) if queue else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4:
        msg = f"num_generations must be an integer in [1, 4], got {n!r}"
        raise ApiError(400, msg, param="num_generations")
    fmt = body.pop("response_format", "url")
    if fmt not in ("url", "b64_json"):
        msg = f"response_format must be 'url' or 'b64_json', got {fmt!r}"
        raise ApiError(400, msg, param="response_format")
    return n, fmt


def validated(body: dict[str, Any], limits: str = "hosted") -> dict[str, Any]:
    """``wanlite.params.validate`` of ``body`` as a dict; ParamError (a ValueError) naming the
    field, also for an integer too large for a float in a number field (``guidance_scale`` of
    400 digits: JSON allows it, and ``float()`` raises OverflowError on it)."""
    for name, value in body.items():
        field = FIELDS_BY_NAME.get(name)
        if field is None or field.type != "number" or not isinstance(value, int):
            continue
        try:
            float(value)
        except OverflowError:
            msg = f"{name} must be {field.range_text()}, got an integer too large for a number"
            raise ParamError(msg, name) from None
    return validate(body, limits=limits).to_dict()


def parse_request(c: ServerContext, body: dict[str, Any], queue: bool) -> tuple[dict, int, str]:
    """(validated params, num_generations, response_format) or ApiError 400."""
    body = dict(body)
    n, fmt = _pop_extras(c, body, queue)
    try:
        params = validated(body, c.config.limits)
    except ValueError as e:  # messages quote user text ASCII-escaped (wanlite.params)
        raise ApiError(400, str(e), param=getattr(e, "param", None)) from None
    return params, n, fmt


async def enqueue(request: Request, params: dict, n: int, fmt: str) -> list[dict]:
    c = ctx(request)
    if c.worker.state == "failed":
        raise ApiError(503, f"the model failed to load: {c.worker.load_error}", "server_error")
    try:
        rows = await run_in_threadpool(
            c.store.enqueue, c.config.model_id, params, n, fmt, c.config.max_queue
        )
    except QueueFull as e:
        raise ApiError(429, str(e), "queue_full", headers={"Retry-After": RETRY_AFTER}) from None
    c.worker.notify()
    for row in rows:
        log.info("generation queued", extra={"fields": {"generation_id": row["id"]}})
    return rows
