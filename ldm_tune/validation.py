"""Validation during training: a held-out loss with fixed noise, the best UNet, and sample images.

A mixin of `Trainer` (it uses the trainer's accelerator, models and state); kept apart so that the training loop
reads top to bottom. Images are made by `LDMInference`, the same code users sample with.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel

from ldm_tune.components import freeze
from ldm_tune.inference import LDMInference
from ldm_tune.pixel_space import PixelInference
from ldm_tune.tracking import log_images


class ValidationMixin:
    def evaluate(self) -> float | None:
        """Validation loss with fixed noise and timesteps (keyed by the validation seed), comparable across steps."""
        if self.val_loader is None:
            return None
        # Under FSDP a forward is a collective and batch counts differ between processes: every process runs a
        # gathered whole copy instead (see ldm_tune.sharding).
        with torch.no_grad(), self._eval_mode(), self._ema_weights(), self.gathered(everywhere=True):
            return self.reduce_mean(
                self.compute_losses(batch, seed=self.config.validation.validation_seed, distributed=False)
                for batch in self.val_loader
                if len(batch["keys"])
            )

    def reduce_mean(self, per_item_values) -> float | None:
        """The mean over every process's items of an iterable of per-item tensors, by one all-reduce of (sum, count).

        Processes may hold different numbers of batches and items (uneven buckets, items that failed to load):
        each reaches the one all-reduce once, so nothing pairs up wrongly or waits, and every process gets the
        same mean (and so the same decision about `best/`). None when no process had an item.
        """
        totals = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for values in per_item_values:
            totals += torch.stack([values.double().sum(), torch.tensor(values.numel(), dtype=torch.float64,
                                                                       device=totals.device)])  # fmt: skip
        total, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        return total / count if count else None

    def validate(self) -> None:
        """Validation loss (keeping the best UNet in `best/`) and validation images."""
        state = self.state
        val_loss = self.evaluate()
        if val_loss is not None:
            self.metrics.log({"step": state.global_step, "val_loss": val_loss})
            if state.best_val_loss is None or val_loss < state.best_val_loss:
                state.best_val_loss, state.best_val_step = val_loss, state.global_step
                self._save_model(self.output_dir / "best", {"step": state.global_step, "val_loss": val_loss})
        self.make_validation_images()

    def make_validation_images(self) -> None:
        if self.config.validation.validation_prompts:
            with self._ema_weights(), self.gathered():  # every process: under FSDP the weights are gathered first
                if self.accelerator.is_main_process:
                    self._validation_images(self.saved_module(self.model))
        self.accelerator.wait_for_everyone()

    def _validation_images(self, unet) -> None:
        v = self.config.validation
        text_encoder = self._load_text_encoder() if self.text_encoder is None else self.text_encoder
        text_encoder = self.accelerator.unwrap_model(text_encoder)  # the DDP-wrapped one when its LoRA trains
        # A pixel-space UNet samples images directly (same prompts, CFG and sampler code, no VAE decode).
        pipeline_cls = PixelInference if self.config.model.space == "pixel" else LDMInference
        pipe = pipeline_cls(self.vae, text_encoder, self.tokenizer, unet, self.scheduler_config,
                            scheduler=v.validation_scheduler, model_name=self.config.model.pretrained_model_name_or_path,
                            checkpoint=f"step {self.state.global_step}")  # fmt: skip
        with self._eval_mode(), self.accelerator.autocast():
            images = pipe.generate(v.validation_prompts, negative_prompt=v.validation_negative_prompt,
                                   num_inference_steps=v.validation_inference_steps,
                                   guidance_scale=v.validation_guidance_scale, num_images_per_prompt=v.num_validation_images,
                                   seed=v.validation_seed, output_path=self.output_dir / "samples" / f"step-{self.state.global_step}",
                                   save_grid=True, progress=False)  # fmt: skip
        log_images(self.accelerator, images, v.validation_prompts, v.num_validation_images, self.state.global_step)

    def _load_text_encoder(self):
        # With cached text embeddings the text encoder is not kept during training; validation images need it.
        m = self.config.model
        model = CLIPTextModel.from_pretrained(m.pretrained_model_name_or_path, subfolder="text_encoder",
                                              revision=m.revision, variant=m.variant, use_safetensors=True)  # fmt: skip
        freeze(model)
        return model.to(self.accelerator.device, dtype=self.weight_dtype)
