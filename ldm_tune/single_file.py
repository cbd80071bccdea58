"""Loading a single-file checkpoint (`.safetensors`, or `.ckpt` read as weights only) in the original ldm layout.

The weights are converted by diffusers' own single-file machinery (`from_single_file` of each model class, and
`create_diffusers_clip_model_from_ldm` for the text encoder, as `StableDiffusionPipeline.from_single_file` does in
`diffusers/loaders/single_file.py`). diffusers needs a diffusers-format config for every component; offline it
cannot fetch one, so ldm_tune ships the SD 1.5 and SD 2.1 (768 px, v-prediction) configs in
`ldm_tune/model_configs/` and picks one from the checkpoint's keys and shapes. Any other architecture (a fine-tuned
tiny model, an inpainting UNet) needs `config=`: a diffusers-format folder of the same architecture.

The CLIP tokenizer comes from `config`'s `tokenizer/`, else from the local Hugging Face cache
(`openai/clip-vit-large-patch14` for SD 1.x, `stabilityai/stable-diffusion-2-1` for SD 2.x), else, for SD 1.x and
2.x, from OpenAI CLIP's BPE file shipped in `ldm_tune/model_configs/clip_bpe/`: both tokenize with that one
vocabulary and differ only in the pad token. Any other architecture without a tokenizer stops with the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ldm_tune.components import SINGLE_FILE_SUFFIXES, ModelComponents, load_unet
from ldm_tune.data.pipeline import default_cache_dir


logger = logging.getLogger(__name__)

MODEL_CONFIGS = Path(__file__).with_name("model_configs")
# OpenAI CLIP's BPE merges (MIT licence), as open-clip-torch 3.3.0 ships them (model_configs/README.md).
CLIP_BPE = MODEL_CONFIGS / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


@dataclass(frozen=True)
class Shipped:
    """An architecture ldm_tune has configs for: the config folder, and its tokenizer's hub id and pad token."""

    config: str
    hub_id: str
    subfolder: str
    pad_token: str


# The pad tokens are the hub tokenizers' (special_tokens_map.json): SD 1.x pads with "<|endoftext|>" (49407); SD 2.x
# with "!" (id 0), as OpenCLIP's tokenizer pads with zeros (Stability-AI/stablediffusion#28, diffusers#2201,
# transformers#24925). The text encoders were trained on those paddings, so each keeps its own.
SHIPPED = {
    "v1": Shipped("sd15", "openai/clip-vit-large-patch14", "", "<|endoftext|>"),
    "v2": Shipped("sd21-v", "stabilityai/stable-diffusion-2-1", "tokenizer", "!"),
}
# The prefixes of the ldm layout (as in diffusers' single_file_utils) and what each part is.
PARTS = {
    "UNet (model.diffusion_model.*)": ("model.diffusion_model.",),
    "VAE (first_stage_model.*)": ("first_stage_model.",),
    "text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)": (
        "cond_stage_model.transformer.",
        "cond_stage_model.model.",
    ),
}
# Keys whose shapes tell SD 1.x from SD 2.x (diffusers' CHECKPOINT_KEY_NAMES["v2"] is the cross-attention key).
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CROSS_ATTENTION_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SHAPES = {"v1": {_CONV_IN: (320, 4, 3, 3), _CROSS_ATTENTION_K: (320, 768)},
           "v2": {_CONV_IN: (320, 4, 3, 3), _CROSS_ATTENTION_K: (320, 1024)}}  # fmt: skip


def is_single_file(path: str | os.PathLike) -> bool:
    """True for an existing `.safetensors` or `.ckpt` file."""
    return Path(path).is_file() and Path(path).suffix in SINGLE_FILE_SUFFIXES


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a single-file checkpoint and its safetensors header metadata.

    A `.ckpt` is read with `torch.load(weights_only=True)`: tensors, numbers, strings and containers only. A pickle
    that needs anything else (a class instance, a callable: what makes a pickle run code) is refused with the
    reason, and nothing in it runs.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"`model` {str(path)!r} could not be read as a safetensors file: {error}") from error
    elif path.suffix == ".ckpt":
        state, metadata = _read_ckpt(path), {}
    else:
        raise ValueError(f"`model` {str(path)!r} must be a .safetensors or .ckpt file, got {path.suffix!r}.")
    while isinstance(state.get("state_dict"), dict):  # ldm/Lightning checkpoints nest the weights
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, metadata


