"""img2img and inpainting: parity with diffusers' own pipelines on the tiny model, input checks, records and CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_tune.inference import LDMInference
from ldm_tune.schedulers import make_scheduler


PROMPTS = ["a red circle", "a blue square on a green background"]
NEGATIVES = ["blurry", "a red circle"]
KWARGS = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=5, guidance_scale=7.5,
              num_images_per_prompt=2)  # fmt: skip
SEED, BATCH = 11, 4


def init_image(size: int = 64) -> Image.Image:
    # A gradient with a bright square: structure the VAE keeps, so that img2img visibly starts from it.
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    pixels = np.stack([x, y, 1 - x * y], axis=-1)
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 1.0
    return Image.fromarray((pixels * 255).astype(np.uint8))


def mask_image(size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255  # repaint the right half
    return Image.fromarray(mask)


def generators():
    # What our `seed=SEED` gives: image i its own CPU generator seeded SEED + i.
    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(BATCH)]


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.set_scheduler("dpm++")


@pytest.fixture(scope="module")
def img2img_reference(_sd_pipeline_once):
    from diffusers import StableDiffusionImg2ImgPipeline

    reference = StableDiffusionImg2ImgPipeline(**_sd_pipeline_once.components)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="module")
def inpaint_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a randomly initialised 9-input-channel (inpainting) UNet of the same architecture."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("models") / "tiny-inpaint"
    shutil.copytree(tiny_model_dir, folder)
    config = dict(UNet2DConditionModel.load_config(tiny_model_dir, subfolder="unet"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def inpaint_pipes(tiny_pipe, _sd_pipeline_once, inpaint_model_dir):
    """{unet channels: (ours, diffusers' StableDiffusionInpaintPipeline)} on the same components."""
    from diffusers import StableDiffusionInpaintPipeline

    nine = LDMInference.from_pretrained(inpaint_model_dir, device="cpu")
    pipes = {}
    for channels, ours in ((4, tiny_pipe), (9, nine)):
        components = {**_sd_pipeline_once.components, "unet": ours.unet}
        reference = StableDiffusionInpaintPipeline(**components)
        reference.set_progress_bar_config(disable=True)
        pipes[channels] = ours, reference
    assert nine.unet.config.in_channels == 9
    return pipes


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler_a"])
def test_img2img_parity_with_diffusers(pipe, img2img_reference, name, strength):
    pipe.set_scheduler(name)
    image = init_image()
    ours = pipe.generate(image=image, strength=strength, seed=SEED, output_type="np", progress=False, **KWARGS)
    img2img_reference.scheduler = make_scheduler(name, pipe.base_scheduler_config)
    theirs = img2img_reference(image=image, strength=strength, generator=generators(), output_type="np",
                               **KWARGS).images  # fmt: skip
    diff = np.abs(ours - theirs).max()
    print(f"img2img {name} strength={strength}: max abs diff {diff:.2e}")
    assert ours.shape == (BATCH, 64, 64, 3) and diff <= 1e-4


@pytest.mark.parametrize("strength", [1.0, 0.75])
@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler_a"])
@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_parity_with_diffusers(inpaint_pipes, channels, name, strength):
    ours, reference = inpaint_pipes[channels]
    ours.set_scheduler(name)
    image, mask = init_image(), mask_image()
    try:
        result = ours.generate(image=image, mask_image=mask, strength=strength, seed=SEED, output_type="np",
                               progress=False, **KWARGS)  # fmt: skip
    finally:
        ours.set_scheduler("dpm++")
    reference.scheduler = make_scheduler(name, ours.base_scheduler_config)
    # One copy of the image and mask per image: diffusers then encodes image i with generator i, as we do.
    theirs = reference(image=[image] * BATCH, mask_image=[mask] * BATCH, strength=strength, height=64, width=64,
                       generator=generators(), output_type="np", **KWARGS).images  # fmt: skip
    diff = np.abs(result - theirs).max()
    print(f"inpaint unet={channels} {name} strength={strength}: max abs diff {diff:.2e}")
    assert result.shape == (BATCH, 64, 64, 3) and diff <= 1e-4


def test_img2img_follows_the_image_more_at_low_strength(pipe):
    # The tiny VAE is random (its reconstructions are poor), so compare two init images rather than pixels: at low
    # strength their outputs differ as the images do, at strength 1 the noise has washed most of that out.
    pipe.set_scheduler("ddim")
    flipped = init_image().transpose(Image.FLIP_LEFT_RIGHT)

    def spread(strength):
        kwargs = dict(seed=0, strength=strength, num_inference_steps=10, output_type="np", progress=False)
        a, b = (pipe.generate("a red circle", image=image, **kwargs) for image in (init_image(), flipped))
        return np.abs(a - b).mean()

    assert spread(0.2) > 2 * spread(1.0)


def test_legacy_inpainting_keeps_the_unmasked_part(pipe):
    pipe.set_scheduler("ddim")
    kwargs = dict(strength=1.0, num_inference_steps=4, output_type="latent", progress=False)
    a = pipe.generate("a red circle", image=init_image(), mask_image=mask_image(), seed=1, **kwargs)
    b = pipe.generate("a red circle", image=init_image(), mask_image=mask_image(), seed=2, **kwargs)
    # Left half kept: only the posterior sample of the init image (drawn per seed) differs there; right half repainted.
    left, right = np.abs(a - b)[..., :8], np.abs(a - b)[..., 8:]
    assert right.mean() > 5 * left.mean()


def test_image_inputs_of_every_type(pipe):
    pipe.set_scheduler("ddim")
    kwargs = dict(seed=3, strength=0.6, num_inference_steps=3, output_type="np", progress=False)
    from_pil = pipe.generate("a red circle", image=init_image(), **kwargs)
    array = np.asarray(init_image(), dtype=np.float32) / 255
    from_np = pipe.generate("a red circle", image=array, **kwargs)
    tensor = torch.from_numpy(array).permute(2, 0, 1) * 2 - 1
    from_pt = pipe.generate("a red circle", image=tensor, **kwargs)
    from_list = pipe.generate("a red circle", image=[init_image()], **kwargs)
    for other in (from_np, from_pt, from_list):
        assert np.abs(from_pil - other).max() <= 1e-4


def test_size_defaults_to_the_image_and_one_image_per_output_is_taken(pipe):
    kwargs = dict(seed=0, strength=0.5, num_inference_steps=2, output_type="np", progress=False)
    assert pipe.generate("a red circle", image=init_image(32), **kwargs).shape == (1, 32, 32, 3)
    images = [init_image(), init_image().transpose(Image.FLIP_LEFT_RIGHT)]
    assert pipe.generate("a red circle", image=images, num_images_per_prompt=2, **kwargs).shape == (2, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=1.5), r"`strength` must be in \[0, 1\], got 1.5"),
        (dict(strength=-0.1), r"`strength` must be in \[0, 1\]"),
        (dict(strength=0.1, num_inference_steps=5), "`strength` 0.1 keeps no step of 5"),
        (dict(image=None, mask_image=mask_image()), "`mask_image` needs an `image`"),
        (dict(image=init_image(62)), "`image` size 62x62 must be a multiple of 4"),
        (dict(mask_image=mask_image(32)), "`mask_image` must be one mask, or one per image, of the image's size"),
        (dict(image=[init_image(), init_image(32)]), "All images of `image` must have one size"),
        (dict(image=[init_image()] * 3, num_images_per_prompt=2), "`image` has 3 images: pass one, or one per image"),
        (dict(image="picture.png"), "`image` must be a PIL image, a numpy array, a torch tensor"),
        (dict(height=62), "`height` must be a positive multiple of 4"),
    ],
)
def test_bad_image_arguments_raise_before_any_work(pipe, kwargs, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before every check ran")

    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    kwargs = {"prompt": "a red circle", "image": init_image(), **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(**kwargs, progress=False)


def test_nine_channel_unet_needs_a_mask(inpaint_pipes):
    ours, _ = inpaint_pipes[9]
    with pytest.raises(ValueError, match="9 input channels"):
        ours.generate("a red circle", seed=0, num_inference_steps=2, progress=False)


def test_strength_and_image_hashes_are_recorded(pipe, tmp_path):
    from ldm_tune.inference_image import image_sha256
    from ldm_tune.png_info import read_generation

    pipe.generate("a red circle", image=init_image(), mask_image=mask_image(), strength=0.75, seed=0,
                  num_inference_steps=4, output_path=tmp_path, progress=False)  # fmt: skip
    record = json.loads((tmp_path / "00000.json").read_text())
    assert record["strength"] == 0.75
    assert record["init_image_sha256"] == image_sha256(init_image()) and len(record["init_image_sha256"]) == 64
    assert record["mask_sha256"] == image_sha256(mask_image()) != record["init_image_sha256"]
    document, _ = read_generation(tmp_path / "00000-00.png")
    assert document["strength"] == 0.75 and document["mask_sha256"] == record["mask_sha256"]
    pipe.generate("a red circle", seed=0, num_inference_steps=2, output_path=tmp_path, progress=False)
    plain = json.loads((tmp_path / "00001.json").read_text())
    assert plain["strength"] is None and plain["init_image_sha256"] is None
    # A1111's infotext names the strength of an img2img/inpaint image, and only then.
    assert "Denoising strength: 0.75" in Image.open(tmp_path / "00000-00.png").text["parameters"]
    assert "Denoising strength" not in Image.open(tmp_path / "00001-00.png").text["parameters"]


def write_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    init_image().save(folder / "init.png")
    mask_image().save(folder / "mask.png")
    mask_image(32).save(folder / "small-mask.png")
    (folder / "notes.png").write_text("not an image")
    return folder


def test_cli_img2img_and_inpainting_record_their_inputs(tiny_model_dir, tmp_path):
    from ldm_tune.cli import main
    from ldm_tune.inference_image import image_sha256

    inputs = write_inputs(tmp_path / "inputs")
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "4", "--seed", "3"]
    assert main([*base, "--init-image", str(inputs / "init.png"), "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--init-image", str(inputs / "init.png"), "--mask", str(inputs / "mask.png"), "--strength",
                 "0.5", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    img2img = json.loads((tmp_path / "a" / "00000.json").read_text())
    inpaint = json.loads((tmp_path / "b" / "00000.json").read_text())
    assert img2img["strength"] == 0.8 and img2img["mask_sha256"] is None
    assert img2img["init_image_sha256"] == image_sha256(init_image())
    assert inpaint["strength"] == 0.5 and inpaint["mask_sha256"] == image_sha256(mask_image())
    # --from-png needs the init image again, and then makes the very same image.
    png = tmp_path / "b" / "00000-00.png"
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "c")]) == 2
    again = ["generate", "--from-png", str(png), "--init-image", str(inputs / "init.png"), "--mask",
             str(inputs / "mask.png"), "--out", str(tmp_path / "c")]  # fmt: skip
    assert main(again) == 0
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "c" / "00000-00.png")))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init-image", "{in}/missing.png"], "`init_image` .*missing.png' does not exist"),
        (["--init-image", "{in}/notes.png"], "`init_image` .*notes.png' is not a readable image"),
        (["--init-image", "{in}/init.png", "--strength", "2"], r"`strength` \(--strength\) must be in \[0, 1\]"),
        (["--strength", "0.5"], r"`strength` \(--strength\) needs an init image"),
        (["--mask", "{in}/mask.png"], r"`mask_image` \(--mask\) needs an `image`"),
        (["--init-image", "{in}/init.png", "--mask", "{in}/small-mask.png"], r"`mask_image` \(--mask\) must be one"),
    ],
)
def test_cli_image_flags_are_checked_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch, flags,
                                                            message):  # fmt: skip
    import re

    from ldm_tune.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(LDMInference, "from_pretrained", no_loading)
    inputs = write_inputs(tmp_path / "inputs")
    flags = [flag.replace("{in}", str(inputs)) for flag in flags]
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "out"), *flags]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
