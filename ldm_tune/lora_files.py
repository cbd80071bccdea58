"""LoRA files: diffusers' format (what `StableDiffusionPipeline.load_lora_weights` reads) plus a kohya-format copy.

The adapters live in the models as peft adapters named "default" (`unet.add_adapter(LoraConfig(...))`). `save_lora`
writes two files into a folder:

- `pytorch_lora_weights.safetensors`: through peft's `get_peft_model_state_dict` and diffusers' `save_lora_weights`,
  which also stores each adapter's `LoraConfig` (rank, alpha, DoRA, targets) in the header, so a loader rebuilds it
  exactly. `load_lora_into_adapters` reads it back to resume a run.
- `lora_kohya.safetensors`: the kohya-ss naming that AUTOMATIC1111 and ComfyUI read
  (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`;
  `lora_te_text_model_encoder_layers_0_self_attn_q_proj...` for the text encoder).

Both headers carry the training metadata as kohya-ss `train_network.py` writes it (`ss_*` keys) and the Stability AI
ModelSpec keys (`modelspec.*`, https://github.com/Stability-AI/ModelSpec, as kohya-ss `library/sai_model_spec.py`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
ADAPTER = "default"
# The ModelSpec version kohya-ss writes (library/sai_model_spec.py, BASE_METADATA).
MODELSPEC_VERSION = "1.0.1"
# SD 2.x's OpenCLIP-H text encoder is 1024 wide; SD 1.x's CLIP-L (and every other width we build) is treated as 1.x.
SD2_CROSS_ATTENTION_DIM = 1024


def has_adapter(model: torch.nn.Module | None) -> bool:
    """True when `model` carries the "default" LoRA adapter."""
    return model is not None and ADAPTER in getattr(model, "peft_config", {})


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `model` with peft's keys (`...to_q.lora_A.weight`), as fp32 copies.

    These are the keys diffusers' own `save_lora_adapter` writes. Not `convert_state_dict_to_diffusers`: it renames
    only attention projections (`to_q.lora_A` -> `to_q.lora.down`) and leaves e.g. `proj_in.lora_A` alone, and
    diffusers' UNet loader converts a file only when its first key lacks `lora_A` (`load_lora_adapter`), so in such
    a mixed file the attention weights were skipped with only a warning (diffusers 0.42.1).
    """
    return {key: value.detach().float().cpu().clone() for key, value in _peft_state(model).items()}


def _peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # save_embedding_layers=False: we never resize a vocabulary, and "auto" only warns that the base model's folder
    # has no config to compare vocabularies with.
    return get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)


