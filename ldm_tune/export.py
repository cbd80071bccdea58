"""Export a diffusers model as one `.safetensors` file in the original CompVis/LDM layout (A1111, ComfyUI, ...).

The layout is what diffusers' single-file loaders read: `model.diffusion_model.*` (UNet), `first_stage_model.*`
(VAE) and `cond_stage_model.transformer.*` (an OpenAI CLIP text encoder, SD 1.x) or `cond_stage_model.model.*` (an
OpenCLIP one, SD 2.x). The key mapping is the inverse of diffusers' converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint` in `diffusers/loaders/single_file_utils.py`), as
diffusers' own `scripts/convert_diffusers_to_original_stable_diffusion.py` writes it. That script hard-codes the SD
1.x block counts (`for i in range(4)`, `range(3)`) and writes SD 2.x text-encoder keys that diffusers cannot read
back; here the block numbering comes from the UNet's config, and every export is checked by running diffusers'
forward converters on it: a file is only written when they give back exactly the model's own tensors.

Nothing in the weights says how the model was trained to predict (SD 2.x-base and 2.x-768 have the same keys), so
the header records `prediction_type` (and the whole scheduler config). ldm_tune's loaders (`load_components`,
`LDMInference.from_pretrained`, `ldm-tune generate --model FILE`) read it from there. diffusers'
`StableDiffusionPipeline.from_single_file(FILE, config=DIR)` takes its scheduler from DIR instead (its
`prediction_type=` argument is deprecated and only used without a config): for a v-prediction export pass
`scheduler=DDIMScheduler.from_pretrained(DIR, subfolder="scheduler", prediction_type="v_prediction")`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file

from ldm_tune.components import ModelComponents, checkpoint_unet, load_components
from ldm_tune.inference_lora import _check_scale, _sha256
from ldm_tune.lora_files import check_lora_fits, read_lora, resolve_lora_file


logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: ldm's FrozenCLIPEmbedder (transformers' CLIPTextModel)
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: ldm's FrozenOpenCLIPEmbedder (open_clip's text tower)

# diffusers ResnetBlock2D -> ldm ResBlock (openaimodel.py): the inverse of `update_unet_resnet_ldm_to_diffusers`.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
# diffusers' VAE attention -> ldm AttnBlock: the inverse of `update_vae_attentions_ldm_to_diffusers`.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# transformers' CLIP encoder layer -> open_clip's ResidualAttentionBlock (the inverse of diffusers'
# DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]); q/k/v are concatenated into `attn.in_proj_*` separately.
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """`key` with its longest matching diffusers prefix replaced by the ldm one (None: no prefix matches)."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old) :]
            for part, new_part in (inner or {}).items():
                if rest.startswith(part + "."):
                    rest = new_part + rest[len(part) :]
                    break
            return prefixes[old] + rest
    return None


def _unet_prefixes(config) -> dict[str, str]:
    """diffusers block prefix -> ldm `input_blocks.N.M.` / `middle_block.N.` / `output_blocks.N.M.` prefix.

    ldm numbers its blocks flat: input block 0 is `conv_in`, then each down block has `layers_per_block` resnet
    (+ attention) blocks and one downsampler; the up blocks have `layers_per_block + 1` each, the upsampler sitting
    beside the last resnet (after its attention, when there is one). The same arithmetic as the forward converter.
    """
    per = config.layers_per_block
    if not isinstance(per, int):
        raise ValueError(f"`unet.config.layers_per_block` must be one number for the ldm layout, got {per!r}.")
    prefixes = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}  # fmt: skip
    blocks = len(config.down_block_types)
    for i in range(blocks):
        for j in range(per):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
    for i, block_type in enumerate(config.up_block_types):
        for j in range(per + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (per + 1) + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (per + 1) + j}.1."
        upsampler = 2 if "CrossAttn" in block_type else 1
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{upsampler}."
    return prefixes


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A `UNet2DConditionModel` state dict in the ldm layout, without the `model.diffusion_model.` prefix."""
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # conv_in, time embedding, conv_out: renamed one to one
    prefixes, out = _unet_prefixes(config), {}
    for key, tensor in state.items():
        inner = _UNET_RESNET if ".resnets." in key else None
        new = top.get(key) or _rename(key, prefixes, inner)
        if new is None:
            raise ValueError(f"The UNet weight {key!r} has no place in the ldm layout (an SD 1.x/2.x UNet is needed).")
        out[new] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An `AutoencoderKL` state dict in the ldm layout, without the `first_stage_model.` prefix.

    ldm's VAE attention uses 1x1 convolutions where diffusers uses linear layers: those weights get two trailing
    singleton dimensions back (`conv_attn_to_linear` in diffusers removes them).
    """
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    blocks = len(config.up_block_types)
    prefixes = {}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(len(config.down_block_types)):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
    for i in range(blocks):  # ldm counts the decoder's up blocks from the lowest resolution upwards, diffusers down
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{blocks - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{blocks - 1 - i}.upsample."
    out = {}
    for key, tensor in state.items():
        attention = ".mid_block.attentions." in key
        new = top.get(key) or _rename(key, prefixes, _VAE_ATTENTION if attention else None)
        if new is None:
            raise ValueError(f"The VAE weight {key!r} has no place in the ldm layout (an SD 1.x/2.x VAE is needed).")
        if attention and tensor.ndim == 2:  # linear (out, in) -> 1x1 convolution (out, in, 1, 1)
            tensor = tensor[:, :, None, None]
        out[new.replace("conv_shortcut", "nin_shortcut")] = tensor
    return out


def uses_open_clip_layout(text_encoder) -> bool:
    """SD 2.x's text encoder is OpenCLIP ViT-H (GELU); SD 1.x's is OpenAI CLIP ViT-L (QuickGELU). The activation is
    what tells the two architectures apart, and what an ldm config's choice of embedder amounts to."""
    return text_encoder.config.hidden_act == "gelu"


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """A `CLIPTextModel` state dict in the ldm layout, with its `cond_stage_model.` prefix."""
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the ldm keys keep it.
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}
    state.pop("text_model.embeddings.position_ids", None)  # a buffer, rebuilt by every loader
    if not uses_open_clip_layout(text_encoder):
        return {CLIP_PREFIX + key: tensor for key, tensor in state.items()}
    return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in _open_clip_state(state).items()}


