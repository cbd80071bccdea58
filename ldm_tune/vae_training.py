"""The VAE stage: train an `AutoencoderKL` (from scratch or fine-tuned) with the trainer's machinery.

Reconstruction loss (MSE or L1) plus a weighted KL term, under the same Accelerate loop, checkpoints, resume,
EMA and validation as the UNet stage (`stage: vae`, or `ldm-tune train-vae`). Validation reports PSNR on held-out
images. The export is a `vae/` folder and a full `pipeline/` folder with the new VAE, whose `scaling_factor` is
measured on the training data (1 / std of the latents, as Stable Diffusion did), so that the UNet stage can use it
frozen as its base model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.utils import make_image_grid
from PIL import Image

from ldm_tune.components import load_components, save_model_folder, sharpen_posterior
from ldm_tune.data.dataset import collate
from ldm_tune.finetune import FullFineTune
from ldm_tune.io_utils import save_atomically
from ldm_tune.losses import draw
from ldm_tune.training import Trainer


class _AutoencoderWithLoss(torch.nn.Module):
    """Encode -> sample the posterior with the given noise -> decode, in one forward (so DDP syncs gradients)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, posterior_eps: torch.Tensor | None = None):
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean if posterior_eps is None else posterior.mean + posterior.std * posterior_eps
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their mean squared errors."""
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


class VAETrainer(Trainer):
    """`Trainer` for `stage: vae`."""

    model_cls, model_folder = AutoencoderKL, "vae"

    def saved_module(self, model):
        return self.accelerator.unwrap_model(model).vae

    def _load_models(self) -> None:
        m, t = self.config.model, self.config.training
        components = load_components(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant)
        self.tokenizer, self.scheduler_config = components.tokenizer, components.scheduler_config
        self.weight_dtype, self.prediction_type, self.text_encoder = torch.float32, None, None
        vae = components.vae
        if self.config.vae.from_scratch:
            torch.manual_seed(self.config.seed)
            vae = sharpen_posterior(AutoencoderKL.from_config(vae.config))
        vae.requires_grad_(True)
        if t.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        self.vae = None  # nothing frozen to encode with: the VAE is what trains
        self.model = _AutoencoderWithLoss(vae)
        # A full fine-tune of the VAE; `trainable_modules: [decoder.]` as SD's ft-MSE VAE (decoder only).
        self.method = FullFineTune(self)
        self.trained_models = self.method.setup()
        self.ema = self.method.make_ema() if t.use_ema else None
        if self.ema is not None:
            self.ema.to(self.accelerator.device)

    def _latent_shape(self, pixels: torch.Tensor) -> tuple:
        vae = self.saved_module(self.model)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.latent_channels, pixels.shape[2] // factor, pixels.shape[3] // factor)

    def compute_losses(self, batch: dict, seed: int, distributed: bool = True) -> torch.Tensor:
        """Per-item reconstruction loss + kl_weight x KL (both means over their elements)."""
        pixels = batch["pixel_values"]
        draws = draw(batch["keys"].cpu(), self._latent_shape(pixels), 1, seed)
        model = self.model if distributed else self.accelerator.unwrap_model(self.model)
        recon, mean, logvar = model(pixels, draws.posterior_eps.to(pixels.device, pixels.dtype))
        error = (recon.float() - pixels.float()).abs() if self.config.vae.reconstruction_loss == "l1" else None
        error = error if error is not None else (recon.float() - pixels.float()) ** 2
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())
        return error.mean(dim=(1, 2, 3)) + self.config.vae.kl_weight * kl.mean(dim=(1, 2, 3))

    def evaluate(self) -> float | None:
        """Held-out mean squared error of deterministic reconstructions (posterior mean); PSNR is logged with it."""
        if self.val_loader is None:
            return None
        model = self.accelerator.unwrap_model(self.model)  # no DDP collective: batch counts may differ per process
        errors = []
        with torch.no_grad(), self._eval_mode(), self._ema_weights():
            for batch in self.val_loader:
                if len(batch["keys"]):
                    recon = model(batch["pixel_values"])[0]
                    mse = F.mse_loss(recon.float(), batch["pixel_values"].float(), reduction="none")
                    errors.append(mse.mean(dim=(1, 2, 3)))
        # Mean MSE and mean PSNR over every process's images, each by one all-reduce of (sum, count).
        mean_mse = self.reduce_mean(errors)
        self.last_val_psnr = self.reduce_mean(psnr(e) for e in errors)
        self.metrics.log({"step": self.state.global_step, "val_psnr": self.last_val_psnr})
        return mean_mse

    def _sample_batch(self, count: int) -> dict:
        dataset = (self.val_loader or self.train_loader).dataset
        return collate([dataset[(0, i)] for i in range(min(count, len(dataset)))])

    def make_validation_images(self) -> None:
        """Originals (top row) over reconstructions (bottom row) in `samples/step-N/reconstructions.png`."""
        if self.accelerator.is_main_process:
            pixels = self._sample_batch(self.config.vae.validation_images)["pixel_values"].to(self.accelerator.device)
            with torch.no_grad(), self._eval_mode(), self._ema_weights():
                recon = self.model(pixels)[0]
            images = [_to_pil(x) for x in torch.cat([pixels, recon])]
            folder = self.output_dir / "samples" / f"step-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            make_image_grid(images, rows=2, cols=len(pixels)).save(folder / "reconstructions.png")
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def measure_scaling_factor(self, vae: AutoencoderKL, count: int = 256) -> float:
        """1 / std of the posterior means of up to `count` training images (Rombach et al. 2022, appendix G)."""
        dataset = self.train_loader.dataset
        means = []
        for start in range(0, min(count, len(dataset)), 32):
            batch = collate([dataset[(0, i)] for i in range(start, min(start + 32, count, len(dataset)))])
            means.append(vae.encode(batch["pixel_values"].to(vae.device)).latent_dist.mean.float())
        return 1.0 / torch.cat(means).std().item()

    def export(self, vae: AutoencoderKL) -> dict:
        """Write `vae/` and `pipeline/` (the base model with this VAE); returns the scaling factor and PSNR."""
        facts = {"val_psnr": getattr(self, "last_val_psnr", None)}
        if self.config.vae.compute_scaling_factor and not self.streaming:
            vae.eval()
            facts["scaling_factor"] = self.measure_scaling_factor(vae)
            vae.register_to_config(scaling_factor=facts["scaling_factor"])
        save_atomically(lambda tmp: vae.save_pretrained(tmp, safe_serialization=True), self.output_dir / "vae")
        m = self.config.model
        base = load_components(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant)
        base.vae = vae
        save_model_folder(base, self.output_dir / "pipeline", replace=True)
        return facts


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    array = ((tensor.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


__all__ = ["VAETrainer", "psnr"]
