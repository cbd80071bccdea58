import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from ldm_tune.presets import SD15_SCHEDULER
from ldm_tune.schedulers import SCHEDULERS, canonical_name, describe_schedulers, make_scheduler, scheduler_names


REQUIRED = [
    "ddpm",
    "ddim",
    "pndm",
    "plms",
    "dpm++",
    "dpmpp_2m",
    "dpm-solver++",
    "euler",
    "euler_a",
    "lms",
    "heun",
    "unipc",
]


@pytest.mark.parametrize("name", scheduler_names(include_aliases=True))
def test_every_name_builds_from_the_models_config(name):
    scheduler = make_scheduler(name, SD15_SCHEDULER)
    # The model's betas, not the class defaults (0.0001-0.02 linear).
    assert scheduler.config.beta_start == 0.00085 and scheduler.config.beta_end == 0.012
    assert scheduler.config.beta_schedule == "scaled_linear"
    if "clip_sample" in scheduler.config:
        assert scheduler.config.clip_sample is False


def test_required_names_and_aliases():
    names = scheduler_names(include_aliases=True)
    assert set(REQUIRED) <= set(names)
    assert canonical_name("PLMS") == "pndm" and canonical_name("dpmpp_2m") == "dpm++"
    assert isinstance(make_scheduler("plms", SD15_SCHEDULER), PNDMScheduler)
    dpm = make_scheduler("dpm-solver++", SD15_SCHEDULER)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="`scheduler` must be one of") as info:
        make_scheduler("dpm3000", SD15_SCHEDULER)
    for name in REQUIRED:
        assert repr(name) in str(info.value)


def test_overrides_apply_and_unknown_override_is_refused():
    karras = make_scheduler("dpm++", SD15_SCHEDULER, use_karras_sigmas=True)
    assert karras.config.use_karras_sigmas is True
    with pytest.raises(ValueError, match="use_karras_sigma.*not arguments of DPMSolverMultistepScheduler"):
        make_scheduler("dpm++", SD15_SCHEDULER, use_karras_sigma=True)


def test_missing_clip_sample_is_turned_off_for_latents():
    config = {k: v for k, v in SD15_SCHEDULER.items() if k != "clip_sample"}
    assert DDIMScheduler.from_config(config).config.clip_sample is True  # the trap
    assert make_scheduler("ddim", config).config.clip_sample is False


def test_clip_sample_true_in_model_config_warns(caplog):
    with caplog.at_level("WARNING"):
        make_scheduler("ddim", {**SD15_SCHEDULER, "clip_sample": True})
    assert "clip_sample" in caplog.text


def test_describe_has_one_line_per_scheduler():
    lines = describe_schedulers()
    assert len(lines) == len(SCHEDULERS)
    assert all(line.split()[0] in SCHEDULERS for line in lines)
