"""Signed result links: a result URL that downloads without the ``Authorization`` header, like a
hosted presigned URL, for a limited time.

The link carries ``expires`` (Unix seconds) and ``sig``, an HMAC-SHA256 with the API key of
``"<generation id>:<expires>"`` cut to 32 hex digits, so neither the id nor the expiry can be
changed.  Each rendering of a generation makes a fresh link; files are looked up by generation
id only, never by a client path.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qs

from .ints import ascii_uint


class Signer:
    def __init__(self, key: str | None, ttl: float = 6 * 3600.0):
        self._key = (key or "").encode()
        self.ttl = ttl

    def sign(self, gen_id: str, expires: int) -> str:
        msg = f"{gen_id}:{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def query(self, gen_id: str) -> str:
        """The query string of a signed link to ``gen_id``'s result, valid for ``ttl`` seconds."""
        expires = int(time.time() + self.ttl)
        return f"expires={expires}&sig={self.sign(gen_id, expires)}"

    def verify(self, gen_id: str, query_string: bytes) -> str:
        """``"ok"``, ``"expired"`` (a genuine link, too old) or ``"bad"``."""
        query = parse_qs(query_string.decode("latin-1"))
        given = (query.get("sig") or [""])[0]
        expires = ascii_uint((query.get("expires") or [""])[0], max_digits=12)
        if expires is None:
            return "bad"
        if not hmac.compare_digest(given.encode(), self.sign(gen_id, expires).encode()):
            return "bad"
        return "ok" if time.time() <= expires else "expired"
