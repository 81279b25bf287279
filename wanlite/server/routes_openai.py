"""OpenAI's video API: ``POST /v1/videos``, ``GET /v1/videos[/{id}[/content]]``,
``DELETE /v1/videos/{id}``, on the same jobs as the hosted routes (one store, one queue: an id
from either API works in both).  Mapping and rendering: :mod:`wanlite.server.openai_video`.

Listing is OpenAI's cursor page: ``order`` (``desc``, newest first, by default), ``limit``
(1-100, default 20) and ``after`` (the last id of the previous page); the answer carries
``first_id``, ``last_id`` and ``has_more``.  Content is the MP4 (``variant=video``) or a JPEG
of the middle frame (``variant=thumbnail``), both behind the API key like every route here.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .body import read_json_or_form
from .context import ctx
from .errors import ApiError
from .errors import AsciiJSONResponse as JSONResponse
from .filesend import OpenFileResponse, open_result
from .ints import ascii_uint
from .jobs import enqueue
from .openai_video import STATUS, create_params, video_object
from .routes_queue import get_row
from .store import ACTIVE
from .thumbnail import middle_frame_jpeg

router = APIRouter()
POLL_AFTER_MS = "500"  # openai's poll helper waits this long between polls (default 1 s)


def _video(request: Request, video_id: str) -> dict:
    try:
        return get_row(request, video_id)
    except ApiError:
        raise _not_found(video_id) from None


def _not_found(video_id: str) -> ApiError:
    return ApiError(
        404,
        f"video {video_id!r} not found",
        "invalid_request_error",
        param="video_id",
        code="not_found",
    )


@router.post("/v1/videos")
async def create_video(request: Request):
    c = ctx(request)
    body, is_form = await read_json_or_form(request)
    params = create_params(c, body, is_form)
    row = (await enqueue(request, params, 1, "url"))[0]
    return video_object(c, row)


@router.get("/v1/videos/{video_id}")
def get_video(video_id: str, request: Request):
    row = _video(request, video_id)
    headers = {"openai-poll-after-ms": POLL_AFTER_MS} if row["status"] in ACTIVE else None
    return JSONResponse(video_object(ctx(request), row), headers=headers)


@router.api_route("/v1/videos/{video_id}/content", methods=["GET", "HEAD"])
async def get_content(video_id: str, request: Request, variant: str = "video"):
    c = ctx(request)
    row = await run_in_threadpool(_video, request, video_id)
    if variant not in ("video", "thumbnail"):
        msg = f"variant must be 'video' or 'thumbnail', got {ascii(variant)}"
        raise ApiError(400, msg, param="variant", code="invalid_value")
    if row["status"] != "succeeded" or not row["result_file"]:
        msg = f"video {video_id} has no content: it is {STATUS[row['status']]}"
        raise ApiError(409, msg, "invalid_request_error", code="video_not_ready")
    f = await run_in_threadpool(open_result, c.results_dir, row["result_file"])
    if f is None:  # deleted since the row was read
        raise _not_found(video_id)
    if variant == "video":
        range_ = request.headers.get("range")
        return OpenFileResponse(f, "video/mp4", f"{row['id']}.mp4", request.method, range_)
    with f:
        jpeg = await run_in_threadpool(middle_frame_jpeg, f)
    return Response(jpeg, media_type="image/jpeg")


def _cursor(request: Request, after: str | None) -> int | None:
    """The queue sequence of the ``after`` id; a video deleted since the previous page (by a
    client or by retention) still marks its place, for a day (``Store.seq_of``)."""
    if after is None:
        return None
    seq = ctx(request).store.seq_of(after)
    if seq is None:
        msg = f"after: unknown video {ascii(after)}"
        raise ApiError(400, msg, param="after", code="invalid_value")
    return seq


def _page_args(limit: str, order: str) -> tuple[int, bool]:
    size = ascii_uint(limit, max_digits=3)
    if size is None or not 1 <= size <= 100:
        raise ApiError(400, "limit must be an integer in [1, 100]", param="limit")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", param="order")
    return size, order == "desc"


@router.get("/v1/videos")
def list_videos(request: Request, after: str | None = None, limit: str = "20", order: str = "desc"):
    c = ctx(request)
    size, descending = _page_args(limit, order)
    seq = _cursor(request, after)
    bound = {"below": seq} if descending else {"above": seq}
    rows, more = c.store.page(limit=size, descending=descending, **bound)
    data = [video_object(c, r) for r in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.delete("/v1/videos/{video_id}")
def delete_video(video_id: str, request: Request):
    if ctx(request).worker.delete(video_id) is None:
        _video(request, video_id)  # the 404
    return {"id": video_id, "object": "video.deleted", "deleted": True}
