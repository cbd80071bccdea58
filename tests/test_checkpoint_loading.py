"""Loading a training checkpoint for sampling: its EMA weights by default, and the run's prediction_type (issue 18)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_tune.components import load_components
from ldm_tune.inference import LDMInference
from ldm_tune.training import Trainer


KWARGS = dict(prompt="a red circle", seed=3, num_inference_steps=3, output_type="np", progress=False)


def by_hand(model_dir, unet_folder, prediction_type=None):
    """A pipeline on the base model with the UNet of `unet_folder` loaded directly."""
    components = load_components(model_dir)
    unet = UNet2DConditionModel.from_pretrained(unet_folder, use_safetensors=True)
    config = dict(components.scheduler_config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return LDMInference(components.vae, components.text_encoder, components.tokenizer, unet, config, "ddim").to("cpu")


def same_weights(a, b) -> bool:
    b = b.state_dict()
    return all(torch.equal(value, b[name]) for name, value in a.state_dict().items())


def test_checkpoint_samples_with_its_ema_weights_unless_told_not_to(make_config, tiny_model_dir, tmp_path):
    config = make_config("training.use_ema=true", "training.max_train_steps=3", "training.learning_rate=1e-3",
                         "checkpointing.checkpointing_steps=3")  # fmt: skip
    Trainer(config).train()
    checkpoint = Path(config.output_dir) / "checkpoint-3"
    assert (checkpoint / "unet_ema" / "config.json").is_file()
    ema = LDMInference.from_pretrained(tiny_model_dir, checkpoint=checkpoint, device="cpu", scheduler="ddim")
    raw = LDMInference.from_pretrained(
        tiny_model_dir, checkpoint=checkpoint, device="cpu", scheduler="ddim", use_ema=False
    )
    ema_by_hand, raw_by_hand = (
        by_hand(tiny_model_dir, checkpoint / "unet_ema"),
        by_hand(tiny_model_dir, checkpoint / "unet"),
    )
    assert same_weights(ema.unet, ema_by_hand.unet) and same_weights(raw.unet, raw_by_hand.unet)
    images = ema.generate(**KWARGS, output_path=tmp_path / "ema")
    assert np.array_equal(images, ema_by_hand.generate(**KWARGS))
    raw_images = raw.generate(**KWARGS, output_path=tmp_path / "raw")
    assert np.array_equal(raw_images, raw_by_hand.generate(**KWARGS))
    assert np.abs(images - raw_images).max() > 1e-4
    assert json.loads((tmp_path / "ema" / "00000.json").read_text())["unet_weights"] == "ema"
    recorded = json.loads((tmp_path / "raw" / "00000.json").read_text())
    assert recorded["unet_weights"] == "raw" and recorded["prediction_type"] == "epsilon"
    # The finished run's unet/ holds the EMA weights (the export swaps them in): recorded as such.
    export = LDMInference.from_pretrained(tiny_model_dir, checkpoint=config.output_dir, device="cpu", scheduler="ddim")
    assert export.unet_weights == "ema" and same_weights(export.unet, ema.unet)


def test_checkpoint_without_ema_uses_its_unet(make_config, tiny_model_dir, caplog):
    config = make_config("training.max_train_steps=1", "checkpointing.checkpointing_steps=1")
    Trainer(config).train()
    checkpoint = Path(config.output_dir) / "checkpoint-1"
    with caplog.at_level("INFO", logger="ldm_tune.components"):
        pipe = LDMInference.from_pretrained(tiny_model_dir, checkpoint=checkpoint, device="cpu", use_ema=True)
    assert pipe.unet_weights == "raw" and "no EMA weights" in caplog.text
    assert same_weights(pipe.unet, by_hand(tiny_model_dir, checkpoint / "unet").unet)


def test_v_prediction_fine_tune_of_an_epsilon_base_samples_as_v_prediction(make_config, tiny_model_dir, tmp_path):
    base = json.loads((Path(tiny_model_dir) / "scheduler" / "scheduler_config.json").read_text())
    assert base.get("prediction_type", "epsilon") == "epsilon"
    config = make_config("model.prediction_type=v_prediction", "training.max_train_steps=1",
                         "checkpointing.checkpointing_steps=1")  # fmt: skip
    Trainer(config).train()
    run = Path(config.output_dir)
    # A run still training has no summary.json nor pipeline/: its config.yaml records the prediction type.
    shutil.rmtree(run / "pipeline")
    (run / "summary.json").unlink()
    pipe = LDMInference.from_pretrained(
        tiny_model_dir, checkpoint=run / "checkpoint-1", device="cpu", scheduler="ddim"
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.base_scheduler_config["prediction_type"] == "v_prediction"  # every sampler built from it
    images = pipe.generate(**KWARGS, output_path=tmp_path / "v")
    assert json.loads((tmp_path / "v" / "00000.json").read_text())["prediction_type"] == "v_prediction"
    assert np.array_equal(
        images, by_hand(tiny_model_dir, run / "checkpoint-1" / "unet", "v_prediction").generate(**KWARGS)
    )
    pipe.set_scheduler("ddim", prediction_type="epsilon")
    assert np.abs(images - pipe.generate(**KWARGS)).max() > 1e-3


@pytest.mark.parametrize("flags, weights", [([], "ema"), (["--no-ema"], "raw")])
def test_generate_cli_no_ema_flag(tiny_model_dir, tmp_path, monkeypatch, ema_checkpoint, flags, weights):
    from ldm_tune.cli import main

    torch.manual_seed(0)
    checkpoint = ema_checkpoint(tiny_model_dir, tmp_path / "checkpoint-5")
    seen = {}
    original = LDMInference.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LDMInference, "from_pretrained", classmethod(spy))
    main(["generate", "--model", str(tiny_model_dir), "--checkpoint", str(checkpoint), "--prompt", "a red circle",
          "--steps", "2", "--seed", "1", "--device", "cpu", "--out", str(tmp_path / "out"), *flags])  # fmt: skip
    assert seen["use_ema"] is (weights == "ema")
    recorded = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert recorded["unet_weights"] == weights and recorded["checkpoint"] == str(checkpoint)
