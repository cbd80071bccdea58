"""Text-to-image sampling with classifier-free guidance, shaped like a diffusers pipeline.

`LDMInference` runs `check_inputs -> encode_prompt -> prepare_latents -> denoise -> decode` and gives the same
images as `StableDiffusionPipeline` on the same components, scheduler and seed (tested for every registered
scheduler). The trainer builds one from its in-memory components for validation images. LoRAs (diffusers or kohya
format, see `ldm_tune.lora_files`) are loaded by diffusers' own loaders into the very same models.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from tqdm.auto import tqdm

from ldm_tune.components import (
    check_model_source,
    checkpoint_unet,
    default_dtype,
    freeze,
    load_components,
    resolve_device,
    vae_scale_factor,
)
from ldm_tune.generation_params import (
    OUTPUT_TYPES,
    GenerationParams,
    check_generation_inputs,
    image_generators,
    image_seeds,
    resolve_seed,
)
from ldm_tune.inference_image import (
    ImageInputsMixin,
    Inpainting,
    check_image_count,
    check_image_inputs,
    image_sha256,
)
from ldm_tune.inference_lora import LoadedLora, LoraMixin
from ldm_tune.inference_switches import SpeedSwitchesMixin
from ldm_tune.outputs import save_generation
from ldm_tune.png_info import run_record, unet_weight_files, weights_hash
from ldm_tune.prompt_weighting import encode_weighted_prompts
from ldm_tune.schedulers import canonical_name, make_scheduler


__all__ = ["OUTPUT_TYPES", "GenerationParams", "LDMInference"]


class LDMInference(ImageInputsMixin, LoraMixin, SpeedSwitchesMixin):
    """Generate images from a Stable-Diffusion-format model.

    Args:
        vae, text_encoder, tokenizer, unet: the model's components (not modified; a training UNet may be passed).
        scheduler_config: the model's own scheduler config, from which every named scheduler is built.
        scheduler: a registry name (see `ldm-tune schedulers`).
        model_name, checkpoint: recorded in the parameters JSON so every image can be reproduced.
        unet_files: the safetensors file(s) the UNet was read from, hashed for the "Model hash" of the PNG text
            (`from_pretrained` finds them; None for a UNet that is not a file, e.g. during training).

    LoRAs are added with `load_lora(path, scale)` and weighted with `set_lora_scale`; they are recorded (file,
    sha256, scale) in the parameters JSON too. Memory and speed switches (`enable_vae_slicing`, `enable_vae_tiling`,
    `enable_attention_slicing`, `enable_model_cpu_offload`, `compile_unet`) are in `ldm_tune.inference_switches`.
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler_config: dict,
        scheduler: str = "dpm++",
        model_name: str | None = None,
        checkpoint: str | None = None,
        unet_files: list[Path] | None = None,
    ):
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.base_scheduler_config = dict(scheduler_config)
        self.model_name, self.checkpoint = model_name, checkpoint
        self.revision = self.variant = None
        self.model_config = None  # the config folder of a single-file model (`from_pretrained(config=...)`)
        self.unet_weights = None  # "ema" or "raw" for a training checkpoint's UNet (set by `from_pretrained`)
        self.unet_files, self._model_hash = unet_files, None
        self.loras: list[LoadedLora] = []
        self._lora_pipeline = None
        self.vae_scale_factor = vae_scale_factor(vae)
        self._make_processors()
        self.set_scheduler(scheduler)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        checkpoint: str | None = None,
        scheduler: str = "dpm++",
        device: str | torch.device = "auto",
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        variant: str | None = None,
        lora: list[str | os.PathLike | tuple[str | os.PathLike, float]] | str | os.PathLike | None = None,
        use_ema: bool = True,
        config: str | os.PathLike | None = None,
    ) -> LDMInference:
        """Load a Stable-Diffusion-format folder or hub id, optionally with a training checkpoint's UNet and LoRAs.

        `model` may also be a single-file `.safetensors` (or weights-only `.ckpt`) checkpoint in the original ldm
        layout; `config` is then a diffusers-format folder of its architecture (default: the shipped SD 1.5 / 2.1
        configs, see `ldm_tune.single_file`), and the file itself gives the "Model hash".

        `device="auto"` picks CUDA, then MPS, then the CPU; the dtype defaults to fp16 on CUDA and fp32 elsewhere.
        `lora` lists LoRAs as paths or `(path, scale)` pairs (see `load_lora`).
        `checkpoint`: a training `checkpoint-N`, output folder, `best/` or UNet folder. A checkpoint of a run with
        EMA uses its EMA weights (`unet_ema/`, what made the validation images) unless `use_ema=False`; the run's
        `prediction_type` (from its summary, `pipeline/` or `config.yaml`) replaces the base model's.
        """
        check_model_source(model)  # a mistyped local path gets "does not exist", never a hub lookup
        if not isinstance(use_ema, bool):
            raise TypeError(f"`use_ema` must be a bool, got {use_ema!r}.")
        device = resolve_device(device)
        dtype = torch_dtype or default_dtype(device)
        trained = None if checkpoint is None else checkpoint_unet(checkpoint, use_ema)
        components = load_components(
            model,
            unet_path=None if trained is None else trained.folder,
            revision=revision,
            variant=variant,
            torch_dtype=dtype,
            config=config,
        )
        scheduler_config = components.scheduler_config
        if trained is not None and trained.prediction_type is not None:  # the trained parameterisation travels
            scheduler_config = {**scheduler_config, "prediction_type": trained.prediction_type}
        freeze(components.vae, components.text_encoder, components.unet)
        pipe = cls(
            components.vae,
            components.text_encoder,
            components.tokenizer,
            components.unet,
            scheduler_config,
            scheduler,
            model_name=str(model),
            checkpoint=None if checkpoint is None else str(checkpoint),
            unet_files=unet_weight_files(model, None if trained is None else trained.folder, variant, revision),
        ).to(device)
        pipe.revision, pipe.variant = revision, variant
        pipe.model_config = None if config is None else str(config)
        pipe.unet_weights = None if trained is None else trained.weights
        for item in [lora] if isinstance(lora, (str, os.PathLike)) else lora or []:
            path, scale = item if isinstance(item, (tuple, list)) else (item, 1.0)
            pipe.load_lora(path, scale)
        return pipe

    @property
    def device(self) -> torch.device:
        # Under model CPU offload the models rest on the CPU and run on the offload device.
        return self._offload_device or self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LDMInference:
        """Move (and optionally cast) every model; this ends model CPU offload."""
        self.disable_model_cpu_offload()
        for model in (self.vae, self.text_encoder, self.unet):
            model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
        return self

    def set_scheduler(self, name: str, **overrides) -> None:
        """Swap the sampler, built from the model's own scheduler config (see `ldm_tune.schedulers`)."""
        self.scheduler = make_scheduler(name, self.base_scheduler_config, **overrides)
        self.scheduler_name = canonical_name(name)
        self.scheduler_overrides = dict(overrides)

    # 1. Check inputs. Raise error if not correct.
    def check_inputs(
        self, params: GenerationParams, generator, callback, output_type, image=None, mask_image=None
    ) -> GenerationParams:
        """Validate every argument; return `params` with prompts and negative prompts as lists of equal length,
        and the size of the init image where none was given."""
        size = check_image_inputs(
            image, mask_image, params.strength, params.num_inference_steps, self.vae_scale_factor,
            self.unet.config.in_channels,
        )  # fmt: skip
        native = self.unet.config.sample_size * self.vae_scale_factor
        height, width = size or (native, native)
        params.height = height if params.height is None else params.height
        params.width = width if params.width is None else params.width
        params = check_generation_inputs(
            params, self.scheduler, self.vae_scale_factor, generator, callback, output_type
        )
        layers = self.text_encoder.config.num_hidden_layers
        if params.clip_skip is not None and params.clip_skip >= layers:
            raise ValueError(f"`clip_skip` must be below the text encoder's {layers} layers, got {params.clip_skip}.")
        if image is not None:
            check_image_count(image, len(params.prompt) * params.num_images_per_prompt)
        return params

    # 2. Encode input prompt.
    def encode_prompt(
        self,
        prompts: list[str],
        negatives: list[str],
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        clip_skip: int | None = None,
    ) -> torch.Tensor:
        """Text embeddings for each image, `[negative; positive]` stacked when guidance is on.

        Prompts take A1111's emphasis syntax and may be longer than 77 tokens (see `ldm_tune.prompt_weighting`);
        a plain prompt of one chunk gives exactly diffusers' embeddings. `clip_skip` skips the last layers of the
        text encoder for the negative prompts too, as A1111 does (diffusers' SD pipeline skips them for the
        positive prompts only, which huggingface/diffusers PRs #13796 and #13973 report as a bug).
        """
        texts = negatives + prompts if do_classifier_free_guidance else prompts
        embeds = encode_weighted_prompts(self.tokenizer, self.text_encoder, texts, clip_skip)
        embeds = embeds.to(dtype=self.text_encoder.dtype, device=self.device)
        # Each prompt's embedding repeated num_images_per_prompt times in a row, as the diffusers pipeline does.
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    # 3. Prepare latent variables: `prepare_start` -> `prepare_latents` (`ldm_tune.inference_image`).

    def _extra_step_kwargs(self, generator: torch.Generator | list[torch.Generator], eta: float) -> dict:
        # Schedulers differ in what `step` accepts: only DDIM uses eta, only stochastic samplers a generator. Every
        # stochastic sampler of the registry draws its step noise with diffusers' `randn_tensor`, which takes a list
        # and draws image i's noise from generator i (tests/test_generation_daily.py checks each sampler).
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    # 4. Denoising loop.
    def denoise(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        eta: float,
        generator: torch.Generator | list[torch.Generator],
        callback: Callable | None = None,
        progress: bool = True,
        timesteps: torch.Tensor | None = None,
        inpainting: Inpainting | None = None,
    ) -> torch.Tensor:
        """Run the sampler over `timesteps` (default: all of the scheduler's) to clean latents; CFG in one batched
        UNet call. With `inpainting`, the UNet sees the mask (9 channels) or the known part is put back (4)."""
        do_cfg = embeds.shape[0] == 2 * latents.shape[0]
        step_kwargs = self._extra_step_kwargs(generator, eta)
        timesteps = self.scheduler.timesteps if timesteps is None else timesteps
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if inpainting is not None:
                model_input = inpainting.unet_input(model_input)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if do_cfg:
                # Classifier-free guidance (Ho & Salimans 2022): move away from the unconditional prediction.
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                if guidance_rescale > 0:
                    # Fixes over-exposure at high guidance (arXiv 2305.08891, section 3.4).
                    noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
            output = self.scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = output.prev_sample
            if inpainting is not None:
                following = timesteps[i + 1] if i + 1 < len(timesteps) else None
                latents = inpainting.blend(self.scheduler, latents, following)
            # The sampler's current estimate of the clean latents, for callbacks that show the trajectory
            # (None for samplers that do not expose it).
            self.pred_original_sample = getattr(output, "pred_original_sample", None)
            if callback is not None:
                callback(i, t, latents)
        return latents

    # 5. Decode latents to images: `decode` (`ldm_tune.inference_image`).

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_path: str | Path | None = None,
        callback: Callable | None = None,
        output_type: str = "pil",
        progress: bool = True,
        save_grid: bool = False,
        save_images: list[int] | None = None,
        image=None,
        strength: float = 0.8,
        mask_image=None,
        clip_skip: int | None = None,
    ):
        """Generate images for one prompt or a list of prompts; from an init image (img2img) or inpaint a masked part.

        Args:
            prompt: text, or a list of texts (one batch), in A1111's syntax: `(word)`, `(word:1.3)`, `[word]`,
                `BREAK`, `\\(` for a literal parenthesis; longer than 77 tokens in chunks of 75
                (`ldm_tune.prompt_weighting`).
            negative_prompt: what to steer away from: one string for all prompts or one per prompt.
            height, width: image size, multiples of the VAE factor (default: the size of `image`, else the UNet's
                native size).
            num_inference_steps: sampler steps. guidance_scale: CFG weight, guidance is off at <= 1.
            guidance_rescale: 0-1, rescales CFG output (arXiv 2305.08891). eta: DDIM noise (0 = deterministic).
            num_images_per_prompt: images per prompt, consecutive in the output.
            seed: image i (over all prompts x images per prompt, in output order) gets `seed + i` on its own CPU
                `torch.Generator` (A1111's rule): an image depends on its seed only, not on the device or the
                batch. `None` or -1 draws a seed; the seed of every image is recorded in the JSON and PNGs.
            generator: a generator to use instead of `seed`, or a list of one per image (as in diffusers).
            output_path: folder to write PNGs and a JSON of every parameter into (never overwrites files).
            callback: called as `callback(step, timestep, latents)` after every sampler step; the sampler's
                estimate of the clean latents is then in `self.pred_original_sample` (when it has one).
            output_type: `pil` (default), `np`, `pt` or `latent`.
            progress: show a progress bar. save_grid: also write a grid PNG (rows = prompts) into `output_path`.
            save_images: write only the images of these indices into `output_path` (default: all).
            image: init image(s) for img2img or inpainting: a PIL image, a numpy array (HWC in [0, 1]), a tensor
                (CHW in [-1, 1]), or a list of them: one for all images, or one per image generated.
            strength: how much of `image` is repainted, in [0, 1]: sampling runs the last `strength` of the
                sampler's steps, from `image` noised to that level (1: from pure noise).
            mask_image: inpainting mask(s) of the image's size: white (>= 0.5) is repainted, black is kept. A
                9-channel (inpainting) UNet sees the mask; with a 4-channel UNet the kept part is put back each step.
            clip_skip: skip this many last layers of the text encoder (diffusers' numbering: 1 uses the pre-final
                layer, which A1111 calls "Clip skip: 2"); None or 0 skips none.

        Returns:
            A list of PIL images (or an array/tensor for `np`/`pt`/`latent`), `num_images_per_prompt` per prompt.
        """
        params = GenerationParams(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_rescale,
            eta,
            num_images_per_prompt,
            seed,
            strength=None if image is None else strength,
            init_image_sha256=image_sha256(image),
            mask_sha256=image_sha256(mask_image),
            clip_skip=clip_skip,
        )
        params = self.check_inputs(params, generator, callback, output_type, image, mask_image)
        batch_size = len(params.prompt) * num_images_per_prompt
        if save_images is not None and not all(isinstance(i, int) and 0 <= i < batch_size for i in save_images):
            raise ValueError(f"`save_images` must list image indices in [0, {batch_size}), got {save_images!r}.")
        seeds = None
        if generator is None:
            params.seed = resolve_seed(params.seed)
            seeds = image_seeds(params.seed, batch_size)
            generator = image_generators(seeds)
        do_cfg = guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None
        embeds = self.encode_prompt(params.prompt, params.negative_prompt, num_images_per_prompt, do_cfg, clip_skip)
        start = self.prepare_start(params, batch_size, embeds.dtype, generator, image, mask_image)
        latents, timesteps, inpainting = start
        latents = self.denoise(
            latents, embeds, num_inference_steps, guidance_scale, guidance_rescale, eta, generator, callback, progress,
            timesteps, inpainting,
        )  # fmt: skip
        images = self.decode(latents, output_type)
        self.offload_models()
        if output_path is not None:
            pil_images = images if output_type == "pil" else self.decode(latents, "pil")
            record = run_record(self, params)
            self.last_output_files = save_generation(
                pil_images, record, output_path, grid=save_grid, seeds=seeds, keep=save_images
            )
        return images

    __call__ = generate

    @property
    def model_hash(self) -> str | None:
        """A1111's AutoV2-style hash of the UNet weights file(s) (see `ldm_tune.png_info`), computed once."""
        if self._model_hash is None and self.unet_files:
            self._model_hash = weights_hash(self.unet_files)
        return self._model_hash
