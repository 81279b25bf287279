"""The server's configuration and shared state, and how a stored row looks on the wire.

Design
------
* :class:`ServerConfig` is what the command line decides; :class:`ServerContext` adds what
  exists while the app runs (store, worker, event hub) and lives on ``app.state.ctx``; route
  handlers reach it with :func:`ctx`.
* Result links are absolute URLs of this server; with an API key they carry a signature
  (see :mod:`wanlite.server.signing`).
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
from .worker import EventHub, Worker, result_path


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL  # what wanlite.load() gets
    model_id: str = MODEL_ID  # the id clients send as "model"
    data_dir: Path = Path("wanlite-data")
    api_key: str | None = None
    max_queue: int = 64  # generations waiting (not counting the running one)
    max_body: int = 64 * 1024
    public_url: str | None = None  # base of result URLs; default: the request's own
    options: dict = field(default_factory=dict)  # wanlite.Options fields for wanlite.load
    threads: int = 0  # torch intra-op threads for the model; 0 = torch's default


@dataclass
class ServerContext:
    config: ServerConfig
    signer: Signer
    store: Store | None = None
    hub: EventHub | None = None
    worker: Worker | None = None

    @property
    def results_dir(self) -> Path:
        return Path(self.config.data_dir) / "results"

    def base_url(self, request: Request) -> str:
        return (self.config.public_url or str(request.base_url)).rstrip("/")

    def result_url(self, base: str, gen_id: str) -> str:
        url = base + result_path(gen_id)
        return f"{url}?{self.signer.query(gen_id)}" if self.config.api_key else url


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
