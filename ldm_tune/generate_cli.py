"""`ldm-tune generate`: every argument is checked before any model loads, and `--from-png` makes an image again.

The checks read only the model's scheduler and VAE configs (two small JSON files) and build the sampler from them,
so a bad sampler name, a size that is not a multiple of the VAE factor, a step count out of range, a missing
model, checkpoint or LoRA file, or an unavailable device fails in a second, not after minutes of loading.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch
import yaml


logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULTS = {"scheduler": "dpm++", "steps": 30, "guidance": 7.5, "guidance_rescale": 0.0, "eta": 0.0, "num_images": 1}
DEFAULT_STRENGTH = 0.8  # as `LDMInference.generate` and diffusers' img2img pipeline
# Library argument -> CLI flag, so that an error names the flag to fix as well.
_FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "guidance_rescale": "--guidance-rescale",
    "num_images_per_prompt": "--num-images",
    "scheduler": "--scheduler",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "eta": "--eta",
    "scheduler_arg": "--scheduler-arg",
    "strength": "--strength",
    "image": "--init-image",
    "mask_image": "--mask",
    "clip_skip": "--clip-skip",
    "batches": "--batches",
    "cpu_offload": "--cpu-offload",
}
# A LoRA path may itself contain ':' (or be a Windows path): only a final ':<decimal number>' is a scale.
_LORA_SCALE = re.compile(r"^(?P<path>.+):(?P<scale>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)  # YAML typing: true -> bool, 0.5 -> float, karras -> str


def _lora_arg(text: str) -> tuple[str, float]:
    match = _LORA_SCALE.match(text)
    return (match["path"], float(match["scale"])) if match else (text, 1.0)


def add_generate_parser(sub) -> None:
    """The `generate` subcommand. Setting flags default to None so that `--from-png` knows which were given."""
    parser = sub.add_parser("generate", help="Generate images from a model folder or hub id.")
    add = parser.add_argument
    add("--model", help="Stable-Diffusion-format folder, single-file .safetensors/.ckpt checkpoint, or hub id "
        "`owner/name` (default with --from-png: its own).")  # fmt: skip
    add("--config", help="For a single-file --model: a diffusers-format folder of its architecture (configs and "
        "tokenizer); default: the shipped SD 1.5 / SD 2.1 configs.")  # fmt: skip
    add("--from-png", metavar="FILE", help="Make this PNG (written by `ldm-tune generate`) again from the settings "
        "in it; any other flag given replaces the recorded value.")  # fmt: skip
    add("--checkpoint", help="Training checkpoint or output folder whose UNet replaces the base UNet (its EMA "
        "weights when it has them) and whose prediction_type is used.")  # fmt: skip
    add("--no-ema", action="store_true", default=None, help="With --checkpoint: use its raw UNet weights (unet/), "
        "not the EMA ones (unet_ema/, the default when present).")  # fmt: skip
    add("--lora", action="append", type=_lora_arg, metavar="PATH[:SCALE]",
        help="LoRA .safetensors file (diffusers or kohya format) or training output folder, with an optional scale "
        "(default 1; 0 turns it off); repeat the flag for several.")  # fmt: skip
    add("--prompt", action="append", help="Prompt; repeat the flag for several. A1111 syntax: (word) x1.1, "
        "(word:1.3), [word] /1.1, \\( for a literal '(', BREAK for a new 75-token chunk; no 77-token limit.")  # fmt: skip
    add("--negative-prompt", action="append", help="Negative prompt: once for all prompts, or once per --prompt.")
    add("--scheduler", help="Sampler name (see `ldm-tune schedulers`; default dpm++).")
    add("--scheduler-arg", action="append", type=_key_value, metavar="KEY=VALUE",
        help="Scheduler constructor override, e.g. use_karras_sigmas=true or timestep_spacing=trailing.")  # fmt: skip
    add("--steps", type=int, help="Number of sampling steps (default 30).")
    add("--guidance", type=float, help="Classifier-free guidance scale (default 7.5; <= 1: off).")
    add("--guidance-rescale", type=float, help="CFG rescale in [0, 1] (default 0; arXiv 2305.08891).")
    add("--eta", type=float, help="DDIM eta (default 0: deterministic).")
    add("--seed", type=int, help="Seed of the first image; image i gets seed + i (omitted or -1: drawn, recorded).")
    add("--clip-skip", type=int, metavar="N", help="Skip the last N text encoder layers (default: none). A1111's "
        "\"Clip skip: 2\" is --clip-skip 1.")  # fmt: skip
    add("--num-images", type=int, help="Images per prompt (default 1).")
    add("--height", type=int, help="Image height (default: the model's native size).")
    add("--width", type=int, help="Image width (default: the model's native size).")
    add("--init-image", metavar="PATH", help="Start from this image (img2img; inpainting with --mask); the output "
        "size defaults to its size.")  # fmt: skip
    add("--strength", type=float, help="With --init-image: how much of it is repainted, in [0, 1] (default 0.8).")
    add("--mask", metavar="PATH", help="Inpainting mask for --init-image, of its size: white is repainted.")
    add("--batches", type=int, help="Run N batches of --num-images per prompt (default 1), seeds continuing: with "
        "one prompt, --batches 2 --num-images 2 makes the images of --num-images 4, two at a time.")  # fmt: skip
    add("--vae-slicing", action="store_true", help="Decode one image at a time (less memory, same images).")
    add("--vae-tiling", action="store_true", help="Decode in overlapping tiles, for images larger than the model's "
        "native size (pixels near the seams change; recorded).")  # fmt: skip
    add("--attention-slicing", action="store_true", help="Compute attention a few heads at a time (less memory, "
        "slower; for GPUs without PyTorch 2's fused attention).")  # fmt: skip
    add("--cpu-offload", action="store_true", help="CUDA only: keep the models in CPU memory, each on the GPU only "
        "while it runs.")  # fmt: skip
    add("--compile", action="store_true", help="torch.compile the UNet (the first batch compiles, later ones "
        "run faster).")  # fmt: skip
    add("--compile-frozen", action="store_true", help="torch.compile the UNet with its weights compiled in "
        "(inductor freezing; see the README's speed table: it depends on the model; LoRAs cannot change after).")  # fmt: skip
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    add("--dtype", choices=list(DTYPES), help="Model dtype (default: fp16 on CUDA, fp32 elsewhere).")
    add("--revision", help="Hub revision of --model.")
    add("--variant", help="Weights variant of --model, e.g. fp16.")
    add("--out", required=True, help="Folder for the PNGs, the grid and the parameters JSON.")


def generate_settings(args) -> dict:
    """Defaults, then the settings recorded in `--from-png`, then every flag given."""
    settings = {**DEFAULTS, "lora": [], "scheduler_arg": {}, "negative_prompt": "", "prompt": None, "model": None}
    settings["use_ema"] = True
    settings.update(dict.fromkeys(("checkpoint", "revision", "variant", "height", "width", "seed", "save_images")))
    settings.update(dict.fromkeys(("init_image", "mask", "strength", "clip_skip", "vae_tiling", "attention_slicing")))
    settings["config"] = None
    if args.from_png is not None:
        from ldm_tune.png_info import recorded_settings

        # Only an image made again with its whole batch is exact; a new prompt, seed or count makes a new batch.
        alone = any(getattr(args, key) is not None for key in ("prompt", "negative_prompt", "seed", "num_images"))
        settings.update(recorded_settings(args.from_png, replay=not alone))
        if args.scheduler is not None:  # the recorded overrides belong to the recorded sampler
            settings["scheduler_arg"] = {}
    given = {key: getattr(args, key) for key in ("model", "checkpoint", "revision", "variant", "lora", "scheduler",
             "prompt", "height", "width", "steps", "guidance", "guidance_rescale", "eta", "seed", "num_images",
             "init_image", "mask", "strength", "clip_skip", "config")}  # fmt: skip
    settings.update({key: value for key, value in given.items() if value is not None})
    settings["scheduler_arg"] = {**settings["scheduler_arg"], **dict(args.scheduler_arg or [])}
    if getattr(args, "no_ema", None):
        settings["use_ema"] = False
    settings["vae_tiling"] = settings["vae_tiling"] or (True if args.vae_tiling else None)  # True: the VAE's size
    settings["attention_slicing"] = settings["attention_slicing"] or ("auto" if args.attention_slicing else None)
    compile_setting = "freezing" if args.compile_frozen else args.compile
    settings.update(vae_slicing=args.vae_slicing, cpu_offload=args.cpu_offload, compile=compile_setting)
    settings["batches"] = 1 if args.batches is None else args.batches
    if args.negative_prompt is not None:
        negative = args.negative_prompt
        settings["negative_prompt"] = negative[0] if len(negative) == 1 else negative
    if settings["init_image"] is not None and settings["strength"] is None:
        settings["strength"] = DEFAULT_STRENGTH
    settings.update(device=args.device, dtype=args.dtype, out=args.out)
    return settings


def _check_device(name: str) -> torch.device:
    from ldm_tune.components import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as error:
        raise ValueError(f"`device` {name!r} is not a device name: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {name!r}: CUDA is not available on this machine (use --device cpu or auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` {name!r}: MPS is not available on this machine (use --device cpu or auto).")
    return device


def _read_configs(model: str, kind: str, revision: str | None) -> tuple[dict, dict]:
    """The model's scheduler and VAE configs: two small JSON files, read (or fetched) before any weights."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from huggingface_hub import constants

    try:
        scheduler_config = dict(DDPMScheduler.load_config(model, subfolder="scheduler", revision=revision))
        vae_config = dict(AutoencoderKL.load_config(model, subfolder="vae", revision=revision))
    except OSError as error:
        if kind == "local":
            raise ValueError(f"`model` {model!r}: its configs could not be read: {error}") from error
        reason = (
            "HF_HUB_OFFLINE is set and it is not in the local hub cache"
            if constants.HF_HUB_OFFLINE
            else f"the hub did not serve it ({str(error).splitlines()[0]})"
        )
        raise FileNotFoundError(
            f"`model` {model!r} is taken for a hub id (`owner/name`, and no local file or folder of that name "
            f"exists), but {reason}. For a local folder, check the path."
        ) from error
    return scheduler_config, vae_config


