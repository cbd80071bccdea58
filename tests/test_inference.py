import json

import numpy as np
import pytest
import torch

from ldm_tune.inference import LDMInference
from ldm_tune.schedulers import make_scheduler, scheduler_names


PROMPTS = ["a red circle", "a blue square on a green background"]
NEGATIVES = ["blurry", "a red circle"]


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.set_scheduler("dpm++")


def reference(sd_pipeline, pipe, name, seed, **kwargs):
    # Our `seed=s` gives image i its own CPU generator seeded s + i (A1111's rule): diffusers takes such a list too.
    sd_pipeline.scheduler = make_scheduler(name, pipe.base_scheduler_config)
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    count = len(prompts) * kwargs.get("num_images_per_prompt", 1)
    generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
    return sd_pipeline(generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize("name", scheduler_names())
def test_parity_with_stable_diffusion_pipeline(pipe, sd_pipeline, name):
    kwargs = dict(
        prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, num_images_per_prompt=2
    )
    pipe.set_scheduler(name)
    ours = pipe.generate(seed=11, output_type="np", progress=False, **kwargs)
    theirs = reference(sd_pipeline, pipe, name, 11, **kwargs)
    assert ours.shape == theirs.shape == (4, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert 0.05 < ours.std() and ((ours > 0.01) & (ours < 0.99)).mean() > 0.5  # real images, not saturated


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt="a red circle", guidance_scale=1.0, num_inference_steps=3),
        dict(prompt=PROMPTS, guidance_scale=5.0, guidance_rescale=0.7, num_inference_steps=3),
        dict(prompt="a red circle", negative_prompt="green", guidance_scale=3.0, eta=0.5, num_inference_steps=3),
    ],
)
def test_parity_without_guidance_with_rescale_and_eta(pipe, sd_pipeline, kwargs):
    pipe.set_scheduler("ddim")
    ours = pipe.generate(seed=5, output_type="np", progress=False, **kwargs)
    assert np.abs(ours - reference(sd_pipeline, pipe, "ddim", 5, **kwargs)).max() <= 1e-4


def test_same_seed_same_image_other_seed_other_image(pipe):
    def run(seed):
        return pipe.generate("a red circle", seed=seed, num_inference_steps=3, output_type="np", progress=False)

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_guidance_changes_the_image(pipe):
    def run(guidance):
        kwargs = {"seed": 1, "num_inference_steps": 3, "output_type": "np", "progress": False}
        return pipe.generate("a red circle", guidance_scale=guidance, **kwargs)

    assert np.abs(run(1.0) - run(7.5)).max() > 1e-2


def test_cfg_is_one_batched_unet_call_and_off_at_scale_one(pipe):
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        pipe.generate(
            PROMPTS, seed=0, num_inference_steps=2, guidance_scale=7.5, num_images_per_prompt=3, progress=False
        )
        pipe.generate(PROMPTS, seed=0, num_inference_steps=2, guidance_scale=1.0, progress=False)
    finally:
        hook.remove()
    assert batches == [12, 12, 2, 2]


def test_returns_pil_images_per_prompt(pipe):
    images = pipe.generate(PROMPTS, seed=0, num_inference_steps=2, num_images_per_prompt=2, progress=False)
    assert len(images) == 4 and images[0].size == (64, 64) and images[0].mode == "RGB"


