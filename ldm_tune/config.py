"""Training configuration: dataclasses loaded from YAML, with dotted `key=value` overrides from the command line.

Leaf names follow diffusers' `train_text_to_image.py` (`pretrained_model_name_or_path`, `train_batch_size`, ...),
grouped into sections: `model`, `data`, `training`, `checkpointing`, `validation`, `dreambooth`, `vae`, `logging`,
plus the top-level
`output_dir` and `seed`. Unknown keys, wrong types and impossible values raise a `ValueError` before any model
loads. `ldm-tune train --help-config` prints every key with its default and meaning.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def _f(default, doc: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = _f("", "Stable-Diffusion-format folder or hub id of the base model.")
    revision: str | None = _f(None, "Hub revision of the base model.")
    variant: str | None = _f(None, "Weights variant of the base model, e.g. fp16.")
    prediction_type: str | None = _f(None, "epsilon or v_prediction; default: the model's scheduler config.")
    space: str = _f(
        "latent",
        "latent: diffuse VAE latents (LDM); pixel: diffuse the RGB image itself (DDPM), no VAE, a 3-channel UNet "
        "at image size (see ldm_tune.pixel_space).",
    )


@dataclass
class DataConfig:
    train_data_dir: str | None = _f(None, "Image folder with metadata.jsonl (file_name + caption column).")
    dataset_name: str | None = _f(None, "Hugging Face dataset name, or a local dataset path (save_to_disk/hub).")
    dataset_config_name: str | None = _f(None, "Config (subset) of `dataset_name`.")
    dataset_split: str = _f("train", "Split of `dataset_name` to train on.")
    image_column: str = _f("image", "Column holding the image (file_name for imagefolder).")
    caption_column: str = _f("text", "Column holding the caption; a list picks one caption at random.")
    train_data_file: str | None = _f(
        None,
        "JSONL, CSV or parquet of pairs: image (local path, relative to the file, or http(s) URL) in "
        "`image_column` and caption in `caption_column` (LAION parquet: URL, TEXT).",
    )
    train_shards: str | None = _f(
        None, "WebDataset .tar shards, streamed: a path, a brace pattern (data/{000..099}.tar) or an http(s) URL."
    )
    streaming: bool = _f(False, "Stream `dataset_name` (datasets' streaming=True) instead of downloading it all.")
    validation_split: float = _f(0.0, "Fraction of the training items held out for validation loss (0: none).")
    validation_data_dir: str | None = _f(None, "A separate image folder for validation loss.")
    validation_dataset_split: str | None = _f(None, "A split of `dataset_name` for validation loss, e.g. validation.")
    max_train_samples: int | None = _f(None, "Use only the first N training items (debugging, quick runs).")
    repeats: int = _f(1, "Each training item is seen this many times per epoch (kohya's num_repeats), no copies.")
    resolution: int = _f(512, "Training image size in pixels (multiple of 8).")
    center_crop: bool = _f(False, "Center crop after resizing; random crop when false.")
    random_flip: bool = _f(False, "Flip images horizontally with probability 0.5.")
    image_interpolation_mode: str = _f("lanczos", "Resize filter: lanczos, bicubic, bilinear, box, nearest.")
    caption_dropout: float = _f(0.1, "Probability of training on the empty caption (needed for CFG).")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0: load in the main process).")
    cache_dir: str | None = _f(
        None, "Downloads, scan results and caches (default: $LDM_TUNE_CACHE or ~/.cache/ldm_tune)."
    )
    min_image_size: int = _f(0, "Skip images whose shorter side is below this many pixels (0: keep all).")
    max_aspect_ratio: float = _f(4.0, "Skip images more elongated than this (long side / short side); bucket limit.")
    max_image_pixels: int = _f(89_478_485, "Skip larger images as decompression bombs (PIL's default limit).")
    max_bad_fraction: float = _f(0.05, "Stop before training if more than this fraction of the items is bad.")
    verify: str = _f(
        "upfront",
        "upfront: decode every image before step 1 (complete report); lazy: check captions up front and "
        "each image when first loaded (bad ones skipped and counted), so training starts without a decode pass.",
    )
    max_empty_batches: int = _f(
        100, "Stop when this many micro-batches in a row hold no usable item (a stream of bad samples, files gone)."
    )
    bucketing: bool = _f(False, "Aspect-ratio buckets of about resolution^2 pixels; each batch from one bucket.")
    bucket_step: int = _f(64, "Bucket sides are multiples of this many pixels.")
    cache_latents: bool | None = _f(
        None,
        "Encode every image (and its flip) once through the VAE and train from disk; unset: on where valid and "
        "cheaper (ldm_tune.data.cache_policy).",
    )
    cache_text_embeddings: bool | None = _f(
        None,
        "Encode every caption (and the empty one) once through the text encoder; unset: on where valid and "
        "cheaper (ldm_tune.data.cache_policy).",
    )
    cache_batch_size: int = _f(16, "Batch size when filling the latent and text caches.")
    cache_memory_mib: float = _f(1024, "Keep up to this many MiB of cache files in RAM once read (per loader worker).")
    download_workers: int = _f(8, "Parallel downloads for http(s) images.")
    download_shard_size: int = _f(10_000, "Rows of a URL list per tar shard of the download cache (img2dataset's).")
    download_timeout: float = _f(10.0, "Seconds to connect, and between bytes, for a download.")
    download_total_timeout: float = _f(60.0, "Seconds a single download may take in all.")
    download_retries: int = _f(2, "Retries (with exponential backoff) after timeouts, 429 and 5xx answers.")
    max_download_bytes: int = _f(50 * 2**20, "Refuse downloads larger than this many bytes.")
    allowed_networks: list[str] = _f(
        [],
        "Non-public networks that URLs may reach, as CIDRs (e.g. [127.0.0.0/8] for a local mirror); link-local "
        "and cloud-metadata addresses stay refused whatever this says.",
    )
    use_env_proxies: bool = _f(
        False, "Send downloads through the environment's proxies (the address checks then cannot protect you)."
    )
    image_formats: list[str] = _f(
        ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"], "Image formats opened from any source; others are skipped."
    )
    image_root: str | None = _f(
        None,
        "Folder that local paths of `train_data_file` must stay in (default: the list's folder); relative paths "
        "are relative to it. Set it (e.g. /data) for lists of absolute paths elsewhere.",
    )


@dataclass
class TrainingConfig:
    train_batch_size: int = _f(16, "Batch size per device.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    max_train_steps: int | None = _f(None, "Optimizer updates in all; overrides num_train_epochs.")
    num_train_epochs: int = _f(100, "Epochs, when max_train_steps is not set.")
    learning_rate: float = _f(1e-4, "Peak learning rate (after warm-up).")
    scale_lr: bool = _f(False, "Multiply the learning rate by batch size x accumulation x processes.")
    lr_scheduler: str = _f(
        "constant", "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup."
    )
    lr_warmup_steps: int = _f(500, "Linear warm-up updates.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW decoupled weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).")
    mixed_precision: str = _f("no", "no, fp16 (CUDA only) or bf16; the UNet keeps fp32 master weights.")
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in the backward pass to save memory.")
    trainable_modules: list[str] | None = _f(
        None, "Train only parameters whose name contains one of these (e.g. [attn2.]: cross-attention); null: all."
    )
    finetune_method: str = _f("full", "full: train the UNet's own weights; lora: train LoRA adapters (peft) only.")
    lora_rank: int = _f(4, "LoRA rank r (finetune_method: lora).")
    lora_alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha / rank. null: = lora_rank.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch's input.")
    lora_target_modules: list[str] = _f(
        ["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get adapters (default: the attention projections)."
    )
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (arXiv 2402.09353).")
    init_lora_weights: str = _f("gaussian", "gaussian or default (kaiming A); B starts at zero either way.")
    train_text_encoder_lora: bool = _f(False, "Also train LoRA adapters on the text encoder (no text cache then).")
    text_encoder_lora_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "out_proj"], "Text-encoder modules that get adapters."
    )
    text_encoder_lr: float | None = _f(None, "Learning rate of the text-encoder adapters; null: learning_rate.")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    keep_freed_memory: bool = _f(
        True, "Keep freed host memory for the next step (glibc; see ldm_tune.host_memory): no page faults per step."
    )
    use_ema: bool = _f(False, "Keep an exponential moving average of the UNet weights (exported at the end).")
    ema_decay: float = _f(0.9999, "Maximum EMA decay.")
    snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (arXiv 2303.09556); 5.0 is recommended.")
    noise_offset: float = _f(0.0, "Offset noise strength (crosslabs.org/blog/diffusion-with-offset-noise); ~0.05.")
    input_perturbation: float = _f(0.0, "Input perturbation (arXiv 2301.11706); ~0.1.")
    max_nonfinite_steps: int = _f(
        10, "Stop after this many updates in a row skipped for a non-finite loss or gradient."
    )
    ddp_timeout: int = _f(
        7200, "Seconds a process waits for the others at a collective (data preparation before step 1 included)."
    )


@dataclass
class CheckpointingConfig:
    checkpointing_steps: int = _f(500, "Save the full training state every N updates.")
    checkpoints_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "latest, or a checkpoint folder, to continue a run.")


@dataclass
class ValidationConfig:
    validation_steps: int = _f(500, "Compute validation loss and images every N updates (0: only at the end).")
    validation_prompts: list[str] = _f([], "Prompts for validation images.")
    validation_scheduler: str = _f("dpm++", "Sampler for validation images (see `ldm-tune schedulers`).")
    validation_inference_steps: int = _f(25, "Sampling steps for validation images.")
    validation_guidance_scale: float = _f(7.5, "Guidance scale for validation images.")
    validation_negative_prompt: str = _f("", "Negative prompt for validation images.")
    num_validation_images: int = _f(1, "Images per validation prompt.")
    validation_seed: int = _f(0, "Seed of validation images and of the fixed validation-loss noise.")
    validation_batch_size: int | None = _f(None, "Batch size of the validation loss (default: train_batch_size).")


@dataclass
class DreamBoothConfig:
    instance_data_dir: str | None = _f(None, "Images of the subject to teach, added to (or instead of) `data`.")
    instance_prompt: str | None = _f(None, "Caption of every instance image, e.g. 'a photo of sks dog'; null: "
                                           "the folder's own captions.")  # fmt: skip
    instance_repeats: int = _f(1, "Each instance image is seen this many times per epoch (kohya's num_repeats).")
    with_prior_preservation: bool = _f(False, "Train on class images too, weighted by prior_loss_weight.")
    class_data_dir: str | None = _f(None, "Class images; missing ones are generated from the base model here.")
    class_prompt: str | None = _f(None, "Prompt of the generated class images and their caption; null: the "
                                        "folder's own captions (nothing can be generated then).")  # fmt: skip
    num_class_images: int = _f(100, "Class images to train on; fewer in class_data_dir are topped up.")
    class_repeats: int = _f(1, "Each class image is seen this many times per epoch.")
    prior_loss_weight: float = _f(1.0, "Loss weight of class items against instance items (arXiv 2208.12242).")
    sample_batch_size: int = _f(4, "Batch size when generating class images.")
    class_inference_steps: int = _f(30, "Sampling steps of generated class images.")
    class_guidance_scale: float = _f(7.5, "Guidance scale of generated class images.")
    class_scheduler: str = _f("dpm++", "Sampler of generated class images (see `ldm-tune schedulers`).")


@dataclass
class VAEConfig:
    kl_weight: float = _f(1e-6, "Weight of the KL term against the reconstruction loss (stage: vae).")
    reconstruction_loss: str = _f("mse", "mse or l1 (stage: vae).")
    from_scratch: bool = _f(
        False,
        "Re-initialise the model's VAE (same architecture, near-deterministic posterior) instead of fine-tuning.",
    )
    compute_scaling_factor: bool = _f(
        True,
        "After training, set scaling_factor = 1 / std of the latents (as SD did), so the UNet sees unit variance.",
    )
    validation_images: int = _f(8, "Validation images reconstructed into the sample grid (stage: vae).")


@dataclass
class LoggingConfig:
    report_to: str = _f("none", "none, tensorboard, wandb or all; metrics.jsonl is always written.")
    logging_steps: int = _f(10, "Log metrics every N updates.")
    tracker_project_name: str = _f("ldm-tune", "Project name for the trackers.")


@dataclass
class TrainConfig:
    output_dir: str = _f("outputs/run", "Folder for checkpoints, samples, logs and the final model.")
    seed: int = _f(0, "Seed of data order, augmentations, noise and timesteps.")
    stage: str = _f("unet", "unet: fine-tune the UNet (VAE and text encoder frozen); vae: train the VAE.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "stage": ("unet", "vae"),
    "vae.reconstruction_loss": ("mse", "l1"),
    "model.prediction_type": (None, "epsilon", "v_prediction"),
    "model.space": ("latent", "pixel"),
    "training.mixed_precision": ("no", "fp16", "bf16"),
    "training.finetune_method": ("full", "lora"),
    # pissa, olora, corda and loftq initialisations rewrite the base weights: not offered.
    "training.init_lora_weights": ("gaussian", "default"),
    "training.lr_scheduler": (
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    ),
    "data.verify": ("upfront", "lazy"),
    "data.image_interpolation_mode": ("lanczos", "bicubic", "bilinear", "box", "nearest", "hamming"),
    "logging.report_to": ("none", "tensorboard", "wandb", "all"),
}  # fmt: skip


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raises ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(key, item, args[0]) for item in items]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; accept it as the number it means.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"`{key}` must be of type {tp.__name__}, got {value!r} ({type(value).__name__}).")
    return value


# Keys that no longer exist, and what replaced them.
RENAMED = {
    "allow_private_urls": "list the networks a mirror lives in as `data.allowed_networks`, e.g. [127.0.0.0/8] "
    "(link-local and cloud-metadata addresses cannot be allowed).",
}


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    for key in unknown:
        if key in RENAMED:
            raise ValueError(f"`{prefix}{key}` was replaced: {RENAMED[key]}")
    if unknown:
        where = f"section `{prefix.rstrip('.')}`" if prefix else "the top level"
        raise ValueError(f"Unknown config key(s) {[prefix + k for k in unknown]} in {where}; valid keys: {names}.")
    kwargs = {}
    for name, value in values.items():
        if _is_section(hints[name]):
            if not isinstance(value, dict):
                raise ValueError(f"`{prefix}{name}` must be a mapping of keys, got {value!r}.")
            kwargs[name] = _build(hints[name], value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, hints[name])
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `["training.learning_rate=1e-5", ...]` into a nested dict; values are typed by YAML."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(
                f"Override {item!r} must look like `section.key=value`, e.g. training.learning_rate=1e-5."
            )
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r} conflicts with another override of `{part}`.")
        node[parts[-1]] = yaml.safe_load(raw)
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML config (or the defaults), apply dotted overrides, validate, return a `TrainConfig`."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"`--config` {str(path)!r} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"`--config` {str(path)!r} must hold a mapping of keys, got {type(values).__name__}.")
    config = _build(TrainConfig, _merge(values, parse_overrides(list(overrides))))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Refuse impossible values with a message naming the key, the value and what is allowed."""
    for key, allowed in CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ValueError(f"`{key}` must be one of {list(allowed)}, got {value!r}.")
    if not config.model.pretrained_model_name_or_path:
        raise ValueError("`model.pretrained_model_name_or_path` is required (a model folder or hub id).")
    _validate_sources(config.data, config.training, config.dreambooth)
    _validate_ranges(config)
    _validate_method(config)
    _validate_dreambooth(config)
    if config.stage == "vae" and (config.data.cache_latents or config.data.cache_text_embeddings):
        raise ValueError("`stage: vae` trains the VAE itself: turn `data.cache_latents` and the text cache off.")
    _validate_space(config)
    if config.training.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "`training.mixed_precision` fp16 needs a CUDA GPU and none is available; use bf16 (CPUs with "
                "bf16 support, Ampere+ GPUs) or no."
            )
    from ldm_tune.schedulers import canonical_name

    canonical_name(config.validation.validation_scheduler)  # raises with the list of valid names


