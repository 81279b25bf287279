"""The FastAPI app: the hosted API's video endpoints, served from one local model.

Design
------
* Same paths and shapes as the hosted API, so client code only changes its base URL:
  ``POST /api/ai/videos/generate`` (sync), ``POST /api/ai/queue`` + ``GET /api/ai/queue[/{id}]``
  (async), ``GET /api/events`` (SSE), ``GET /api/ai/models[/{id}]``.  Extras: cancelling
  (``DELETE /api/ai/queue/{id}`` or ``POST /api/ai/queue/{id}/cancel``), result files
  (``GET /api/ai/results/{id}.mp4``), ``GET /health`` and ``GET /ready``.
* OpenAI's video API (``/v1/videos``, :mod:`~wanlite.server.routes_openai`) on the same jobs.
* Retention (:mod:`~wanlite.server.retention`) is an asyncio task of the lifespan.
* The store is SQLite in the data dir, or Redis (``--store redis://``: then events of every
  process come through Redis pub/sub into this process's hub, and with ``--workers 0`` no model
  runs here).
* One route family per module (``routes_*.py``), each an ``APIRouter`` of module-level
  handlers; what they share (config, store, worker, event hub, signer) is one
  :class:`~wanlite.server.context.ServerContext` on ``app.state.ctx``, filled in by the
  lifespan below (the store and the worker exist only while the app runs).
* Every error has one JSON shape (:mod:`wanlite.server.errors`).
* The auth check, the body-size bound and the access log are one small ASGI middleware
  (``guard.Guard``), so they cover every route, including unknown ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from . import (
    retention,
    routes_events,
    routes_generate,
    routes_models,
    routes_openai,
    routes_page,
    routes_queue,
    routes_results,
)
from .context import ServerConfig, ServerContext
from .errors import AsciiJSONResponse, install_error_handlers
from .guard import Guard
from .origin import OriginPolicy
from .private import private_dir, private_files
from .protocol import limit_accept_errors
from .signing import Signer
from .store import Store
from .worker import EventHub, RemoteWorkers, Worker

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("wanlite.server")
ROUTERS = (
    routes_models,
    routes_queue,
    routes_results,
    routes_generate,
    routes_events,
    routes_openai,
    routes_page,
)


def default_loader(config: ServerConfig):
    """``wanlite.load`` of ``config.model``, with the configured torch thread count."""

    def load():
        import wanlite

        if config.threads > 0:
            import torch

            torch.set_num_threads(config.threads)
        return wanlite.load(config.model, **config.options)

    return load


PART_AGE = 86400.0  # a shared results folder's temp files this old are leftovers of a crash


def _open_store(c: ServerContext) -> Store:
    private_dir(c.results_dir)
    private_files(c.results_dir, "*.mp4")  # results of an earlier version, made 0644
    shared = c.config.store != "sqlite"  # other processes may be writing their results now
    for part in c.results_dir.glob(".*.part"):  # temp files of a write cut by a crash
        if not shared or time.time() - part.stat().st_mtime > PART_AGE:
            part.unlink(missing_ok=True)
    if shared:
        from .redis_store import RedisStore

        kw = {"claim_timeout": c.config.claim_timeout, "max_attempts": c.config.max_attempts}
        return RedisStore(c.config.store, **kw)
    store = Store(Path(c.config.data_dir) / "wanlite.sqlite3")
    for gen_id in store.recover():
        log.warning("interrupted generation marked failed", extra={"fields": {"id": gen_id}})
    return store


def _relay(c: ServerContext) -> threading.Event | None:
    """On Redis: a thread relaying every process's events into this one's hub (the returned
    event stops it); the hub's publishers are then the Redis bus, never the hub itself."""
    if not c.store.shared:
        return None
    from .redis_store import relay_events

    stop = threading.Event()
    args = (c.config.store, c.hub, stop)
    threading.Thread(target=relay_events, args=args, name="wanlite-relay", daemon=True).start()
    return stop


def _lifespan(c: ServerContext, loader):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        c.store = _open_store(c)
        c.hub = EventHub()
        c.hub.bind(asyncio.get_running_loop())
        limit_accept_errors(asyncio.get_running_loop())
        relay = _relay(c)
        if c.store.shared:
            from .redis_store import RedisBus

            bus = RedisBus(c.store)
        else:
            bus = c.hub
        if c.config.workers:
            c.worker = Worker(c.store, c.results_dir, loader, bus, previews=c.config.previews)
        else:
            c.worker = RemoteWorkers(c.store, c.results_dir, bus)
        c.worker.start()
        purger = asyncio.create_task(retention.run(c.store, c.results_dir, c.config.retention))
        log.info("server started", extra={"fields": {"model": c.config.model_id}})
        try:
            yield
        finally:
            purger.cancel()
            if relay is not None:
                relay.set()
            if await run_in_threadpool(c.worker.stop):
                c.store.close()

    return lifespan


def create_app(config: ServerConfig, loader=None) -> FastAPI:
    """The app.  ``loader()`` returns a pipeline (default: ``wanlite.load`` of config.model)."""
    c = ServerContext(config, Signer(config.api_key, config.result_ttl))
    lifespan = _lifespan(c, loader or default_loader(config))
    app = FastAPI(
        title="wanlite",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=AsciiJSONResponse,  # always encodable, whatever a row holds
    )
    app.state.ctx = c
    origins = OriginPolicy(config.allowed_origins, config.public_url)
    app.add_middleware(
        Guard,
        api_key=config.api_key,
        max_body=config.max_body,
        signer=c.signer,
        hosts=config.allowed_hosts,
        origins=origins,
        max_active=config.max_active,
    )
    install_error_handlers(app)
    for module in ROUTERS:
        app.include_router(module.router)
    return app
