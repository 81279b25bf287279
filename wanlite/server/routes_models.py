"""``/health``, ``/ready`` and the model object (``/api/ai/models[/{id}]``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from wanlite.params import json_schema

from .context import ctx
from .errors import ApiError
from .errors import AsciiJSONResponse as JSONResponse

router = APIRouter()


@router.get("/health")
def health():
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request):
    """200 once a model can run the queue: loaded here or, with --workers 0, in a live worker
    process; on Redis also while the store answers and the queue's group exists (recreated
    here if Redis lost it), else 503 ``unavailable`` with the reason."""
    c = ctx(request)
    w = c.worker
    state, error = w.state, w.load_error
    if state == "ready" and c.store.shared:
        error = c.store.health()
        state = "unavailable" if error else state
    body = {"status": state, "model": c.config.model_id, "error": error}
    return JSONResponse(body, status_code=200 if state == "ready" else 503)


def model_object(request: Request) -> dict[str, Any]:
    c = ctx(request)
    schema = json_schema(c.config.limits)  # "hosted" unless served with --limits model
    return {
        "id": c.config.model_id,
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
        "ready": c.worker.state == "ready",
        "streaming": streaming(c),
    }


def streaming(c) -> bool | None:
    """Whether jobs stream as they are made (a causal model): known once the model is loaded
    in this process; None with ``--workers 0`` or before loading."""
    pipe = getattr(c.worker, "pipe", None)
    return None if pipe is None else bool(getattr(pipe, "causal", False))


@router.get("/api/ai/models")
def list_models(request: Request):
    return {"object": "list", "data": [model_object(request)]}


@router.get("/api/ai/models/{model_id:path}")
def get_model(model_id: str, request: Request):
    served = ctx(request).config.model_id
    if model_id != served:
        raise ApiError(
            404, f"model {model_id!r} not found: this server serves {served!r}", "model_not_found"
        )
    return model_object(request)
