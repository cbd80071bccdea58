"""The exponential moving average of the trained weights: diffusers' `EMAModel`, with its update done in place.

`EMAModel` keeps everything else (the decay schedule, `store` / `copy_to` / `restore`, `save_pretrained` in diffusers
format, `state_dict` for resume); only `step` is replaced. Adapter EMAs (LoRA) are saved as safetensors plus JSON
by `save_ema` / `load_ema`, since `save_pretrained` needs a whole model class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


class ForeachEMA(EMAModel):
    """`EMAModel` whose update is one in-place `torch._foreach_lerp_` over every trained tensor.

    Why not `EMAModel.step` itself: its default loop launches three kernels and allocates two parameter-sized
    temporaries per tensor, and its `foreach=True` path (huggingface/diffusers#7685, off by default for this reason)
    allocates one temporary the size of all the weights. On the SD 1.5 UNet (686 tensors, 3.3 GB, 2 CPU cores,
    `python benchmarks/bench_ema.py`): loop 1.05 s a step, foreach 0.68 s plus 3.3 GB, this 0.36 s and nothing
    extra. On a GPU the lerp is a fused multi-tensor kernel instead of ~2,000 launches. Same arithmetic:
    shadow + (1 - decay) * (param - shadow), within 2e-8 of the loop after 5 steps.
    """

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        pairs = list(zip(self.shadow_params, parameters, strict=True))
        mixed = any(s.dtype != p.dtype or s.device != p.device for s, p in pairs)
        if mixed or _zero3_enabled():  # ZeRO-3 shards need EMAModel's per-tensor gathering; foreach needs one dtype
            return super().step(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in pairs if p.requires_grad]
        frozen = [(s, p) for s, p in pairs if not p.requires_grad]
        if frozen:  # EMAModel's rule: a tensor that does not train is copied, not averaged
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1.0 - decay)


def save_ema(ema: EMAModel, folder: Path) -> None:
    """An `EMAModel` of adapter weights as safetensors (the averages) plus JSON (its counters): no pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(shadow)}, folder / "ema.safetensors")
    (folder / "ema.json").write_text(json.dumps(state))


def load_ema(ema: EMAModel, folder: Path) -> None:
    state = json.loads((folder / "ema.json").read_text())
    tensors = load_file(folder / "ema.safetensors")
    if len(tensors) != len(ema.shadow_params):
        raise ValueError(
            f"{str(folder)!r} holds {len(tensors)} EMA tensors, the adapters have {len(ema.shadow_params)}."
        )
    ema.load_state_dict({**state, "shadow_params": [tensors[f"shadow.{i}"] for i in range(len(tensors))]})
