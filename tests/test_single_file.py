"""Single-file models in and out (issue 18): `ldm-tune export` writes the original ldm layout, and `model` may be
such a `.safetensors` (or a weights-only `.ckpt`).

diffusers' own `StableDiffusionPipeline.from_single_file` is the reference reader of the exported files.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_tune.cli import main
from ldm_tune.components import check_model_source, load_components
from ldm_tune.export import export_single_file, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from ldm_tune.inference import LDMInference
from ldm_tune.lora_files import save_lora
from ldm_tune.single_file import (
    CLIP_BPE,
    MODEL_CONFIGS,
    _header,
    clip_vocabulary,
    clip_vocabulary_folder,
    load_tokenizer,
    model_type,
    read_checkpoint,
    resolve_config,
    scheduler_config_for,
    shipped_tokenizer,
    single_file_configs,
)


KWARGS = dict(prompt="a red circle", seed=3, num_inference_steps=2, output_type="np", progress=False)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The tiny model exported in fp32 through the CLI."""
    out = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def from_single_file(path, config):
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np"
    ).images


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert set(state_a) == set(state_b)
    for key, tensor in state_b.items():
        torch.testing.assert_close(state_a[key], tensor, rtol=0, atol=0, msg=key)


def test_diffusers_reads_the_export_as_the_folder(exported, tiny_model_dir, sd_pipeline):
    pipe = from_single_file(exported, tiny_model_dir)
    for name in ("unet", "vae", "text_encoder"):  # every tensor round-trips exactly
        assert_same_weights(getattr(pipe, name), getattr(sd_pipeline, name))
    difference = np.abs(diffusers_images(pipe) - diffusers_images(sd_pipeline)).max()
    print(f"from_single_file vs folder, max abs pixel difference: {difference:.2e}")
    assert difference <= 1e-4
    with safe_open(exported, framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["format"] == "pt" and metadata["prediction_type"] == "epsilon"
    assert metadata["ldm_tune.source_model"] == str(tiny_model_dir)
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}


def test_ldm_inference_loads_a_single_file(exported, tiny_model_dir, tiny_pipe):
    pipe = LDMInference.from_pretrained(exported, config=tiny_model_dir, device="cpu")
    assert pipe.unet_files == [Path(exported)]  # the A1111 "Model hash" is the file's
    assert np.abs(pipe.generate(**KWARGS) - tiny_pipe.generate(**KWARGS)).max() <= 1e-4


def test_generate_cli_reads_a_single_file_and_its_png_again(exported, tiny_model_dir, tmp_path):
    from PIL import Image

    args = ["generate", "--model", str(exported), "--prompt", "a red circle", "--steps", "2", "--seed", "5",
            "--height", "32", "--width", "32"]  # fmt: skip
    # The tiny architecture is neither SD 1.x nor 2.x: without `--config` it stops before loading, naming the flag.
    assert main([*args, "--out", str(tmp_path / "none")]) == 2 and not (tmp_path / "none").exists()
    assert main([*args, "--config", str(tiny_model_dir), "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "00000.json").read_text())
    assert record["config"] == str(tiny_model_dir) and record["model"] == str(exported)
    original = tmp_path / "a" / "00000-00.png"
    assert main(["generate", "--from-png", str(original), "--out", str(tmp_path / "b")]) == 0  # config recorded
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "00000-00.png")), np.asarray(Image.open(original)))


def test_fp16_export_and_never_overwrites(tiny_model_dir, exported, tmp_path, capsys):
    out = export_single_file(tiny_model_dir, tmp_path / "half.safetensors")  # fp16 is the default
    with safe_open(out, framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float16}
    before = exported.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_single_file(tiny_model_dir, exported, dtype=torch.float32)
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(exported)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert exported.read_bytes() == before
    assert not list(exported.parent.glob(".*.tmp"))


def make_lora(model_dir, folder):
    """A random-weight LoRA of the UNet and text encoder (peft starts B at zero: it would change nothing)."""
    components = load_components(model_dir)
    components.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    components.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (components.unet, components.text_encoder):
            for name, parameter in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    save_lora(folder, components.unet, components.text_encoder)
    return folder


