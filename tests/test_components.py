import shutil
import sys

import pytest
import torch

from ldm_tune.components import check_model_folder, load_components, load_unet


def test_load_components_reads_every_part(tiny_model_dir):
    components = load_components(tiny_model_dir)
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size
    assert components.scheduler_config["clip_sample"] is False
    assert components.vae.dtype == torch.float32
    half = load_components(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16


def test_missing_path_names_it_and_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*model_index.json.*unet/"):
        load_components(tmp_path / "nope")


def test_missing_components_are_listed_in_one_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        check_model_folder(broken)
    message = str(info.value)
    assert (
        "vae/" in message
        and "unet/*.safetensors" in message
        and "text_encoder" not in message.split("missing")[1].split(".")[0]
    )


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    broken = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").rename(broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled .bin weights in \\['unet'\\] are not loaded"):
        load_components(broken)


def test_hub_id_offline_fails_with_a_clear_error():
    with pytest.raises(OSError, match="Could not load 'someone/not-a-model' from the Hugging Face hub"):
        load_components("someone/not-a-model")


def test_checkpoint_without_unet_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no UNet"):
        load_unet(tmp_path)


def test_nothing_imports_torchvision(tiny_pipe):
    assert "torchvision" not in sys.modules
