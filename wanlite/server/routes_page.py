"""The web page: ``GET /`` (``static/index.html``) and its two files under ``/static/``.

Design
------
* Plain HTML, CSS and JavaScript shipped inside the package (``wanlite/server/static``): no
  build step, no CDN, nothing fetched from elsewhere, so it works offline.  The page talks to
  the API of the same origin; it builds its form from the model's ``json_request_schema``.
* The page carries no secret, so these paths are open like ``/health`` (listed in
  :data:`~wanlite.server.guard_paths.OPEN_PATHS`): with ``--api-key`` the page asks for the key
  and keeps it in the tab's ``sessionStorage``; every API call sends it as the bearer token.
  The Host and Origin checks of :mod:`~wanlite.server.guard` still apply to these paths.
* Only the files named in :data:`PAGE_FILES` are served (no path from the client reaches the
  file system).  Responses forbid framing (clickjacking of a tab that holds a key) and set a
  Content-Security-Policy that allows only this origin (and ``data:`` images: the previews;
  ``blob:`` media: the MediaSource of a video shown while it is made).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .errors import ApiError
from .guard_paths import PAGE_PATHS

router = APIRouter()

TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
}
PAGE_FILES = {path: "index.html" if path == "/" else path.rsplit("/", 1)[1] for path in PAGE_PATHS}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _file(path: str) -> Response:
    name = PAGE_FILES.get(path)
    if name is None:
        raise ApiError(404, f"no such file: {path!r}", "not_found")
    media_type = TYPES[name.rsplit(".", 1)[1]]
    return Response(_read(name), media_type=media_type, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def index():
    return _file("/")


@router.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
def static(name: str):
    return _file(f"/static/{name}")
