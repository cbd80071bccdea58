"""Loading the components of a Stable-Diffusion-format model: local folder or hub id, safetensors only.

A Stable-Diffusion-format model is a folder (or hub repository) with `model_index.json` and one subfolder per
component: `unet/`, `vae/`, `text_encoder/` (each a config plus safetensors weights), `tokenizer/` and
`scheduler/`. A training checkpoint's `unet/` folder can replace the base UNet.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_tune.io_utils import check_new_folder, save_atomically


logger = logging.getLogger(__name__)

# subfolder -> the files that make it usable (any one group of alternatives must be present).
REQUIRED_FILES = {
    "unet": (("config.json",), ("*.safetensors", "*.safetensors.index.json")),
    "vae": (("config.json",), ("*.safetensors", "*.safetensors.index.json")),
    "text_encoder": (("config.json",), ("*.safetensors", "*.safetensors.index.json")),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "scheduler": (("scheduler_config.json",),),
}
SD_FOLDER_HELP = (
    "A Stable-Diffusion-format folder holds model_index.json and the subfolders unet/, vae/, text_encoder/ "
    "(each a config.json plus .safetensors weights), tokenizer/ (tokenizer.json or vocab.json + merges.txt) and "
    "scheduler/ (scheduler_config.json). `ldm-tune init-model` writes one."
)
# One part of a hub repository id, as huggingface_hub's `validate_repo_id` allows it: letters, digits, '-', '_' and
# '.', not starting or ending with '-' or '.', at most 96 characters ("--" and ".." are refused separately).
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}", re.ASCII)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # original-layout checkpoints, read by ldm_tune.single_file


@dataclass
class ModelComponents:
    """The four models of a Stable Diffusion checkpoint plus its scheduler config."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler_config: dict


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; anything else is passed to `torch.device`."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (what SD checkpoints are made for), fp32 elsewhere (CPU half precision is slow or missing)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def looks_like_local_path(name: str) -> bool:
    """True when `name` can only be a local path, never a hub id.

    That is: it starts with '.', '/' or '~', holds a backslash (or the OS's own separator), has no '/' or more than
    one, is not shaped like a hub id (see `is_hub_id`), or its first part exists here (`models/tyni` with a local
    `models/` folder is a mistyped path, not the hub repository `tyni` of a user `models`).
    """
    text = str(name)
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or (os.sep != "/" and os.sep in text)
        or text.count("/") != 1
        or not _HUB_ID.fullmatch(text)
        or "--" in text
        or ".." in text
        or text.endswith(".git")
        or Path(text.split("/")[0]).exists()
    )


def is_hub_id(name: str) -> bool:
    """True when `name` is taken for a Hugging Face hub id: no file or folder of that name exists here, and it has
    exactly one '/' between two parts of the hub's allowed characters, with no leading '.', '/' or '~' and no local
    folder of its first part (see `looks_like_local_path`). Everything else is a local path."""
    return not Path(str(name)).exists() and not looks_like_local_path(name)


def check_model_source(name: str | os.PathLike, what: str = "model") -> str:
    """Say whether `name` is a `"local"` path (folder or single-file checkpoint) or a `"hub"` id, before anything loads.

    Raises:
        ValueError: for a local file that is not `.safetensors` or `.ckpt`.
        FileNotFoundError: for a local path that does not exist, e.g. f"`model` {name!r} does not exist.";
            a mistyped local path is never looked up on the hub.
    """
    text = str(name)
    if Path(text).is_file() and Path(text).suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"`{what}` {text!r} is a file but not a single-file checkpoint: a model is a Stable-Diffusion-format "
            f"folder, a hub id, or a {' or '.join(SINGLE_FILE_SUFFIXES)} file in the original ldm layout."
        )
    if Path(text).exists():
        return "local"
    if is_hub_id(text):
        return "hub"
    raise FileNotFoundError(
        f"`{what}` {text!r} does not exist. A local path must exist; a hub id is `owner/name` with exactly one '/' "
        "(no leading '.', '/' or '~', and no local folder named like its owner)."
    )


def _has(folder: Path, patterns: tuple[str, ...]) -> bool:
    return any(any(folder.glob(pattern)) for pattern in patterns)


