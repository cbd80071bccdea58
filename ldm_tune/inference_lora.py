"""LoRAs on `LDMInference`: loaded with diffusers' own loaders into the very models the pipeline samples with.

A mixin of `LDMInference` (as diffusers' `StableDiffusionLoraLoaderMixin` is of its pipelines): `load_lora` takes a
file in diffusers or kohya format (see `ldm_tune.lora_files`) or a training folder, `set_lora_scale` weights the
loaded ones, and `self.loras` records them (file, sha256, scale) for the parameters JSON.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline

from ldm_tune.lora_files import check_lora_fits, read_lora, resolve_lora_file
from ldm_tune.schedulers import make_scheduler


@dataclass
class LoadedLora:
    """A LoRA loaded into the models: the file read, its adapter name and its current scale."""

    path: str
    adapter: str
    scale: float
    sha256: str


def _check_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"`{what}` must be a finite number, got {scale!r}.")
    return float(scale)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class LoraMixin:
    """`load_lora`, `set_lora_scale` and `loras` for a pipeline with `vae`, `text_encoder`, `tokenizer`, `unet`."""

    loras: list[LoadedLora]
    _lora_pipeline: StableDiffusionPipeline | None = None

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """Load a LoRA into the UNet (and text encoder) with diffusers' loaders; several can be loaded at once.

        Args:
            path: a `.safetensors` file in diffusers or kohya format, or a training output or checkpoint folder
                holding `pytorch_lora_weights.safetensors`.
            scale: the LoRA's weight (0 turns it off; `set_lora_scale` changes it later).
            adapter_name: name of the peft adapter (default: from the file or folder name).

        Returns:
            The adapter name.

        Raises:
            FileNotFoundError, ValueError: for a missing, unreadable or non-safetensors file, or a LoRA of another
                architecture. The models are left as they were.
        """
        self._check_weights_not_frozen("load a LoRA")
        file = resolve_lora_file(path)
        scale = _check_scale(scale, "scale")
        name = adapter_name or self._new_adapter_name(Path(path))
        if not re.fullmatch(r"\w+", name) or name in {lora.adapter for lora in self.loras}:
            # peft keeps adapters in nn.ModuleDicts, whose keys cannot contain dots.
            raise ValueError(f"`adapter_name` must be new and made of letters, digits and '_', got {name!r}.")
        check_lora_fits(read_lora(file), self.unet, self.text_encoder, file)
        pipeline = self._loader_pipeline()
        try:
            pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as error:
            pipeline.delete_adapters(name)  # whatever part was injected before the failure
            self._apply_lora_scales()
            lines = str(error).strip().splitlines()  # torch lists every mismatched tensor: keep the first
            reason = " ".join(line.strip() for line in lines[:2]) + (" ..." if len(lines) > 2 else "")
            raise ValueError(f"`lora` {str(file)!r} could not be loaded: {reason}") from error
        self.loras.append(LoadedLora(str(file.resolve()), name, scale, _sha256(file)))
        self._apply_lora_scales()
        return name

    def set_lora_scale(self, scale: float | list[float] | dict[str, float]) -> None:
        """Set the LoRA weights: one number for all, a list in load order, or a dict by adapter name or path.

        A LoRA at 0 is switched off, not multiplied by 0; with all at 0 the images are exactly the base model's.
        """
        if not self.loras:
            raise ValueError("No LoRA is loaded; load one with `load_lora(path, scale)` first.")
        self._check_weights_not_frozen("change LoRA scales")
        if isinstance(scale, dict):
            chosen = {id(self._find_lora(key)): value for key, value in scale.items()}
            new = [chosen.get(id(lora), lora.scale) for lora in self.loras]
        elif isinstance(scale, (list, tuple)):
            if len(scale) != len(self.loras):
                raise ValueError(f"`scale` has {len(scale)} entries but {len(self.loras)} LoRAs are loaded.")
            new = list(scale)
        else:
            new = [scale] * len(self.loras)
        new = [_check_scale(value, "scale") for value in new]  # all checked before any is changed
        for lora, value in zip(self.loras, new, strict=True):
            lora.scale = value
        self._apply_lora_scales()

    def _apply_lora_scales(self) -> None:
        if not self.loras:
            return
        pipeline = self._loader_pipeline()
        active = [lora for lora in self.loras if lora.scale != 0.0]
        if not active:
            # Disabled adapters are skipped inside peft's layers: exactly the base model, not base + 0 * LoRA.
            pipeline.disable_lora()
            return
        pipeline.enable_lora()
        pipeline.set_adapters([lora.adapter for lora in active], [lora.scale for lora in active])

    def _new_adapter_name(self, path: Path) -> str:
        # peft adapter names are nn.ModuleDict keys: no dots. A folder is named by itself, a file by its stem.
        stem = path.name if path.is_dir() else path.stem
        base = re.sub(r"\W", "_", stem) or "lora"
        taken, name, number = {lora.adapter for lora in self.loras}, base, 1
        while name in taken:
            number += 1
            name = f"{base}_{number}"
        return name

    def _find_lora(self, key: str | os.PathLike) -> LoadedLora:
        # By adapter name, by file, or by the folder the file was found in.
        for lora in self.loras:
            if key == lora.adapter or str(Path(key).resolve()) in (lora.path, str(Path(lora.path).parent)):
                return lora
        raise ValueError(f"`scale` names an unknown LoRA {str(key)!r}; loaded: {[x.adapter for x in self.loras]}.")

    def _loader_pipeline(self) -> StableDiffusionPipeline:
        # diffusers' LoRA loaders are pipeline methods: a StableDiffusionPipeline around our very models (not copies)
        # loads adapters into them exactly as `StableDiffusionPipeline.load_lora_weights` does. Its own scheduler
        # object keeps the pipeline's config checks from touching ours.
        if self._lora_pipeline is None:
            self._lora_pipeline = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=make_scheduler("ddim", self.base_scheduler_config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        return self._lora_pipeline
