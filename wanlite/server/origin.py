"""Who may talk to the server from a browser: the ``Host`` check and the ``Origin`` policy.

Design
------
* DNS rebinding: a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 talks to a
  loopback server as a same-origin page, but its requests say ``Host: evil.example``.  So on a
  loopback bind only ``localhost``, ``127.0.0.1`` and ``[::1]`` with the bound port (and the
  ``--public-url`` host) are served; anything else is a 400.  A non-loopback bind is meant to
  be reached by other names, so it checks no ``Host`` (use an API key there).
* Cross-site requests: any page can send a no-preflight ``POST`` (a ``text/plain`` fetch or
  form) or load a URL.  Browsers say where a request comes from (``Origin``, and
  ``Sec-Fetch-Site`` when they send no ``Origin``), so a request from another origin is a 403
  unless that origin was allowed (``--allow-origin``); only allowed origins get CORS headers,
  and their preflights (``OPTIONS``) are answered here.  Result files may still be embedded or
  linked from anywhere (``<video src>`` sends no ``Origin``): their ids are unguessable and,
  with a key, their links are signed.
* Non-browser clients send neither header and are not affected.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .guard_paths import RESULT_RE

CORS_METHODS = "GET, POST, DELETE, HEAD, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _netloc(url: str) -> str | None:
    """``host:port`` of an http(s) URL, the port made explicit, lower case; None when the URL
    does not parse (``http://a:b``, ``http://localhost:8000.evil.example``: a bad port)."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_hosts(bind_host: str, port: int, public_url: str | None) -> tuple[str, ...] | None:
    """The ``Host`` values (``host:port``) a server bound to ``bind_host`` answers; None = any."""
    if not is_loopback(bind_host):
        return None
    hosts = [f"{name}:{port}" for name in LOOPBACK_NAMES]
    if public_url and _netloc(public_url):
        hosts.append(_netloc(public_url))
    return tuple(hosts)


def host_ok(host: str, allowed: tuple[str, ...] | None) -> bool:
    if allowed is None:
        return True
    host = host.strip().lower()
    return host in allowed or f"{host}:80" in allowed  # no port = the default one


class OriginPolicy:
    """Decides on a request's ``Origin`` / ``Sec-Fetch-Site``; knows the CORS headers."""

    def __init__(self, allowed_origins: tuple[str, ...], public_url: str | None):
        self.allowed = {o.strip().rstrip("/").lower() for o in allowed_origins}
        self.same = {_netloc(public_url)} - {None} if public_url else set()

    def check(self, scope, headers: dict[bytes, bytes]) -> tuple[bool, str | None]:
        """(allowed?, the origin to send CORS headers to, if any)."""
        origin = headers.get(b"origin", b"").decode("latin-1").strip()
        if origin:
            if origin.lower() in self.allowed:
                return True, origin
            if origin.lower() != "null" and self._same_origin(origin, scope, headers):
                return True, None
            return False, None
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
        if site in ("cross-site", "same-site"):  # a browser request from another site
            result = scope["method"] in ("GET", "HEAD") and RESULT_RE.match(scope["path"])
            return bool(result), None
        return True, None

    def _same_origin(self, origin: str, scope, headers: dict[bytes, bytes]) -> bool:
        if not origin.lower().startswith(("http://", "https://")):
            return False
        host = headers.get(b"host", b"").decode("latin-1")
        here = _netloc(f"{scope.get('scheme', 'http')}://{host}") if host else None
        there = _netloc(origin)
        return there is not None and (there == here or there in self.same)

    @staticmethod
    def cors_headers(origin: str, preflight: bool = False) -> list[tuple[bytes, bytes]]:
        out = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if preflight:
            out += [
                (b"access-control-allow-methods", CORS_METHODS.encode()),
                (b"access-control-allow-headers", CORS_HEADERS.encode()),
                (b"access-control-max-age", b"600"),
            ]
        return out