def save_lora(
    folder: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    metadata: dict[str, str] | None = None,
    kohya: bool = True,
) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (and `folder/lora_kohya.safetensors`) with the adapters.

    Args:
        folder: output folder (created if needed).
        unet, text_encoder: models with a "default" peft LoRA adapter (the text encoder's is optional).
        metadata: extra header entries, e.g. `training_metadata(config, global_step)`; they override the entries
            derived from the models (rank, alpha, base model version).
        kohya: also write the kohya-format copy for AUTOMATIC1111 and ComfyUI. Skipped, with a logged reason, for
            adapters that format cannot express (DoRA, LoRA biases); a stale copy is then removed.

    Returns:
        The path of the diffusers-format file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    has_text = has_adapter(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=adapter_state(unet),
        text_encoder_lora_layers=adapter_state(text_encoder) if has_text else None,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config[ADAPTER].to_dict() if has_text else None,
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    header = {**model_metadata(unet, (metadata or {}).get("modelspec.prediction_type")), **(metadata or {})}
    path = folder / LORA_WEIGHT_NAME
    _add_header(path, header)
    kohya_path = folder / KOHYA_WEIGHT_NAME
    if not kohya:
        return path
    try:
        state = kohya_state_dict(unet, text_encoder if has_text else None)
    except ValueError as error:
        logger.warning("Not writing the kohya-format copy %s: %s", kohya_path, error)
        kohya_path.unlink(missing_ok=True)  # an older copy would no longer match the diffusers file
        return path
    _save_safetensors(state, kohya_path, header)
    return path


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    # Written under a temporary name and renamed: an interrupted save never leaves a truncated LoRA behind.
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata=header)
    os.replace(tmp, path)


def _add_header(path: Path, extra: dict[str, str]) -> None:
    # diffusers' save_lora_weights writes its own header ("format", "lora_adapter_metadata") and takes no extra
    # entries, so the (small) file is rewritten once with ours added; diffusers' own entries win.
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    _save_safetensors(tensors, path, {**extra, **header})


# Kohya format.
def kohya_state_dict(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The adapters in kohya-ss naming, with each module's real alpha.

    Raises:
        ValueError: for adapters the format cannot express (DoRA, LoRA biases), with the reason.
    """
    state = {}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if has_adapter(model):
            _check_kohya_expressible(model, prefix)
            state.update(_kohya_part(model, prefix))
    return state


def _check_kohya_expressible(model: torch.nn.Module, prefix: str) -> None:
    config = model.peft_config[ADAPTER]
    if config.use_dora:
        # PEFT's DoRA rescales each output row by m / ||W + s*BA||. No kohya-format loader reproduces that:
        # diffusers drops `dora_scale` from non-diffusers files (lora_pipeline.py, "is_dora_scale_present"),
        # AUTOMATIC1111 normalises input columns (extensions-builtin/Lora/network.py, apply_weight_decompose), and
        # ComfyUI normalises input columns too or, in newer versions for a per-output scale, divides by the norm of
        # the base weight instead of the adapted one (comfy/weight_adapter/base.py, weight_decompose).
        raise ValueError(
            f"the {prefix} adapter uses DoRA (`use_dora=True`), which AUTOMATIC1111, ComfyUI and diffusers do not "
            f"reproduce from a kohya file; use {LORA_WEIGHT_NAME} with diffusers instead."
        )
    if getattr(config, "lora_bias", False) or config.bias != "none":
        raise ValueError(f"the {prefix} adapter trains biases, which kohya's LoRA format has no place for.")


def _kohya_part(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    peft_state = _peft_state(model)
    # kohya-ss names SD 1.x text-encoder modules by their transformers-4 paths (`text_model.encoder.layers.0...`),
    # which ComfyUI (comfy/lora.py, model_lora_keys_clip) and A1111 match on. transformers 5 flattened
    # CLIPTextModel (no `.text_model`), so the prefix is put back; diffusers strips it again when loading
    # (lora_base.py, "CLIPTextModel is flattened in recent transformers versions").
    module_prefix = "text_model." if prefix == "text_encoder" and not hasattr(model, "text_model") else ""
    converted = {}
    for name, layer in _lora_layers(model):
        weights = {key: value for key, value in peft_state.items() if key.startswith(f"{name}.lora_")}
        if set(weights) != {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}:
            raise ValueError(f"the {prefix} module {name} has adapter weights {sorted(weights)} that kohya's LoRA "
                             "format (lora_down, lora_up, alpha) cannot hold.")  # fmt: skip
        part = convert_state_dict_to_kohya(
            {f"{prefix}.{module_prefix}{key}": value.detach().cpu().contiguous() for key, value in weights.items()}
        )
        # diffusers names a single text encoder `lora_te1_` (SDXL's first encoder); SD 1.x/2.x kohya files and
        # the loaders that read them use `lora_te_` (kohya-ss networks/lora.py, LORA_PREFIX_TEXT_ENCODER).
        part = {key.replace("lora_te1_", "lora_te_", 1): value for key, value in part.items()}
        # convert_state_dict_to_kohya stores alpha = rank, i.e. a scale of 1: put in the module's real alpha.
        (alpha_key,) = [key for key in part if key.endswith(".alpha")]
        part[alpha_key] = torch.tensor(kohya_alpha(layer), dtype=torch.float32)
        converted.update(part)
    return converted


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def kohya_alpha(layer: LoraLayer) -> float:
    """The alpha a kohya loader needs for `layer`'s scale: kohya scales by alpha / rank.

    peft's per-layer `lora_alpha` and `r` already resolve `alpha_pattern` and `rank_pattern`; rsLoRA scales by
    alpha / sqrt(rank) (arXiv 2312.03732), which kohya expresses as alpha * sqrt(rank).
    """
    alpha, rank = float(layer.lora_alpha[ADAPTER]), layer.r[ADAPTER]
    return alpha * math.sqrt(rank) if layer.use_rslora.get(ADAPTER, False) else alpha


# Metadata.
def model_metadata(unet: torch.nn.Module, prediction_type: str | None = None) -> dict[str, str]:
    """Header entries that follow from the UNet and its adapter: network size and base-model architecture.

    `prediction_type` is ModelSpec's ("epsilon" or "v"); "v" on SD 2.x marks the 768-v architecture.
    """
    config = unet.peft_config[ADAPTER]
    v2 = unet.config.cross_attention_dim == SD2_CROSS_ATTENTION_DIM
    v_param = prediction_type == "v"
    # kohya-ss model_util.get_model_version_str_for_sd1_sd2 and sai_model_spec.determine_architecture /
    # determine_resolution (an SD 1.x/2.x LoRA's implementation is "diffusers": its keys use diffusers' names).
    architecture = "stable-diffusion-v1" if not v2 else ("stable-diffusion-v2-768-v" if v_param else
                                                          "stable-diffusion-v2-512")  # fmt: skip
    size = 768 if v2 and v_param else 512
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(float(config.lora_alpha)),
        "ss_v2": str(v2),
        "ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + ("_v" if v_param else ""),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"LoRA@{time.time()}",
        "modelspec.date": _now(),
        "modelspec.resolution": f"{size}x{size}",
    }


def _now() -> str:
    # ISO-8601 without microseconds, as sai_model_spec.build_metadata writes `modelspec.date`.
    return datetime.datetime.now().replace(microsecond=0).isoformat()


def training_metadata(config, global_step: int) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` header entries of a LoRA trained with `config` (a `TrainConfig`) for
    `global_step` updates, with the names and value formats of kohya-ss `train_network.py`."""
    t, model = config.training, config.model
    alpha = t.lora_alpha if t.lora_alpha is not None else t.lora_rank
    prediction = model.prediction_type or _scheduler_prediction_type(model)
    source = str(model.pretrained_model_name_or_path)
    entries = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(t.lora_rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_dropout": str(t.lora_dropout),
        # kohya writes network arguments as a JSON object of strings (--network_args key=value).
        "ss_network_args": json.dumps(
            {
                "use_dora": str(t.use_dora),
                "init_lora_weights": t.init_lora_weights,
                "target_modules": ",".join(t.lora_target_modules),
            }
        ),
        "ss_sd_model_name": Path(source).name if Path(source).exists() else source,  # kohya: basename of a path
        "ss_output_name": Path(config.output_dir).name,
        "ss_steps": str(global_step),
        "ss_max_train_steps": str(t.max_train_steps),
        "ss_learning_rate": str(t.learning_rate),
        "ss_unet_lr": str(t.learning_rate),
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_lr_warmup_steps": str(t.lr_warmup_steps),
        "ss_batch_size_per_device": str(t.train_batch_size),
        "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
        "ss_mixed_precision": t.mixed_precision,
        "ss_max_grad_norm": str(t.max_grad_norm),
        "ss_noise_offset": str(t.noise_offset),
        "ss_min_snr_gamma": str(t.snr_gamma),
        "ss_caption_dropout_rate": str(config.data.caption_dropout),
        "ss_flip_aug": str(config.data.random_flip),
        "ss_seed": str(config.seed),
        "ss_resolution": f"({config.data.resolution}, {config.data.resolution})",  # kohya: str of a tuple
        "ss_training_finished_at": str(time.time()),
        "modelspec.title": Path(config.output_dir).name,
        "modelspec.date": _now(),
        "modelspec.resolution": f"{config.data.resolution}x{config.data.resolution}",
        "modelspec.implementation_version": f"ldm_tune/{_package_version()}",
    }
    if t.train_text_encoder_lora:
        entries["ss_text_encoder_lr"] = str(t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate)
    if prediction is not None:
        entries["modelspec.prediction_type"] = "v" if prediction == "v_prediction" else "epsilon"
    return entries


def _scheduler_prediction_type(model_config) -> str | None:
    # prediction_type null means "the base model's scheduler config"; read it the way load_components does.
    try:
        scheduler = DDPMScheduler.load_config(
            model_config.pretrained_model_name_or_path, subfolder="scheduler", revision=model_config.revision
        )
    except (OSError, ValueError) as error:
        logger.info("Prediction type left out of the LoRA metadata: %s", error)
        return None
    return scheduler.get("prediction_type", "epsilon")


def _package_version() -> str:
    try:
        return version("ldm_tune")
    except PackageNotFoundError:
        return "unknown"


# Reading LoRA files for inference.
def resolve_lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a `lora` argument: a `.safetensors` file (diffusers or kohya format), or a training
    output or checkpoint folder holding `pytorch_lora_weights.safetensors`."""
    path = Path(path)
    if path.is_dir():
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        others = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" It holds {others}: pass one of those files itself." if others else ""
        raise FileNotFoundError(f"`lora` {str(path)!r} is a folder without {LORA_WEIGHT_NAME}.{hint}")
    if not path.exists():
        raise FileNotFoundError(
            f"`lora` {str(path)!r} does not exist; pass a .safetensors LoRA file or a training output or checkpoint "
            f"folder holding {LORA_WEIGHT_NAME}."
        )
    if path.suffix != ".safetensors":
        raise ValueError(
            f"`lora` {str(path)!r} is not a .safetensors file: only safetensors are read (pickled .bin, .pt and "
            ".ckpt files can run code when loaded)."
        )
    return path


def read_lora(file: Path) -> dict[str, torch.Tensor]:
    """The LoRA in `file` as diffusers reads it: kohya keys converted, `unet.` and `text_encoder.` prefixes."""
    try:
        with safe_open(file, framework="pt") as handle:  # truncated or foreign bytes fail here, with the reason
            handle.keys()
        return StableDiffusionPipeline.lora_state_dict(str(file.parent), weight_name=file.name)[0]
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
        # KeyError & co. come from diffusers' kohya conversion of an incomplete file (e.g. a lora_down without up).
        raise ValueError(f"`lora` {str(file)!r} could not be read as a LoRA file: {error}") from error


def check_lora_fits(
    state: dict[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module, file: Path
) -> None:
    """Raise one ValueError, before anything is loaded, unless every LoRA layer of `state` (from `read_lora`) has a
    layer of the same name and size in the models. diffusers would otherwise fail half-way, or skip layers with a
    warning and give a silently different model."""
    # diffusers' own test (load_lora_weights): every key of a LoRA names a `lora` weight.
    if not state or not all("lora" in key for key in state):
        examples = sorted(key for key in state if "lora" not in key)[:3]
        raise ValueError(f"`lora` {str(file)!r} holds no LoRA weights (it has keys like {examples}).")
    other = sorted({key.split(".")[0] for key in state} - {"unet", "text_encoder"})
    problems = [f"weights for {other}, which a Stable Diffusion 1.x/2.x model does not have"] if other else []
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        try:
            part = _peft_part(state, prefix, model)
        except ValueError as error:  # e.g. "Could not automatically infer state dict type", as diffusers would fail
            raise ValueError(f"`lora` {str(file)!r} has {prefix} weights diffusers cannot read: {error}") from error
        modules = dict(model.named_modules())
        for key, tensor in part.items():
            if key.endswith((".lora_A.weight", ".lora_B.weight")):
                problem = _layer_mismatch(modules.get(key.rsplit(".", 2)[0]), key, tensor)
                problems += [f"{prefix}.{problem}"] if problem else []
    if problems:
        raise ValueError(
            f"`lora` {str(file)!r} does not fit this model (a LoRA for another architecture?): {len(problems)} "
            f"mismatch(es), e.g. {'; '.join(problems[:3])}."
        )


def _peft_part(state: dict[str, torch.Tensor], prefix: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # The key conversions diffusers applies before injecting adapters: UNet2DConditionModel.load_lora_adapter
    # (loaders/peft.py) and _load_lora_into_text_encoder (loaders/lora_base.py).
    part = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(f"{prefix}.")}
    if not part:
        return {}
    if prefix == "unet":
        return part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):
        part = {key.removeprefix("text_model."): value for key, value in part.items()}
    return part


def _layer_mismatch(module: torch.nn.Module | None, key: str, tensor: torch.Tensor) -> str | None:
    name, kind = key.rsplit(".", 2)[:2]
    layer = getattr(module, "base_layer", module)  # a layer that already carries an adapter wraps the original
    if isinstance(layer, torch.nn.Linear):
        fan_in, fan_out = layer.in_features, layer.out_features
    elif isinstance(layer, torch.nn.Conv2d):
        fan_in, fan_out = layer.in_channels, layer.out_channels
    else:
        return f"{name}: the model has no linear or convolution layer of that name"
    if kind == "lora_A" and tensor.shape[1] != fan_in:
        return f"{key} has shape {tuple(tensor.shape)}, but the layer takes {fan_in} inputs"
    if kind == "lora_B" and tensor.shape[0] != fan_out:
        return f"{key} has shape {tuple(tensor.shape)}, but the layer gives {fan_out} outputs"
    return None


def load_lora_into_adapters(
    folder: str | os.PathLike, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None
) -> None:
    """Set the weights of `folder`'s LoRA file into the existing "default" adapters (resuming a run).

    Every adapter weight of the models must be in the file: a mismatch raises instead of resuming half a model.
    """
    state = StableDiffusionPipeline.lora_state_dict(Path(folder), weight_name=LORA_WEIGHT_NAME)[0]
    unet_state = convert_unet_state_dict_to_peft({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    _check_complete(unet, unet_state, "unet")
    set_peft_model_state_dict(unet, unet_state, adapter_name=ADAPTER)
    if has_adapter(text_encoder):
        text_state = {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")}
        # diffusers' own conversion chain for text encoders (as in `_set_state_dict_into_text_encoder`).
        text_state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text_state))
        _check_complete(text_encoder, text_state, "text_encoder")
        _set_state_dict_into_text_encoder(state, prefix="text_encoder.", text_encoder=text_encoder)


def _check_complete(model: torch.nn.Module, state: dict, name: str) -> None:
    expected = set(_peft_state(model))
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"The LoRA file does not match the {name}'s adapters: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {unexpected[:3]} ({len(unexpected)})."
        )