def check_model_folder(path: str | os.PathLike) -> Path:
    """Check that `path` is a complete Stable-Diffusion-format folder; one error lists everything missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"`pretrained_model_name_or_path` {str(path)!r} does not exist. {SD_FOLDER_HELP}")
    if not path.is_dir():
        raise NotADirectoryError(f"`pretrained_model_name_or_path` {str(path)!r} is not a folder. {SD_FOLDER_HELP}")
    missing = []
    for subfolder, groups in REQUIRED_FILES.items():
        folder = path / subfolder
        if not folder.is_dir():
            missing.append(f"{subfolder}/")
            continue
        for patterns in groups:
            if not _has(folder, patterns):
                missing.append(f"{subfolder}/{' or '.join(patterns)}")
    if missing:
        bins = [p.parent.name for p in path.glob("*/*.bin")]
        hint = (
            f" The pickled .bin weights in {sorted(set(bins))} are not loaded: ldm_tune reads safetensors only."
            if bins
            else ""
        )
        raise FileNotFoundError(f"{str(path)!r} is missing {', '.join(missing)}.{hint} {SD_FOLDER_HELP}")
    return path


def load_unet(path: str | os.PathLike, **kwargs) -> UNet2DConditionModel:
    """Load a UNet from a training checkpoint or output folder (holding `unet/`), or from a UNet folder itself."""
    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, **kwargs)
    if (path / "config.json").is_file() and _has(path, ("*.safetensors", "*.safetensors.index.json")):
        return UNet2DConditionModel.from_pretrained(path, use_safetensors=True, **kwargs)
    raise FileNotFoundError(
        f"`checkpoint` {str(path)!r} holds no UNet: expected {str(path / 'unet')!r} with config.json and "
        "safetensors weights (a training checkpoint or output folder), or a UNet folder itself."
    )


EMA_FOLDER = "unet_ema"  # beside `unet/` in a `checkpoint-N` of a run with `training.use_ema` (EMAModel format)
_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")


@dataclass
class CheckpointUNet:
    """Which UNet folder of a training checkpoint or output folder to load, and what the run trained.

    folder: the UNet folder itself (config.json plus safetensors weights).
    weights: "ema" (the exponential moving average, what made the run's validation images) or "raw".
    prediction_type: the run's `prediction_type` (None: not recorded, the base model's own applies).
    """

    folder: Path
    weights: str
    prediction_type: str | None


def _read_json(path: Path) -> dict:
    import json

    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return document if isinstance(document, dict) else {}


def _run_facts(folder: Path) -> tuple[str | None, bool | None]:
    """The `prediction_type` and `training.use_ema` of the run that wrote `folder` (a run folder, or a
    `checkpoint-N`/`best`/`unet` folder inside one): from `summary.json` and `pipeline/scheduler/` of a finished run,
    else from the run's `config.yaml`. None where nothing records it."""
    prediction_type = use_ema = None
    for run in (folder, folder.parent, folder.parent.parent)[: 3 if folder.name in ("unet", EMA_FOLDER) else 2]:
        if prediction_type is None:
            prediction_type = _read_json(run / "summary.json").get("prediction_type")
        if prediction_type is None:
            scheduler = _read_json(run / "pipeline" / "scheduler" / "scheduler_config.json")
            prediction_type = scheduler.get("prediction_type")
        config = _read_yaml(run / "config.yaml")
        model, training = config.get("model"), config.get("training")
        if prediction_type is None and isinstance(model, dict):
            prediction_type = model.get("prediction_type")
        if use_ema is None and isinstance(training, dict) and "use_ema" in training:
            use_ema = bool(training["use_ema"])
        if config:  # the run's own folder: stop here
            break
    return prediction_type, use_ema


def checkpoint_unet(path: str | os.PathLike, use_ema: bool = True) -> CheckpointUNet:
    """Resolve a `checkpoint` (training `checkpoint-N`, finished output folder, `best/`, or a UNet folder).

    A `checkpoint-N` of a run with EMA holds the raw weights in `unet/` and the EMA weights in `unet_ema/`: the EMA
    ones are used unless `use_ema=False`. An output folder's (or `best/`'s) `unet/` already holds the EMA weights
    when the run used EMA (the raw ones are not kept there).
    """
    path = Path(path)
    prediction_type, run_used_ema = _run_facts(path)
    ema = path / EMA_FOLDER
    if (ema / "config.json").is_file() and _has(ema, ("*.safetensors", "*.safetensors.index.json")):
        if use_ema:
            return CheckpointUNet(ema, "ema", prediction_type)
        return CheckpointUNet(path / "unet", "raw", prediction_type)
    if path.name == EMA_FOLDER:  # the EMA folder itself
        return CheckpointUNet(path, "ema", prediction_type)
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    in_checkpoint = any(_CHECKPOINT_NAME.match(p.name) for p in (path, path.parent))
    if run_used_ema and not in_checkpoint:  # an export: the trainer wrote the EMA weights as unet/
        if not use_ema:
            logger.info("%s holds the run's EMA weights only (an export, no raw UNet): using them.", path)
        return CheckpointUNet(folder, "ema", prediction_type)
    if use_ema:
        logger.info("%s has no EMA weights (no %s/): using the raw UNet.", path, EMA_FOLDER)
    return CheckpointUNet(folder, "raw", prediction_type)


