"""The arguments of one generation: their checks, the per-image seeds and the timestep-spacing warning.

Kept apart from `LDMInference` so that `ldm-tune generate` can check every argument against the model's scheduler
and VAE configs (two small JSON files) before any weights load.

Seeds follow AUTOMATIC1111's rule (`modules/processing.py`: `all_seeds = [seed + x for x in range(n)]`): image `i`
of a call, over all prompts x `num_images_per_prompt` in output order, gets `seed + i` on its own CPU
`torch.Generator`. An image then depends on its own seed only, not on the device, the batch, or the prompts beside
it, and one image of a batch can be made again alone from its recorded seed.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, replace

import torch


logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Seeds are drawn below 2**32 - 1 as A1111 does (`get_fixed_seed`: `random.randrange(4294967294)`), so that a
# drawn seed can be typed into its UI; any seed in [0, 2**64) may be passed.
_DRAWN_SEEDS = 4294967294
# The first timestep as a fraction of the training timesteps below which "leading" spacing is warned about.
_LATE_START = 0.9


@dataclass
class GenerationParams:
    """The arguments of one `generate` call that decide its images (written to the parameters JSON)."""

    prompt: list[str]
    negative_prompt: list[str]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    num_images_per_prompt: int
    seed: int | None
    # img2img / inpainting only (None otherwise): the images are recorded as the sha256 of their bytes, not stored.
    strength: float | None = None
    init_image_sha256: str | None = None
    mask_sha256: str | None = None
    # Text encoder layers skipped at the end (diffusers' numbering; A1111's "Clip skip" is one more). None: none.
    clip_skip: int | None = None


def _check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"`prompt` must be a string or a list of strings, got {prompt!r}.")
    if len(prompts) == 0:
        raise ValueError("`prompt` must not be an empty list.")
    if negative_prompt is None or isinstance(negative_prompt, str):
        return list(prompts), [negative_prompt or ""] * len(prompts)
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
        raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}.")
    if len(negative_prompt) != len(prompts):
        raise ValueError(
            f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {len(prompts)}; pass one "
            "negative prompt per prompt, or a single string for all."
        )
    return list(prompts), list(negative_prompt)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_size_and_steps(params: GenerationParams, scheduler, vae_scale_factor: int) -> None:
    for arg in ("height", "width"):
        value = getattr(params, arg)
        if not isinstance(value, int) or value <= 0 or value % vae_scale_factor:
            raise ValueError(
                f"`{arg}` must be a positive multiple of {vae_scale_factor} (the VAE scale factor), got {value!r}."
            )
    config = scheduler.config
    steps, max_steps = params.num_inference_steps, config.num_train_timesteps
    if config.get("timestep_spacing", "leading") == "leading" and config.get("steps_offset", 0):
        # "leading" spacing adds steps_offset to every timestep: at the full step count the last one is out of
        # range (diffusers would fail with an IndexError deep inside the scheduler).
        max_steps -= config.steps_offset
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= max_steps:
        raise ValueError(
            f"`num_inference_steps` must be an integer in [1, {max_steps}], got {steps!r} (with steps_offset, "
            "use timestep_spacing='trailing' to sample every training timestep)."
        )


def _check_seed(seed, generator, num_images: int) -> None:
    if seed is not None and generator is not None:
        raise ValueError("Pass either `seed` or `generator`, not both.")
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(f"`generator` as a list needs one generator per image ({num_images}), got {len(generator)}.")
    if seed is None or seed == -1:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**64 - num_images:
        # Image i gets seed + i, and a torch.Generator takes seeds below 2**64.
        raise ValueError(
            f"`seed` must be -1 (draw one) or an integer in [0, 2**64 - {num_images}] (image i takes seed + i), "
            f"got {seed!r}."
        )


def check_generation_inputs(
    params: GenerationParams,
    scheduler,
    vae_scale_factor: int,
    generator=None,
    callback=None,
    output_type: str = "pil",
) -> GenerationParams:
    """Validate every argument; return `params` with prompts and negative prompts as lists of equal length.

    `scheduler` is the one that will sample (its config bounds the step count); nothing is loaded or run.
    """
    prompts, negatives = _check_prompts(params.prompt, params.negative_prompt)
    _check_size_and_steps(params, scheduler, vae_scale_factor)
    guidance = params.guidance_scale
    if not _is_number(guidance) or guidance < 0:
        raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance!r}.")
    if not _is_number(params.guidance_rescale) or not 0.0 <= params.guidance_rescale <= 1.0:
        raise ValueError(f"`guidance_rescale` must be in [0, 1], got {params.guidance_rescale!r}.")
    if not _is_number(params.eta) or params.eta < 0:
        raise ValueError(f"`eta` must be a number >= 0, got {params.eta!r}.")
    per_prompt = params.num_images_per_prompt
    if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {per_prompt!r}.")
    _check_seed(params.seed, generator, len(prompts) * per_prompt)
    clip_skip = params.clip_skip
    if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 0):
        raise ValueError(f"`clip_skip` must be None or an integer >= 0 (layers skipped), got {clip_skip!r}.")
    if callback is not None and not callable(callback):
        raise ValueError(f"`callback` must be callable as callback(step, timestep, latents), got {callback!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
    return replace(params, prompt=prompts, negative_prompt=negatives)


def resolve_seed(seed: int | None) -> int:
    """`seed`, or a newly drawn one for `None` or -1 (A1111's "random")."""
    return secrets.randbelow(_DRAWN_SEEDS) if seed is None or seed == -1 else seed


def image_seeds(seed: int, num_images: int) -> list[int]:
    """The seed of each image of a call: `seed + i` (A1111's rule)."""
    return [seed + i for i in range(num_images)]


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image. diffusers' `randn_tensor` draws each image's noise from its own generator (the
    initial latents, and the noise of every stochastic sampler step, which get the same list), on the CPU whatever
    the device, so the noise of an image is the same on any device and in any batch."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def warn_if_late_start(scheduler, scheduler_name: str, num_inference_steps: int) -> None:
    """Warn when the first timestep of "leading" spacing is far below the last training timestep.

    "leading" spacing (DDPM, DDIM and PNDM in Stable Diffusion's config) starts at `(n - 1) * (T // n) + offset`:
    at 600 of 1000 steps that is t = 600, so sampling starts from pure noise as if it were a half-noised image.
    "trailing" spacing starts at T - 1 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", arXiv 2305.08891, section 3.3 and table 2).
    """
    config = scheduler.config
    first, total = int(scheduler.timesteps[0]), config.num_train_timesteps
    if config.get("timestep_spacing") == "leading" and first < _LATE_START * total:
        logger.warning(
            "The %s sampler's first timestep is %d of %d training timesteps (timestep_spacing='leading' at %d "
            "steps): sampling starts from noise as if it were a partly denoised image. Use "
            "set_scheduler(%r, timestep_spacing='trailing') (CLI: --scheduler-arg timestep_spacing=trailing).",
            scheduler_name,
            first,
            total,
            num_inference_steps,
            scheduler_name,
        )