def _validate_space(config: TrainConfig) -> None:
    if config.model.space == "latent":
        return
    # Pixel space has no latents to cache: x0 is the image, which the data loader already gives.
    if config.data.cache_latents:
        raise ValueError("`data.cache_latents` caches VAE latents, and `model.space: pixel` has none: turn it off.")
    if config.stage != "unet":
        raise ValueError(f"`model.space: pixel` applies to `stage: unet`, got stage {config.stage!r}.")
    if config.dreambooth.with_prior_preservation:  # class images are sampled by the latent pipeline
        raise ValueError("`dreambooth.with_prior_preservation` is not supported with `model.space: pixel`.")


def _validate_sources(d: DataConfig, t: TrainingConfig, db: DreamBoothConfig) -> None:
    keys = ("train_data_dir", "train_data_file", "dataset_name", "train_shards")
    sources = [k for k in keys if getattr(d, k) is not None]
    if len(sources) > 1 or (not sources and db.instance_data_dir is None):
        raise ValueError(
            "Set exactly one of `data.train_data_dir`, `data.train_data_file`, `data.dataset_name` and "
            f"`data.train_shards` (or only `dreambooth.instance_data_dir`), got {sources}."
        )
    if d.streaming and d.dataset_name is None:
        raise ValueError("`data.streaming` applies to `data.dataset_name`; tar shards are always streamed.")
    if d.streaming or d.train_shards is not None:
        problems = [k for k, bad in (("training.max_train_steps", t.max_train_steps is None),
                                     ("data.validation_split", d.validation_split > 0),
                                     ("data.cache_latents", d.cache_latents),
                                     ("data.cache_text_embeddings", d.cache_text_embeddings)) if bad]  # fmt: skip
        if problems:
            raise ValueError(
                f"A streamed source has no known length and is never stored: set `training.max_train_steps`, and "
                f"use `validation_data_dir`/`validation_dataset_split` and no caches; check {problems}."
            )
    if d.cache_latents and not d.center_crop:
        raise ValueError(
            "`data.cache_latents` needs a fixed crop: set `data.center_crop: true`; a random crop changes the "
            "latent at every epoch."
        )
    if d.verify == "lazy" and (d.bucketing or d.cache_latents):
        raise ValueError(
            "`data.verify: lazy` does not read image sizes or contents before training, which "
            f"`data.bucketing` ({d.bucketing}) and `data.cache_latents` ({d.cache_latents}) need: turn them off or "
            "use `data.verify: upfront`."
        )
    if d.max_aspect_ratio < 1:
        raise ValueError(f"`data.max_aspect_ratio` must be >= 1, got {d.max_aspect_ratio}.")
    if d.bucket_step <= 0 or d.bucket_step % 8:
        raise ValueError(f"`data.bucket_step` must be a positive multiple of 8, got {d.bucket_step}.")
    held_out = [k for k, v in (("validation_split", d.validation_split), ("validation_data_dir", d.validation_data_dir),
                               ("validation_dataset_split", d.validation_dataset_split)) if v]  # fmt: skip
    if len(held_out) > 1:
        raise ValueError(f"Set at most one validation source in `data`, got {held_out}.")
    if d.validation_dataset_split and d.dataset_name is None:
        raise ValueError("`data.validation_dataset_split` needs `data.dataset_name`.")
    from ldm_tune.data.images import allowed_formats
    from ldm_tune.data.netpolicy import parse_networks

    allowed_formats(d.image_formats, key="data.image_formats")

    try:
        parse_networks(d.allowed_networks)
    except ValueError as error:
        raise ValueError(str(error).replace("`allowed_networks`", "`data.allowed_networks`", 1)) from None