def load_components(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    unet_path: str | os.PathLike | None = None,
    unet: UNet2DConditionModel | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike | None = None,
) -> ModelComponents:
    """Load VAE, text encoder, tokenizer, UNet and scheduler config of a Stable-Diffusion-format model.

    Args:
        pretrained_model_name_or_path: a local folder, a hub id such as `runwayml/stable-diffusion-v1-5`, or a
            single-file `.safetensors` (or weights-only `.ckpt`) checkpoint in the original ldm layout.
        unet_path: optional training checkpoint (or UNet folder) whose UNet replaces the base one.
        unet: an in-memory UNet to use instead of loading one (e.g. when exporting a trained model).
        revision, variant, cache_dir: passed to `from_pretrained` (e.g. `variant="fp16"`).
        torch_dtype: cast the loaded models to this dtype (default: keep the stored dtype promoted to fp32).
        config: for a single file only, a diffusers-format folder of its architecture (configs and tokenizer);
            without it the shipped SD 1.5 / SD 2.1 configs are used (see `ldm_tune.single_file`).

    Only safetensors weights (or a `.ckpt` read as weights only) are read and no remote code is ever run.
    """
    source = str(pretrained_model_name_or_path)
    dtype = torch_dtype or torch.float32
    if Path(source).is_file() and Path(source).suffix in SINGLE_FILE_SUFFIXES:
        from ldm_tune.single_file import load_single_file  # it imports this module

        return load_single_file(source, config=config, torch_dtype=dtype, unet=unet, unet_path=unet_path)
    if config is not None:
        raise ValueError(f"`config` is only for a single-file `model`; {source!r} has its own configs.")
    if not is_hub_id(source):
        check_model_folder(source)
    hub = {"revision": revision, "cache_dir": cache_dir}
    weights = {**hub, "variant": variant, "use_safetensors": True}
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **weights)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights).to(dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
        # Any scheduler class reads scheduler_config.json; the dict keeps every key of the model's own config.
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **hub))
        if unet is None and unet_path is not None:
            unet = load_unet(unet_path, torch_dtype=dtype)
        elif unet is None:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **weights)
    except OSError as error:
        if not is_hub_id(source):
            raise
        raise OSError(
            f"Could not load {source!r} from the Hugging Face hub (offline, unknown repository, or no "
            f"safetensors weights): {error}. A local path must exist; {SD_FOLDER_HELP}"
        ) from error
    return ModelComponents(vae, text_encoder, tokenizer, unet, scheduler_config)


def save_model_folder(components: ModelComponents, out_dir: str | os.PathLike, replace: bool = False) -> Path:
    """Write `components` as a Stable-Diffusion-format folder that `StableDiffusionPipeline.from_pretrained` loads.

    Written under a temporary name and renamed when complete, so an interrupted write never looks like a model.
    An existing non-empty `out_dir` is refused unless `replace` (for folders this tool owns, like `pipeline/`).
    """
    out_dir = Path(out_dir) if replace else check_new_folder(out_dir)
    scheduler_class = getattr(diffusers, components.scheduler_config.get("_class_name", ""), diffusers.PNDMScheduler)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler_class.from_config(components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(lambda tmp: pipeline.save_pretrained(tmp, safe_serialization=True), out_dir)
    logger.info("Wrote %s", out_dir)
    return out_dir


def freeze(*models: torch.nn.Module) -> None:
    """Switch models to eval mode and turn off their gradients (the frozen VAE and text encoder)."""
    for model in models:
        model.eval()
        model.requires_grad_(False)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixel size of one latent cell: 2 ** (number of VAE blocks - 1), 8 for Stable Diffusion."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latents_to_vae_space(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent normalisation before decoding: `z / scaling_factor (+ shift_factor when the VAE has one)`."""
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    return latents + shift if shift is not None else latents


def vae_space_to_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Normalise VAE latents for the UNet: `(z - shift_factor) * scaling_factor`, never a hard-coded 0.18215."""
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


def sharpen_posterior(vae: AutoencoderKL, log_variance: float = -20.0) -> AutoencoderKL:
    """Make a randomly initialised VAE's posterior nearly deterministic (std ~5e-5 at -20); returns `vae`.

    A random encoder predicts log-variance ~0, a posterior std of ~1 against a mean of std ~0.2: its latents are
    almost pure sampling noise, which no UNet can learn and which a VAE trained from there must first learn to
    suppress. A trained VAE's posterior is nearly deterministic (with the small KL weights of latent diffusion,
    arXiv 2112.10752); start there.
    """
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(log_variance)
    return vae


def select_trainable(model: torch.nn.Module, patterns: list[str]) -> int:
    """Freeze every parameter whose name contains none of `patterns`; returns the number of trainable values.

    E.g. `["attn2."]` trains only the UNet's cross-attention, the layers that read the text: Custom Diffusion
    (Kumari et al. 2023, arXiv 2212.04488) fine-tunes new concepts there (its K/V), which forgets far less of what
    the model knew than training every weight.
    """
    names = [name for name, _ in model.named_parameters()]
    chosen = {name for name in names if any(pattern in name for pattern in patterns)}
    if not chosen:
        raise ValueError(
            f"`training.trainable_modules` {patterns} matches no parameter of the {type(model).__name__}; names "
            f"look like {names[:2] + names[len(names) // 2 : len(names) // 2 + 2]}."
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Training %d of %d parameters (%s).", count, sum(p.numel() for p in model.parameters()), patterns)
    return count
