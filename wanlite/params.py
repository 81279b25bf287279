"""The request parameters of ``generate()``: one schema object, shared by the library, the CLI
and the server, exportable as JSON Schema.

Names, defaults and ranges are exactly the hosted API's ("Request parameters" of the hosted
model page).  Validation is strict and happens before any model work: a bool is not an int, a
float is not an int, NaN is not a number in range, and an empty prompt is refused.

Two sets of limits (``LIMITS``): "hosted" (the default everywhere: the hosted schema exactly)
and "model", which widens height and width to 1-1280 and frames to 1-1001 so that Wan2.1's
native sizes (832x480, 480x832) and longer clips can be asked for; every other field and
every default is the same.  ``fields(limits)``, ``validate(..., limits=)`` and
``json_schema(limits)`` take the name.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any

MAX_SEED = 2**63 - 1  # fits SQLite INTEGER and torch.Generator.manual_seed
MODEL_ID = "wan-ai-wan2-1-t2v-1-3b-diffusers"  # the hosted API's id for this model


class ParamError(ValueError):
    """A bad parameter or option: ``field`` names it (None when several or none are to blame);
    the message names it too, with its allowed range.  ``param`` is the same name (the
    OpenAI error shape's word, which the server uses)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    @property
    def param(self) -> str | None:
        return self.field


def _quote(text: str) -> str:
    """User text quoted for a message: ASCII-only, so it is safe in any log or JSON body
    (a lone surrogate such as ``"\\ud800"`` shows as its escape)."""
    return ascii(text)


def is_unicode(text: str) -> bool:
    """False for text that cannot be encoded as UTF-8 (lone surrogates, valid in JSON strings)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # JSON Schema type: "string" | "integer" | "number"
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    nullable: bool = False

    def range_text(self) -> str:
        if self.minimum is None:
            return "a non-empty string" if self.required else "a string"
        kind = "an integer" if self.type == "integer" else "a number"
        return f"{kind} in [{_num(self.minimum)}, {_num(self.maximum)}]"

    def check(self, value: Any) -> Any:
        """Return the normalized value or raise ValueError naming this field and its range."""
        if value is None and self.nullable:
            return None
        shown = _quote(value) if isinstance(value, str) else _shown(value)
        bad = ParamError(f"{self.name} must be {self.range_text()}, got {shown}", self.name)
        if self.type == "string":
            if not isinstance(value, str) or (self.required and not value.strip()):
                raise bad
            if not is_unicode(value):
                msg = f"{self.name} is not valid Unicode text (a lone surrogate?): {shown}"
                raise ParamError(msg, self.name)
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad
        if self.type == "integer":
            if not isinstance(value, numbers.Integral):
                raise bad
            value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an int of hundreds of digits: out of any range
                raise bad from None
            if not math.isfinite(value):
                raise bad
        if not self.minimum <= value <= self.maximum:
            raise bad
        return value


def _shown(value: Any) -> str:
    """``repr`` of a bad value, short: Python refuses to print ints over 4,300 digits."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


DEFAULT_PROMPT = (
    "A beautiful landscape painting of a serene lake with mountains in the background "
    "and an ox in the foreground."
)

FIELDS: tuple[Field, ...] = (
    Field("prompt", "string", None, "Prompt for generated video", required=True),
    Field("height", "integer", 480, "Height of the video", 1, 480),
    Field("width", "integer", 640, "Width of the video", 1, 640),
    Field("negative_prompt", "string", " ", "Negative prompt for generated video"),
    Field("num_inference_steps", "integer", 30, "Number of diffusion steps to take", 1, 100),
    Field("num_frames", "integer", 81, "Number of frames of video to generate", 1, 120),
    Field(
        "guidance_scale",
        "number",
        5.0,
        "Guidance for generated video. Lower values can give more realistic videos.",
        0,
        10,
    ),
    Field(
        "seed",
        "integer",
        None,
        "Random seed. Set for reproducible generation",
        0,
        MAX_SEED,
        nullable=True,
    ),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}

# (minimum, maximum) that differ from the hosted schema, per set of limits.  "model": sizes up
# to 1280 (Wan2.1 1.3B is made for 480P, 832x480 and 480x832; 720P runs but, by the official
# README, less stably) and up to 1001 frames (62.5 s at 16 fps; the official default is 81):
# past 81 frames (``Options.context_frames``) the bidirectional DiT denoises them in sliding
# context windows (``runtime.windows``), so its memory stays flat in the length.  For users with
# real weights and the memory.  Beyond what it was made for, quality is not promised.
LIMITS: dict[str, dict[str, tuple[int, int]]] = {
    "hosted": {},
    "model": {"height": (1, 1280), "width": (1, 1280), "num_frames": (1, 1001)},
}


def fields(limits: str = "hosted") -> tuple[Field, ...]:
    """The request fields under a set of limits ("hosted" = ``FIELDS``)."""
    if limits not in LIMITS:
        raise ParamError(f"limits must be one of {tuple(LIMITS)}, got {limits!r}", "limits")
    wider = LIMITS[limits]
    return tuple(
        replace(f, minimum=wider[f.name][0], maximum=wider[f.name][1]) if f.name in wider else f
        for f in FIELDS
    )


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    height: int = 480
    width: int = 640
    negative_prompt: str = " "
    num_inference_steps: int = 30
    num_frames: int = 81
    guidance_scale: float = 5.0
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate(
    params: dict[str, Any] | None = None, *, limits: str = "hosted", **kwargs: Any
) -> GenerationParams:
    """Check every field (unknown names included) and return the normalized parameters;
    ``limits`` names the ranges ("hosted", the default, or "model": see ``LIMITS``)."""
    checks = fields(limits)
    given = {**(params or {}), **kwargs}
    unknown = sorted(set(given) - set(FIELDS_BY_NAME), key=_quote)
    if unknown:
        names = ", ".join(n if n.isidentifier() and n.isascii() else _quote(n) for n in unknown)
        raise ParamError(
            f"unknown parameter(s): {names}", unknown[0] if len(unknown) == 1 else None
        )
    if "prompt" not in given:
        raise ParamError("prompt is required: a non-empty string", "prompt")
    out = {}
    for f in checks:
        value = given.get(f.name, f.default)
        out[f.name] = f.check(value)
    return GenerationParams(**out)


def json_schema(limits: str = "hosted") -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the request parameters under ``limits``."""
    checks = fields(limits)
    props: dict[str, Any] = {}
    for f in checks:
        p: dict[str, Any] = {"type": f.type, "description": f.description}
        if f.nullable:
            p["type"] = [f.type, "null"]
        if f.default is not None:
            p["default"] = f.default
        if f.minimum is not None:
            p["minimum"], p["maximum"] = f.minimum, f.maximum
        if f.required:
            p["minLength"] = 1
            p["examples"] = [DEFAULT_PROMPT]
        props[f.name] = p
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Wan2.1 T2V 1.3B generation request",
        "type": "object",
        "properties": props,
        "required": [f.name for f in checks if f.required],
        "additionalProperties": False,
    }
