"""The settings of a generated image inside its PNG: A1111's `parameters` text and our full JSON.

Every PNG carries two text chunks:

- `parameters`: AUTOMATIC1111's "infotext" (`modules/processing.py`, `create_infotext`), which A1111's "PNG Info"
  tab, civitai and most image viewers show:

      a red circle <lora:style:0.8>
      Negative prompt: blurry
      Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512,
      Model hash: 3f9c1b2a4d, Model: sd15, Clip skip: 2, Lora hashes: "style: 0123456789ab", Version: ldm_tune 0.1.0

  (one line of fields in the file). Values holding ',', ':' or a newline are JSON-quoted as A1111's
  `infotext_utils.quote` does; the negative prompt line is left out when empty.
- `ldm_tune`: the full parameters JSON of the run (as in `00000.json`) plus `image`, this image's own record
  (file, prompt, negative prompt, seed). `ldm-tune generate --from-png FILE` reads it back (`recorded_settings`).

Model hash: A1111's "AutoV2" hash is the first 10 hex digits of the sha256 of the checkpoint file. A diffusers
model is a folder with no single checkpoint file, so the UNet's weights file is hashed (the part fine-tuning
changes; shards are hashed as one stream, in order). It is left out for a UNet that was never read from a file
(the trainer's validation images). LoRA hashes are A1111's "AutoV3": the sha256 of the safetensors file after its
header (`modules/hashes.py`, `addnet_hash_safetensors`), first 12 hex digits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


logger = logging.getLogger(__name__)


PARAMETERS_KEY = "parameters"
JSON_KEY = "ldm_tune"

# Registry name -> A1111 sampler name (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py). ddpm and deis
# have no A1111 counterpart and keep their registry names.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "dpm++": "DPM++ 2M",
    "dpm++_karras": "DPM++ 2M",
    "dpm++_sde": "DPM++ 2M SDE",
    "euler": "Euler",
    "euler_a": "Euler a",
    "lms": "LMS",
    "heun": "Heun",
    "kdpm2": "DPM2",
    "kdpm2_a": "DPM2 a",
    "unipc": "UniPC",
}
# Scheduler config flag -> A1111 "Schedule type" (A1111 1.9+ writes the sigma schedule apart from the sampler).
_SCHEDULE_TYPES = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "Exponential", "use_beta_sigmas": "Beta"}


def _quote(value) -> str:
    # As modules/infotext_utils.py `quote`: JSON-quote values that would break the "key: value, ..." line.
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _sha256_of(files: list[Path], skip_header: bool = False) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            if skip_header:
                # A safetensors file starts with an 8-byte little-endian header length, then the JSON header.
                (length,) = struct.unpack("<Q", handle.read(8))
                handle.seek(8 + length)
            for block in iter(lambda handle=handle: handle.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The full sha256 of a file (hex)."""
    return _sha256_of([Path(path)])


def weights_hash(files: list[Path]) -> str:
    """A1111's AutoV2 hash of a model: the first 10 hex digits of the sha256 of its weight file(s)."""
    return _sha256_of(files)[:10]


@functools.lru_cache(maxsize=64)
def _lora_hash(path: str, sha256: str) -> str:
    # Keyed by the file's full sha256 as well, so an edited file is hashed again.
    return _sha256_of([Path(path)], skip_header=True)[:12]


def lora_hash(path: str | os.PathLike, sha256: str = "") -> str | None:
    """A1111's AutoV3 hash of a LoRA safetensors file (None when the file is gone or unreadable)."""
    try:
        return _lora_hash(str(path), sha256)
    except (OSError, struct.error):
        return None


def _weights_in(folder: Path, variant: str | None) -> list[Path] | None:
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    if (folder / f"{stem}.safetensors").is_file():
        return [folder / f"{stem}.safetensors"]
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    return shards or None


def unet_weight_files(model, checkpoint=None, variant: str | None = None, revision: str | None = None):
    """The safetensors file(s) the UNet was read from, as `load_components` reads them (None when unknown)."""
    if checkpoint is not None:
        folder = Path(checkpoint)
        return _weights_in(folder / "unet" if (folder / "unet" / "config.json").is_file() else folder, None)
    if Path(model).is_file():  # a single-file checkpoint: A1111 hashes the whole file
        return [Path(model)]
    if Path(model).is_dir():
        return _weights_in(Path(model) / "unet", variant)
    from huggingface_hub import try_to_load_from_cache

    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    cached = try_to_load_from_cache(str(model), f"unet/{name}", revision=revision)
    return [Path(cached)] if isinstance(cached, str) else None  # a sharded hub UNet is not hashed


