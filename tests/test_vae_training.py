import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file

from ldm_tune.tracking import read_metrics
from ldm_tune.training import make_trainer
from ldm_tune.vae_training import VAETrainer


VAE = ["stage=vae", "vae.from_scratch=true", "training.learning_rate=2e-3", "data.center_crop=true"]


def test_vae_stage_learns_and_exports_a_usable_model(make_config, shapes_dir):
    config = make_config(*VAE, f"data.validation_data_dir={shapes_dir / 'validation'}", "training.max_train_steps=60",
                         "validation.validation_steps=30", "vae.validation_images=4")  # fmt: skip
    trainer = make_trainer(config)
    assert isinstance(trainer, VAETrainer)
    with torch.no_grad():  # from scratch, the posterior starts near-deterministic (see sharpen_posterior)
        posterior = trainer.saved_module(trainer.model).encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    assert posterior.std.max() < 1e-3
    trainer.metrics.path.parent.mkdir(parents=True, exist_ok=True)
    before = trainer.evaluate()
    summary = trainer.train()
    out = Path(config.output_dir)
    psnrs = [r["val_psnr"] for r in read_metrics(out / "metrics.jsonl") if "val_psnr" in r]
    assert summary["best_val_loss"] < 0.5 * before and psnrs[-1] > psnrs[0] + 3  # dB
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"]) and summary["scaling_factor"] != 4.5
    pipe = StableDiffusionPipeline.from_pretrained(
        out / "pipeline", safety_checker=None, requires_safety_checker=False
    )
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert (out / "samples" / "step-30" / "reconstructions.png").exists()
    assert json.loads((out / "summary.json").read_text())["stage"] == "vae"


def test_vae_stage_resumes_exactly(straight_and_resumed, tmp_path):
    common = [*VAE, "training.max_train_steps=4", "checkpointing.checkpointing_steps=2", "training.use_ema=true",
              "vae.compute_scaling_factor=false"]  # fmt: skip
    straight_and_resumed(common, kill_after=2)
    a, b = (load_file(tmp_path / run / "vae" / "diffusion_pytorch_model.safetensors") for run in ("full", "split"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_train_vae_command(make_config, tiny_model_dir, shapes_dir, tmp_path):
    from ldm_tune.cli import main

    code = main(["train-vae", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                 f"data.train_data_dir={shapes_dir / 'train'}", "data.resolution=32", "training.max_train_steps=1",
                 f"output_dir={tmp_path / 'vae'}"])  # fmt: skip
    assert code == 0 and (tmp_path / "vae" / "vae" / "config.json").exists()
