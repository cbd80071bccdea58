"""The denoising objective: keyed noise and timesteps, epsilon or v-prediction targets, min-SNR weighting.

Each item's random draws (VAE posterior sample, noise, timestep, offset noise, input perturbation) come from a
generator seeded by the item's (seed, epoch, index) key, drawn on the CPU: the same on every device, batch size
and resume point. That is what makes `bs 4 x accumulation 2 == bs 8` and resume exactness hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ldm_tune.data.dataset import STREAM_NOISE, item_seed


@dataclass
class Draws:
    posterior_eps: torch.Tensor  # (B, C, h, w) for z = mean + std * eps
    noise: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)
    perturbation: torch.Tensor | None  # (B, C, h, w), input perturbation noise


def draw(keys: torch.Tensor, latent_shape: tuple, num_train_timesteps: int, seed: int, noise_offset: float = 0.0,
         input_perturbation: float = 0.0) -> Draws:  # fmt: skip
    """Draw every random number one training item needs from a generator keyed by (seed, epoch, index)."""
    eps, noise, steps, perturb = [], [], [], []
    generator = torch.Generator()
    for epoch, index in keys.tolist():
        generator.manual_seed(item_seed(seed, STREAM_NOISE, epoch, index))
        eps.append(torch.randn(latent_shape, generator=generator))
        n = torch.randn(latent_shape, generator=generator)
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        if noise_offset:
            # Offset noise: a per-channel constant lets the model change overall brightness
            # (https://www.crosslabs.org/blog/diffusion-with-offset-noise).
            n = n + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=generator)
        noise.append(n)
        if input_perturbation:
            perturb.append(torch.randn(latent_shape, generator=generator))
    return Draws(
        torch.stack(eps), torch.stack(noise), torch.cat(steps), torch.stack(perturb) if input_perturbation else None
    )


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (arXiv 2303.09556, section 3.4), for epsilon and v-prediction.

    The paper weights the x0 loss by min(SNR, gamma). An epsilon loss equals the x0 loss times SNR, so its weight is
    min(SNR, gamma) / SNR; a v loss equals the x0 loss times (SNR + 1), so its weight is min(SNR, gamma) / (SNR + 1)
    (diffusers#5654, #9451).
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # epsilon: at SNR == 0 (zero terminal SNR) the x0 loss carries no signal; weight 0 rather than 0 / 0.
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.zeros_like(snr))


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, draws: Draws,
                   prediction_type: str, snr_gamma: float | None = None,
                   input_perturbation: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Per-item loss of the UNet on noised latents, shape (B,)."""
    device = latents.device
    noise, timesteps = draws.noise.to(device), draws.timesteps.to(device)
    model_noise = noise
    if draws.perturbation is not None:
        # Input perturbation (arXiv 2301.11706): noise the input with a perturbed noise, keep the clean target.
        model_noise = noise + input_perturbation * draws.perturbation.to(device)
    noisy = noise_scheduler.add_noise(latents, model_noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        # v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022, arXiv 2202.00512).
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"`prediction_type` must be epsilon or v_prediction, got {prediction_type!r}.")
    prediction = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma, prediction_type).to(loss)
    return loss
