"""Paths the guards treat specially (kept apart so that every guard module can import them)."""

import re

PAGE_PATHS = ("/", "/static/app.js", "/static/style.css")  # the web page (routes_page.py)
OPEN_PATHS = ("/health", "/ready", *PAGE_PATHS)  # no key needed (none of them shows data)
RESULT_RE = re.compile(r"^/api/ai/results/([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.mp4$")
