"""``GET /api/ai/results/{id}.mp4``: a result file, looked up by generation id only (never by a
client path), and only for a succeeded generation whose file sits directly in the results
folder.  The file is opened once and sent from that handle (:mod:`wanlite.server.filesend`),
so a delete racing the download is a 404 or a whole file, never a cut one or a 500.

``GET /api/ai/results/{id}.stream.mp4``: a causal job's video while it is made
(:mod:`wanlite.server.streaming`): the growing fragmented MP4 (``X-Wanlite-Stream: partial``)
while the job runs, the result (``complete``) once it succeeded, else a 404."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .context import ServerContext, ctx
from .errors import ApiError
from .filesend import OpenFileResponse, open_result
from .guard_paths import RESULT_RE, STREAM_RE
from .streaming import GrowingFileResponse, live_name

router = APIRouter()


def _stream(c: ServerContext, gen_id: str, request: Request):
    row = c.store.get(gen_id)
    if row is not None and row["status"] == "succeeded" and row["result_file"]:
        f = open_result(c.results_dir, row["result_file"])
        if f is not None:
            range_ = request.headers.get("range")
            resp = OpenFileResponse(f, "video/mp4", f"{gen_id}.mp4", request.method, range_)
            resp.raw_headers.append((b"x-wanlite-stream", b"complete"))
            return resp
    f = None
    if row is not None and row["status"] == "processing":
        f = open_result(c.results_dir, live_name(gen_id))
    if f is None:
        msg = "no stream for this generation (not running, or no chunk made yet)"
        raise ApiError(404, msg, "not_found")

    def state() -> str:
        now = c.store.get(gen_id)
        status = now["status"] if now is not None else None
        return {"processing": "running", "succeeded": "done"}.get(status, "ended")

    path = c.results_dir / live_name(gen_id)
    return GrowingFileResponse(f, path, state, request.method, lambda: c.hub.closed)


@router.api_route("/api/ai/results/{name}", methods=["GET", "HEAD"])
def get_result(name: str, request: Request):
    c = ctx(request)
    live = STREAM_RE.match(f"/api/ai/results/{name}")
    if live:
        return _stream(c, live.group(1), request)
    m = RESULT_RE.match(f"/api/ai/results/{name}")
    row = c.store.get(m.group(1)) if m else None
    f = None
    if row is not None and row["status"] == "succeeded" and row["result_file"]:
        f = open_result(c.results_dir, row["result_file"])
    if f is None:
        raise ApiError(404, "no such result", "not_found")
    range_ = request.headers.get("range")
    return OpenFileResponse(f, "video/mp4", f"{row['id']}.mp4", request.method, range_)