def sampler_display_name(name: str) -> str:
    """A1111's name of a registry sampler (e.g. "DPM++ 2M" for dpm++), or the registry name where it has none."""
    return A1111_SAMPLER_NAMES.get(name, name)


def a1111_clip_skip(clip_skip: int | None) -> int | None:
    """A1111's "Clip skip" of diffusers' `clip_skip`, None where A1111 leaves the field out. A1111 counts the last
    layer as 1 (`opts.CLIP_stop_at_last_layers`, 1 = no skip), diffusers counts skipped layers: A1111 N is
    diffusers N - 1. A1111 writes the field only above 1 (`processing.create_infotext`)."""
    return clip_skip + 1 if clip_skip else None


def clip_skip_from_a1111(value) -> int | None:
    """diffusers' `clip_skip` of A1111's "Clip skip" field (a number or its text; None for 1 or less)."""
    layers = int(value)
    return layers - 1 if layers > 1 else None


# A1111's `infotext_utils.re_param`: `key: value` or `key: "json, quoted"`, comma-separated.
_INFOTEXT_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def infotext_fields(text: str) -> dict[str, str]:
    """The `key: value` fields of the last line of an A1111 `parameters` text (quoted values unquoted)."""
    fields = {}
    for key, value in _INFOTEXT_FIELD.findall(text.strip().splitlines()[-1] if text.strip() else ""):
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return fields


def _model_name(document: dict) -> str | None:
    model = document.get("model")
    if model is None:
        return None
    # A1111 names a model by its file name; a folder by its own name, a hub id in full.
    return model if not Path(model).exists() else Path(model).resolve().name


def infotext(document: dict, image: dict) -> str:
    """A1111's `parameters` text of one image of a run (`document` as in the run's JSON, `image` its record)."""
    config = document.get("scheduler_config") or {}
    loras = [lora for lora in document.get("loras") or [] if lora["scale"] != 0]
    hashes = {lora["adapter"]: lora_hash(lora["path"], lora.get("sha256", "")) for lora in loras}
    fields = {
        "Steps": document["num_inference_steps"],
        "Sampler": sampler_display_name(document["scheduler"]),
        "Schedule type": next((label for key, label in _SCHEDULE_TYPES.items() if config.get(key)), None),
        "CFG scale": document["guidance_scale"],
        "Seed": image.get("seed"),
        "Size": f"{document['width']}x{document['height']}",
        "Model hash": document.get("model_hash"),
        "Model": _model_name(document),
        "Checkpoint": Path(document["checkpoint"]).name if document.get("checkpoint") else None,
        "Eta": document.get("eta") or None,
        "CFG rescale": document.get("guidance_rescale") or None,
        # A1111's img2img/inpaint field; None (left out) for text-to-image.
        "Denoising strength": document.get("strength") if document.get("init_image_sha256") else None,
        "Clip skip": a1111_clip_skip(document.get("clip_skip")),
        "Lora hashes": ", ".join(f"{name}: {value}" for name, value in hashes.items() if value) or None,
        "Version": f"ldm_tune {document.get('versions', {}).get('ldm_tune', '')}".strip(),
    }
    # A1111 writes the LoRAs into the prompt as <lora:name:weight>, where its Lora extension reads them.
    prompt = " ".join([image.get("prompt", ""), *(f"<lora:{lora['adapter']}:{lora['scale']:g}>" for lora in loras)])
    negative = image.get("negative_prompt") or ""
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt.strip()}{negative_line}\n{line}"


def run_record(pipe, params) -> dict:
    """Everything needed to reproduce the images of one `LDMInference.generate` call (the `ldm_tune` JSON): model,
    checkpoint, LoRAs, sampler, every argument of `params` and the switches that change pixels."""
    return {
        "model": pipe.model_name,
        "model_hash": pipe.model_hash,
        "revision": pipe.revision,
        "variant": pipe.variant,
        "config": pipe.model_config,
        "checkpoint": pipe.checkpoint,
        "unet_weights": pipe.unet_weights,
        "prediction_type": pipe.scheduler.config.get("prediction_type"),
        "loras": [asdict(lora) for lora in pipe.loras],
        **asdict(params),
        "scheduler": pipe.scheduler_name,
        "scheduler_overrides": pipe.scheduler_overrides,
        "scheduler_config": dict(pipe.scheduler.config),
        "switches": pipe.switches,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "device": str(pipe.device),
    }