def _open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # diffusers' SD 2.x text encoder is open_clip's text tower minus its last block (SD 2 conditions on the
    # penultimate layer), without `text_projection` and `logit_scale`, which SD 2 never uses: those are not made
    # up here, as diffusers' own export script does not; ldm loaders read checkpoints with strict=False.
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight",
           "text_model.final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    out, qkv = {}, {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        if not key.startswith("text_model.encoder.layers."):
            raise ValueError(f"The text encoder weight {key!r} has no place in the open_clip layout.")
        index, rest = key[len("text_model.encoder.layers.") :].split(".", 1)
        block = f"transformer.resblocks.{index}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, projection, kind = rest.split(".")  # q/k/v weights or biases -> one in_proj_{weight,bias}
            qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[projection[0]] = tensor
            continue
        new = _rename(rest, {"": ""}, _OPEN_CLIP_LAYER)
        out[block + new] = tensor
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def components_to_ldm(components: ModelComponents) -> dict[str, torch.Tensor]:
    """Every weight of the model in the ldm single-file layout, checked against diffusers' forward converters."""
    unet = unet_to_ldm(components.unet.state_dict(), components.unet.config)
    vae = vae_to_ldm(components.vae.state_dict(), components.vae.config)
    state = {**{UNET_PREFIX + k: v for k, v in unet.items()}, **{VAE_PREFIX + k: v for k, v in vae.items()}}
    state.update(text_encoder_to_ldm(components.text_encoder))
    check_round_trip(state, components)
    return state


def check_round_trip(state: dict[str, torch.Tensor], components: ModelComponents) -> None:
    """Raise unless diffusers' own converters turn `state` back into exactly the models' tensors.

    This is the test that the inverse mapping is right for this very architecture (block counts, attention
    placement, text encoder kind), so that no file is written that diffusers, A1111 or ComfyUI would misread.
    """
    text_encoder = components.text_encoder
    if uses_open_clip_layout(text_encoder):
        text = convert_open_clip_checkpoint(text_encoder, state, prefix=OPEN_CLIP_PREFIX)
    else:
        text = convert_ldm_clip_checkpoint(state)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        text = {key.removeprefix("text_model."): value for key, value in text.items()}
    converted = {
        "unet": (convert_ldm_unet_checkpoint(state, dict(components.unet.config)), components.unet),
        "vae": (convert_ldm_vae_checkpoint(state, dict(components.vae.config)), components.vae),
        "text_encoder": (text, text_encoder),
    }
    for name, (back, model) in converted.items():
        expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        missing, extra = sorted(set(expected) - set(back)), sorted(set(back) - set(expected))
        wrong = [key for key in expected if key in back and not torch.equal(back[key], expected[key])]
        if missing or extra or wrong:
            raise ValueError(
                f"The ldm layout of this {name} does not convert back with diffusers' loader: missing {missing[:3]} "
                f"({len(missing)}), extra {extra[:3]} ({len(extra)}), different {wrong[:3]} ({len(wrong)}); "
                "this architecture cannot be exported as a single file."
            )


