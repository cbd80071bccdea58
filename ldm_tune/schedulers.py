"""Sampling schedulers by name: a registry of diffusers scheduler classes, each built from the model's own config.

Building from the model's config (`from_config`) matters: class defaults differ from Stable Diffusion's (betas
0.0001-0.02 linear instead of 0.00085-0.012 scaled_linear, `clip_sample=True`), and a scheduler built from class
defaults silently produces wrong images. This module never imports the trainer.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerSpec:
    cls: type[SchedulerMixin]
    description: str
    defaults: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


# Names follow the A1111 / diffusers docs mapping (docs/source/en/api/schedulers/overview.md).
SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddpm": SchedulerSpec(DDPMScheduler, "DDPM ancestral sampling (Ho et al. 2020); needs many steps (~1000)."),
    "ddim": SchedulerSpec(DDIMScheduler, "DDIM (Song et al. 2020); deterministic at eta=0, good at 50 steps."),
    "pndm": SchedulerSpec(
        PNDMScheduler,
        "PLMS: pseudo linear multistep (Liu et al. 2022), Stable Diffusion's original sampler.",
        {"skip_prk_steps": True},
        aliases=("plms",),
    ),
    "dpm++": SchedulerSpec(
        DPMSolverMultistepScheduler,
        "DPM-Solver++ 2M (Lu et al. 2022), order 2; good images in 20-25 steps.",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        aliases=("dpmpp_2m", "dpm-solver++"),
    ),
    "dpm++_karras": SchedulerSpec(
        DPMSolverMultistepScheduler,
        "DPM-Solver++ 2M with Karras sigmas (A1111 'DPM++ 2M Karras').",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        aliases=("dpmpp_2m_karras",),
    ),
    "dpm++_sde": SchedulerSpec(
        DPMSolverMultistepScheduler,
        "DPM-Solver++ 2M SDE, stochastic (A1111 'DPM++ 2M SDE').",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        aliases=("dpmpp_2m_sde",),
    ),
    "euler": SchedulerSpec(EulerDiscreteScheduler, "Euler (Karras et al. 2022, Algorithm 2); deterministic."),
    "euler_a": SchedulerSpec(
        EulerAncestralDiscreteScheduler, "Euler ancestral; stochastic, images change with step count."
    ),
    "lms": SchedulerSpec(LMSDiscreteScheduler, "Linear multistep (k-diffusion's LMS); needs scipy."),
    "heun": SchedulerSpec(HeunDiscreteScheduler, "Heun (Karras et al. 2022), 2 UNet calls per step."),
    "kdpm2": SchedulerSpec(KDPM2DiscreteScheduler, "DPM2 (Karras et al. 2022), 2 UNet calls per step."),
    "kdpm2_a": SchedulerSpec(KDPM2AncestralDiscreteScheduler, "DPM2 ancestral; stochastic, 2 UNet calls per step."),
    "unipc": SchedulerSpec(UniPCMultistepScheduler, "UniPC (Zhao et al. 2023), predictor-corrector; fast."),
    "deis": SchedulerSpec(DEISMultistepScheduler, "DEIS multistep (Zhang and Chen 2022)."),
}
_ALIASES = {alias: name for name, spec in SCHEDULERS.items() for alias in spec.aliases}


def scheduler_names(include_aliases: bool = False) -> list[str]:
    """Registered scheduler names (optionally with their aliases)."""
    return list(SCHEDULERS) + (list(_ALIASES) if include_aliases else [])


def canonical_name(name: str) -> str:
    """Resolve an alias (case-insensitive) to its registry name; unknown names raise a ValueError listing all."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(
            f"`scheduler` must be one of {scheduler_names(include_aliases=True)}, got {name!r}. "
            "`ldm-tune schedulers` describes each."
        )
    return key


def _init_parameters(cls: type[SchedulerMixin]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def make_scheduler(name: str, base_config: dict, **overrides) -> SchedulerMixin:
    """Build the scheduler `name` from a model's scheduler config, with optional overrides.

    Args:
        name: a registry name or alias (see `scheduler_names(include_aliases=True)`).
        base_config: the model's own scheduler config (e.g. `scheduler/scheduler_config.json`).
        overrides: constructor arguments of the scheduler class, e.g. `use_karras_sigmas=True`.

    Raises:
        ValueError: for an unknown name or an override the scheduler class does not accept.
    """
    spec = SCHEDULERS[canonical_name(name)]
    accepted = _init_parameters(spec.cls)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"Scheduler overrides {unknown} are not arguments of {spec.cls.__name__}; valid: {sorted(accepted)}."
        )
    kwargs = {**spec.defaults, **overrides}
    if "clip_sample" in accepted and "clip_sample" not in base_config and "clip_sample" not in overrides:
        # diffusers defaults clip_sample to True, which clamps x0 to [-1, 1]: right for pixels, wrong for latents.
        kwargs["clip_sample"] = False
    elif "clip_sample" in accepted and base_config.get("clip_sample") and overrides.get("clip_sample", True):
        logger.warning(
            "The model's scheduler config sets `clip_sample: true`; this clamps predicted latents to [-1, 1] and "
            "usually ruins a latent model's samples. Pass `clip_sample=False` to turn it off."
        )
    return spec.cls.from_config(base_config, **kwargs)


def describe_schedulers() -> list[str]:
    """One line per registered scheduler: name, aliases, class and a description."""
    lines = []
    for name, spec in SCHEDULERS.items():
        aliases = f" (alias: {', '.join(spec.aliases)})" if spec.aliases else ""
        lines.append(f"{name:<14}{spec.cls.__name__:<34}{spec.description}{aliases}")
    return lines
