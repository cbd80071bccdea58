"""Everyday generation (issue 18): per-image seeds, settings inside the PNGs, `--from-png`, and fail-fast checks."""

import hashlib
import json
import logging
from importlib.metadata import version

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_tune.cli import main
from ldm_tune.schedulers import make_scheduler, scheduler_names


FAST = dict(num_inference_steps=3, height=32, width=32, output_type="np", progress=False)


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.set_scheduler("dpm++")


# 1. Seeds.
@pytest.mark.parametrize("name", scheduler_names())
def test_an_image_depends_on_its_own_seed_only(pipe, name):
    """Image i gets seed + i: the same (prompt, seed) alone, as image 3 of 8, and beside other prompts."""
    pipe.set_scheduler(name)
    alone = pipe.generate("a red circle", seed=7, **FAST)[0]
    batch = pipe.generate("a red circle", seed=4, num_images_per_prompt=8, **FAST)
    mixed = pipe.generate(["a blue square", "a red circle", "green"], negative_prompt=["x", "", "y"], seed=6, **FAST)
    # Batched matrix products round differently at other batch sizes (~3e-6 here); another seed changes everything.
    assert np.abs(batch[3] - alone).max() <= 1e-4
    assert np.abs(mixed[1] - alone).max() <= 1e-4
    assert np.abs(batch[2] - alone).max() > 0.05 and np.abs(batch[4] - alone).max() > 0.05


def test_seeds_recorded_per_image_and_minus_one_draws(pipe, tmp_path):
    pipe.generate(["a", "b"], seed=-1, num_images_per_prompt=2, output_path=tmp_path, **{**FAST, "output_type": "pil"})
    params = json.loads((tmp_path / "00000.json").read_text())
    seed = params["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert [image["seed"] for image in params["images"]] == [seed, seed + 1, seed + 2, seed + 3]
    again = pipe.generate("b", seed=seed + 3, **FAST)[0]
    saved = np.asarray(Image.open(tmp_path / "00000-03.png"), dtype=np.float32) / 255
    assert np.abs(again - saved).max() <= 1 / 255 + 1e-6


# 2. Settings in the file.
def test_png_carries_a1111_parameters_and_the_full_json(pipe, tiny_model_dir, tmp_path):
    pipe.set_scheduler("dpm++_karras")
    pipe.generate("a red circle, flat", negative_prompt="blurry", seed=11, num_inference_steps=2, height=32,
                  width=32, guidance_scale=7.5, output_path=tmp_path, progress=False)  # fmt: skip
    unet_file = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    model_hash = hashlib.sha256(unet_file.read_bytes()).hexdigest()[:10]
    png = Image.open(tmp_path / "00000-00.png")
    assert png.text["parameters"] == (
        "a red circle, flat\n"
        "Negative prompt: blurry\n"
        f"Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 11, Size: 32x32, "
        f"Model hash: {model_hash}, Model: tiny, Version: ldm_tune {version('ldm_tune')}"
    )
    embedded = json.loads(png.text["ldm_tune"])
    on_disk = json.loads((tmp_path / "00000.json").read_text())
    assert embedded.pop("image") == on_disk["images"][0] and embedded == on_disk
    assert on_disk["model_hash"] == model_hash


def test_infotext_writes_loras_as_a1111_does(tmp_path):
    from safetensors.torch import save_file

    from ldm_tune.png_info import infotext

    lora = tmp_path / "style.safetensors"
    save_file({"w": torch.ones(3)}, lora)
    raw = lora.read_bytes()
    after_header = raw[8 + int.from_bytes(raw[:8], "little") :]  # A1111's AutoV3 hash skips the header
    document = dict(num_inference_steps=20, scheduler="euler_a", guidance_scale=7.0, width=512, height=768,
                    model="owner/sd", checkpoint=None, eta=0.0, guidance_rescale=0.0, scheduler_config={},
                    loras=[{"adapter": "style", "path": str(lora), "scale": 0.5, "sha256": ""}])  # fmt: skip
    text = infotext(document, {"prompt": "a cat", "negative_prompt": "", "seed": 3})
    assert text == (
        "a cat <lora:style:0.5>\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 3, Size: 512x768, Model: owner/sd, "
        f'Lora hashes: "style: {hashlib.sha256(after_header).hexdigest()[:12]}", Version: ldm_tune'
    )


def run_cli(*args):
    return main(["generate", *map(str, args)])


def test_from_png_makes_the_very_same_pixels(tiny_model_dir, tmp_path, capsys):
    common = ("--steps", 3, "--height", 32, "--width", 32)
    assert run_cli("--model", tiny_model_dir, "--prompt", "a red circle", "--prompt", "a blue square",
                   "--num-images", 2, "--seed", 3, "--scheduler", "euler_a", *common, "--out", tmp_path / "a") == 0  # fmt: skip
    original = tmp_path / "a" / "00000-03.png"
    assert run_cli("--from-png", original, "--out", tmp_path / "b") == 0
    # Made again within its own batch of 4 (only that image is written, under its own name): the very same pixels.
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["00000-03.png", "00000.json"]
    expected = np.asarray(Image.open(original))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "00000-03.png")), expected)
    # Alone from its own seed (6 = 3 + 3): the same image up to batch-size rounding.
    assert run_cli("--from-png", original, "--seed", 6, "--out", tmp_path / "c") == 0
    alone = np.asarray(Image.open(tmp_path / "c" / "00000-00.png"))
    assert np.abs(alone.astype(int) - expected).max() <= 1
    assert json.loads((tmp_path / "c" / "00000.json").read_text())["prompt"] == ["a blue square"]


