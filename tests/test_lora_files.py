"""LoRA files (diffusers and kohya format, metadata) and LoRAs in `LDMInference` and `ldm-tune generate`.

The LoRAs are built with peft on the tiny model, their weights randomised so that they change the images, with
lora_alpha != rank. diffusers' own `StableDiffusionPipeline.load_lora_weights` is the reference loader.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_tune.cli import _lora_arg, main
from ldm_tune.components import load_components
from ldm_tune.inference import LDMInference
from ldm_tune.lora_files import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    adapter_state,
    load_lora_into_adapters,
    save_lora,
    training_metadata,
)
from ldm_tune.presets import TINY_UNET
from ldm_tune.schedulers import make_scheduler


# Attention projections plus feed-forward layers and the (1x1 convolution) transformer input projection.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
GENERATE = dict(prompt="a red circle", num_inference_steps=2, guidance_scale=7.5, height=32, width=32)


def make_lora(model_dir, folder, seed, text_encoder=False, unet=None, metadata=None, text_kwargs=None, **kwargs):
    """Add random-weight adapters (rank 4, alpha 8 unless overridden) to fresh models and save them."""
    components = load_components(model_dir)
    unet = unet or components.unet
    unet.add_adapter(LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS, **kwargs}))
    models = [unet]
    if text_encoder:
        config = {"r": 2, "lora_alpha": 6, "target_modules": TEXT_TARGETS, **(text_kwargs or {})}
        components.text_encoder.add_adapter(LoraConfig(**config))
        models.append(components.text_encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:  # peft starts B at zero: the LoRA would do nothing
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    save_lora(folder, unet, components.text_encoder if text_encoder else None, metadata=metadata)
    return folder, unet, components.text_encoder


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    """Two LoRAs: `unet` (UNet only) and `full` (UNet and text encoder)."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "unet": make_lora(tiny_model_dir, root / "unet", seed=1)[0],
        "full": make_lora(tiny_model_dir, root / "full", seed=2, text_encoder=True)[0],
    }


def reference_pipeline(model_dir, scheduler="dpm++"):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, seed=3):
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **GENERATE).images


def our_images(pipe, seed=3):
    return pipe.generate(seed=seed, output_type="np", progress=False, **GENERATE)


def header(path):
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


# Files.
@pytest.mark.parametrize("which", ["unet", "full"])
def test_kohya_file_gives_the_same_images_as_the_diffusers_file(loras, tiny_model_dir, sd_pipeline, which):
    pipe = reference_pipeline(tiny_model_dir)
    pipe.load_lora_weights(loras[which], weight_name=LORA_WEIGHT_NAME, adapter_name="diffusers")
    pipe.load_lora_weights(loras[which], weight_name=KOHYA_WEIGHT_NAME, adapter_name="kohya")
    if which == "full":  # both files really carry text-encoder adapters
        assert set(pipe.get_list_adapters()["text_encoder"]) == {"diffusers", "kohya"}
    pipe.set_adapters("diffusers")
    from_diffusers = reference_images(pipe)
    pipe.set_adapters("kohya")
    from_kohya = reference_images(pipe)
    pipe.disable_lora()
    base = reference_images(pipe)
    assert np.abs(from_kohya - from_diffusers).max() <= 1e-4
    assert np.abs(from_diffusers - base).max() > 1e-2


def test_kohya_keys_follow_the_sd1_naming(loras, tiny_model_dir):
    components = load_components(tiny_model_dir)
    # What ComfyUI (comfy/lora.py model_lora_keys_unet / _clip) and kohya-ss derive from the module paths.
    unet_layers = {f"lora_unet_{name.replace('.', '_')}": module for name, module in components.unet.named_modules()}
    text_layers = {
        f"lora_te_text_model_{name.replace('.', '_')}": module
        for name, module in components.text_encoder.named_modules()
    }
    state = load_file(loras["full"] / KOHYA_WEIGHT_NAME)
    names = {key.split(".")[0] for key in state}
    assert all(key.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for key in state)
    assert all(f"{name}.{suffix}" in state for name in names for suffix in ("lora_down.weight", "lora_up.weight"))
    unet_names = {name for name in names if name.startswith("lora_unet_")}
    text_names = names - unet_names
    assert all(name.startswith("lora_te_text_model_encoder_layers_") for name in text_names)
    assert len(text_names) == 2 * len(TEXT_TARGETS)  # 2 layers
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in text_names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0" in unet_names
    for name in unet_names:
        assert isinstance(unet_layers.get(name), (torch.nn.Linear, torch.nn.Conv2d)), name
    assert all(isinstance(text_layers.get(name), torch.nn.Linear) for name in text_names)
    assert isinstance(unet_layers["lora_unet_down_blocks_0_attentions_0_proj_in"], torch.nn.Conv2d)


