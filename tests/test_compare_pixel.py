"""Pixel-space diffusion (`model.space: pixel`, `PixelInference`) and the `compare-pixel` command."""

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from PIL import Image

from ldm_tune.pixel_space import PixelInference, make_pixel_model, make_space


@pytest.fixture(scope="module")
def pixel_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny preset's UNet width on 32 px RGB, with the tiny model's text encoder and tokenizer."""
    return make_pixel_model(tiny_model_dir, tmp_path_factory.mktemp("models") / "pixel", image_size=32, seed=0)


@pytest.fixture
def no_vae(monkeypatch):
    """Any use of a VAE fails the test: pixel space has none."""

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was called in pixel space")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    monkeypatch.setattr(AutoencoderKL, "decode", refuse)


def test_pixel_loss_is_the_denoising_loss_of_the_raw_pixels(make_config, pixel_model_dir, no_vae, tmp_path):
    from ldm_tune.losses import denoising_loss, draw
    from ldm_tune.training import make_trainer

    config = make_config(f"model.pretrained_model_name_or_path={pixel_model_dir}", "model.space=pixel",
                         "training.max_train_steps=1", "validation.validation_prompts=[a red circle]",
                         "validation.validation_inference_steps=2", "data.center_crop=true")  # fmt: skip
    trainer = make_trainer(config)
    assert trainer.unet.config.in_channels == 3
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        losses = trainer.compute_losses(batch, seed=0, distributed=False)
        # By hand: x0 is the image in [-1, 1] (no encoder, no scaling factor), noised with the same keyed draws.
        pixels = batch["pixel_values"]
        assert pixels.shape[1:] == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
        draws = draw(batch["keys"], tuple(pixels.shape[1:]), 1000, 0)
        text = trainer.text_encoder(batch["input_ids"], return_dict=False)[0]
        expected = denoising_loss(trainer.unet, trainer.noise_scheduler, pixels, text, draws, "epsilon")
    torch.testing.assert_close(losses, expected)
    summary = trainer.train()  # one update and pixel-space validation images, the VAE never called
    assert summary["global_step"] == 1
    sample = next((tmp_path / "run" / "samples" / "step-1").glob("*-00.png"))
    assert Image.open(sample).size == (32, 32)


def test_pixel_space_config_is_checked(make_config, tiny_model_dir):
    with pytest.raises(ValueError, match=r"`model.space` must be one of \['latent', 'pixel'\], got 'rgb'"):
        make_config("model.space=rgb")
    with pytest.raises(ValueError, match="`data.cache_latents` caches VAE latents, and `model.space: pixel`"):
        make_config("model.space=pixel", "data.cache_latents=true", "data.center_crop=true")
    from ldm_tune.components import load_components

    latent_unet = load_components(tiny_model_dir).unet  # 4 channels: a latent UNet
    with pytest.raises(ValueError, match=r"3 input and 3 output channels \(RGB\), got \(4, 4\)"):
        make_space("pixel", None, latent_unet, torch.float32)


def test_pixel_inference_matches_a_hand_written_ddim_loop(pixel_model_dir, no_vae):
    pipe = PixelInference.from_pretrained(pixel_model_dir, device="cpu", scheduler="ddim")
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    prompt = "a red circle on a white background"
    image = pipe.generate(prompt, num_inference_steps=3, guidance_scale=1.0, seed=7, output_type="pt", progress=False)
    # The same sampler written out with diffusers' DDIM on the model's pixel schedule, x0 clamped to [-1, 1].
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert scheduler.config.clip_sample and scheduler.config.beta_schedule == "linear"
    scheduler.set_timesteps(3)
    x = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(7)) * scheduler.init_noise_sigma
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t, encoder_hidden_states=embeds).sample, t, x).prev_sample
    torch.testing.assert_close(image, (x / 2 + 0.5).clamp(0, 1))
    again = pipe.generate(prompt, num_inference_steps=3, guidance_scale=5.0, seed=7, progress=False)[0]
    assert again.size == (32, 32)
    assert again.tobytes() == pipe.generate(prompt, num_inference_steps=3, guidance_scale=5.0, seed=7,
                                            progress=False)[0].tobytes()  # fmt: skip
    with pytest.raises(ValueError, match="not supported in pixel space"):
        pipe.generate(prompt, image=again, num_inference_steps=3, progress=False)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_compare_writes_table_json_and_chart(tmp_path, monkeypatch):
    from ldm_tune.compare_pixel import CompareSettings, compare_spaces

    out = tmp_path / "compare"
    results = compare_spaces(out, CompareSettings.quick())
    saved = json.loads((out / "compare.json").read_text())
    assert set(saved["spaces"]) == {"latent", "pixel"} and saved["machine"]["fp32_matmul_gflops"] > 0
    for space, entry in saved["spaces"].items():
        training, measured = entry["training"], entry["measured"]
        assert training["steps"] >= 1 and _positive(training["seconds_per_step"]), space
        assert _positive(training["samples_per_second"]) and _positive(training["stage_seconds"]), space
        for row in ("ddim_one_image", "ddpm_one_image", "ddim_batch"):
            assert _positive(measured[row]["seconds_per_image"]) and _positive(measured[row]["peak_rss_mib"]), row
        assert all(0 <= measured["ddim_batch"][k] <= 1 for k in ("color", "shape", "joint"))
    assert {(r["space"], r["size"]) for r in saved["cost"]} == {("latent", 64), ("pixel", 64)}
    for row in saved["cost"]:
        assert all(_positive(row[k]) for k in ("seconds_per_step", "ddim50_seconds_per_image",
                                               "ddpm1000_seconds_per_image", "peak_rss_mib")), row  # fmt: skip
    assert {(r["space"], r["unet_side"], r["unet_channels"]) for r in saved["cost"]} == {("latent", 16, 4),
                                                                                         ("pixel", 64, 3)}  # fmt: skip
    markdown = (out / "compare.md").read_text()
    assert "| 32 px, trained | latent (LDM) | pixel (DDPM) | pixel / latent |" in markdown
    assert "| 64 | pixel | 64x64x3 |" in markdown and "untrained weights" in markdown.lower()
    assert "GFLOP/s" in markdown and "What the numbers say about the claim" in markdown
    assert Image.open(out / "compare.png").size[0] > 600
    assert results["spaces"]["pixel"]["training"]["steps"] == saved["spaces"]["pixel"]["training"]["steps"]
    # A second run finds everything done: no training, no measurement; only the report is written again.
    from ldm_tune import compare_report, training

    monkeypatch.setattr(training.Trainer, "run_loop", lambda self: (_ for _ in ()).throw(AssertionError("retrained")))
    monkeypatch.setattr(
        compare_report.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured"))
    )
    compare_spaces(out, CompareSettings.quick())
