"""OpenAI's video API over wanlite's jobs: a create request -> generation parameters, and a
stored row -> OpenAI's Video object.

Design
------
* ``size`` "WxH" is ``width`` x ``height``; ``seconds`` is frames at Wan2.1's 16 fps:
  ``num_frames = floor(seconds * 16 + 0.5) + 1`` (the +1: Wan's clips are 16k+1 frames long, so
  "5" is the model's usual 81 frames); both must land in the hosted schema's ranges (width
  1-640, height 1-480, 1-120 frames: seconds 0 to 7.4; with ``--limits model`` 1-1280, 1-1280
  and 1-1001 frames: seconds 0 to 62.5), else a 400 naming ``size`` or ``seconds``.  Absent,
  they are the hosted defaults (640x480, 81 frames = "5").  A Video's ``seconds`` is always
  worked back from its frame count, so it says what was generated.
* The hosted schema's other fields (``negative_prompt``, ``num_inference_steps``,
  ``guidance_scale``, ``seed``, ``num_frames``, ``width``, ``height``) are accepted too;
  giving a field both ways (``seconds`` and ``num_frames``, ``size`` and ``width``) is a 400.
* OpenAI's client sends ``create`` as a form, so every value arrives as a string: for a form,
  integer and number fields are parsed here first; whatever does not parse is left as the
  string, for :func:`wanlite.params.validate` to refuse with its usual message.  JSON bodies
  keep strict types (``seconds`` may be a string or a number in both, as in OpenAI's API).
* Statuses: queued -> ``queued``, processing -> ``in_progress``, succeeded -> ``completed``,
  failed and cancelled -> ``failed`` (OpenAI has no cancelled; ``error.code`` says
  ``cancelled``).  ``expires_at`` is when retention will delete the job (null: kept forever).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

from wanlite.params import FIELDS_BY_NAME, fields

from .body import FormFile
from .context import ServerContext, _ts
from .errors import ApiError
from .jobs import validated

FPS = 16
MAX_FRAMES = int(FIELDS_BY_NAME["num_frames"].maximum)  # hosted; _frames() takes the limits
MAX_SECONDS = (MAX_FRAMES - 1) / FPS  # 7.4375; floor(7.46 * 16 + 0.5) + 1 is still 120
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
_INT = re.compile(r"^\s*[+-]?\d{1,20}\s*$")
STATUS = {
    "queued": "queued",
    "processing": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "failed",
}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param, code="invalid_value")


def _from_form(body: dict[str, Any]) -> dict[str, Any]:
    """Form strings -> numbers for the schema's numeric fields (left as is if they don't
    parse); an empty optional field is absent.  A file part is refused."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        if isinstance(value, FormFile):
            raise _bad(name, f"{ascii(name)} cannot be a file: this server does text-to-video only")
        field = FIELDS_BY_NAME.get(name)
        if field is not None and field.type in ("integer", "number") and isinstance(value, str):
            if value.strip() == "" and field.nullable:
                continue
            if field.type == "integer" and _INT.match(value):
                value = int(value)
            elif field.type == "number":
                with contextlib.suppress(ValueError):  # left a string: validate refuses it
                    value = float(value)
        out[name] = value
    return out


def _frames(seconds: Any, limits: str = "hosted") -> int:
    max_frames = int(next(f for f in fields(limits) if f.name == "num_frames").maximum)
    shown = ascii(seconds) if isinstance(seconds, str) else repr(seconds)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."  # 400 digits say no more
    bad = _bad(
        "seconds",
        f"seconds must be a number in [0, {(max_frames - 1) / FPS:g}] (frames = "
        f"seconds*{FPS}+1, at most {max_frames}), got {shown}",
    )
    if isinstance(seconds, bool):
        raise bad
    try:
        value = float(seconds)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int of 400 digits
        raise bad from None
    if not math.isfinite(value) or value < 0:
        raise bad
    frames = math.floor(value * FPS + 0.5) + 1
    if frames > max_frames:
        raise bad
    return frames


def _size(size: Any, limits: str = "hosted") -> tuple[int, int]:
    w, h = (next(f for f in fields(limits) if f.name == n) for n in ("width", "height"))
    m = _SIZE.match(size) if isinstance(size, str) else None
    width, height = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if not (w.minimum <= width <= w.maximum and h.minimum <= height <= h.maximum):
        shown = ascii(size) if isinstance(size, str) else repr(size)
        raise _bad(
            "size",
            f"size must be 'WIDTHxHEIGHT' with width in [1, {int(w.maximum)}] and height in "
            f"[1, {int(h.maximum)}], got {shown}",
        )
    return width, height


def _either(body: dict[str, Any], one: str, others: tuple[str, ...]) -> None:
    both = [o for o in others if o in body]
    if one in body and both:
        raise _bad(one, f"give {one} or {' and '.join(both)}, not both")


def create_params(c: ServerContext, body: dict[str, Any], is_form: bool) -> dict[str, Any]:
    """The validated generation parameters of a ``POST /v1/videos`` body, or ApiError 400."""
    body = _from_form(body) if is_form else dict(body)
    model = body.pop("model", None)
    if model is not None and model != c.config.model_id:
        msg = f"unknown model {ascii(model)}: this server serves {c.config.model_id!r}"
        raise ApiError(400, msg, "invalid_request_error", param="model", code="model_not_found")
    if body.pop("input_reference", None) is not None:
        raise _bad("input_reference", "input_reference is not supported: text-to-video only")
    _either(body, "size", ("width", "height"))
    _either(body, "seconds", ("num_frames",))
    if "size" in body:
        body["width"], body["height"] = _size(body.pop("size"), c.config.limits)
    if "seconds" in body:
        body["num_frames"] = _frames(body.pop("seconds"), c.config.limits)
    try:
        return validated(body, c.config.limits)
    except ValueError as e:
        raise _bad(getattr(e, "param", None), str(e)) from None


def seconds_text(num_frames: int) -> str:
    return f"{(num_frames - 1) / FPS:g}"


def _progress(row: dict[str, Any]) -> int:
    if row["status"] == "succeeded":
        return 100
    return min(99, row["step"] * 100 // max(row["total_steps"], 1))


def _error(row: dict[str, Any]) -> dict[str, Any] | None:
    if row["status"] not in ("failed", "cancelled"):
        return None
    code = "cancelled" if row["status"] == "cancelled" else "generation_failed"
    return {"code": code, "message": row["error_message"] or row["status"]}


def video_object(c: ServerContext, row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as OpenAI's Video object."""
    p, retention = row["params"], c.config.retention
    done = row["completed_at"]
    return {
        "id": row["id"],
        "object": "video",
        "model": row["model"],
        "status": STATUS[row["status"]],
        "progress": _progress(row),
        "created_at": _ts(row["enqueued_at"]),
        "completed_at": _ts(done),
        "expires_at": _ts(done + retention) if done is not None and retention > 0 else None,
        "size": f"{p['width']}x{p['height']}",
        "seconds": seconds_text(p["num_frames"]),
        "prompt": p["prompt"],
        "remixed_from_video_id": None,
        "error": _error(row),
    }