def test_kohya_alphas_are_the_real_ones(tiny_model_dir, tmp_path):
    # alpha_pattern and rank_pattern on the UNet, rsLoRA on the text encoder.
    folder, unet, text_encoder = make_lora(
        tiny_model_dir, tmp_path, seed=4, text_encoder=True, lora_alpha=8,
        alpha_pattern={"attn2.to_k": 3}, rank_pattern={"attn2.to_v": 2}, text_kwargs={"use_rslora": True},
    )  # fmt: skip
    state = load_file(folder / KOHYA_WEIGHT_NAME)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_"
    assert state[name + "to_k.alpha"].item() == 3.0 and state[name + "to_q.alpha"].item() == 8.0
    assert state[name + "to_v.lora_down.weight"].shape[0] == 2
    assert state["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"].item() == pytest.approx(6 * math.sqrt(2))
    # kohya's update is alpha / rank * up @ down: it must equal peft's own delta weight for every layer.
    for prefix, model in (("lora_unet_", unet), ("lora_te_text_model_", text_encoder)):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        assert layers
        for module_name, layer in layers:
            key = prefix + module_name.replace(".", "_")
            up, down = state[key + ".lora_up.weight"], state[key + ".lora_down.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.get_delta_weight("default").shape)
            expected = layer.get_delta_weight("default")
            torch.testing.assert_close(delta * state[key + ".alpha"] / down.shape[0], expected, rtol=1e-5, atol=1e-6)


def test_metadata_in_both_files(tiny_model_dir, make_config, tmp_path):
    config = make_config("training.finetune_method=lora", "training.lora_alpha=8", "training.learning_rate=0.0003",
                         "training.train_text_encoder_lora=true", "training.text_encoder_lr=0.0001")  # fmt: skip
    metadata = training_metadata(config, global_step=7)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    folder = make_lora(tiny_model_dir, tmp_path / "out", seed=5, text_encoder=True, metadata=metadata)[0]
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_steps": "7",
        "ss_learning_rate": "0.0003",
        "ss_text_encoder_lr": "0.0001",
        "ss_resolution": "(32, 32)",
        "ss_seed": "0",
        "ss_sd_model_name": "tiny",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "run",
        "modelspec.resolution": "32x32",
        "modelspec.prediction_type": "epsilon",
    }
    for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        found = header(folder / name)
        assert {key: found.get(key) for key in expected} == expected, name
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", found["modelspec.date"])
    # diffusers' own header entries are kept: its loader rebuilds the LoraConfig (alpha, targets) from them.
    assert "lora_adapter_metadata" in header(folder / LORA_WEIGHT_NAME)


def test_dora_skips_the_kohya_copy_with_a_reason(tiny_model_dir, tmp_path, caplog):
    (tmp_path / KOHYA_WEIGHT_NAME).write_bytes(b"stale")  # from an earlier save: must not survive
    with caplog.at_level("WARNING", logger="ldm_tune.lora_files"):
        make_lora(tiny_model_dir, tmp_path, seed=6, use_dora=True)
    assert (tmp_path / LORA_WEIGHT_NAME).is_file() and not (tmp_path / KOHYA_WEIGHT_NAME).exists()
    assert "DoRA" in caplog.text and KOHYA_WEIGHT_NAME in caplog.text


