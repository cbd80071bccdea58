import pytest
import yaml

from ldm_tune.config import TrainConfig, describe_config, load_config, save_config


BASE = ["model.pretrained_model_name_or_path=m", "data.train_data_dir=d"]


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"pretrained_model_name_or_path": "m"}, "data": {"train_data_dir": "d"},
                                    "training": {"learning_rate": "1e-4", "train_batch_size": 2}}))  # fmt: skip
    config = load_config(path, ["training.train_batch_size=8", "validation.validation_prompts=[a, b]", "seed=3"])
    assert config.training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string: accepted as the number
    assert config.training.train_batch_size == 8 and config.seed == 3
    assert config.validation.validation_prompts == ["a", "b"]
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['training.learning_rat'\].*'learning_rate'"):
        load_config(None, [*BASE, "training.learning_rat=1"])
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['optim'\] in the top level"):
        load_config(None, [*BASE, "optim.lr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.resolution=500", "`data.resolution` must be a positive multiple of 8, got 500."),
        ("training.train_batch_size=0", "`training.train_batch_size` must be >= 1, got 0."),
        ("training.train_batch_size=two", "`training.train_batch_size` must be of type int, got 'two'"),
        (
            "training.mixed_precision=fp8",
            "`training.mixed_precision` must be one of \\['no', 'fp16', 'bf16'\\], got 'fp8'",
        ),
        ("model.prediction_type=x0", "`model.prediction_type` must be one of"),
        ("data.caption_dropout=1.5", "`data.caption_dropout` must be in \\[0, 1\\), got 1.5."),
        ("training.use_ema=maybe", "`training.use_ema` must be of type bool"),
        ("validation.validation_scheduler=dpm3", "`scheduler` must be one of"),
        ("training.snr_gamma=0", "`training.snr_gamma` must be > 0"),
    ],
)
def test_impossible_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*BASE, override])


def test_fp16_without_cuda_suggests_bf16():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*use bf16"):
        load_config(None, [*BASE, "training.mixed_precision=fp16"])


def test_data_source_and_model_are_required():
    with pytest.raises(ValueError, match="`model.pretrained_model_name_or_path` is required"):
        load_config(None, ["data.train_data_dir=d"])
    with pytest.raises(
        ValueError, match="exactly one of `data.train_data_dir`, `data.train_data_file`, `data.dataset_name` and"
    ):
        load_config(None, ["model.pretrained_model_name_or_path=m"])


def test_every_key_is_documented():
    text = describe_config()
    import dataclasses

    for section in dataclasses.fields(TrainConfig):
        value = getattr(TrainConfig(), section.name)
        names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [section.name]
        for name in names:
            key = f"{section.name}.{name}" if dataclasses.is_dataclass(value) else name
            line = next(line for line in text.splitlines() if line.strip().startswith(key + " ="))
            help_line = text.splitlines()[text.splitlines().index(line) + 1].strip()
            assert help_line, key


LORA = [*BASE, "training.finetune_method=lora"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([*BASE, "training.finetune_method=qlora"], r"`training.finetune_method` must be one of \['full', 'lora'\]"),
        ([*LORA, "training.lora_rank=0"], "`training.lora_rank` must be >= 1, got 0."),
        ([*LORA, "training.lora_alpha=-1"], "`training.lora_alpha` must be > 0"),
        ([*LORA, "training.lora_dropout=1"], r"`training.lora_dropout` must be in \[0, 1\), got 1.0."),
        ([*LORA, "training.init_lora_weights=pissa"], "`training.init_lora_weights` must be one of"),
        ([*LORA, "training.lora_target_modules=[]"], "`training.lora_target_modules` must name at least one"),
        ([*LORA, "stage=vae"], "lora applies to `stage: unet`"),
        ([*LORA, "training.trainable_modules=[attn2.]"], "use `training.lora_target_modules`"),
        ([*BASE, "training.train_text_encoder_lora=true"], "needs `training.finetune_method: lora`"),
        (
            [*LORA, "training.train_text_encoder_lora=true", "data.cache_text_embeddings=true"],
            "`data.cache_text_embeddings` stores text-encoder outputs, but `training.train_text_encoder_lora`",
        ),
        ([*BASE, "dreambooth.instance_prompt=a sks dog"], r"`dreambooth.instance_data_dir` is needed for"),
        (
            [*BASE, "dreambooth.instance_data_dir=i", "dreambooth.with_prior_preservation=true"],
            "`dreambooth.with_prior_preservation` needs `dreambooth.class_data_dir`",
        ),
        ([*BASE, "dreambooth.instance_data_dir=i", "dreambooth.class_prompt=a dog"], "used only with"),
        ([*BASE, "dreambooth.instance_data_dir=i", "dreambooth.instance_repeats=0"], "instance_repeats` must be >= 1"),
        ([*BASE, "data.repeats=0"], "`data.repeats` must be >= 1, got 0."),
        (
            ["model.pretrained_model_name_or_path=m", "data.train_shards=s.tar", "training.max_train_steps=1",
             "dreambooth.instance_data_dir=i"],
            "cannot be mixed with a streamed",
        ),
    ],
)  # fmt: skip
def test_lora_and_dreambooth_values_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_dreambooth_instance_data_alone_is_a_source():
    config = load_config(None, ["model.pretrained_model_name_or_path=m", "dreambooth.instance_data_dir=i",
                                "dreambooth.instance_prompt=a photo of sks dog", "training.finetune_method=lora"])  # fmt: skip
    assert config.data.train_data_dir is None and config.dreambooth.instance_repeats == 1
    assert config.training.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("name", ["tiny", "sd15", "sd21-v", "sd15-lora", "sd15-dreambooth-lora"])
def test_shipped_configs_are_valid(name, monkeypatch):
    from pathlib import Path

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU configs ask for fp16
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert config.output_dir


@pytest.mark.parametrize("name", ["cpu", "1gpu-fp16", "multi-gpu", "deepspeed-zero2", "fsdp"])
def test_shipped_accelerate_configs_parse(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # refuses unknown keys
    if name == "deepspeed-zero2":
        assert config.deepspeed_config["zero_stage"] == 2 and not config.deepspeed_config["zero3_init_flag"]


def test_network_settings_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match=r"`data.allow_private_urls` was replaced: .*data.allowed_networks"):
        load_config(None, ["model.pretrained_model_name_or_path=m", "data.allow_private_urls=true"])
    with pytest.raises(ValueError, match=r"`data.allowed_networks`.*169.254"):
        load_config(None, ["model.pretrained_model_name_or_path=m", "data.train_data_dir=d",
                           "data.allowed_networks=[169.254.0.0/16]"])  # fmt: skip
    config = load_config(None, ["model.pretrained_model_name_or_path=m", "data.train_data_dir=d",
                                "data.allowed_networks=[10.0.0.0/8]"])  # fmt: skip
    assert config.data.allowed_networks == ["10.0.0.0/8"]