def write_single_file(state: dict[str, torch.Tensor], out: str | os.PathLike, dtype: torch.dtype,
                      metadata: dict[str, str]) -> Path:  # fmt: skip
    """Write `state` cast to `dtype` to a new `out` file, atomically; an existing `out` is never replaced.

    The file is written under a temporary name and hard-linked to `out`: the link fails if `out` appeared in the
    meantime (no check-then-write race), and an interrupted export never leaves a partial file under `out`.
    """
    out = check_new_file(out)
    tensors = {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        _publish(Path(tmp), out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    logger.info("Wrote %s (%d tensors, %s)", out, len(tensors), dtype)
    return out


def _publish(tmp: Path, out: Path) -> None:
    try:
        os.link(tmp, out)  # atomic, and refuses an existing `out`
    except FileExistsError as error:
        raise FileExistsError(f"`out` {str(out)!r} already exists; choose a new file name.") from error
    except OSError:  # a file system without hard links (FAT, some network mounts): rename after a last check
        check_new_file(out)
        os.replace(tmp, out)


def check_new_file(out: str | os.PathLike) -> Path:
    """`out` as a Path, after refusing an existing path or a name that is not `.safetensors`."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"`out` must end in .safetensors, got {str(out)!r}.")
    if out.exists():
        raise FileExistsError(f"`out` {str(out)!r} already exists; choose a new file name.")
    return out


def export_metadata(components: ModelComponents, **facts) -> dict[str, str]:
    """The safetensors header entries: where the weights came from and how to sample them.

    `prediction_type` travels in the header because nothing in the weights says it (SD 2.x-base and 2.x-768 have
    the same keys); `ldm_tune.single_file` reads it back. `scheduler_config` keeps the whole noise schedule.
    """
    scheduler = components.scheduler_config
    metadata = {
        "prediction_type": str(scheduler.get("prediction_type", "epsilon")),
        "ldm_tune.scheduler_config": json.dumps(scheduler),
    }
    for key, value in facts.items():
        if value is not None:
            metadata[f"ldm_tune.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def merge_loras(components: ModelComponents, loras: list[tuple[str | os.PathLike, float]]) -> list[dict]:
    """Fuse `(path, scale)` LoRAs into the UNet and text encoder weights, with diffusers' own `fuse_lora`.

    Returns what was merged (file, sha256, scale) for the header. A LoRA at scale 0 is left out.
    """
    loras = [(resolve_lora_file(path), _check_scale(scale, "scale")) for path, scale in loras]
    loras = [(file, scale) for file, scale in loras if scale != 0.0]
    if not loras:
        return []
    # diffusers' LoRA loaders are pipeline methods: a pipeline around our very models loads and fuses into them.
    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    names = [f"lora{index}" for index in range(len(loras))]
    for (file, _), name in zip(loras, names, strict=True):
        check_lora_fits(read_lora(file), components.unet, components.text_encoder, file)  # one clear error
        pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    pipeline.set_adapters(names, [scale for _, scale in loras])
    # W + scale * B @ A (times alpha / rank) in place; unloading then removes the peft layers, keeping W.
    pipeline.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)
    pipeline.unload_lora_weights()
    return [{"path": str(file), "sha256": _sha256(file), "scale": scale} for file, scale in loras]


def export_single_file(
    model: str | os.PathLike,
    out: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    lora: list[tuple[str | os.PathLike, float]] | None = None,
    dtype: torch.dtype = torch.float16,
    use_ema: bool = True,
    config: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (with a training checkpoint's UNet and merged LoRAs) as one ldm-layout `.safetensors` file.

    Args:
        model: a Stable-Diffusion-format folder, hub id, or single file (with `config` where it needs one).
        out: the new `.safetensors` file; an existing file is never overwritten (FileExistsError).
        checkpoint: a training `checkpoint-N`, output folder, `best/` or UNet folder; its EMA weights are used
            when it has them unless `use_ema=False`, and the run's `prediction_type` is recorded.
        lora: `(path, scale)` LoRAs fused into the weights at their scales.
        dtype: the dtype of the written tensors (fp16 is what SD single files usually hold).

    Returns:
        The written file. Its header records `prediction_type`, the source model, checkpoint and LoRAs.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"`dtype` must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}.")
    check_new_file(out)  # before minutes of loading
    trained = None if checkpoint is None else checkpoint_unet(checkpoint, use_ema)
    components = load_components(model, unet_path=None if trained is None else trained.folder, config=config)
    if trained is not None and trained.prediction_type is not None:  # the trained parameterisation travels
        components.scheduler_config = {**components.scheduler_config, "prediction_type": trained.prediction_type}
    merged = merge_loras(components, lora or [])
    state = components_to_ldm(components)
    metadata = export_metadata(
        components,
        source_model=str(model),
        checkpoint=None if checkpoint is None else str(checkpoint),
        unet_weights=None if trained is None else trained.weights,
        loras=merged or None,
    )
    return write_single_file(state, out, dtype, metadata)