def test_load_lora_into_adapters_restores_the_saved_weights(loras, tiny_model_dir, tmp_path):
    folder, unet, text_encoder = make_lora(tiny_model_dir, tmp_path, seed=7, text_encoder=True)
    fresh = load_components(tiny_model_dir)
    fresh.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    fresh.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=TEXT_TARGETS))
    load_lora_into_adapters(folder, fresh.unet, fresh.text_encoder)
    for saved, loaded in ((unet, fresh.unet), (text_encoder, fresh.text_encoder)):
        a, b = adapter_state(saved), adapter_state(loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# LDMInference.
def test_one_lora_with_a_scale_matches_diffusers(loras, tiny_model_dir, tiny_pipe):
    ours = LDMInference.from_pretrained(tiny_model_dir, device="cpu", lora=[(loras["full"], 0.7)])
    reference = reference_pipeline(tiny_model_dir)
    reference.load_lora_weights(loras["full"], adapter_name="full")
    reference.set_adapters(["full"], [0.7])
    images = our_images(ours)
    assert np.abs(images - reference_images(reference)).max() <= 1e-4
    assert np.abs(images - our_images(tiny_pipe)).max() > 1e-2


def test_two_loras_at_once_match_diffusers(loras, tiny_model_dir):
    kohya_file = loras["unet"] / KOHYA_WEIGHT_NAME
    ours = LDMInference.from_pretrained(tiny_model_dir, device="cpu")
    assert ours.load_lora(kohya_file, 0.5) == "lora_kohya"
    assert ours.load_lora(loras["full"], 1.2) == "full"  # a training output folder
    reference = reference_pipeline(tiny_model_dir)
    reference.load_lora_weights(loras["unet"], weight_name=KOHYA_WEIGHT_NAME, adapter_name="a")
    reference.load_lora_weights(loras["full"], adapter_name="b")
    for scales in ([0.5, 1.2], [1.0, -0.4]):
        if scales[0] == 1.0:
            ours.set_lora_scale({"lora_kohya": 1.0, loras["full"]: -0.4})  # by adapter name and by path
        reference.set_adapters(["a", "b"], scales)
        assert np.abs(our_images(ours) - reference_images(reference)).max() <= 1e-4, scales
    assert [lora.scale for lora in ours.loras] == [1.0, -0.4]


def test_scale_zero_gives_exactly_the_base_images(loras, tiny_model_dir, tiny_pipe):
    ours = LDMInference.from_pretrained(tiny_model_dir, device="cpu", lora=[loras["full"], loras["unet"]])
    base = our_images(tiny_pipe)
    with_loras = our_images(ours)
    ours.set_lora_scale(0)
    assert np.array_equal(our_images(ours), base)
    ours.set_lora_scale([0.0, 1.0])  # only the UNet-only LoRA on
    only_unet = our_images(ours)
    assert np.abs(only_unet - base).max() > 1e-2 and np.abs(only_unet - with_loras).max() > 1e-2
    ours.set_lora_scale(1.0)
    assert np.array_equal(our_images(ours), with_loras)
    with pytest.raises(ValueError, match=r"`scale` has 3 entries but 2 LoRAs are loaded"):
        ours.set_lora_scale([1, 2, 3])
    with pytest.raises(ValueError, match=r"`scale` must be a finite number, got nan"):
        ours.set_lora_scale(float("nan"))


def test_generate_records_the_loras(loras, tiny_model_dir, tmp_path):
    ours = LDMInference.from_pretrained(tiny_model_dir, device="cpu", lora=[(loras["full"], 0.25)])
    ours.generate("a red circle", num_inference_steps=2, seed=1, output_path=tmp_path, progress=False)
    (record,) = json.loads((tmp_path / "00000.json").read_text())["loras"]
    assert record["path"] == str((loras["full"] / LORA_WEIGHT_NAME).resolve())
    assert record["scale"] == 0.25 and record["adapter"] == "full" and len(record["sha256"]) == 64


@pytest.fixture(scope="module")
def bad_loras(tiny_model_dir, loras, tmp_path_factory):
    """A missing file, a folder without a LoRA, corrupt and foreign files, and LoRAs of other architectures."""
    root = tmp_path_factory.mktemp("bad")
    good = (loras["unet"] / LORA_WEIGHT_NAME).read_bytes()
    (root / "header_cut.safetensors").write_bytes(good[:20])
    (root / "data_cut.safetensors").write_bytes(good[: len(good) - 100])
    (root / "text.safetensors").write_text("not a LoRA\n" * 10)
    (root / "lora.bin").write_bytes(good)
    (root / "empty").mkdir()
    # A full UNet file is a valid safetensors file, but not a LoRA.
    unet_file = next((tiny_model_dir / "unet").glob("*.safetensors"))
    other_context = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 16})
    other_widths = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": [16, 32, 32]})
    # A diffusers file whose LoraConfig header says rank 2 while its tensors have rank 4: fails inside diffusers.
    with safe_open(loras["unet"] / LORA_WEIGHT_NAME, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    config = {**json.loads(metadata["lora_adapter_metadata"]), "unet.r": 2}
    save_file(tensors, root / "rank.safetensors", metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    return {
        "inconsistent header": (root / "rank.safetensors", "could not be loaded: Error(s) in loading state_dict"),
        "missing": (root / "missing.safetensors", "does not exist"),
        "folder without a LoRA": (root / "empty", f"is a folder without {LORA_WEIGHT_NAME}"),
        "truncated header": (root / "header_cut.safetensors", "could not be read as a LoRA file"),
        "truncated data": (root / "data_cut.safetensors", "could not be read as a LoRA file"),
        "text file": (root / "text.safetensors", "could not be read as a LoRA file"),
        "pickle suffix": (root / "lora.bin", "only safetensors are read"),
        "full UNet": (unet_file, "holds no LoRA weights"),
        "other cross_attention_dim": (
            make_lora(tiny_model_dir, root / "ctx", seed=8, unet=other_context)[0] / KOHYA_WEIGHT_NAME,
            "does not fit this model",
        ),
        "other block widths": (
            make_lora(tiny_model_dir, root / "widths", seed=9, unet=other_widths)[0],
            "does not fit this model",
        ),
    }


BAD = ["inconsistent header", "missing", "folder without a LoRA", "truncated header", "truncated data", "text file", "pickle suffix",
       "full UNet", "other cross_attention_dim", "other block widths"]  # fmt: skip


@pytest.fixture(scope="module")
def pipe_with_lora(tiny_model_dir, loras):
    pipe = LDMInference.from_pretrained(tiny_model_dir, device="cpu", lora=[(loras["full"], 0.8)])
    return pipe, our_images(pipe)


@pytest.mark.parametrize("case", BAD)
def test_bad_lora_raises_one_clear_error_and_changes_nothing(pipe_with_lora, bad_loras, case):
    pipe, before = pipe_with_lora
    path, message = bad_loras[case]
    adapters = (dict(pipe.unet.peft_config), dict(pipe.text_encoder.peft_config))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        pipe.load_lora(path, 0.5)
    assert str(error.value).startswith("`lora` '") and message in str(error.value)
    assert str(path) in str(error.value) or str(path / LORA_WEIGHT_NAME) in str(error.value)
    assert (dict(pipe.unet.peft_config), dict(pipe.text_encoder.peft_config)) == adapters
    assert [lora.adapter for lora in pipe.loras] == ["full"]
    assert np.array_equal(our_images(pipe), before)


# Command line.
@pytest.mark.parametrize(
    "text, expected",
    [
        ("out/run", ("out/run", 1.0)),
        ("out/run:0.5", ("out/run", 0.5)),
        ("a:b/lora.safetensors", ("a:b/lora.safetensors", 1.0)),
        ("a:b/lora.safetensors:-1.5e-1", ("a:b/lora.safetensors", -0.15)),
        (r"C:\loras\x.safetensors:.75", (r"C:\loras\x.safetensors", 0.75)),
        ("x.safetensors:nan", ("x.safetensors:nan", 1.0)),
    ],
)
def test_lora_argument_takes_only_a_final_number_as_scale(text, expected):
    assert _lora_arg(text) == expected


def test_cli_generate_with_two_loras(loras, tiny_model_dir, tmp_path, capsys):
    odd = tmp_path / "with:colon"  # a path may itself contain ':'
    odd.mkdir()
    (odd / "style.safetensors").write_bytes((loras["unet"] / KOHYA_WEIGHT_NAME).read_bytes())
    out = tmp_path / "images"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "2", "--seed", "1",
            "--lora", f"{loras['full']}:0.6", "--lora", str(odd / "style.safetensors"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    recorded = json.loads((out / "00000.json").read_text())["loras"]
    assert [(r["adapter"], r["scale"]) for r in recorded] == [("full", 0.6), ("style", 1.0)]
    assert recorded[1]["path"] == str((odd / "style.safetensors").resolve())
    missing = tmp_path / "nope.safetensors"
    argv[argv.index("--lora") + 1] = f"{missing}:0.5"
    assert main(argv) == 2
    assert f"`lora` '{missing}' does not exist" in capsys.readouterr().err


def test_cli_evaluate_scores_a_model_with_its_lora(loras, tiny_model_dir, tmp_path):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--steps", "2", "--guidance", "3", "--images-per-prompt",
            "1", "--device", "cpu", "--prompts", str(tmp_path / "prompts.txt")]  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a red circle on a white background\n")
    assert main([*argv, "--lora", f"{loras['full']}:0.5", "--out", str(tmp_path / "with.json")]) == 0
    result = json.loads((tmp_path / "with.json").read_text())
    assert [(x["path"], x["scale"]) for x in result["lora"]] == [
        (str((loras["full"] / LORA_WEIGHT_NAME).resolve()), 0.5)
    ]
