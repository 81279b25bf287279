"""``GET /api/events``: Server-Sent Events.  A new subscriber first gets the completion events
of the last minute (so a client that enqueues and then connects cannot miss a fast job), then
live events, with a comment line every 15 s of silence.  Streams end when the server stops."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .context import ctx
from .store import TERMINAL
from .worker import CLOSED, terminal_events

router = APIRouter()

REPLAY_SECONDS = 60.0  # completions this recent are replayed to a new subscriber
KEEPALIVE_SECONDS = 15.0


def _frame(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(hub, queue: asyncio.Queue, recent: list[dict], link):
    replayed = {row["id"] for row in recent}
    try:
        yield ": connected\n\n"
        for row in recent:
            for name, data in terminal_events(row):
                yield _frame(name, link(data))
        while True:
            try:
                name, data = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if name == CLOSED:
                return  # the server is stopping: end the stream cleanly
            if data["status"] in TERMINAL and data["generation_id"] in replayed:
                continue  # already sent from the replay
            yield _frame(name, link(data))
    finally:
        hub.unsubscribe(queue)


@router.get("/api/events")
async def events_route(request: Request):
    c = ctx(request)
    base = c.base_url(request)
    queue = c.hub.subscribe()  # before reading the replay: nothing falls in between
    try:
        recent = await run_in_threadpool(c.store.finished_since, time.time() - REPLAY_SECONDS)
    except BaseException:  # e.g. Redis away: a 503, and no subscriber left behind
        c.hub.unsubscribe(queue)
        raise

    def link(data: dict[str, Any]) -> dict[str, Any]:  # server-relative result paths -> URLs
        gen_id = data["generation_id"]
        if data.get("result_url"):
            data = {**data, "result_url": c.result_url(base, gen_id)}
        if data.get("stream_url"):
            data = {**data, "stream_url": c.result_url(base, gen_id, data["stream_url"])}
        return data

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    stream = _stream(c.hub, queue, recent, link)
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
