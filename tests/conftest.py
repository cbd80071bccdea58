"""Shared fixtures. Everything is built in code and offline: an accidental hub download fails loudly."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Stable-Diffusion-format folder of the `tiny` preset, written by the real `init_model`."""
    from ldm_tune.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """`LDMInference` on the tiny model, CPU fp32. Tests that change the scheduler must set it back."""
    from ldm_tune.inference import LDMInference

    return LDMInference.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def sd_pipeline(tiny_model_dir):
    """diffusers' own StableDiffusionPipeline on the same folder: the reference our inference must match."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