def _validate_method(config: TrainConfig) -> None:
    t, d = config.training, config.data
    if t.finetune_method == "full":
        if t.train_text_encoder_lora:
            raise ValueError("`training.train_text_encoder_lora` needs `training.finetune_method: lora`.")
        return
    if config.stage != "unet":
        raise ValueError(f"`training.finetune_method` lora applies to `stage: unet`, got stage {config.stage!r}.")
    if t.trainable_modules is not None:
        raise ValueError(
            "`training.trainable_modules` chooses weights of a full fine-tune; with `finetune_method: lora` use "
            f"`training.lora_target_modules`, got trainable_modules={t.trainable_modules}."
        )
    if t.lora_rank < 1:
        raise ValueError(f"`training.lora_rank` must be >= 1, got {t.lora_rank}.")
    if t.lora_alpha is not None and t.lora_alpha <= 0:
        raise ValueError(f"`training.lora_alpha` must be > 0 (or null for lora_rank), got {t.lora_alpha}.")
    if not 0.0 <= t.lora_dropout < 1.0:
        raise ValueError(f"`training.lora_dropout` must be in [0, 1), got {t.lora_dropout}.")
    for key in ("lora_target_modules", "text_encoder_lora_target_modules"):
        if not getattr(t, key):
            raise ValueError(f"`training.{key}` must name at least one module, got {getattr(t, key)}.")
    if t.text_encoder_lr is not None and t.text_encoder_lr < 0:
        raise ValueError(f"`training.text_encoder_lr` must be >= 0, got {t.text_encoder_lr}.")
    if t.train_text_encoder_lora and d.cache_text_embeddings:
        raise ValueError(
            "`data.cache_text_embeddings` stores text-encoder outputs, but `training.train_text_encoder_lora` trains "
            "the text encoder, so they change at every step: turn one of them off."
        )