def open_image(path, flag: str, mode: str = "RGB"):
    """The image at `path`, fully read (a truncated or non-image file fails here, not after the model loads)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"`{flag}` {str(path)!r} does not exist.")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"`{flag}` {str(path)!r} is not a readable image: {error}") from error


def load_image_settings(settings: dict) -> tuple[object, object]:
    """The init image and mask of the settings (None without them), checked against what `--from-png` recorded."""
    from ldm_tune.inference_image import image_sha256

    recorded = settings.get("recorded_image_sha256") or {}
    if settings["init_image"] is None and recorded.get("image"):
        raise ValueError(f"`--from-png` image was made from an init image (sha256 {recorded['image']}): pass it "
                         "again with --init-image.")  # fmt: skip
    if settings["init_image"] is None and settings.get("strength") is not None:
        raise ValueError("`strength` needs an init image (--init-image).")
    image = None if settings["init_image"] is None else open_image(settings["init_image"], "init_image")
    mask = None if settings["mask"] is None else open_image(settings["mask"], "mask", mode="L")
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and recorded.get(name) and image_sha256(value) != recorded[name]:
            logger.warning("The %s differs from the one the image was made from (sha256 differs).", name)
    return image, mask


def check_generate_settings(settings: dict) -> tuple[object, object]:
    """Every check that needs no weights: files, device, sampler and every generation argument. Returns the init
    image and mask, read (None without them)."""
    from ldm_tune.components import check_model_folder, check_model_source
    from ldm_tune.generation_params import GenerationParams, check_generation_inputs
    from ldm_tune.inference_image import check_image_inputs
    from ldm_tune.lora_files import resolve_lora_file
    from ldm_tune.schedulers import make_scheduler
    from ldm_tune.single_file import is_single_file, single_file_configs

    if settings.get("model") is None:
        raise ValueError("`--model` is required (or --from-png FILE of an image that records its model).")
    if not settings.get("prompt"):
        raise ValueError("`--prompt` is required (or --from-png FILE).")
    kind = check_model_source(settings["model"])
    single = kind == "local" and is_single_file(settings["model"])
    if kind == "local" and not single:
        check_model_folder(settings["model"])
    if settings["checkpoint"] is not None and not Path(settings["checkpoint"]).exists():
        raise FileNotFoundError(f"`checkpoint` {str(settings['checkpoint'])!r} does not exist.")
    for path, _ in settings["lora"]:
        resolve_lora_file(path)
    out = Path(settings["out"])
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"`out` {str(out)!r} is a file, not a folder.")
    device = _check_device(settings["device"])
    batches = settings["batches"]
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"`batches` must be an integer >= 1, got {batches!r}.")
    if settings["cpu_offload"] and device.type != "cuda":
        raise ValueError(f"`cpu_offload` needs a CUDA device, got {str(device)!r}: on the CPU the models already sit "
                         "in CPU memory.")  # fmt: skip
    if single:  # the file's header and its config folder (or the shipped one): no weights read yet
        scheduler_config, vae_config = single_file_configs(settings["model"], settings.get("config"))
    else:
        scheduler_config, vae_config = _read_configs(str(settings["model"]), kind, settings.get("revision"))
    scheduler = make_scheduler(settings["scheduler"], scheduler_config, **settings["scheduler_arg"])
    factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    image, mask = load_image_settings(settings)
    # The UNet's channels are not known before it loads: a 9-channel UNet without a mask is refused then.
    size = check_image_inputs(image, mask, settings["strength"], settings["steps"], factor, None) or (factor, factor)
    params = GenerationParams(
        settings["prompt"],
        settings["negative_prompt"],
        size[0] if settings.get("height") is None else settings["height"],  # None: the native size, always valid
        size[1] if settings.get("width") is None else settings["width"],
        settings["steps"],
        settings["guidance"],
        settings["guidance_rescale"],
        settings["eta"],
        settings["num_images"],
        settings.get("seed"),
        clip_skip=settings["clip_skip"],
    )
    check_generation_inputs(params, scheduler, factor)
    try:
        scheduler.set_timesteps(settings["steps"])  # refuses bad values of overrides, e.g. timestep_spacing=middle
    except ValueError as error:
        raise ValueError(f"`scheduler_arg` {settings['scheduler_arg']} of the {settings['scheduler']} sampler: "
                         f"{error}") from error  # fmt: skip
    return image, mask


def _dtype(settings: dict, device: torch.device) -> torch.dtype | None:
    if settings["dtype"] is not None:
        return DTYPES[settings["dtype"]]
    recorded, on = settings.get("recorded_dtype"), settings.get("recorded_device")
    # Pixels repeat only in the recorded dtype; on another kind of device keep that device's default dtype.
    if recorded and on and torch.device(on).type == device.type:
        return getattr(torch, recorded)
    if recorded and on:
        logger.warning("The image was made on %s in %s; on %s its pixels will differ slightly.", on, recorded, device)
    return None


def _name_flags(error: ValueError) -> ValueError:
    message = str(error)
    for name, flag in _FLAGS.items():
        if message.startswith(f"`{name}`"):
            return ValueError(message.replace(f"`{name}`", f"`{name}` ({flag})", 1))
    return error


def _load_pipeline(settings: dict):
    """The model on its device, with the sampler and every memory and speed switch of the settings."""
    from ldm_tune.components import default_dtype
    from ldm_tune.host_memory import keep_freed_memory
    from ldm_tune.inference import LDMInference

    keep_freed_memory()  # a process of its own: no page faults for each step's large activations on a CPU
    device = _check_device(settings["device"])
    pipe = LDMInference.from_pretrained(
        settings["model"],
        checkpoint=settings["checkpoint"],
        scheduler=settings["scheduler"],
        device="cpu" if settings["cpu_offload"] else device,  # offload moves each model to `device` as it runs
        torch_dtype=_dtype(settings, device) or default_dtype(device),
        revision=settings["revision"],
        variant=settings["variant"],
        lora=settings["lora"],
        use_ema=settings["use_ema"],
        config=settings["config"],
    )
    if settings["scheduler_arg"]:
        pipe.set_scheduler(settings["scheduler"], **settings["scheduler_arg"])
    if settings["cpu_offload"]:
        pipe.enable_model_cpu_offload(device=device)
    if settings["vae_slicing"]:
        pipe.enable_vae_slicing()
    if settings["vae_tiling"]:
        pipe.enable_vae_tiling(None if settings["vae_tiling"] is True else settings["vae_tiling"])
    if settings["attention_slicing"]:
        pipe.enable_attention_slicing(settings["attention_slicing"])
    if settings["compile"]:  # after the LoRAs (loaded by from_pretrained): frozen weights cannot change later
        pipe.compile_unet(freeze=settings["compile"] == "freezing")
    return pipe


def _generate_batches(pipe, settings: dict, image, mask) -> list[dict]:
    """`--batches` calls, each writing its own run; image i over all of them gets seed + i (A1111's batch count)."""
    from ldm_tune.generation_params import resolve_seed

    prompts = settings["prompt"]
    per_batch = (1 if isinstance(prompts, str) else len(prompts)) * settings["num_images"]
    # One drawn seed for all batches, so their seeds continue.
    seed = settings["seed"] if settings["batches"] == 1 else resolve_seed(settings["seed"])
    written = []
    for batch in range(settings["batches"]):
        pipe.generate(
            prompts,
            negative_prompt=settings["negative_prompt"],
            height=settings["height"],
            width=settings["width"],
            num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance"],
            guidance_rescale=settings["guidance_rescale"],
            eta=settings["eta"],
            num_images_per_prompt=settings["num_images"],
            seed=None if seed is None else seed + batch * per_batch,
            output_path=settings["out"],
            save_grid=True,
            save_images=settings["save_images"],
            clip_skip=settings["clip_skip"],
            **({} if image is None else {"image": image, "mask_image": mask, "strength": settings["strength"]}),
        )
        written.append(pipe.last_output_files)
    return written


def run_generate(args) -> None:
    """Check every setting, then load the model and write the images."""
    settings = generate_settings(args)
    try:
        image, mask = check_generate_settings(settings)  # before any model loads
    except ValueError as error:
        raise _name_flags(error) from error
    written = _generate_batches(_load_pipeline(settings), settings, image, mask)
    grids = [files["grid"] for files in written if files["grid"]]
    grid = f", grid{'s' if len(grids) > 1 else ''} {', '.join(map(str, grids))}" if grids else ""
    params = ", ".join(str(files["params"]) for files in written)
    print(f"Wrote {sum(len(files['images']) for files in written)} images{grid} and parameters {params}")
