"""DreamBooth's class images: the prior-preservation data, generated from the base model before training.

DreamBooth (Ruiz et al., arXiv 2208.12242) fine-tunes on a few images of a subject under a rare token ("a photo of
sks dog") and, to keep the model from forgetting what the class looks like (language drift, section 4.3), also
trains on images the *base* model generates for the class prompt ("a photo of a dog"), their loss weighted by
`prior_loss_weight`. The training data side (instance and class sources, repeats, loss weights) is in
`ldm_tune.data.pipeline`; this module tops up `dreambooth.class_data_dir` to `num_class_images` images.

Generated images are reproducible and resumable:
- image `i` is `class-{i:05d}.png`; its initial noise comes from a CPU generator seeded by `(seed, i)`, and it is
  always sampled in the same batch (slots `[k * sample_batch_size, (k + 1) * sample_batch_size)`), so it is
  bit-identical whatever the process count, and after a kill, a rerun writes exactly the images still missing;
- each file is written under a temporary name and renamed, the `.txt` caption and `.json` parameters first and the
  image last, so an image in the folder is complete;
- images the user put in the folder count toward `num_class_images` and are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm_tune.config import TrainConfig
from ldm_tune.data.dataset import STREAM_CLASS_IMAGES, item_seed
from ldm_tune.data.sources import find_metadata, list_images, read_image_folder
from ldm_tune.outputs import package_versions


logger = logging.getLogger(__name__)

GENERATED_BY = "ldm_tune.dreambooth"  # marks the parameter files this module writes
_CLASS_IMAGE = re.compile(r"^class-(\d{5,})\.png$")
_TEMPORARY = re.compile(r"^\.class-\d{5,}\.(png|txt|json)\.\d+\.tmp$")


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def class_image_seed(seed: int, index: int) -> int:
    """The seed of class image `index`: its own stream, so it never shifts the training draws."""
    return item_seed(seed, STREAM_CLASS_IMAGES, 0, index)


@dataclass
class ClassImagePlan:
    """What `class_data_dir` holds and what to generate.

    Generated images fill the names `class-00000.png` ... `class-{slots - 1}.png`; `missing` are the slots to
    write now. The slots depend only on `num_class_images` and the user's own images, so a rerun after a kill
    plans the same names and writes the ones still missing.
    """

    folder: Path
    found: int  # images in the folder (the user's and earlier runs'), all counted toward num_class_images
    slots: int
    missing: list[int]


def plan_class_images(config: TrainConfig) -> ClassImagePlan:
    """Count the class images and choose the missing slots; raises when they cannot be generated."""
    db = config.dreambooth
    folder = Path(db.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = db.num_class_images
    metadata = find_metadata(folder)
    if metadata is not None:
        _, facts = read_image_folder(folder, config.data.caption_column, key="dreambooth.class_data_dir")
        found = facts["total"]
        if found < wanted:
            raise ValueError(
                f"`dreambooth.class_data_dir` {str(folder)!r} lists its images in {metadata.name} and holds {found} "
                f"of the {wanted} of `dreambooth.num_class_images`; generated images would not be listed there. Add "
                f"{wanted - found} images with their rows, lower `dreambooth.num_class_images` to {found}, or use a "
                "class folder without metadata (generated images get .txt captions)."
            )
        return ClassImagePlan(folder, found, 0, [])
    names = {path.relative_to(folder).as_posix() for path in list_images(folder)}
    own = sum(1 for name in names if _CLASS_IMAGE.match(name))
    slots = max(wanted - (len(names) - own), 0)  # the names left for generated images after the user's own
    needed = max(wanted - len(names), 0)
    missing = [i for i in range(slots) if class_image_name(i) not in names][:needed]
    if missing and db.class_prompt is None:
        raise ValueError(
            f"`dreambooth.class_prompt` must be set to generate the {len(missing)} missing class images, got None: "
            f"`dreambooth.class_data_dir` {str(folder)!r} holds {len(names)} of the {wanted} images of "
            f"`dreambooth.num_class_images`. Set a class prompt (e.g. 'a photo of a dog'), add images, or lower "
            f"num_class_images to {len(names)}."
        )
    return ClassImagePlan(folder, len(names), slots, missing)


def ensure_class_images(config: TrainConfig, accelerator, components, weight_dtype: torch.dtype) -> int:
    """Top up `dreambooth.class_data_dir` to `num_class_images` images from the base model.

    Every process plans from the same listing, generates its share of the batches that hold missing images
    (shares differ by at most one batch), and waits for the others, also when nothing is missing.

    Args:
        config: the training config (`dreambooth`, `data.resolution`, `seed`, `model`).
        accelerator: the run's `Accelerator` (device, process index and count, autocast, barriers).
        components: the base model's `ModelComponents`; moved to the device, modes restored afterwards.
        weight_dtype: the dtype of the frozen VAE and text encoder (the UNet stays fp32, under autocast).

    Returns:
        The number of images this process wrote.

    Raises:
        ValueError: images are missing and `class_prompt` is None, or a metadata folder is short of images.
        FileExistsError: a `class-NNNNN.txt`/`.json` beside a missing image was not written by ldm_tune.
    """
    db = config.dreambooth
    plan = plan_class_images(config)
    accelerator.wait_for_everyone()  # every process has listed the folder before any writes to it
    if accelerator.is_main_process:
        logger.info("Class images in %s: %d found of %d; generating %d.", plan.folder, plan.found,
                    db.num_class_images, len(plan.missing))  # fmt: skip
    size = db.sample_batch_size
    batches = sorted({index // size for index in plan.missing})
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    written = 0
    if mine:
        batches = [list(range(b * size, min((b + 1) * size, plan.slots))) for b in mine]
        written = _generate(config, accelerator, components, weight_dtype, plan, batches)
        logger.info("Generated %d class images on process %d.", written, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # temporary files of a killed run; nobody writes any more
        for path in plan.folder.iterdir():
            if _TEMPORARY.match(path.name):
                path.unlink()
        if plan.missing:
            logger.info("Class images in %s: %d now.", plan.folder, len(list_images(plan.folder)))
    return written


def _generate(config: TrainConfig, accelerator, components, weight_dtype, plan: ClassImagePlan,
              batches: list[list[int]]) -> int:  # fmt: skip
    from ldm_tune.inference import LDMInference

    db, device = config.dreambooth, accelerator.device
    models = (components.vae, components.text_encoder, components.unet)
    modes = [model.training for model in models]
    # In place, no copies: the frozen parts go to the dtype the trainer casts them to next anyway; the UNet keeps
    # its fp32 weights (the trainer's master weights) and samples under autocast.
    for model in (components.vae, components.text_encoder):
        model.to(device) if model.dtype == weight_dtype else model.to(device, dtype=weight_dtype)
    components.unet.to(device)
    pipe = LDMInference(components.vae, components.text_encoder, components.tokenizer, components.unet,
                        components.scheduler_config, scheduler=db.class_scheduler,
                        model_name=config.model.pretrained_model_name_or_path)  # fmt: skip
    missing, written = set(plan.missing), 0
    try:
        for model in models:
            model.eval()
        for indices in tqdm(batches, desc="class images", disable=not accelerator.is_local_main_process):
            # One generator per image (on the CPU: the same noise on any device) makes it independent of the
            # other images of its batch.
            generators = [torch.Generator("cpu").manual_seed(class_image_seed(config.seed, i)) for i in indices]
            with accelerator.autocast():
                images = pipe.generate([db.class_prompt] * len(indices), negative_prompt="",
                                       height=config.data.resolution, width=config.data.resolution,
                                       num_inference_steps=db.class_inference_steps,
                                       guidance_scale=db.class_guidance_scale, generator=generators,
                                       progress=False)  # fmt: skip
            for index, image in zip(indices, images, strict=True):
                if index in missing:  # the batch may also hold slots an earlier run already wrote
                    _write_class_image(plan.folder, index, image, _parameters(config, pipe, index, indices))
                    written += 1
    finally:
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
    return written


def _parameters(config: TrainConfig, pipe, index: int, batch: list[int]) -> dict:
    """Everything that decides the image, for the `.json` beside it."""
    db, m = config.dreambooth, config.model
    return {
        "generated_by": GENERATED_BY,
        "purpose": "DreamBooth prior-preservation class image (arXiv 2208.12242)",
        "file": class_image_name(index),
        "prompt": db.class_prompt,
        "negative_prompt": "",
        "seed": class_image_seed(config.seed, index),
        "generator": "torch.Generator('cpu'), one per image",
        "batch": [class_image_name(i) for i in batch],  # sampled together: bit-exact only in the same batch
        "num_inference_steps": db.class_inference_steps,
        "guidance_scale": db.class_guidance_scale,
        "scheduler": pipe.scheduler_name,
        "height": config.data.resolution,
        "width": config.data.resolution,
        "model": m.pretrained_model_name_or_path,
        "revision": m.revision,
        "variant": m.variant,
        "unet_dtype": str(pipe.dtype).replace("torch.", ""),
        "mixed_precision": config.training.mixed_precision,
        "device": str(pipe.device),
        "versions": package_versions(),
    }


def _write_class_image(folder: Path, index: int, image, parameters: dict) -> None:
    """The caption and parameters first, the image last: an image in the folder is complete."""
    path = folder / class_image_name(index)
    sidecars = {path.with_suffix(".json"): json.dumps(parameters, indent=2) + "\n",
                path.with_suffix(".txt"): parameters["prompt"]}  # fmt: skip
    for sidecar, text in sidecars.items():  # all checked before anything is written
        if sidecar.exists() and not _left_by_us(sidecar, text):
            raise FileExistsError(
                f"`dreambooth.class_data_dir` holds {str(sidecar)!r} beside a missing {path.name}, not written by "
                "ldm_tune; move it away (generated class images are named class-NNNNN.png/.txt/.json)."
            )
    for sidecar, text in sidecars.items():
        _write_atomic(sidecar, lambda handle, text=text: handle.write(text.encode("utf-8")))
    _write_atomic(path, lambda handle: image.save(handle, format="PNG"))


def _left_by_us(sidecar: Path, text: str) -> bool:
    # Left by a killed run of ours: a parameters file we marked, or a caption with exactly the text we would write.
    try:
        content = sidecar.read_text(encoding="utf-8")
        if sidecar.suffix == ".json":
            return json.loads(content).get("generated_by") == GENERATED_BY
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return content == text


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
    os.replace(tmp, path)
