"""What trains and what is saved: the one place where a full fine-tune and a LoRA differ.

The trainer's loop (`run_loop -> run_step -> forward_backward -> save`) is the same for every method; it asks its
method which models train, which parameters the optimizer and the EMA get, and how checkpoints, `best/` and the
final export are written.

- `FullFineTune` (`finetune_method: full`, and the VAE stage): the model's own weights (all, or those named by
  `trainable_modules`) in fp32; checkpoints and exports are whole diffusers folders (`unet/`, `unet_ema/`).
- `LoRAFineTune` (`finetune_method: lora`): peft LoRA adapters on the UNet (and optionally the text encoder). The
  base weights are frozen, cast to the mixed-precision dtype and never written; the adapters train in fp32.
  Checkpoints hold only the adapters (plus optimizer, LR scheduler, RNG, data position); the export is
  `pytorch_lora_weights.safetensors` (diffusers) and `lora_kohya.safetensors` (ComfyUI, AUTOMATIC1111).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from ldm_tune.components import select_trainable
from ldm_tune.ema import ForeachEMA, load_ema, save_ema
from ldm_tune.lora_files import LORA_WEIGHT_NAME, load_lora_into_adapters, save_lora, training_metadata


class FullFineTune:
    """The model's own weights train; `trainer.model_cls` / `model_folder` say which model (UNet or VAE)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config.training

    def setup(self) -> list[torch.nn.Module]:
        """Mark what trains; returns the models to prepare with Accelerate (the denoiser first)."""
        model = self.trainer.model
        model.train()
        if self.config.trainable_modules is not None:
            select_trainable(self.trainer.saved_module(model), self.config.trainable_modules)
        return [model]

    def param_groups(self, lr_factor: float = 1.0) -> list[dict]:
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.config.learning_rate * lr_factor}]

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.trainer.model.parameters())

    def make_ema(self) -> ForeachEMA:
        module = self.trainer.saved_module(self.trainer.model)
        return ForeachEMA(self.ema_parameters(), decay=self.config.ema_decay, model_cls=self.trainer.model_cls,
                        model_config=module.config)  # fmt: skip

    # Whole models go into checkpoints in diffusers format (unet/, unet_ema/), so a checkpoint is also loadable for
    # inference (`LDMInference.from_pretrained(model, checkpoint=...)`); the diffusers example does the same.
    # Under FSDP (ldm_tune.sharding) Accelerate saves the shards themselves (`weights` is empty), and every process
    # gathers a whole copy for the diffusers folder.
    def save_checkpoint(self, models, weights, output_dir) -> None:
        tr = self.trainer
        with tr.gathered():
            if tr.accelerator.is_main_process:
                for model in models:
                    tr.saved_module(model).save_pretrained(Path(output_dir) / tr.model_folder, safe_serialization=True)
                if tr.ema is not None:
                    tr.ema.save_pretrained(Path(output_dir) / f"{tr.model_folder}_ema")
        del weights[:]  # written above in diffusers format; Accelerate would write them a second time

    def load_checkpoint(self, models, input_dir) -> None:
        tr = self.trainer
        while models:
            model = tr.saved_module(models.pop())
            loaded = tr.model_cls.from_pretrained(input_dir, subfolder=tr.model_folder, use_safetensors=True)
            model.load_state_dict(loaded.state_dict())
        if tr.ema is not None:
            loaded = ForeachEMA.from_pretrained(Path(input_dir) / f"{tr.model_folder}_ema", tr.model_cls)
            tr.ema.load_state_dict(loaded.state_dict())
            tr.ema.to(tr.accelerator.device)

    def save_weights(self, folder: Path) -> None:
        """The trained weights alone (for `best/`)."""
        self.trainer.saved_module(self.trainer.model).save_pretrained(
            folder / self.trainer.model_folder, safe_serialization=True
        )

    def export(self) -> dict:
        """The final export (main process, EMA weights swapped in by the trainer)."""
        return self.trainer.export(self.trainer.saved_module(self.trainer.model))