def test_lora_merged_export_samples_as_the_loaded_lora(tiny_model_dir, tiny_pipe, tmp_path):
    lora = make_lora(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "merged.safetensors"
    main(["export", "--model", str(tiny_model_dir), "--lora", f"{lora}:0.7", "--out", str(out), "--dtype", "fp32"])
    merged = LDMInference.from_pretrained(out, config=tiny_model_dir, device="cpu").generate(**KWARGS)
    loaded = LDMInference.from_pretrained(tiny_model_dir, lora=[(lora, 0.7)], device="cpu").generate(**KWARGS)
    print(f"merged vs loaded LoRA, max abs pixel difference: {np.abs(merged - loaded).max():.2e}")
    assert np.abs(merged - loaded).max() <= 1e-4
    assert np.abs(merged - tiny_pipe.generate(**KWARGS)).max() > 1e-2  # the LoRA is in it
    with safe_open(out, framework="pt") as handle:
        assert json.loads(handle.metadata()["ldm_tune.loras"])[0]["scale"] == 0.7


def v_prediction_run(ema_checkpoint, model_dir, run: Path) -> Path:
    """run/checkpoint-5 of a v-prediction run with EMA (its config.yaml says so)."""
    checkpoint = ema_checkpoint(model_dir, run / "checkpoint-5")
    config = {"model": {"prediction_type": "v_prediction"}, "training": {"use_ema": True}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return checkpoint


@pytest.mark.parametrize("flags, weights", [([], "unet_ema"), (["--no-ema"], "unet")])
def test_checkpoint_export_uses_ema_weights_and_prediction_type(
    tiny_model_dir, tmp_path, ema_checkpoint, flags, weights
):
    checkpoint = v_prediction_run(ema_checkpoint, tiny_model_dir, tmp_path / "run")
    out = tmp_path / "trained.safetensors"
    argv = ["export", "--model", str(tiny_model_dir), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*argv, "--dtype", "fp32", *flags]) == 0
    components = load_components(out, config=tiny_model_dir)
    assert_same_weights(components.unet, UNet2DConditionModel.from_pretrained(checkpoint / weights))
    assert components.scheduler_config["prediction_type"] == "v_prediction"  # the folder's own says epsilon
    # A single file with a checkpoint's UNet in place of its own (`generate --model FILE --checkpoint C`).
    replaced = load_components(out, config=tiny_model_dir, unet_path=checkpoint / "unet")
    assert_same_weights(replaced.unet, UNet2DConditionModel.from_pretrained(checkpoint / "unet"))


def test_ckpt_is_read_as_weights_only(exported, tiny_model_dir, tmp_path):
    state, _ = read_checkpoint(exported)
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")
    loaded = load_components(tmp_path / "model.ckpt", config=tiny_model_dir)
    assert_same_weights(loaded.vae, AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"))


class RunsCode:
    """Unpickling this calls `open(marker, "w")`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_ckpt_that_needs_code_is_refused_unrun(tmp_path, tiny_model_dir):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused unread.*could run code"):
        load_components(tmp_path / "evil.ckpt", config=tiny_model_dir)
    with pytest.raises(OSError, match="Unable to load weights"):  # diffusers reads .ckpt as weights only too
        from_single_file(tmp_path / "evil.ckpt", tiny_model_dir)
    assert not marker.exists()


def test_unknown_files_are_refused_with_the_reason(exported, tiny_model_dir, tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a Stable Diffusion single-file checkpoint.*foo.weight"):
        load_components(tmp_path / "other.safetensors")
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a single-file checkpoint"):
        check_model_source(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="pass `config`"):  # the tiny architecture is neither SD 1.x nor 2.x
        load_components(exported)
    state, _ = read_checkpoint(exported)
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, tmp_path / "incomplete.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\), e.g. \['unet.conv_out.weight'\]"):
        load_components(tmp_path / "incomplete.safetensors", config=tiny_model_dir)


def test_open_clip_text_encoder_uses_the_sd2_layout(tiny_model_dir, tmp_path):
    # The tiny model with a GELU text encoder: the OpenCLIP architecture of SD 2.x, in miniature.
    model = shutil.copytree(tiny_model_dir, tmp_path / "gelu")
    config_file = model / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "hidden_act": "gelu"}))
    out = export_single_file(model, tmp_path / "gelu.safetensors", dtype=torch.float32)
    state, _ = read_checkpoint(out)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    loaded = from_single_file(out, model)
    assert_same_weights(loaded.text_encoder, CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))


@pytest.mark.parametrize("name, kind, counts", [("sd15", "v1", (686, 248, 196)), ("sd21-v", "v2", (686, 248, 280))])
def test_shipped_architectures_map_to_the_original_keys(name, kind, counts):
    # On the meta device: no weights. The key counts are those of the released v1-5 / 2-1 single files (the text
    # encoder without position_ids; SD 2.x's without its unused last block, text_projection and logit_scale).
    folder = MODEL_CONFIGS / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    unet_keys = unet_to_ldm(unet.state_dict(), unet.config)
    vae_keys = vae_to_ldm(vae.state_dict(), vae.config)
    text_keys = text_encoder_to_ldm(text_encoder)
    assert (len(unet_keys), len(vae_keys), len(text_keys)) == counts
    assert "output_blocks.2.1.conv.weight" in unet_keys and "decoder.up.3.upsample.conv.weight" in vae_keys
    assert vae_keys["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # ldm's 1x1 convolution, not linear
    shapes = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet_keys.items()}
    shapes |= {f"first_stage_model.{k}": tuple(v.shape) for k, v in vae_keys.items()}
    assert model_type(shapes | {k: tuple(v.shape) for k, v in text_keys.items()}, name) == kind


def test_sd_shaped_files_resolve_configs_and_tokenizer_offline(tmp_path, monkeypatch):
    # The header decides: the keys that tell SD 1.x from 2.x, with their real shapes (no 4 GB of weights needed).
    def stub(cross_attention_dim, text_key):
        return {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
                320, cross_attention_dim
            ),
            "first_stage_model.quant_conv.bias": torch.zeros(8),
            text_key: torch.zeros(1),
        }

    # As with an empty Hugging Face cache, whatever this machine's holds: the shipped vocabulary must serve.
    monkeypatch.setattr("ldm_tune.single_file._cached_vocabulary", lambda hub_id, subfolder: False)
    save_file(stub(768, "cond_stage_model.transformer.text_model.final_layer_norm.bias"), tmp_path / "v1.safetensors")
    save_file(stub(1024, "cond_stage_model.model.ln_final.bias"), tmp_path / "v2.safetensors")
    for name, shipped, pad_id in (("v1", "sd15", 49407), ("v2", "sd21-v", 0)):
        shapes, _ = _header(tmp_path / f"{name}.safetensors")
        assert model_type(shapes, name) == name
        folder = resolve_config(name, name, None)
        assert folder == MODEL_CONFIGS / shipped
        single_file_configs(tmp_path / f"{name}.safetensors")  # the up-front check finds a tokenizer
        tokenizer = load_tokenizer(folder, name)
        assert Path(tokenizer.name_or_path) == clip_vocabulary_folder()
        assert (tokenizer.pad_token_id, tokenizer.model_max_length) == (pad_id, 77)
    assert scheduler_config_for(MODEL_CONFIGS / "sd21-v", {})["prediction_type"] == "v_prediction"
    assert (
        scheduler_config_for(MODEL_CONFIGS / "sd21-v", {"prediction_type": "epsilon"})["prediction_type"] == "epsilon"
    )


def test_other_architectures_still_need_a_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has none.*SD 1.x and 2.x only.*--config DIR"):
        load_tokenizer(tmp_path, "other")


def test_shipped_vocabulary_is_openai_clip_s():
    vocab, merges = clip_vocabulary(CLIP_BPE)
    assert (len(vocab), len(merges)) == (49408, 49152 - 256 - 2)
    assert (vocab["!"], vocab["a</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 320, 49406, 49407)
    folder = clip_vocabulary_folder()
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert clip_vocabulary_folder() == folder
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == written  # written once, no leftovers
    assert shipped_tokenizer("v1").get_vocab() == vocab


# Reference ids: "a photo of a cat/dog" as transformers' CLIP docs encode them; "! !! !!!" as open_clip.tokenize
# (SD 1.x's tokenization) and the hub's SD 2.x tokenizer (where "!" is the pad token) encode it in diffusers#4153.
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
DOG = [49406, 320, 1125, 539, 320, 1929, 49407]


@pytest.mark.parametrize(
    "kind, exclamations, pad_id",
    [("v1", [49406, 256, 748, 995, 49407], 49407), ("v2", [49406, 0, 0, 0, 0, 0, 0, 49407], 0)],
)
def test_shipped_tokenizer_gives_the_known_ids(kind, exclamations, pad_id):
    tokenizer = shipped_tokenizer(kind)
    assert tokenizer(["a photo of a cat", "A photo of a  DOG", "! !! !!!"]).input_ids == [CAT, DOG, exclamations]
    # As the SD pipelines call it (diffusers' `encode_prompt`): padded to 77 with the architecture's pad token.
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert padded == CAT + [pad_id] * (77 - len(CAT))
    long = tokenizer("cat " * 100, padding="max_length", truncation=True, max_length=77).input_ids
    assert long == [49406] + [2368] * 75 + [49407]
