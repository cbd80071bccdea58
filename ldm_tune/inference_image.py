"""The latent side of `LDMInference`: its start latents, decoding, and the image-conditioned steps (img2img and
inpainting).

They give the same images as diffusers' `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` on the
same components and per-image generator list (tests/test_img2img.py). Each generator is drawn from in the order those
pipelines draw from it: (1) the VAE posterior sample of the init image (img2img; inpainting with strength < 1 or a
4-channel UNet), (2) the starting noise, (3) the posterior sample of the masked image (inpainting), (4) the noise of
stochastic sampler steps. So image i depends on generator i only, and can be made again alone from its seed, as long
as every image has its own copy of the init image (a single image is repeated per image before it is encoded).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ldm_tune.components import latents_to_vae_space, vae_space_to_latents
from ldm_tune.generation_params import warn_if_late_start


# Input channels of a UNet that denoises latents alone, and of an inpainting UNet (latents + mask + masked image).
PLAIN_CHANNELS, INPAINT_CHANNELS = 4, 9


def image_sha256(image) -> str | None:
    """sha256 of an image's bytes with its shape and type (recorded instead of the image; None for no image)."""
    if image is None:
        return None
    digest = hashlib.sha256()
    for item in image if isinstance(image, (list, tuple)) else [image]:
        if isinstance(item, PIL.Image.Image):
            digest.update(f"PIL {item.mode} {item.size}".encode())
            digest.update(item.tobytes())
        else:
            array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            digest.update(f"{type(item).__name__} {array.dtype} {array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _sizes(image, name: str) -> list[tuple[int, int]]:
    """(height, width) of each image of a PIL image, list of them, array (HWC/NHWC) or tensor (CHW/NCHW)."""
    if isinstance(image, PIL.Image.Image):
        return [(image.height, image.width)]
    if isinstance(image, (list, tuple)) and image:
        return [size for item in image for size in _sizes(item, name)]
    if isinstance(image, np.ndarray) and image.ndim in (2, 3, 4):
        # diffusers takes a 2-d array as one grayscale image and 3-d as HWC (or a batch of masks, but not here).
        return [image.shape[:2]] if image.ndim <= 3 else [image.shape[1:3]] * image.shape[0]
    if isinstance(image, torch.Tensor) and image.ndim in (2, 3, 4):
        return [tuple(image.shape[-2:])] * (image.shape[0] if image.ndim == 4 else 1)
    raise ValueError(
        f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(image).__name__}."
    )


def check_image_inputs(image, mask_image, strength, num_inference_steps, factor: int, unet_channels: int | None):
    """Validate the init image, mask and strength; return the images' (height, width) (None without an image).

    `unet_channels` None (the UNet is not loaded yet, as in `ldm-tune generate`) skips the checks against the UNet.
    """
    if mask_image is not None and image is None:
        raise ValueError("`mask_image` needs an `image` to inpaint; pass the image it masks as `image`.")
    if image is None:
        if unet_channels == INPAINT_CHANNELS:
            raise ValueError(
                f"The UNet has {INPAINT_CHANNELS} input channels (an inpainting model): pass `image` and `mask_image`."
            )
        return None
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"`strength` must be in [0, 1], got {strength!r}.")
    if isinstance(num_inference_steps, int) and kept_steps(num_inference_steps, strength) < 1:
        raise ValueError(
            f"`strength` {strength} keeps no step of {num_inference_steps} (int(num_inference_steps * strength) is "
            "0): raise `strength` or `num_inference_steps`."
        )
    sizes = _sizes(image, "image")
    if len(set(sizes)) != 1:
        raise ValueError(f"All images of `image` must have one size, got {sorted(set(sizes))}.")
    height, width = sizes[0]
    if height % factor or width % factor:
        raise ValueError(f"`image` size {width}x{height} must be a multiple of {factor} (the VAE scale factor).")
    if mask_image is None:
        return height, width
    if unet_channels is not None and unet_channels not in (PLAIN_CHANNELS, INPAINT_CHANNELS):
        raise ValueError(f"Inpainting needs a UNet of 4 or 9 input channels, this one has {unet_channels}.")
    mask_sizes = _sizes(mask_image, "mask_image")
    if set(mask_sizes) != {(height, width)} or len(mask_sizes) not in (1, len(sizes)):
        raise ValueError(
            f"`mask_image` must be one mask, or one per image, of the image's size {width}x{height}, got "
            f"{len(mask_sizes)} of {sorted({f'{w}x{h}' for h, w in mask_sizes})}."
        )
    return height, width


def check_image_count(image, batch_size: int) -> None:
    """One init image for all, or one per image generated (the mask follows the images, checked above)."""
    count = len(_sizes(image, "image"))
    if count not in (1, batch_size):
        raise ValueError(f"`image` has {count} images: pass one, or one per image generated ({batch_size}).")


def kept_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the sampler's steps run at `strength` (as `StableDiffusionImg2ImgPipeline.get_timesteps`)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