def test_from_png_without_our_chunk_names_the_file(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert run_cli("--from-png", plain, "--out", tmp_path / "out") == 2
    assert f"`from_png` {str(plain)!r} has no `ldm_tune` chunk" in capsys.readouterr().err


# 7. Fail fast.
@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model fails the test: every check must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_components was called before the arguments were checked")

    monkeypatch.setattr("ldm_tune.components.load_components", refuse)
    monkeypatch.setattr("ldm_tune.inference.load_components", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheduler", "nope"], "`scheduler` (--scheduler) must be one of ['ddpm', 'ddim', 'pndm', 'dpm++',"),
        (["--height", 513], "`height` (--height) must be a positive multiple of 4 (the VAE scale factor), got 513."),
        (["--steps", 0], "`num_inference_steps` (--steps) must be an integer in [1, 999], got 0"),
        (["--guidance", -1], "`guidance_scale` (--guidance) must be a finite number >= 0, got -1.0."),
        (["--guidance-rescale", 2], "`guidance_rescale` (--guidance-rescale) must be in [0, 1], got 2.0."),
        (["--num-images", 0], "`num_images_per_prompt` (--num-images) must be an integer >= 1, got 0."),
        (["--seed", -5], "`seed` (--seed) must be -1 (draw one) or an integer in [0, 2**64 - 1]"),
        (["--scheduler-arg", "foo=1"], "Scheduler overrides ['foo'] are not arguments of"),
        (["--scheduler", "ddim", "--scheduler-arg", "timestep_spacing=middle"], "middle is not supported"),
        (["--checkpoint", "missing-ckpt"], "`checkpoint` 'missing-ckpt' does not exist."),
        (["--lora", "missing.safetensors"], "`lora` 'missing.safetensors' does not exist"),
    ],
)
def test_every_argument_is_checked_before_loading(no_loading, tiny_model_dir, tmp_path, capsys, args, message):
    code = run_cli("--model", tiny_model_dir, "--prompt", "x", *args, "--out", tmp_path / "out")
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_mistyped_local_path_is_never_a_hub_id(no_loading, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    for path in ("models/tyni", "./tyni", "tyni", "models/tiny/unet/x"):
        assert run_cli("--model", path, "--prompt", "x", "--out", "out") == 2
        assert f"`model` {path!r} does not exist." in capsys.readouterr().err
    # `owner/name` with no local `owner/` folder is a hub id; offline and not cached, the error says so.
    assert run_cli("--model", "someone/nothing", "--prompt", "x", "--out", "out") == 2
    err = capsys.readouterr().err
    assert "'someone/nothing' is taken for a hub id" in err and "HF_HUB_OFFLINE is set" in err


@pytest.mark.parametrize(
    "name, hub",
    [
        ("runwayml/stable-diffusion-v1-5", True),
        ("owner/name.v2", True),
        ("./owner/name", False),
        ("/abs/name", False),
        ("~/name", False),
        ("a/b/c", False),
        ("name", False),
        ("owner/-name", False),
        ("own--er/name", False),
        ("owner/name.git", False),
        ("owner\\name", False),
    ],
)
def test_hub_id_rule(name, hub):
    from ldm_tune.components import is_hub_id

    assert is_hub_id(name) is hub


def test_a_stray_run_file_never_fails_after_the_compute(pipe, tmp_path, monkeypatch):
    (tmp_path / "00000.json").write_text("not ours")
    pipe.generate("a red circle", seed=1, output_path=tmp_path, **{**FAST, "output_type": "pil"})
    assert (tmp_path / "00000.json").read_text() == "not ours"
    assert json.loads((tmp_path / "00001.json").read_text())["images"][0]["file"] == "00001-00.png"
    # Two writers that both saw run 2 as free: the second one takes the next number. Stray images of a number
    # without its JSON are skipped too, and the reservation is given back.
    from ldm_tune import outputs

    (tmp_path / "00002.json").write_text("the other writer")
    (tmp_path / "00003-00.png").write_bytes(b"stray")
    monkeypatch.setattr(outputs, "next_run_id", lambda folder: 2)
    pipe.generate("a red circle", seed=1, output_path=tmp_path, **{**FAST, "output_type": "pil"})
    assert (tmp_path / "00004.json").exists() and (tmp_path / "00004-00.png").exists()
    assert not (tmp_path / "00003.json").exists() and (tmp_path / "00003-00.png").read_bytes() == b"stray"


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm"])
def test_leading_spacing_with_a_late_first_timestep_warns(pipe, caplog, name):
    from ldm_tune.generation_params import warn_if_late_start

    scheduler = make_scheduler(name, {**pipe.base_scheduler_config, "timestep_spacing": "leading"})
    scheduler.set_timesteps(600)
    with caplog.at_level(logging.WARNING, logger="ldm_tune"):
        warn_if_late_start(scheduler, name, 600)
    assert "first timestep is 600 of 1000" in caplog.text and "timestep_spacing='trailing'" in caplog.text
    caplog.clear()
    pipe.set_scheduler(name, timestep_spacing="trailing")
    with caplog.at_level(logging.WARNING, logger="ldm_tune"):
        pipe.generate("a red circle", seed=0, **FAST)
    assert pipe.scheduler.timesteps[0] == 999 and "first timestep" not in caplog.text
    pipe.set_scheduler(name)
    with caplog.at_level(logging.WARNING, logger="ldm_tune"):
        pipe.generate("a red circle", seed=0, **FAST)  # 3 "leading" steps start at t = 667
    assert "timestep_spacing='trailing'" in caplog.text