def _read_ckpt(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()
        reason = next((line for line in reason if "Unsupported" in line or "global" in line), reason[0])
        raise ValueError(
            f"`model` {str(path)!r} is a pickle that needs more than weights to load ({reason.strip()}); it was "
            "refused unread, because loading it could run code. Convert it to .safetensors where you trust it."
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"`model` {str(path)!r} could not be read as a .ckpt checkpoint: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"`model` {str(path)!r} holds a {type(state).__name__}, not a dict of weights.")
    return state


def model_type(shapes: dict[str, tuple[int, ...]], path: str | os.PathLike) -> str:
    """`"v1"`, `"v2"` (the SD 1.x / 2.x architectures of the shipped configs) or `"other"`, from key shapes.

    Raises:
        ValueError: when the file lacks a UNet, VAE or text encoder in the ldm layout (naming what is missing).
    """
    missing = [name for name, prefixes in PARTS.items() if not any(k.startswith(prefixes) for k in shapes)]
    if missing:
        examples = sorted(shapes)[:3]
        raise ValueError(
            f"`model` {str(path)!r} is not a Stable Diffusion single-file checkpoint: it has no {', '.join(missing)} "
            f"weights (its keys look like {examples}). ldm_tune reads the original ldm layout, as A1111 and "
            "`ldm-tune export` write it; a diffusers-format model is a folder."
        )
    for name, expected in _SHAPES.items():
        if all(tuple(shapes.get(key, ())) == shape for key, shape in expected.items()):
            return name
    return "other"


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    # A safetensors header gives every key and shape without reading the weights; a .ckpt must be read.
    if path.suffix != ".safetensors":
        state, metadata = read_checkpoint(path)
        return _shapes(state), metadata
    try:
        with safe_open(path, framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return shapes, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"`model` {str(path)!r} could not be read as a safetensors file: {error}") from error


def single_file_configs(path: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """The scheduler and VAE configs a single file will load with, and a check that its tokenizer is there, all
    before any weights are read (for `ldm-tune generate`'s up-front checks)."""
    path = Path(path)
    shapes, metadata = _header(path)
    kind = model_type(shapes, path)
    folder = resolve_config(path, kind, config)
    load_tokenizer(folder, kind)
    return scheduler_config_for(folder, metadata), dict(AutoencoderKL.load_config(folder, subfolder="vae"))


def resolve_config(path: str | os.PathLike, kind: str, config: str | os.PathLike | None) -> Path:
    """The diffusers-format config folder for a single file: `config` if given, else the shipped one."""
    if config is not None:
        folder = Path(config)
        needed = [f"{name}/config.json" for name in ("unet", "vae", "text_encoder")] + [
            "scheduler/scheduler_config.json"
        ]
        absent = [name for name in needed if not (folder / name).is_file()]
        if absent:
            raise FileNotFoundError(
                f"`config` {str(folder)!r} must be a diffusers-format folder with {', '.join(needed)}; it lacks "
                f"{', '.join(absent)}."
            )
        return folder
    if kind not in SHIPPED:
        raise ValueError(
            f"`model` {str(path)!r} is not the SD 1.x or SD 2.x architecture whose configs ldm_tune ships; pass "
            "`config` (`--config DIR`): a diffusers-format folder of the same architecture (e.g. the model it "
            "was exported from)."
        )
    return MODEL_CONFIGS / SHIPPED[kind].config


def _has_vocabulary(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))


def _cached_vocabulary(hub_id: str, subfolder: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = [f"{subfolder}/{name}" if subfolder else name for name in ("vocab.json", "merges.txt")]
    return all(isinstance(try_to_load_from_cache(hub_id, name), str) for name in names)


def load_tokenizer(folder: Path, kind: str) -> CLIPTokenizer:
    """The tokenizer from `folder/tokenizer/`, else the local HF cache, else (SD 1.x/2.x) the shipped vocabulary.

    The files are looked for first: transformers 5 builds an empty two-token tokenizer, without an error, from a
    folder or hub id that has no vocabulary, and every prompt would then encode to the same tokens.
    """
    if _has_vocabulary(folder / "tokenizer"):
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    if kind in SHIPPED and _cached_vocabulary(SHIPPED[kind].hub_id, SHIPPED[kind].subfolder):
        return CLIPTokenizer.from_pretrained(
            SHIPPED[kind].hub_id, subfolder=SHIPPED[kind].subfolder, local_files_only=True
        )
    if kind in SHIPPED:
        return shipped_tokenizer(kind)
    where = "no `config` was given" if folder.parent == MODEL_CONFIGS else f"`config` {str(folder)!r} has none"
    raise FileNotFoundError(
        f"No CLIP tokenizer for this single file: {where} (a tokenizer/ folder with vocab.json + merges.txt). "
        "ldm_tune ships the CLIP vocabulary of SD 1.x and 2.x only, and this file is neither: pass `config` "
        "(`--config DIR`), a diffusers-format folder with tokenizer/ (e.g. the model it was exported from)."
    )


def shipped_tokenizer(kind: str) -> CLIPTokenizer:
    """SD 1.x's (`"v1"`) or SD 2.x's (`"v2"`) CLIP tokenizer, built offline from the shipped BPE file.

    The hub's tokenizer_config.json of both has `model_max_length` 77 and CLIPTokenizer's default bos, eos and
    unk tokens; only the pad token differs (see `SHIPPED`).
    """
    return CLIPTokenizer.from_pretrained(
        clip_vocabulary_folder(), pad_token=SHIPPED[kind].pad_token, model_max_length=77
    )


def clip_vocabulary_folder() -> Path:
    """A folder with the vocab.json and merges.txt of the shipped BPE file, written once under the cache dir.

    The folder is named by the file's sha256, so an updated BPE file never reuses an old vocabulary.
    """
    digest = hashlib.sha256(CLIP_BPE.read_bytes()).hexdigest()[:16]
    folder = default_cache_dir() / "clip_tokenizer" / digest
    if not _has_vocabulary(folder):
        vocab, merges = clip_vocabulary(CLIP_BPE)
        folder.mkdir(parents=True, exist_ok=True)
        # The "#version" header line is what Hugging Face merges.txt files start with (and the loader skips).
        _write_atomically(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        _write_atomically(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return folder


def clip_vocabulary(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """The token ids and merges of CLIP's BPE file, built as OpenAI CLIP's `clip/simple_tokenizer.py` builds them.

    By hand, as no installed library reads this file (transformers reads the vocab.json + merges.txt that the hub
    stores). The ids: the 256 byte symbols (GPT-2's byte-to-unicode table, which CLIP uses), the same with "</w>"
    (end of word), one per merge in rank order, then <|startoftext|> (49406) and <|endoftext|> (49407): 49408.
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # after the version line; CLIP's vocabulary has 49152 - 256 - 2 merges
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _write_atomically(path: Path, text: str) -> None:
    # Another process may be writing the same file: each writes its own temporary file and renames it into place.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def scheduler_config_for(folder: Path, metadata: dict[str, str]) -> dict:
    """The noise schedule: the file's own record (written by `ldm-tune export`) wins over the config folder's.

    `prediction_type` is not in the weights (SD 2.x-base and 2.x-768 have the same keys), so it comes from the
    header's `prediction_type` when the file has one. diffusers' `from_single_file` learns it from the `config`
    folder's scheduler (or a `scheduler=` object), never from the file.
    """
    scheduler_config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler"))
    try:
        scheduler_config.update(json.loads(metadata.get("ldm_tune.scheduler_config", "{}")))
    except ValueError:
        logger.warning("Ignoring an unreadable `ldm_tune.scheduler_config` in the file's header.")
    if metadata.get("prediction_type") in ("epsilon", "v_prediction", "sample"):
        scheduler_config["prediction_type"] = metadata["prediction_type"]
    return scheduler_config


def _check_loaded(model: torch.nn.Module, what: str, path) -> None:
    # diffusers loads with strict=False onto empty (meta) weights: a weight the file lacks stays unset.
    unset = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if unset:
        raise ValueError(
            f"`model` {str(path)!r} lacks {len(unset)} {what} weight(s) of its config's architecture, e.g. "
            f"{unset[:3]}; pass `config` of the architecture the file was made from."
        )


def _missing_weights(state: dict[str, torch.Tensor], folder: Path) -> list[str]:
    # What diffusers' converters cannot fill (it loads onto empty weights, then fails on the first unset one
    # with "Cannot copy out of meta tensor"): the models are built on the meta device, so nothing is allocated.
    missing = []
    for model_class, convert, subfolder in (
        (UNet2DConditionModel, convert_ldm_unet_checkpoint, "unet"),
        (AutoencoderKL, convert_ldm_vae_checkpoint, "vae"),
    ):
        config = model_class.load_config(folder, subfolder=subfolder)
        with torch.device("meta"):
            expected = model_class.from_config(config).state_dict()
        try:
            converted = convert(state, config)
        except (KeyError, ValueError, RuntimeError):  # too foreign to convert at all: the original error says more
            continue
        missing += [f"{subfolder}.{key}" for key in sorted(set(expected) - set(converted))]
    return missing


def load_single_file(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    torch_dtype: torch.dtype = torch.float32,
    unet: UNet2DConditionModel | None = None,
    unet_path: str | os.PathLike | None = None,
) -> ModelComponents:
    """Load the components of a single-file checkpoint (see the module docstring for configs and tokenizers)."""
    state, metadata = read_checkpoint(path)
    kind = model_type(_shapes(state), path)
    folder = resolve_config(path, kind, config)
    tokenizer = load_tokenizer(folder, kind)  # before the weights: the likeliest thing to be missing offline
    # Cast here rather than with `torch_dtype=`: diffusers then calls `model.to(dtype)`, which warns on every load.
    state = {key: tensor.to(torch_dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    common = {"config": str(folder), "local_files_only": True}
    try:
        if unet is None and unet_path is not None:
            unet = load_unet(unet_path, torch_dtype=torch_dtype)
        elif unet is None:
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder", **common)
    except (RuntimeError, KeyError, ValueError) as error:  # weights missing from the file, or of other shapes
        missing = _missing_weights(state, folder)
        # diffusers' shape message goes on to suggest `ignore_mismatched_sizes`, i.e. random weights: cut that.
        reason = str(error).splitlines()[0].split(". If you want")[0]
        reason = f"it lacks {len(missing)} weight(s), e.g. {missing[:3]}" if missing else reason
        raise ValueError(
            f"`model` {str(path)!r} does not fit the configs in {str(folder)!r} ({reason}); pass `config` of the "
            "architecture the file was made from."
        ) from error
    for model, what in ((unet, "UNet"), (vae, "VAE"), (text_encoder, "text encoder")):
        _check_loaded(model, what, path)
    return ModelComponents(vae, text_encoder, tokenizer, unet, scheduler_config_for(folder, metadata))
