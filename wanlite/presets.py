"""Named generation recipes: published step / guidance / sampler settings for a distilled LoRA.

A preset changes *defaults* only: a request's explicit ``num_inference_steps`` or
``guidance_scale`` wins.  It picks the sampler (``scheduler.make_sampler``).  It does not load
the LoRA: the file is the user's (``--lora PATH``); ``lora_hint`` says which one the recipe is
for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .configs import SchedulerConfig
from .scheduler import Sampler, make_sampler

__all__ = ["PRESETS", "Preset", "describe_presets", "get_preset", "request_defaults"]


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # where the recipe is published
    sampler: str  # "unipc" | "euler" (scheduler.SAMPLERS)
    timesteps: tuple[int, ...] | None  # a fixed grid (cut to the step count), or None
    num_inference_steps: int
    guidance_scale: float
    lora_hint: str  # the LoRA the recipe is for (and its multiplier)

    def defaults(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None
    ) -> tuple[int, float]:
        """(steps, guidance): the request's values where given, the preset's otherwise."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        return steps, guidance

    def make_sampler(self, cfg: SchedulerConfig, steps: int, shift: float | None = None) -> Sampler:
        """The preset's sampler for ``steps`` steps (``ValueError`` when the preset's timestep
        list has fewer, or when ``shift`` is given for a fixed list)."""
        return make_sampler(self.sampler, cfg, steps, shift=shift, timesteps=self.timesteps)

    def settings(self) -> str:
        """What the preset sets, one line (for ``wanlite presets``)."""
        grid = f", timesteps {list(self.timesteps)}[:steps]" if self.timesteps else ""
        return (
            f"{self.num_inference_steps} steps, guidance {self.guidance_scale:g}, "
            f"{self.sampler} sampler{grid}; LoRA: {self.lora_hint}"
        )


_CAUSVID_TIMESTEPS = (1000, 934, 862, 756, 603, 410, 250, 140, 74)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="causvid",
            source="Wan2GP profiles/wan_1.3B/Causvid Rank32 - 8 Steps.json",
            sampler="euler",
            timesteps=_CAUSVID_TIMESTEPS,
            num_inference_steps=8,
            guidance_scale=1.0,
            lora_hint="the Wan2.1 T2V 1.3B CausVid bidirect2 rank-32 LoRA at multiplier 1.0",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def describe_presets() -> list[tuple[str, str, str]]:
    """(name, what it sets, source) for every preset, sorted by name."""
    return [(p.name, p.settings(), p.source) for _, p in sorted(PRESETS.items())]


def request_defaults(
    preset: str | None, num_inference_steps: int | None, guidance_scale: float | None
) -> tuple[int, float]:
    """(steps, guidance) of a request: the values given, else the preset's, else the hosted
    schema's defaults (30, 5.0).  One rule for the library, the CLI and the server."""
    from .params import FIELDS_BY_NAME

    if preset is not None:
        num_inference_steps, guidance_scale = get_preset(preset).defaults(
            num_inference_steps, guidance_scale
        )
    if num_inference_steps is None:
        num_inference_steps = FIELDS_BY_NAME["num_inference_steps"].default
    if guidance_scale is None:
        guidance_scale = FIELDS_BY_NAME["guidance_scale"].default
    return num_inference_steps, guidance_scale