def _validate_dreambooth(config: TrainConfig) -> None:
    db, d = config.dreambooth, config.data
    if db.instance_data_dir is None:
        set_keys = [k for k in ("instance_prompt", "class_data_dir", "class_prompt") if getattr(db, k) is not None]
        if set_keys or db.with_prior_preservation:
            raise ValueError(
                f"`dreambooth.instance_data_dir` is needed for {set_keys or ['with_prior_preservation']}."
            )
        return
    if config.stage != "unet":
        raise ValueError(f"`dreambooth` applies to `stage: unet`, got stage {config.stage!r}.")
    if d.streaming or d.train_shards is not None:
        raise ValueError("`dreambooth.instance_data_dir` cannot be mixed with a streamed `data` source.")
    if d.validation_split > 0 and not any((d.train_data_dir, d.train_data_file, d.dataset_name)):
        raise ValueError(
            f"`data.validation_split` {d.validation_split} holds out items of the `data` source, and there is none "
            "(only `dreambooth.instance_data_dir`): set `data.validation_data_dir` instead."
        )
    if db.with_prior_preservation and db.class_data_dir is None:
        raise ValueError("`dreambooth.with_prior_preservation` needs `dreambooth.class_data_dir` (and class_prompt).")
    if not db.with_prior_preservation and (db.class_data_dir is not None or db.class_prompt is not None):
        raise ValueError("`dreambooth.class_data_dir`/`class_prompt` are used only with `with_prior_preservation`.")
    for key in ("instance_repeats", "class_repeats", "num_class_images", "sample_batch_size", "class_inference_steps"):
        if getattr(db, key) < 1:
            raise ValueError(f"`dreambooth.{key}` must be >= 1, got {getattr(db, key)}.")
    if db.prior_loss_weight < 0:
        raise ValueError(f"`dreambooth.prior_loss_weight` must be >= 0, got {db.prior_loss_weight}.")
    from ldm_tune.schedulers import canonical_name

    canonical_name(db.class_scheduler)


