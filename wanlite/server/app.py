"""HTTP routes: the hosted API's video endpoints, served from one local model.

Design
------
* Same paths and shapes as the hosted API, so client code only changes its base URL:
  ``POST /api/ai/videos/generate`` (sync), ``POST /api/ai/queue`` + ``GET /api/ai/queue[/{id}]``
  (async), ``GET /api/events`` (SSE), ``GET /api/ai/models[/{id}]``.  Extras: cancelling
  (``DELETE /api/ai/queue/{id}`` or ``POST /api/ai/queue/{id}/cancel``), result files
  (``GET /api/ai/results/{id}.mp4``), ``GET /health`` and ``GET /ready``.
* Parameters are validated when the request arrives (``wanlite.params.validate``, the same
  definitions as ``json_request_schema``), so a bad request is a 400 naming the field and
  never reaches the queue.  Every error has one JSON shape::

      {"status": "error", "status_message": "...",
       "error": {"type": "invalid_request_error", "message": "...", "param": "height"}}

* The sync endpoint is the queue plus a wait: it enqueues, then waits for the worker's
  completion event (a client that disconnects cancels its generation).
* Result URLs are absolute URLs of this server.  With an API key they carry a signature
  (``?sig=``, an HMAC of the generation id), so they download without the header, like a
  hosted presigned URL; files are looked up by generation id only, never by a client path.
* The auth check, the body-size bound and the access log are one small ASGI middleware
  (``guard.Guard``), so they cover every route, including unknown ones.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from wanlite.params import FIELDS_BY_NAME, MODEL_ID, json_schema, validate
from wanlite.paths import DEFAULT_MODEL

from .guard import RESULT_RE, ApiError, Guard, error_response, read_body
from .store import STATUSES, TERMINAL, QueueFull, Store
from .worker import COMPLETED, EventHub, Worker, result_path, terminal_events

log = logging.getLogger("wanlite.server")

REPLAY_SECONDS = 60.0  # SSE: completions this recent are replayed to a new subscriber
KEEPALIVE_SECONDS = 15.0


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


def _ts(t: float | None) -> int | None:
    return None if t is None else int(t)


def create_app(config: ServerConfig, loader=None) -> FastAPI:
    """The app.  ``loader()`` returns a pipeline (default: ``wanlite.load`` of config.model)."""
    data_dir = Path(config.data_dir)
    results_dir = data_dir / "results"
    key = (config.api_key or "").encode()

    def sign(gen_id: str) -> str:
        return hmac.new(key, gen_id.encode(), hashlib.sha256).hexdigest()[:32]

    if loader is None:

        def loader():
            import wanlite

            if config.threads > 0:
                import torch

                torch.set_num_threads(config.threads)
            return wanlite.load(config.model, **config.options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        results_dir.mkdir(parents=True, exist_ok=True)
        for part in results_dir.glob(".*.part"):  # temp files of a write cut by a crash
            part.unlink(missing_ok=True)
        store = Store(data_dir / "wanlite.sqlite3")
        for gen_id in store.recover():
            log.warning("interrupted generation marked failed", extra={"fields": {"id": gen_id}})
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        worker = Worker(store, results_dir, loader, hub)
        app.state.store, app.state.hub, app.state.worker = store, hub, worker
        worker.start()
        log.info("server started", extra={"fields": {"model": config.model_id}})
        try:
            yield
        finally:
            if await run_in_threadpool(worker.stop):
                store.close()

    app = FastAPI(title="wanlite", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body, signer=sign)

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        type_ = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, type_)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        e = exc.errors()[0]
        where = ".".join(map(str, e["loc"]))
        return error_response(400, f"{where}: {e['msg']}", "invalid_request_error")

    # -- helpers -----------------------------------------------------------------------------
    def base_url(request: Request) -> str:
        return (config.public_url or str(request.base_url)).rstrip("/")

    def result_url(base: str, gen_id: str) -> str:
        url = base + result_path(gen_id)
        return f"{url}?sig={sign(gen_id)}" if config.api_key else url

    def render(row: dict[str, Any], base: str) -> dict[str, Any]:
        ok = row["status"] == "succeeded"
        metrics = row["metrics"] or {}
        return {
            **row["params"],
            "generation_id": row["id"],
            "model": row["model"],
            "model_name": row["model"],
            "media_type": "video",
            "status": row["status"],
            "result_url": result_url(base, row["id"]) if ok else None,
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

    def parse_request(body: dict[str, Any], queue: bool) -> tuple[dict, int, str]:
        """(validated params, num_generations, response_format) or ApiError 400."""
        body = dict(body)
        model = body.pop("model", None)
        if model is None:
            raise ApiError(400, "model is required", param="model")
        if model != config.model_id:
            msg = f"unknown model {model!r}: this server serves {config.model_id!r}"
            raise ApiError(400, msg, "model_not_found", param="model")
        body.pop("target_namespace", None)  # hosted-API billing namespace: accepted, unused
        n = body.pop("num_generations", 1) if queue else 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4:
            msg = f"num_generations must be an integer in [1, 4], got {n!r}"
            raise ApiError(400, msg, param="num_generations")
        fmt = body.pop("response_format", "url")
        if fmt not in ("url", "b64_json"):
            msg = f"response_format must be 'url' or 'b64_json', got {fmt!r}"
            raise ApiError(400, msg, param="response_format")
        try:
            params = validate(body).to_dict()
        except ValueError as e:
            msg = str(e)
            first = msg.split(" ", 1)[0]
            param = first if first in FIELDS_BY_NAME else None
            if msg.startswith("unknown parameter"):
                param = msg.split(": ", 1)[1]
            raise ApiError(400, msg, param=param) from None
        return params, n, fmt

    async def enqueue(request: Request, params: dict, n: int, fmt: str) -> list[dict]:
        worker: Worker = request.app.state.worker
        if worker.state == "failed":
            raise ApiError(503, f"the model failed to load: {worker.load_error}", "server_error")
        try:
            rows = await run_in_threadpool(
                request.app.state.store.enqueue, config.model_id, params, n, fmt, config.max_queue
            )
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full") from None
        worker.notify()
        for row in rows:
            log.info("generation queued", extra={"fields": {"generation_id": row["id"]}})
        return rows

    def model_object(request: Request) -> dict[str, Any]:
        schema = json_schema()
        return {
            "id": config.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "wanlite",
            "display_name": "Wan2.1 1.3B - Text to Video",
            "description": "Wan2.1 T2V 1.3B text-to-video, served locally by wanlite",
            "developer": {"name": "Alibaba Wan"},
            "capabilities": {"input": ["text"], "output": ["video"]},
            "endpoint": "/videos/generate",
            "model_type": "base",
            "json_request_schema": schema,
            "request_schema": schema,
            "ready": request.app.state.worker.state == "ready",
        }

    # -- routes ------------------------------------------------------------------------------
    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready(request: Request):
        w: Worker = request.app.state.worker
        body = {"status": w.state, "model": config.model_id, "error": w.load_error}
        return JSONResponse(body, status_code=200 if w.state == "ready" else 503)

    @app.get("/api/ai/models")
    def list_models(request: Request):
        return {"object": "list", "data": [model_object(request)]}

    @app.get("/api/ai/models/{model_id:path}")
    def get_model(model_id: str, request: Request):
        if model_id != config.model_id:
            msg = f"model {model_id!r} not found: this server serves {config.model_id!r}"
            raise ApiError(404, msg, "model_not_found")
        return model_object(request)

    @app.post("/api/ai/queue")
    async def enqueue_route(request: Request):
        params, n, fmt = parse_request(await read_body(request), queue=True)
        rows = await enqueue(request, params, n, fmt)
        return {"generations": [{"generation_id": r["id"], "status": r["status"]} for r in rows]}

    @app.get("/api/ai/queue")
    def list_queue(request: Request, model: str | None = None, status: str | None = None):
        statuses = ("queued", "processing")
        if status:
            statuses = STATUSES if status == "all" else tuple(status.split(","))
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                msg = f"status must be 'all' or a comma-separated subset of {', '.join(STATUSES)}"
                raise ApiError(400, msg, param="status")
        rows = request.app.state.store.list(statuses, model)
        base = base_url(request)
        return {"count": len(rows), "generations": [render(r, base) for r in rows]}

    def get_row(request: Request, gen_id: str) -> dict[str, Any]:
        row = request.app.state.store.get(gen_id)
        if row is None:
            raise ApiError(404, f"generation {gen_id!r} not found", "not_found")
        return row

    @app.get("/api/ai/queue/{gen_id}")
    def get_generation(gen_id: str, request: Request):
        return render(get_row(request, gen_id), base_url(request))

    @app.delete("/api/ai/queue/{gen_id}")
    @app.post("/api/ai/queue/{gen_id}/cancel")
    def cancel_generation(gen_id: str, request: Request):
        row, outcome = request.app.state.worker.cancel(gen_id)
        if outcome == "missing":
            raise ApiError(404, f"generation {gen_id!r} not found", "not_found")
        if outcome == "terminal":
            msg = f"generation {gen_id} already {row['status']}: nothing to cancel"
            raise ApiError(409, msg, "conflict")
        return render(row, base_url(request))

    @app.get("/api/ai/results/{name}")
    def get_result(name: str, request: Request):
        m = RESULT_RE.match(f"/api/ai/results/{name}")
        row = request.app.state.store.get(m.group(1)) if m else None
        if row is None or row["status"] != "succeeded" or not row["result_file"]:
            raise ApiError(404, "no such result", "not_found")
        path = results_dir / row["result_file"]
        if path.resolve().parent != results_dir.resolve() or not path.is_file():
            raise ApiError(404, "no such result", "not_found")
        return FileResponse(path, media_type="video/mp4", filename=f"{row['id']}.mp4")

    @app.post("/api/ai/videos/generate")
    async def generate_sync(request: Request):
        params, _, fmt = parse_request(await read_body(request), queue=False)
        hub: EventHub = request.app.state.hub
        store: Store = request.app.state.store
        events = hub.subscribe()  # before enqueueing: the completion cannot be missed
        try:
            gen_id = (await enqueue(request, params, 1, fmt))[0]["id"]
            next_check = time.monotonic() + 1.0
            while True:
                try:
                    name, data = await asyncio.wait_for(events.get(), timeout=1.0)
                    if name == COMPLETED and data["generation_id"] == gen_id:
                        break
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() < next_check:
                    continue
                next_check = time.monotonic() + 1.0
                if await request.is_disconnected():
                    await run_in_threadpool(request.app.state.worker.cancel, gen_id)
                    log.info("client gone: generation cancelled", extra={"fields": {"id": gen_id}})
                    return JSONResponse({}, status_code=499)
                if (await run_in_threadpool(store.get, gen_id))["status"] in TERMINAL:
                    break
        finally:
            hub.unsubscribe(events)
        row = await run_in_threadpool(store.get, gen_id)
        if row["status"] == "cancelled":
            raise ApiError(409, f"generation {gen_id} was cancelled", "cancelled")
        if row["status"] != "succeeded":
            msg = f"generation {gen_id} failed: {row['error_message']}"
            raise ApiError(500, msg, "generation_failed")
        p = row["params"]
        item: dict[str, Any] = {
            "content_type": "video/mp4",
            "generation_id": gen_id,
            "seed": row["seed"],
            "width": p["width"],
            "height": p["height"],
            "num_frames": p["num_frames"],
        }
        if fmt == "b64_json":
            data = await run_in_threadpool((results_dir / row["result_file"]).read_bytes)
            item["b64_json"] = base64.b64encode(data).decode()
        else:
            item["url"] = result_url(base_url(request), gen_id)
        return {
            "created": _ts(row["completed_at"]),
            "model": config.model_id,
            "generation_id": gen_id,
            "videos": [item],
            "timings": (row["metrics"] or {}).get("timings"),
        }

    @app.get("/api/events")
    async def events_route(request: Request):
        hub: EventHub = request.app.state.hub
        base = base_url(request)
        queue = hub.subscribe()
        recent = await run_in_threadpool(
            request.app.state.store.finished_since, time.time() - REPLAY_SECONDS
        )

        def frame(name: str, data: dict[str, Any]) -> str:
            if data.get("result_url"):
                data = {**data, "result_url": result_url(base, data["generation_id"])}
            return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

        async def stream():
            replayed = {row["id"] for row in recent}
            try:
                yield ": connected\n\n"
                for row in recent:
                    for name, data in terminal_events(row):
                        yield frame(name, data)
                while True:
                    try:
                        name, data = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if data["status"] in TERMINAL and data["generation_id"] in replayed:
                        continue  # already sent from the replay
                    yield frame(name, data)
            finally:
                hub.unsubscribe(queue)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return app
