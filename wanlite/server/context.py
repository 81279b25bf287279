"""The server's configuration and shared state, and how a stored row looks on the wire.

Design
------
* :class:`ServerConfig` is what the command line decides; :class:`ServerContext` adds what
  exists while the app runs (store, worker, event hub) and lives on ``app.state.ctx``; route
  handlers reach it with :func:`ctx`.  The store is SQLite (default) or Redis
  (``config.store``); ``worker`` is the model thread, or with ``--workers 0`` a
  :class:`~wanlite.server.worker.RemoteWorkers` (cancel and delete through the store, readiness
  from the worker processes).
* Result links are absolute URLs built from ``--public-url`` or, without it, from the address
  the client connected to: never from the client's ``Host`` or ``X-Forwarded-Host``, which a
  client (or anyone in front of a proxy) may set to anything.  With an API key they carry
  ``expires`` and a signature over the id and ``expires`` (:mod:`wanlite.server.signing`).
* :meth:`ServerContext.begin_shutdown` runs at the shutdown signal, before uvicorn waits for
  open connections: the running generation stops at its next step (and is re-queued) and
  event streams end, so neither holds the shutdown up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from wanlite.params import MODEL_ID
from wanlite.paths import DEFAULT_MODEL

from .signing import Signer
from .store import Store
from .streaming import live_name, stream_path
from .worker import EventHub, JobControl, result_path


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL  # what wanlite.load() gets
    model_id: str = MODEL_ID  # the id clients send as "model"
    data_dir: Path = Path("wanlite-data")
    api_key: str | None = None
    max_queue: int = 64  # generations waiting (not counting the running one)
    max_body: int = 64 * 1024
    max_active: int = 100  # long-lived requests (SSE, downloads, sync calls) at once
    public_url: str | None = None  # base of result URLs; default: the address connected to
    options: dict = field(default_factory=dict)  # wanlite.load keywords: Options, single files
    threads: int = 0  # torch intra-op threads for the model; 0 = torch's default
    allowed_hosts: tuple[str, ...] | None = None  # Host values served (host:port); None = any
    allowed_origins: tuple[str, ...] = ()  # cross-site origins allowed, with CORS headers
    result_ttl: float = 6 * 3600.0  # seconds a signed result link stays valid
    previews: int = 0  # progress events carry a preview image every N steps; 0 = never
    retention: float = 7 * 86400.0  # seconds finished jobs and files are kept; 0 = forever
    store: str = "sqlite"  # "sqlite" (in the data dir) or a redis:// URL
    results: Path | None = None  # result files; default: the data dir's results folder
    workers: int = 1  # model threads in this process: 1, or 0 (HTTP only; needs Redis)
    claim_timeout: float = 30.0  # Redis: a job whose worker is silent this long is taken over
    max_attempts: int = 3  # Redis: deliveries of a job before it ends failed

    @property
    def limits(self) -> str:
        """The request ranges served: "hosted" (the hosted schema, the default) or "model"
        (``--limits model``: wider sizes and frame counts; ``wanlite.params.LIMITS``)."""
        return self.options.get("limits") or "hosted"


@dataclass
class ServerContext:
    config: ServerConfig
    signer: Signer
    store: Store | None = None  # or a RedisStore (same interface)
    hub: EventHub | None = None
    worker: JobControl | None = None  # a Worker, or RemoteWorkers with --workers 0

    @property
    def results_dir(self) -> Path:
        return Path(self.config.results or Path(self.config.data_dir) / "results")

    def base_url(self, request: Request) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        # the local address this connection reached, never the client's Host header; the
        # scheme is X-Forwarded-Proto's only from --forwarded-allow-ips (uvicorn rewrites it)
        host, port = request.scope["server"]
        host = f"[{host}]" if ":" in host else host
        return f"{request.url.scheme}://{host}:{port}"

    def begin_shutdown(self) -> None:
        """Callable from a signal handler: stop the worker's job, end the event streams."""
        if self.worker is not None:
            self.worker.interrupt()
        if self.hub is not None:
            self.hub.close()

    def result_url(self, base: str, gen_id: str, path: str | None = None) -> str:
        """The absolute link to ``path`` (default: ``gen_id``'s result), signed with a key."""
        url = base + (path or result_path(gen_id))
        return f"{url}?{self.signer.query(gen_id)}" if self.config.api_key else url

    def stream_url(self, base: str, row: dict[str, Any]) -> str | None:
        """The link to a running causal job's growing video, once its file exists."""
        if row["status"] != "processing" or not (self.results_dir / live_name(row["id"])).exists():
            return None
        return self.result_url(base, row["id"], stream_path(row["id"]))


def ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def _ts(t: float | None) -> int | None:
    return None if t is None else int(t)


def render(c: ServerContext, row: dict[str, Any], base: str) -> dict[str, Any]:
    """A generation as the API shows it (parameters both flattened and under ``parameters``)."""
    ok = row["status"] == "succeeded"
    metrics = row["metrics"] or {}
    return {
        **row["params"],
        "generation_id": row["id"],
        "model": row["model"],
        "model_name": row["model"],
        "media_type": "video",
        "status": row["status"],
        "result_url": c.result_url(base, row["id"]) if ok else None,
        "stream_url": c.stream_url(base, row),
        "error_message": row["error_message"],
        "progress": {"step": row["step"], "total": row["total_steps"]},
        "seed": row["seed"],
        "parameters": row["params"],
        "response_format": row["response_format"],
        "cancel_requested": row["cancel_requested"],
        "enqueued_at": _ts(row["enqueued_at"]),
        "started_at": _ts(row["started_at"]),
        "completed_at": _ts(row["completed_at"]),
        "timings": metrics.get("timings"),
    }