def png_metadata(document: dict, image: dict | None, parameters_of: dict | None = None) -> PngInfo:
    """The text chunks of one PNG: `parameters` (of `image`, or of `parameters_of` for a grid) and `ldm_tune`."""
    info = PngInfo()
    shown = image if image is not None else parameters_of
    if shown is not None:
        # tEXt when the text is Latin-1, else iTXt (PIL falls back by itself), as A1111 writes it.
        info.add_text(PARAMETERS_KEY, infotext(document, shown))
    info.add_itxt(JSON_KEY, json.dumps({**document, "image": image}, default=str), zip=True)
    return info


def read_generation(path: str | os.PathLike) -> tuple[dict, dict]:
    """The run's parameters and this image's record from a PNG written by `save_generation`.

    Raises:
        FileNotFoundError: no such file. ValueError: not a PNG, no `ldm_tune` chunk, or a grid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`from_png` {str(path)!r} does not exist.")
    try:
        with Image.open(path) as png:
            kind, text = png.format, dict(getattr(png, "text", {}) or {})
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"`from_png` {str(path)!r} is not a readable image: {error}") from error
    if kind != "PNG":
        raise ValueError(f"`from_png` {str(path)!r} is a {kind} file, not a PNG written by `ldm-tune generate`.")
    if JSON_KEY not in text:
        hint = " It has A1111 `parameters` text, which does not hold every setting." if PARAMETERS_KEY in text else ""
        raise ValueError(
            f"`from_png` {str(path)!r} has no `{JSON_KEY}` chunk: it was not written by `ldm-tune generate`, or its "
            f"text chunks were stripped.{hint}"
        )
    try:
        document = json.loads(text[JSON_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"`from_png` {str(path)!r} has a damaged `{JSON_KEY}` chunk: {error}") from error
    image = document.pop("image", None)
    if not isinstance(image, dict):
        files = [record.get("file") for record in document.get("images", [])]
        raise ValueError(f"`from_png` {str(path)!r} is a grid; pass one of its images: {files}.")
    return document, image


def recorded_settings(path: str | os.PathLike, replay: bool) -> dict:
    """The `ldm-tune generate` settings of one image from its PNG (`--from-png`).

    With `replay`, the whole call the image was made in (all its prompts and images, from the same first seed),
    of which only this image is written: batched matrix products round differently at other batch sizes (about
    3e-6 here, sometimes one level of 255), so only the same batch gives the very same pixels. Without it, the
    image alone from its own seed.
    """
    document, image = read_generation(path)
    if image.get("seed") is None:
        raise ValueError(f"`from_png` {path!r} was made with an explicit `generator`, not a seed: its noise is not "
                         "recorded, so it cannot be made again.")  # fmt: skip
    loras = document.get("loras") or []
    for lora in loras:
        if Path(lora["path"]).is_file() and file_sha256(lora["path"]) != lora.get("sha256"):
            logger.warning("LoRA %s has changed since %s was made (sha256 differs).", lora["path"], path)
    return {
        "model": document.get("model"),
        "checkpoint": document.get("checkpoint"),
        "use_ema": document.get("unet_weights") != "raw",
        "revision": document.get("revision"),
        "variant": document.get("variant"),
        "config": document.get("config"),
        "lora": [(lora["path"], lora["scale"]) for lora in loras],
        "scheduler": document["scheduler"],
        "scheduler_arg": dict(document.get("scheduler_overrides") or {}),
        "prompt": [image["prompt"]],
        "negative_prompt": image.get("negative_prompt", ""),
        "height": document["height"],
        "width": document["width"],
        "steps": document["num_inference_steps"],
        "guidance": document["guidance_scale"],
        "guidance_rescale": document["guidance_rescale"],
        "eta": document["eta"],
        "seed": image["seed"],
        "clip_skip": document.get("clip_skip"),
        # Switches that change pixels come back on (compile does not: it changes rounding only on some hardware).
        "vae_tiling": (document.get("switches") or {}).get("vae_tiling"),
        "attention_slicing": (document.get("switches") or {}).get("attention_slicing"),
        "strength": document.get("strength"),
        "recorded_image_sha256": {"image": document.get("init_image_sha256"), "mask": document.get("mask_sha256")},
        "num_images": 1,
        "recorded_dtype": document.get("dtype"),
        "recorded_device": document.get("device"),
        **(_recorded_call(document, image) if replay else {}),
    }


def _recorded_call(document: dict, image: dict) -> dict:
    return {
        "prompt": document["prompt"],
        "negative_prompt": document["negative_prompt"],
        "num_images": document["num_images_per_prompt"],
        "seed": document["seed"],
        "save_images": [image["batch_index"]],
    }
