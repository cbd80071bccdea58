"""Model presets built in code: random-weight Stable-Diffusion-format folders, with no download.

`tiny` is small enough for CPU tests and the demo (64 px images, 16x16x4 latents). `sd15-arch` reproduces the
Stable Diffusion 1.5 component configurations exactly (UNet 859,520,964 parameters), so memory and speed can be
measured at real size without the real weights. Both are written with `StableDiffusionPipeline.save_pretrained`,
so what loads them afterwards is the real loading code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_tune.components import ModelComponents, save_model_folder, sharpen_posterior
from ldm_tune.io_utils import check_new_folder


BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# The Stable Diffusion 1.5 scheduler config (runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json).
# `clip_sample: False` matters: diffusers' DDPM/DDIM default to True, which clamps x0 to [-1, 1] at every step;
# that is meant for pixels and silently ruins samples of a latent model (latents are not bounded).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "thresholding": False,
    "trained_betas": None,
}

# Stable Diffusion 1.5 component configs (public config.json files of runwayml/stable-diffusion-v1-5).
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": False,
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CLIP ViT-L/14 text tower. Its bos/eos/pad ids (0, 2, 1) are the legacy values of the released config; with
# eos_token_id == 2 transformers pools at the highest token id, which our tokenizer gives to <|endoftext|>.
SD15_TEXT_ENCODER = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# The tiny preset: 64 px images, a x4 VAE (16x16x4 latents), a two-resolution cross-attention UNet.
TINY_UNET = {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 16,
}
TINY_VAE = {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 64,
    # Brings the random encoder's latents (std ~0.22 on natural and synthetic images) to about unit variance,
    # the role 0.18215 plays for Stable Diffusion's VAE. A trained VAE measures its own.
    "scaling_factor": 4.5,
}
TINY_TEXT_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}

# The demo preset (`make demo`): 32 px images, a x4 VAE (8x8x4 latents: cheap UNet steps, which is what a CPU
# can afford; ../shared/reference/demo-feasibility.md, probe 13), a UNet with cross-attention at 4x4 and 2x2.
DEMO_UNET = {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
}
# 32 channels at every level: at 600 steps it reconstructs better (28.9 dB on two seeds) than [32, 64, 64] (27.6 dB)
# and trains 1.6x faster (the 64-channel convolutions at 16x16 and 32x32 were most of the VAE's FLOPs).
# The scaling factor is measured by the VAE stage.
DEMO_VAE = {**TINY_VAE, "block_out_channels": [32, 32, 32], "sample_size": 32, "scaling_factor": 1.0}
# A 16-token context: the captions use at most 10, and cross-attention over 77 padded tokens made each UNet
# training step ~20 % slower (69 vs 83 ms at batch 32).
DEMO_TEXT_ENCODER = {**TINY_TEXT_ENCODER, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64,
                     "max_position_embeddings": 16}  # fmt: skip

PRESETS = ("tiny", "sd15-arch", "demo")


def build_tokenizer(words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP BPE tokenizer offline.

    The base vocabulary is the 256 byte-level symbols (each also with the `</w>` end-of-word suffix), so any UTF-8
    text tokenizes without unknown tokens. Each word in `words` gets merges that make it one token, so a caption
    vocabulary (e.g. the demo's colors and shapes) is encoded compactly. <|startoftext|> and <|endoftext|> take
    the two highest ids, as in CLIP, because CLIP's legacy pooling picks the position of the highest id.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for word in sorted({w.lower() for w in words if w.strip()}):
        for piece, _ in byte_level.pre_tokenize_str(word):
            symbols = list(piece)
            symbols[-1] += "</w>"
            # Merge left to right: (w0, w1) -> w0w1, (w0w1, w2) -> w0w1w2, ...
            prefix = symbols[0]
            for symbol in symbols[1:]:
                if (prefix, symbol) not in merges:
                    merges.append((prefix, symbol))
                prefix = prefix + symbol
                vocab.setdefault(prefix, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _seeded(seed: int, offset: int) -> None:
    # One seed per component, as diffusers' get_dummy_components() does, so changing one model's config does not
    # change the initial weights of the others.
    torch.manual_seed(seed + offset)


def _build_small(unet_config: dict, vae_config: dict, text_config: dict, seed: int,
                 words: Iterable[str]) -> ModelComponents:  # fmt: skip
    """Random-weight components from small configs, with an offline tokenizer that knows `words`."""
    tokenizer = build_tokenizer(words, text_config["max_position_embeddings"])
    _seeded(seed, 0)
    unet = UNet2DConditionModel(**unet_config)
    _seeded(seed, 1)
    vae = sharpen_posterior(AutoencoderKL(**vae_config))
    _seeded(seed, 2)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config, vocab_size=len(tokenizer), **ids))
    return ModelComponents(vae, text_encoder, tokenizer, unet, dict(SD15_SCHEDULER))


def build_tiny(seed: int = 0, words: Iterable[str] = ()) -> ModelComponents:
    """Random-weight components of the `tiny` preset (CPU-fast, 64 px images)."""
    return _build_small(TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, seed, words)


def build_demo(seed: int = 0, words: Iterable[str] = ()) -> ModelComponents:
    """Random-weight components of the `demo` preset (32 px), with a tokenizer that knows the caption words."""
    return _build_small(DEMO_UNET, DEMO_VAE, DEMO_TEXT_ENCODER, seed, words)


def build_sd15_arch(seed: int = 0, device: str | torch.device = "cpu") -> ModelComponents:
    """Random-weight components with the exact Stable Diffusion 1.5 architecture.

    `device="meta"` builds them without allocating weights (for parameter counts and memory planning).
    """
    tokenizer = build_tokenizer()
    with torch.device(device):
        _seeded(seed, 0)
        unet = UNet2DConditionModel(**SD15_UNET)
        _seeded(seed, 1)
        vae = AutoencoderKL(**SD15_VAE)
        _seeded(seed, 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    return ModelComponents(vae, text_encoder, tokenizer, unet, dict(SD15_SCHEDULER))


def build_preset(preset: str, seed: int = 0, words: Iterable[str] = ()) -> ModelComponents:
    """Build the random-weight components of a named preset (`tiny`, `sd15-arch` or `demo`)."""
    if preset == "tiny":
        return build_tiny(seed, words)
    if preset == "demo":
        return build_demo(seed, words)
    if preset == "sd15-arch":
        return build_sd15_arch(seed)
    raise ValueError(f"`preset` must be one of {list(PRESETS)}, got {preset!r}.")


def init_model(preset: str, out_dir: str | os.PathLike, seed: int = 0, dtype: torch.dtype | None = None,
               words: Iterable[str] = ()) -> Path:  # fmt: skip
    """Build a preset with random weights and save it as a Stable-Diffusion-format folder."""
    out_dir = check_new_folder(out_dir)  # before building: sd15-arch takes a while
    components = build_preset(preset, seed, words)
    if dtype is not None and dtype != torch.float32:
        for model in (components.vae, components.text_encoder, components.unet):
            model.to(dtype=dtype)
    return save_model_folder(components, out_dir)