class LoRAFineTune:
    """LoRA adapters (Hu et al. 2021, arXiv 2106.09685) through peft, on the UNet and optionally the text encoder."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config.training
        self._trained = None

    def _lora_config(self, target_modules: list[str]) -> LoraConfig:
        t = self.config
        return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha or t.lora_rank, lora_dropout=t.lora_dropout,
                          target_modules=list(target_modules), use_dora=t.use_dora,
                          init_lora_weights="gaussian" if t.init_lora_weights == "gaussian" else True)  # fmt: skip

    def _add_adapter(self, model: torch.nn.Module, key: str) -> None:
        targets = getattr(self.config, key)
        try:
            model.add_adapter(self._lora_config(targets))
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            raise ValueError(
                f"`training.{key}` {targets} matches no module of the {type(model).__name__} ({error}); its linear "
                f"layers are named like {names[:2] + names[len(names) // 2 : len(names) // 2 + 2]}."
            ) from error

    def setup(self) -> list[torch.nn.Module]:
        tr = self.trainer
        # The frozen base runs in the mixed-precision dtype (half the memory of fp32 master weights, as the
        # diffusers LoRA examples do); the adapters are upcast to fp32 so that fp16 gradients can be unscaled
        # (diffusers#6086) and small updates are not lost to rounding.
        tr.model.requires_grad_(False)
        tr.model.to(dtype=tr.weight_dtype)
        self._add_adapter(tr.model, "lora_target_modules")
        models = [tr.model]
        if self.config.train_text_encoder_lora:
            self._add_adapter(tr.text_encoder, "text_encoder_lora_target_modules")
            models.append(tr.text_encoder)
        cast_training_params(models, dtype=torch.float32)
        for model in models:
            model.train()
        return models

    def _models(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        unwrap = self.trainer.accelerator.unwrap_model
        text_encoder = unwrap(self.trainer.text_encoder) if self.config.train_text_encoder_lora else None
        return unwrap(self.trainer.model), text_encoder

    def param_groups(self, lr_factor: float = 1.0) -> list[dict]:
        unet, text_encoder = self._models()
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
                   "lr": self.config.learning_rate * lr_factor}]  # fmt: skip
        if text_encoder is not None:
            lr = self.config.text_encoder_lr if self.config.text_encoder_lr is not None else self.config.learning_rate
            groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": lr * lr_factor})
        return groups

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        if self._trained is None:  # asked at every update: the adapter tensors stay the same objects once added
            self._trained = [p for group in self.param_groups() for p in group["params"]]
        return self._trained

    def make_ema(self) -> ForeachEMA:
        return ForeachEMA(self.ema_parameters(), decay=self.config.ema_decay)

    def save_checkpoint(self, models, weights, output_dir) -> None:
        tr = self.trainer
        if tr.accelerator.is_main_process:
            save_lora(output_dir, *self._models(), kohya=False)
            if tr.ema is not None:
                save_ema(tr.ema, Path(output_dir) / "ema")
            del weights[:]  # the base weights never go into a checkpoint

    def load_checkpoint(self, models, input_dir) -> None:
        del models[:]  # nothing for Accelerate to load: the adapters are set here
        load_lora_into_adapters(input_dir, *self._models())
        if self.trainer.ema is not None:
            load_ema(self.trainer.ema, Path(input_dir) / "ema")
            self.trainer.ema.to(self.trainer.accelerator.device)

    def save_weights(self, folder: Path) -> None:
        save_lora(folder, *self._models(), metadata=self._metadata())

    def _metadata(self) -> dict[str, str]:
        return training_metadata(self.trainer.config, self.trainer.state.global_step)

    def export(self) -> dict:
        """`pytorch_lora_weights.safetensors` and `lora_kohya.safetensors` in the output folder, each file written
        under a temporary name and renamed, so an interrupted export never leaves a torn LoRA."""
        out = self.trainer.output_dir
        with tempfile.TemporaryDirectory(dir=out, prefix=".lora-export-") as tmp:
            save_lora(tmp, *self._models(), metadata=self._metadata())
            files = sorted(p.name for p in Path(tmp).glob("*.safetensors"))
            for name in files:
                os.replace(Path(tmp) / name, out / name)
        trainable = sum(p.numel() for p in self.ema_parameters())
        return {"lora_files": files, "trainable_parameters": trainable}


METHODS = {"full": FullFineTune, "lora": LoRAFineTune}


def make_method(trainer):
    """The fine-tuning method of `trainer.config.training.finetune_method`."""
    return METHODS[trainer.config.training.finetune_method](trainer)


__all__ = ["FullFineTune", "LORA_WEIGHT_NAME", "LoRAFineTune", "make_method"]