def _validate_ranges(config: TrainConfig) -> None:
    d, t, c, v = config.data, config.training, config.checkpointing, config.validation
    if d.resolution <= 0 or d.resolution % 8:
        raise ValueError(f"`data.resolution` must be a positive multiple of 8, got {d.resolution}.")
    fractions = (("data.validation_split", d.validation_split), ("data.caption_dropout", d.caption_dropout),
                 ("data.max_bad_fraction", d.max_bad_fraction))  # fmt: skip
    for key, value in fractions:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`{key}` must be in [0, 1), got {value}.")
    positive = {
        "training.train_batch_size": t.train_batch_size,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.num_train_epochs": t.num_train_epochs,
        "training.max_train_steps": t.max_train_steps,
        "training.max_nonfinite_steps": t.max_nonfinite_steps,
        "training.ddp_timeout": t.ddp_timeout,
        "checkpointing.checkpointing_steps": c.checkpointing_steps,
        "checkpointing.checkpoints_total_limit": c.checkpoints_total_limit,
        "validation.validation_inference_steps": v.validation_inference_steps,
        "validation.num_validation_images": v.num_validation_images,
        "validation.validation_batch_size": v.validation_batch_size,
        "logging.logging_steps": config.logging.logging_steps,
        "data.cache_batch_size": d.cache_batch_size,
        "data.download_workers": d.download_workers,
        "data.download_shard_size": d.download_shard_size,
        "data.repeats": d.repeats,
        "data.max_empty_batches": d.max_empty_batches,
    }
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"`{key}` must be >= 1, got {value}.")
    for key, value in (("training.learning_rate", t.learning_rate), ("training.lr_warmup_steps", t.lr_warmup_steps),
                       ("training.max_grad_norm", t.max_grad_norm), ("training.noise_offset", t.noise_offset),
                       ("training.input_perturbation", t.input_perturbation),
                       ("validation.validation_steps", v.validation_steps),
                       ("data.cache_memory_mib", d.cache_memory_mib)):  # fmt: skip
        if value < 0:
            raise ValueError(f"`{key}` must be >= 0, got {value}.")
    if t.snr_gamma is not None and t.snr_gamma <= 0:
        raise ValueError(f"`training.snr_gamma` must be > 0 (or null to turn min-SNR off), got {t.snr_gamma}.")
    if not 0.0 < t.ema_decay < 1.0:
        raise ValueError(f"`training.ema_decay` must be in (0, 1), got {t.ema_decay}.")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe_config() -> str:
    """Every key with its type, default and meaning (for `ldm-tune train --help-config`)."""
    lines = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):
                lines.append(f"\n{f.name}:")
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('help', '')}")

    walk(TrainConfig, "")
    return "\n".join(lines).strip()
