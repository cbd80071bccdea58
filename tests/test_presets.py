import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm_tune.presets import SD15_SCHEDULER, build_sd15_arch, build_tokenizer, init_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_tiny_folder_loads_in_stable_diffusion_pipeline(tiny_model_dir):
    for sub in ("unet", "vae", "text_encoder"):
        assert list((tiny_model_dir / sub).glob("*.safetensors")), sub
        assert not list((tiny_model_dir / sub).glob("*.bin")), sub
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_scheduler_config_is_sd15_and_never_clips_latents(tiny_model_dir):
    config = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    # clip_sample=True (the diffusers class default) clamps latents to [-1, 1] and ruins a latent model's samples.
    assert config["clip_sample"] is False
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "skip_prk_steps"):
        assert config[key] == SD15_SCHEDULER[key], key
    assert config["_class_name"] == "PNDMScheduler"


def test_sd15_arch_has_the_exact_parameter_counts():
    components = build_sd15_arch(device="meta")  # no memory for the weights
    assert count(components.unet) == 859_520_964
    assert count(components.vae) == 83_653_863
    assert count(components.text_encoder) == 123_060_480
    assert components.text_encoder.config.hidden_size == 768
    assert components.text_encoder.config.num_hidden_layers == 12
    assert 2 ** (len(components.vae.config.block_out_channels) - 1) == 8
    assert components.scheduler_config["beta_schedule"] == "scaled_linear"


def test_init_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        init_model("tiny", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_init_model_rejects_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="`preset` must be one of"):
        init_model("sdxl", tmp_path / "m")


def test_init_model_seed_decides_the_weights(tmp_path):
    from ldm_tune.presets import build_tiny

    a, b, c = build_tiny(seed=1), build_tiny(seed=1), build_tiny(seed=2)
    wa, wb, wc = (next(x.unet.parameters()) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_offline_tokenizer_covers_any_text_and_merges_words():
    tokenizer = build_tokenizer(words=["triangle", "red"])
    ids = tokenizer("a RED triangle, ünïcode 日本 😀").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.convert_tokens_to_ids("red</w>") in ids  # lower-cased, one token
    assert tokenizer.convert_tokens_to_ids("triangle</w>") in ids
    # CLIP's legacy pooling takes the position of the highest id: that must be <|endoftext|>.
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("a red triangle")
