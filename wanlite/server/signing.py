"""Signed result links: a result URL that downloads without the ``Authorization`` header, like a
hosted presigned URL.  The signature is an HMAC-SHA256 (with the API key) of the generation id,
cut to 32 hex digits; files are looked up by generation id only, never by a client path."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs


class Signer:
    def __init__(self, key: str | None):
        self._key = (key or "").encode()

    def sign(self, gen_id: str) -> str:
        return hmac.new(self._key, gen_id.encode(), hashlib.sha256).hexdigest()[:32]

    def query(self, gen_id: str) -> str:
        """The query string of a signed link to ``gen_id``'s result."""
        return f"sig={self.sign(gen_id)}"

    def verify(self, gen_id: str, query_string: bytes) -> bool:
        query = parse_qs(query_string.decode("latin-1"))
        given = (query.get("sig") or [""])[0].encode("latin-1")
        return hmac.compare_digest(given, self.sign(gen_id).encode())
