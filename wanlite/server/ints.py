"""Integers from text a client sent (query strings, signed links), ASCII digits only.

``str.isdigit`` is true for ``"²"`` and other non-ASCII digits, which ``int()`` then refuses
(or reads as another number), and a few thousand digits make ``int()`` itself raise: both were
unhandled 500s.  Here a value is 1 to ``max_digits`` ASCII digits, or it is not an integer.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def ascii_uint(text: str | None, max_digits: int = 19) -> int | None:
    """``int(text)`` when ``text`` is 1 to ``max_digits`` ASCII digits, else None."""
    if text is None or not 0 < len(text) <= max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)