def test_callback_receives_step_timestep_latents(pipe):
    seen = []
    pipe.set_scheduler("ddim")
    final = pipe.generate(
        "a red circle",
        seed=0,
        num_inference_steps=4,
        output_type="latent",
        progress=False,
        callback=lambda i, t, latents: seen.append((i, int(t), latents.clone())),
    )
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], final) and seen[0][2].shape == (1, 4, 16, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=62), "`height` must be a positive multiple of 4"),
        (dict(width=0), "`width` must be a positive multiple of 4"),
        (dict(num_inference_steps=0), r"`num_inference_steps` must be an integer in \[1, 999\]"),
        (dict(num_inference_steps=1000), r"`num_inference_steps` must be .* use timestep_spacing='trailing'"),
        (dict(prompt=[]), "`prompt` must not be an empty list"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "`negative_prompt` has 1 entries but `prompt` has 2"),
        (dict(guidance_rescale=1.5), r"`guidance_rescale` must be in \[0, 1\]"),
        (dict(num_images_per_prompt=0), "`num_images_per_prompt` must be an integer >= 1"),
        (dict(seed=1, generator=torch.Generator().manual_seed(1)), "either `seed` or `generator`"),
        (dict(output_type="jpeg"), "`output_type` must be one of"),
        (dict(prompt=3), "`prompt` must be a string or a list of strings"),
    ],
)
def test_bad_arguments_raise(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(**kwargs, progress=False)


def test_output_path_writes_pngs_and_reproducible_parameters(pipe, tmp_path):
    pipe.set_scheduler("euler_a")
    first = pipe.generate(
        PROMPTS,
        negative_prompt=NEGATIVES,
        seed=7,
        num_inference_steps=3,
        num_images_per_prompt=2,
        output_path=tmp_path,
        progress=False,
    )
    params = json.loads((tmp_path / "00000.json").read_text())
    assert sorted(p.name for p in tmp_path.glob("00000-*.png")) == [f"00000-{i:02d}.png" for i in range(4)]
    for key, value in dict(
        seed=7,
        scheduler="euler_a",
        num_inference_steps=3,
        guidance_scale=7.5,
        height=64,
        width=64,
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        model=str(pipe.model_name),
    ).items():
        assert params[key] == value, key
    assert params["images"][2] == {
        "file": "00000-02.png",
        "batch_index": 2,
        "prompt": PROMPTS[1],
        "negative_prompt": NEGATIVES[1],
        "seed": 9,  # image i gets seed + i
    }
    # A second call never overwrites: it takes the next run number, and its JSON reproduces the first images.
    pipe.set_scheduler("dpm++")
    keys = (
        "prompt",
        "negative_prompt",
        "seed",
        "num_inference_steps",
        "guidance_scale",
        "guidance_rescale",
        "eta",
        "num_images_per_prompt",
        "height",
        "width",
    )
    pipe.set_scheduler(params["scheduler"], **params["scheduler_overrides"])
    again = pipe.generate(**{k: params[k] for k in keys}, output_path=tmp_path, progress=False)
    assert (tmp_path / "00001.json").exists()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))


def test_random_seed_is_drawn_and_recorded(pipe, tmp_path):
    pipe.generate("a red circle", num_inference_steps=2, output_path=tmp_path, progress=False)
    seed = json.loads((tmp_path / "00000.json").read_text())["seed"]
    assert isinstance(seed, int)
    replay = pipe.generate("a red circle", num_inference_steps=2, seed=seed, output_type="np", progress=False)
    saved = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "00000-00.png"), dtype=np.float32) / 255
    assert np.abs(replay[0] - saved).max() <= 1 / 255 + 1e-6


def test_checkpoint_unet_replaces_the_base_unet(tiny_model_dir, tmp_path, sd_pipeline):
    from ldm_tune.components import load_components

    unet = load_components(tiny_model_dir).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "checkpoint-10" / "unet")
    base = LDMInference.from_pretrained(tiny_model_dir, device="cpu", scheduler="ddim")
    tuned = LDMInference.from_pretrained(
        tiny_model_dir, checkpoint=tmp_path / "checkpoint-10", device="cpu", scheduler="ddim"
    )
    kwargs = dict(prompt="a red circle", seed=3, num_inference_steps=3, output_type="np", progress=False)
    a, b = base.generate(**kwargs), tuned.generate(**kwargs)
    assert np.abs(a - b).max() > 1e-3
    direct = LDMInference.from_pretrained(
        tiny_model_dir, checkpoint=tmp_path / "checkpoint-10" / "unet", device="cpu", scheduler="ddim"
    )
    assert np.array_equal(direct.generate(**kwargs), b)


def test_auto_device_and_dtype_on_this_machine(pipe):
    from ldm_tune.components import default_dtype, resolve_device

    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert pipe.dtype == torch.float32


def test_every_training_timestep_with_trailing_spacing(pipe):
    pipe.set_scheduler("ddpm", timestep_spacing="trailing")
    latents = pipe.generate("a red circle", seed=0, num_inference_steps=1000, output_type="latent", progress=False)
    assert torch.isfinite(latents).all() and pipe.scheduler.timesteps[0] == 999
