"""``POST /api/ai/videos/generate``: the queue plus a wait.

It enqueues, then waits for the worker's completion event (subscribed before enqueueing, so
it cannot be missed), checking once a second whether the client is still there (a client that
disconnects cancels its generation) and whether the row ended without an event reaching us.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .body import read_body
from .context import ServerContext, _ts, ctx
from .errors import ApiError
from .errors import AsciiJSONResponse as JSONResponse
from .filesend import open_result
from .jobs import enqueue, parse_request
from .store import TERMINAL
from .worker import CLOSED, COMPLETED

log = logging.getLogger("wanlite.server")
router = APIRouter()


async def _wait(request: Request, events: asyncio.Queue, gen_id: str) -> bool:
    """Wait until ``gen_id`` ends; False if the client went away (the generation is cancelled)."""
    c = ctx(request)
    next_check = time.monotonic() + 1.0
    while True:
        try:
            name, data = await asyncio.wait_for(events.get(), timeout=1.0)
            if name == COMPLETED and data["generation_id"] == gen_id:
                return True
            if name == CLOSED:
                msg = f"the server is stopping: generation {gen_id} stays queued; poll it later"
                raise ApiError(503, msg, "server_shutting_down", headers={"Retry-After": "10"})
        except asyncio.TimeoutError:
            pass
        if time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + 1.0
        if await request.is_disconnected():
            await run_in_threadpool(c.worker.cancel, gen_id)
            log.info("client gone: generation cancelled", extra={"fields": {"id": gen_id}})
            return False
        row = await run_in_threadpool(c.store.get, gen_id)
        if row is None or row["status"] in TERMINAL:  # None: deleted (DELETE /v1/videos/{id})
            return True


def _read_result(c: ServerContext, name: str) -> bytes | None:
    f = open_result(c.results_dir, name)
    if f is None:
        return None
    with f:
        return f.read()


async def _response(c: ServerContext, request: Request, row: dict, fmt: str) -> dict[str, Any]:
    gen_id, p = row["id"], row["params"]
    item: dict[str, Any] = {
        "content_type": "video/mp4",
        "generation_id": gen_id,
        "seed": row["seed"],
        "width": p["width"],
        "height": p["height"],
        "num_frames": p["num_frames"],
    }
    if fmt == "b64_json":
        data = await run_in_threadpool(_read_result, c, row["result_file"])
        if data is None:  # deleted (DELETE /v1/videos/{id}) since it ended
            raise ApiError(409, f"generation {gen_id} was deleted", "cancelled")
        item["b64_json"] = base64.b64encode(data).decode()
    else:
        item["url"] = c.result_url(c.base_url(request), gen_id)
    return {
        "created": _ts(row["completed_at"]),
        "model": c.config.model_id,
        "generation_id": gen_id,
        "videos": [item],
        "timings": (row["metrics"] or {}).get("timings"),
    }


@router.post("/api/ai/videos/generate")
async def generate_sync(request: Request):
    c = ctx(request)
    params, _, fmt = parse_request(c, await read_body(request), queue=False)
    events = c.hub.subscribe()  # before enqueueing: the completion cannot be missed
    try:
        gen_id = (await enqueue(request, params, 1, fmt))[0]["id"]
        if not await _wait(request, events, gen_id):
            return JSONResponse({}, status_code=499)
    finally:
        c.hub.unsubscribe(events)
    row = await run_in_threadpool(c.store.get, gen_id)
    if row is None:
        raise ApiError(409, f"generation {gen_id} was deleted", "cancelled")
    if row["status"] == "cancelled":
        raise ApiError(409, f"generation {gen_id} was cancelled", "cancelled")
    if row["status"] != "succeeded":
        raise ApiError(
            500, f"generation {gen_id} failed: {row['error_message']}", "generation_failed"
        )
    return await _response(c, request, row, fmt)
