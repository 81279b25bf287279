"""The async queue: ``POST /api/ai/queue``, ``GET /api/ai/queue[/{id}]`` and cancelling
(``DELETE /api/ai/queue/{id}`` or ``POST /api/ai/queue/{id}/cancel``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .body import read_body
from .context import ctx, render
from .errors import ApiError
from .ints import ascii_uint
from .jobs import enqueue, parse_request
from .store import STATUSES

router = APIRouter()


@router.post("/api/ai/queue")
async def enqueue_route(request: Request):
    params, n, fmt = parse_request(ctx(request), await read_body(request), queue=True)
    rows = await enqueue(request, params, n, fmt)
    return {"generations": [{"generation_id": r["id"], "status": r["status"]} for r in rows]}


def _statuses(status: str | None) -> tuple[str, ...]:
    if not status:
        return ("queued", "processing")
    statuses = STATUSES if status == "all" else tuple(status.split(","))
    if any(s not in STATUSES for s in statuses):
        msg = f"status must be 'all' or a comma-separated subset of {', '.join(STATUSES)}"
        raise ApiError(400, msg, param="status")
    return statuses


MAX_PAGE = 1000


def _int_arg(name: str, value: str | None, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    number = ascii_uint(value)
    if number is None or not lo <= number <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}]", param=name)
    return number


@router.get("/api/ai/queue")
def list_queue(
    request: Request,
    model: str | None = None,
    status: str | None = None,
    limit: str | None = None,
    before: str | None = None,
):
    """The newest ``limit`` matching rows enqueued before the ``before`` cursor, oldest first;
    ``next_before`` is the cursor of the page before this one (null on the first page)."""
    c = ctx(request)
    size = _int_arg("limit", limit, 1, MAX_PAGE) or MAX_PAGE
    cursor = _int_arg("before", before, 1, 2**63 - 1)
    rows, more = c.store.page(_statuses(status), model, size, below=cursor)
    rows.reverse()
    base = c.base_url(request)
    return {
        "count": len(rows),
        "generations": [render(c, r, base) for r in rows],
        "has_more": more,
        "next_before": rows[0]["seq"] if more else None,
    }


def get_row(request: Request, gen_id: str) -> dict[str, Any]:
    row = ctx(request).store.get(gen_id)
    if row is None:
        raise ApiError(404, f"generation {gen_id!r} not found", "not_found")
    return row


@router.get("/api/ai/queue/{gen_id}")
def get_generation(gen_id: str, request: Request):
    c = ctx(request)
    return render(c, get_row(request, gen_id), c.base_url(request))


@router.delete("/api/ai/queue/{gen_id}")
@router.post("/api/ai/queue/{gen_id}/cancel")
def cancel_generation(gen_id: str, request: Request):
    c = ctx(request)
    row, outcome = c.worker.cancel(gen_id)
    if outcome == "missing":
        raise ApiError(404, f"generation {gen_id!r} not found", "not_found")
    if outcome == "terminal":
        msg = f"generation {gen_id} already {row['status']}: nothing to cancel"
        raise ApiError(409, msg, "conflict")
    return render(c, row, c.base_url(request))
