"""Paths the guards treat specially (kept apart so that every guard module can import them)."""

import re

PAGE_PATHS = ("/", "/static/app.js", "/static/style.css")  # the web page (routes_page.py)
OPEN_PATHS = ("/health", "/ready", *PAGE_PATHS)  # no key needed (none of them shows data)
RESULT_RE = re.compile(r"^/api/ai/results/([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.mp4$")
# A causal job's growing video (streaming.py); signed links open it as they open the result.
STREAM_RE = re.compile(
    r"^/api/ai/results/([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.stream\.mp4$"
)
# Requests that hold their connection for long (an SSE stream, a download, a sync generation):
# at most --limit-concurrency of them run at once (guard.Guard); /health and /ready never wait.
LONG_RE = re.compile(
    r"^/(?:api/events|api/ai/videos/generate|api/ai/results/[^/]+|v1/videos/[^/]+/content)$"
)
