"""``GET /api/ai/results/{id}.mp4``: a result file, looked up by generation id only (never by a
client path), and only for a succeeded generation whose file sits directly in the results
folder."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from .context import ctx
from .errors import ApiError
from .guard_paths import RESULT_RE

router = APIRouter()


@router.api_route("/api/ai/results/{name}", methods=["GET", "HEAD"])
def get_result(name: str, request: Request):
    c = ctx(request)
    m = RESULT_RE.match(f"/api/ai/results/{name}")
    row = c.store.get(m.group(1)) if m else None
    if row is None or row["status"] != "succeeded" or not row["result_file"]:
        raise ApiError(404, "no such result", "not_found")
    path = c.results_dir / row["result_file"]
    if path.resolve().parent != c.results_dir.resolve() or not path.is_file():
        raise ApiError(404, "no such result", "not_found")
    return FileResponse(path, media_type="video/mp4", filename=f"{row['id']}.mp4")
