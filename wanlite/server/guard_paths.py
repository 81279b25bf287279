"""Paths the guards treat specially (kept apart so that every guard module can import them)."""

import re

OPEN_PATHS = ("/health", "/ready")  # no key needed
RESULT_RE = re.compile(r"^/api/ai/results/([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.mp4$")