@dataclass
class Inpainting:
    """What the denoising loop needs to inpaint: the mask at latent size (1 = repaint) and, for a 9-channel UNet,
    the masked image's latents; for a 4-channel UNet, the init image's latents and the starting noise."""

    mask: torch.Tensor
    masked_latents: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def unet_input(self, model_input: torch.Tensor) -> torch.Tensor:
        """A 9-channel UNet sees the mask and the masked image beside the latents (repeated for the CFG halves)."""
        if self.masked_latents is None:
            return model_input
        copies = model_input.shape[0] // self.mask.shape[0]
        extra = torch.cat([self.mask.repeat(copies, 1, 1, 1), self.masked_latents.repeat(copies, 1, 1, 1)], dim=1)
        return torch.cat([model_input, extra], dim=1)

    def blend(self, scheduler, latents: torch.Tensor, next_timestep) -> torch.Tensor:
        """A 4-channel UNet knows nothing of the mask: outside it, put back the init image noised to the level of
        the next step (the clean image after the last step), as `StableDiffusionInpaintPipeline` does."""
        if self.image_latents is None:
            return latents
        known = self.image_latents
        if next_timestep is not None:
            known = scheduler.add_noise(known, self.noise, torch.tensor([next_timestep]))
        return (1 - self.mask) * known + self.mask * latents


class ImageInputsMixin:
    """The start latents, decoding and the img2img / inpainting steps of `LDMInference` (it provides vae, unet and
    scheduler)."""

    def _make_processors(self) -> None:
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # As StableDiffusionInpaintPipeline builds it: grayscale, values kept in [0, 1], then 0/1 at 0.5.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        generator: torch.Generator | list[torch.Generator],
    ) -> torch.Tensor:
        """Initial Gaussian latents, scaled by the scheduler's initial sigma (one generator per image for a list)."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Decode latents with the VAE into images of `output_type` (`pil`, `np` or `pt`, values in [0, 1])."""
        if output_type == "latent":
            return latents
        images = self.vae.decode(latents_to_vae_space(self.vae, latents).to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last `strength` of the sampler's timesteps (the scheduler's timesteps must be set)."""
        start = num_inference_steps - kept_steps(num_inference_steps, strength)
        # Multistep and ancestral samplers count their own step index: tell them where sampling starts.
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return self.scheduler.timesteps[start * self.scheduler.order :]

    def preprocess(self, image, height: int, width: int, batch_size: int, mask: bool = False) -> torch.Tensor:
        """Pixels in [-1, 1] (a mask in {0, 1}), one per image generated: a single image is repeated."""
        processor = self.mask_processor if mask else self.image_processor
        pixels = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        return pixels.repeat(batch_size // pixels.shape[0], 1, 1, 1)

    def encode_image(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """UNet latents of `pixels`: a sample of the VAE posterior, image i drawn from generator i."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        if isinstance(generator, list):
            samples = [self.vae.encode(pixels[i : i + 1]).latent_dist.sample(generator[i]) for i in range(len(pixels))]
            return vae_space_to_latents(self.vae, torch.cat(samples))
        return vae_space_to_latents(self.vae, self.vae.encode(pixels).latent_dist.sample(generator))

    def prepare_image_latents(self, pixels: torch.Tensor, timestep, dtype, generator) -> torch.Tensor:
        """img2img's start: the init image's latents noised to the first kept timestep."""
        latents = self.encode_image(pixels, generator).to(dtype)
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=dtype)
        return self.scheduler.add_noise(latents, noise, timestep.repeat(latents.shape[0]))

    def prepare_inpainting(self, pixels, mask_image, strength: float, timestep, dtype, generator):
        """Inpainting's start latents and what the loop needs (`Inpainting`), as `StableDiffusionInpaintPipeline`."""
        batch, (height, width) = pixels.shape[0], pixels.shape[-2:]
        plain = self.unet.config.in_channels == PLAIN_CHANNELS
        # At strength 1 sampling starts from pure noise; only a 4-channel UNet then needs the image's latents.
        image_latents = self.encode_image(pixels, generator).to(dtype) if plain or strength < 1 else None
        factor = self.vae_scale_factor
        shape = (batch, self.vae.config.latent_channels, height // factor, width // factor)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        if strength < 1:
            latents = self.scheduler.add_noise(image_latents, noise, timestep.repeat(batch))
        else:
            latents = noise * self.scheduler.init_noise_sigma
        mask = self.preprocess(mask_image, height, width, batch, mask=True)
        # Encoded for a 4-channel UNet too, which does not use it: its posterior sample moves each generator on as
        # in diffusers, so that the step noise of stochastic samplers is the same.
        masked_latents = self.encode_image(pixels * (mask < 0.5), generator).to(dtype)
        mask = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(device=self.device, dtype=dtype)
        if plain:
            return latents, Inpainting(mask, image_latents=image_latents, noise=noise)
        return latents, Inpainting(mask, masked_latents=masked_latents)

    def prepare_start(self, params, batch_size: int, dtype, generator, image, mask_image):
        """Set the timesteps; return the start latents, the timesteps to run and the inpainting state (or None)."""
        self.scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        if image is None:
            warn_if_late_start(self.scheduler, self.scheduler_name, params.num_inference_steps)
            return self.prepare_latents(batch_size, params.height, params.width, dtype, generator), None, None
        # img2img starts part-way on purpose: the late-start warning is only about starting from pure noise.
        timesteps = self.get_timesteps(params.num_inference_steps, params.strength)
        pixels = self.preprocess(image, params.height, params.width, batch_size)
        if mask_image is None:
            return self.prepare_image_latents(pixels, timesteps[:1], dtype, generator), timesteps, None
        start = timesteps[:1]
        latents, inpainting = self.prepare_inpainting(pixels, mask_image, params.strength, start, dtype, generator)
        return latents, timesteps, inpainting
