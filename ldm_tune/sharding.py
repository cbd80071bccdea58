"""FSDP: what the trainer does differently when the trained UNet is sharded across processes.

Under DDP and DeepSpeed ZeRO-2 every process holds the whole UNet, so checkpoints, `best/`, the export and the
validation images are written from the main process's copy. Under FSDP (`configs/accelerate/fsdp.yaml`) each process
holds a shard, and a forward pass is itself a collective (it all-gathers each block's weights): a UNet run on one
process alone, or a different number of times on each, waits forever. So the full weights are first gathered by
every process (`gathered_copy`), into a plain copy of the model that the usual code then saves or runs, without any
collective: on the main process for files and images, on every process for the validation loss (whose batch counts
differ between processes).

The sharded training state itself (weights, AdamW moments) is saved and resumed by Accelerate
(`save_state`/`load_state`, torch.distributed.checkpoint).
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from accelerate.utils import DistributedType


def is_sharded(accelerator) -> bool:
    """True when the trained model is sharded across processes (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharded_training(accelerator, config) -> None:
    """Refuse, before any model loads, what the trainer cannot do with a sharded UNet, naming what to use instead."""
    if not is_sharded(accelerator):
        return
    plugin, t = accelerator.state.fsdp_plugin, config.training
    refused = []
    if plugin.fsdp_version != 2:
        refused.append(
            f"`fsdp_version: {plugin.fsdp_version}` (set `fsdp_version: 2`, as configs/accelerate/fsdp.yaml)"
        )
    if config.stage != "unet":
        refused.append(f"`stage: {config.stage}`")
    if t.finetune_method != "full":
        # Adapters are a few MB: sharding them saves nothing, and their files are written from one process.
        refused.append(f"`training.finetune_method: {t.finetune_method}`")
    if t.use_ema:
        # diffusers' EMAModel keeps whole tensors; the shards' averages would need a sharded EMA of their own.
        refused.append("`training.use_ema: true`")
    if refused:
        raise ValueError(
            f"FSDP trains a full fine-tune of the UNet without EMA; this run asks for {', '.join(refused)}. Use DDP "
            "(configs/accelerate/multi-gpu.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml), "
            "which keep a whole UNet on each GPU, for these."
        )


def gathered_copy(accelerator, model: torch.nn.Module, model_cls, everywhere: bool = False):
    """A plain (unsharded) copy of a sharded `model` with all its weights, built from the gathered state dict.

    Every process must call this (the gather is a collective). Returns the copy on the main process, or on every
    process when `everywhere`; None on the others. The copy holds fp32 weights on the accelerator's device, in
    eval mode, without gradients.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload=True is what gives the full tensors to rank 0 only (the others get an empty dict).
    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    state = get_model_state_dict(model, options=options)
    if not (everywhere or accelerator.is_main_process):
        return None
    with init_empty_weights():  # no random init of weights that are replaced at once
        copy = model_cls.from_config(accelerator.unwrap_model(model).config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.to(accelerator.device, dtype=torch.float32).eval().requires_grad_(False)
