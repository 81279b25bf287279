"""Named generation recipes: the published step / guidance / sampler settings of a distilled
model or LoRA, with where they are published and which files they are for.

A preset changes *defaults* only: a request's explicit ``num_inference_steps`` or
``guidance_scale`` wins, and an explicit ``shift`` replaces the preset's.  It picks the sampler
(``scheduler.make_sampler``).  It does not load weights: the files are the user's
(``files`` says which): a model folder (``--model``), a single DiT file (``--transformer``) or
a LoRA (``--lora``).  ``attention`` notes what the recipe's model was trained for: FastWan's
VSA is switched on by the checkpoint itself (its gate weights; ``attention="sdpa"`` runs it
dense instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.configs import SchedulerConfig
from .scheduler import Sampler, make_sampler

__all__ = ["PRESETS", "Preset", "describe_presets", "get_preset", "request_defaults"]


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # where the recipe is published (repository, file, function)
    sampler: str  # scheduler.SAMPLERS or scheduler.FEWSTEP_KINDS
    timesteps: tuple[int, ...] | None  # the recipe's step list (cut to the step count), or None
    num_inference_steps: int
    guidance_scale: float
    files: str  # what to load with it
    shift: float | None = None  # the recipe's shift for its step list (None: none applies)
    attention: str = "as loaded"  # what the model was trained with

    def defaults(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None
    ) -> tuple[int, float]:
        """(steps, guidance): the request's values where given, the preset's otherwise."""
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        return steps, guidance

    def make_sampler(
        self, cfg: SchedulerConfig, steps: int, shift: float | None = None, seed: int | None = None
    ) -> Sampler:
        """The preset's sampler for ``steps`` steps; ``shift`` (given) replaces the preset's.
        ``ValueError`` when the step list has fewer steps, or ``shift`` does not apply."""
        if shift is None:
            shift = self.shift
        return make_sampler(self.sampler, cfg, steps, shift, self.timesteps, seed)

    def settings(self) -> str:
        """What the preset sets, one line (for ``wanlite presets``)."""
        grid = f", timesteps {list(self.timesteps)}[:steps]" if self.timesteps else ""
        shift = f", shift {self.shift:g}" if self.shift is not None else ""
        return (
            f"{self.num_inference_steps} steps, guidance {self.guidance_scale:g}, "
            f"{self.sampler} sampler{grid}{shift}; attention {self.attention}; for: {self.files}"
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
            files="--lora: the Wan2.1 T2V 1.3B CausVid bidirect2 rank-32 LoRA at multiplier 1.0 "
            "(Kijai/WanVideo_comfy Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors)",
        ),
        Preset(
            name="fastwan",
            source="hao-ai-lab/FastVideo fastvideo/configs/pipelines/wan.py "
            "FastWan2_1_T2V_480P_Config; fastvideo/pipelines/stages/denoising.py "
            "DmdDenoisingStage.forward",
            sampler="dmd",
            timesteps=(1000, 757, 522),
            num_inference_steps=3,
            guidance_scale=1.0,
            shift=8.0,
            attention="VSA at sparsity 0.8 (from the checkpoint's gates)",
            files="--model: the FastVideo/FastWan2.1-T2V-1.3B-Diffusers folder",
        ),
        Preset(
            name="rcm",
            source="NVlabs/rcm rcm/inference/wan2pt1_t2v_rcm_infer.py (sigma_max 80, "
            "mid_t 1.5, 1.4, 1.0)",
            sampler="rcm",
            timesteps=None,
            num_inference_steps=4,
            guidance_scale=1.0,
            files="--transformer: worstcoder/rcm-Wan rCM_Wan2.1_T2V_1.3B_480p.pt (net. prefix "
            "and Linear patch embedding converted on load), --model: Wan2.1-T2V-1.3B for the rest",
        ),
        Preset(
            name="lightx2v",
            source="ModelTC/LightX2V lightx2v/models/schedulers/wan/step_distill/scheduler.py "
            "WanStepDistillScheduler (sample_shift 5, denoising_step_list 1000, 750, 500, 250)",
            sampler="distill",
            timesteps=(1000, 750, 500, 250),
            num_inference_steps=4,
            guidance_scale=1.0,
            shift=5.0,
            files="--transformer: a LightX2V 4-step distilled Wan2.1 T2V 1.3B DiT (their "
            "published 1.3B file, lightx2v/Wan-NVFP4 wan2.1_t2v_1_3b_nvfp4_lightx2v_4step, is "
            "NVFP4, which wanlite does not read)",
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
    from ..params import FIELDS_BY_NAME

    if preset is not None:
        num_inference_steps, guidance_scale = get_preset(preset).defaults(
            num_inference_steps, guidance_scale
        )
    if num_inference_steps is None:
        num_inference_steps = FIELDS_BY_NAME["num_inference_steps"].default
    if guidance_scale is None:
        guidance_scale = FIELDS_BY_NAME["guidance_scale"].default
    return num_inference_steps, guidance_scale
