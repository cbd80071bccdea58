"""Diffusion in pixel space next to latent space, with the same trainer and the same sampler code.

`model.space: latent` (the default) is latent diffusion (Rombach et al. 2022, arXiv 2112.10752): x0 is the VAE's
normalised latent. `model.space: pixel` is the DDPM setting (Ho et al. 2020, arXiv 2006.11239): x0 is the RGB image
in [-1, 1] itself, with no VAE and no scaling factor, and the UNet has 3 input and output channels at image size.
The trainer asks its `DiffusionSpace` for x0; `PixelInference` samples in pixel space with `LDMInference`'s
prompts, CFG, schedulers and seeds. `ldm-tune compare-pixel` (ldm_tune.compare_pixel) measures the two.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldm_tune.components import load_components, save_model_folder, vae_space_to_latents
from ldm_tune.inference import LDMInference
from ldm_tune.io_utils import check_new_folder
from ldm_tune.presets import SD15_SCHEDULER
from ldm_tune.schedulers import SCHEDULERS, canonical_name


SPACES = ("latent", "pixel")
PIXEL_CHANNELS = 3

# DDPM's own schedule for pixels (Ho et al. 2020, section 4: linear betas 1e-4 to 0.02 over 1000 steps), whose last
# step leaves ~0.6 % of the image's amplitude (SD's scaled_linear schedule, tuned for latents, leaves ~7 %).
# `clip_sample` is left to the sampler: `PixelInference.set_scheduler` turns it on (SD's folder format saves a PNDM
# config, which would drop it anyway).
PIXEL_SCHEDULER = {k: v for k, v in SD15_SCHEDULER.items() if k != "clip_sample"}
PIXEL_SCHEDULER.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def pixel_unet_config(latent_unet_config: dict, image_size: int) -> dict:
    """The latent UNet's architecture (same width, blocks, layers and attention) on RGB pixels at `image_size`."""
    return {**latent_unet_config, "in_channels": PIXEL_CHANNELS, "out_channels": PIXEL_CHANNELS,
            "sample_size": image_size}  # fmt: skip


def make_pixel_model(source: str | Path, out_dir: str | Path, image_size: int, seed: int = 0) -> Path:
    """A pixel-space model folder from a latent one: its UNet rebuilt at 3 channels and `image_size` with random
    weights, the same text encoder and tokenizer, and DDPM's pixel schedule.

    The Stable Diffusion folder format has a `vae/`; the source's is kept there so that every loader reads the
    folder, but nothing in pixel space calls it (`PixelInference` drops it, `PixelSpace` never encodes).
    """
    out_dir = check_new_folder(out_dir)
    components = load_components(source)
    config = pixel_unet_config(dict(components.unet.config), image_size)
    torch.manual_seed(seed)  # as presets._seeded(seed, 0): the UNet's own seed
    components.unet = UNet2DConditionModel.from_config(config)
    components.scheduler_config = {**components.scheduler_config, **PIXEL_SCHEDULER}
    return save_model_folder(components, out_dir)


class LatentSpace:
    """x0 is the VAE latent `(mean + std * eps)`, normalised by the VAE's scaling factor; cached moments are used
    when the batch carries them (`data.cache_latents`)."""

    def __init__(self, vae, weight_dtype: torch.dtype):
        self.vae, self.weight_dtype = vae, weight_dtype

    def moments(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "latent_mean" in batch:
            return batch["latent_mean"], batch["latent_std"]
        posterior = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist
        return posterior.mean, posterior.std

    def to_x0(self, z: torch.Tensor) -> torch.Tensor:
        return vae_space_to_latents(self.vae, z)


class PixelSpace:
    """x0 is the image itself in [-1, 1]: a point mass (std 0), no encoder, no scaling factor."""

    def moments(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch["pixel_values"].float()
        return pixels, torch.zeros_like(pixels)

    def to_x0(self, z: torch.Tensor) -> torch.Tensor:
        return z


def make_space(space: str, vae, unet, weight_dtype: torch.dtype) -> LatentSpace | PixelSpace:
    """The x0 of `model.space`; a pixel space needs an RGB UNet (3 channels in and out)."""
    if space == "latent":
        return LatentSpace(vae, weight_dtype)
    if space != "pixel":
        raise ValueError(f"`model.space` must be one of {list(SPACES)}, got {space!r}.")
    channels = (unet.config.in_channels, unet.config.out_channels)
    if channels != (PIXEL_CHANNELS, PIXEL_CHANNELS):
        raise ValueError(
            f"`model.space` pixel needs a UNet with 3 input and 3 output channels (RGB), got {channels}; build a "
            "pixel model with `ldm_tune.pixel_space.make_pixel_model` (or `ldm-tune compare-pixel`)."
        )
    return PixelSpace()


class PixelInference(LDMInference):
    """`LDMInference` in pixel space: the start noise is an image-sized RGB tensor (`vae_scale_factor` 1) and the
    sampler's result is the image, post-processed without a VAE. Prompts, CFG, schedulers and seeds are the
    inherited code. img2img and inpainting (which encode with a VAE) are not offered."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler_config: dict, *args, **kwargs):
        # The folder's VAE only satisfies the parent's constructor; it is dropped so that it is neither called nor
        # counted in the memory of pixel-space sampling.
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler_config, *args, **kwargs)
        self.vae, self.vae_scale_factor = None, 1
        self._make_processors()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PixelInference:
        for model in (self.text_encoder, self.unet):
            model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
        return self

    def set_scheduler(self, name: str, **overrides) -> None:
        """As `LDMInference.set_scheduler`, with the predicted x0 clamped to [-1, 1] by samplers that can
        (`clip_sample`, DDPM's own sampler setting): right for pixels, wrong for latents (ldm_tune/presets.py)."""
        accepted = inspect.signature(SCHEDULERS[canonical_name(name)].cls.__init__).parameters
        if "clip_sample" in accepted:
            overrides = {"clip_sample": True, **overrides}
        super().set_scheduler(name, **overrides)

    def check_inputs(self, params, generator, callback, output_type, image=None, mask_image=None):
        if image is not None or mask_image is not None:
            raise ValueError("`image` and `mask_image` (img2img, inpainting) are not supported in pixel space.")
        return super().check_inputs(params, generator, callback, output_type)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """The sample is the image in [-1, 1]: only post-processing (to [0, 1] and `output_type`)."""
        if output_type == "latent":
            return latents
        return self.image_processor.postprocess(latents.float(), output_type=output_type)
