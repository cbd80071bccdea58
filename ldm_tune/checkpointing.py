"""Crash-safe checkpoints and the final exports.

A checkpoint is written by Accelerate's `save_state` into a hidden temporary folder; a marker file is written
last and the folder is renamed to `checkpoint-N` only then. A kill at any moment therefore leaves every earlier
checkpoint intact, and a half-written folder is never mistaken for a checkpoint: only `checkpoint-N` folders with
the marker count, for resuming and for rotation (`checkpoints_total_limit` deletes only the oldest complete ones).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from ldm_tune.io_utils import replace_folder


logger = logging.getLogger(__name__)

MARKER = "ldm_tune_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointManager:
    """Finds, writes, rotates and resolves the `checkpoint-N` folders of one output folder."""

    def __init__(self, accelerator, output_dir: str | Path, total_limit: int | None = None):
        self.accelerator, self.output_dir, self.total_limit = accelerator, Path(output_dir), total_limit

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        found = []
        if self.output_dir.is_dir():
            for path in self.output_dir.iterdir():
                match = _CHECKPOINT.match(path.name)
                if match and (path / MARKER).is_file():
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        """`latest` -> the newest complete checkpoint (None if there is none); a path -> checked and returned."""
        if resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not path.is_absolute() and not path.exists():
            path = self.output_dir / path
        if not (path / MARKER).is_file():
            complete = [str(p) for _, p in self.complete()]
            raise ValueError(
                f"`checkpointing.resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint "
                f"(no {MARKER}); complete checkpoints in {str(self.output_dir)!r}: {complete or 'none'}."
            )
        return path

    def remove_partial(self) -> None:
        """Delete temporary folders left by a save that was killed (main process only)."""
        if self.accelerator.is_main_process and self.output_dir.is_dir():
            for path in self.output_dir.glob(".checkpoint-*.tmp"):
                logger.warning("Removing %s, left by an interrupted checkpoint save.", path)
                shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, info: dict) -> Path:
        """Save the full training state as `checkpoint-{step}` (all processes must call this)."""
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".checkpoint-{step}.tmp"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            # The marker goes last: its presence is what makes a folder a checkpoint.
            (tmp / MARKER).write_text(json.dumps({**info, "step": step, "time": time.time()}, indent=2))
            replace_folder(tmp, final)
            self.rotate()
        self.accelerator.wait_for_everyone()
        return final

    def rotate(self) -> None:
        """Keep the newest `total_limit` complete checkpoints; incomplete folders are never touched."""
        if self.total_limit is None:
            return
        complete = self.complete()
        for _, path in complete[: max(0, len(complete) - self.total_limit)]:
            logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, self.total_limit)
            shutil.rmtree(path)


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with `accelerator.register_for_checkpointing`)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: where a resumed run picks up the data
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    empty_in_row: int = 0  # micro-batches in a row with no usable item on some process
    best_val_loss: float | None = None
    best_val_step: int | None = None
    items_skipped: int = 0  # items skipped during training: streamed bad samples, or files changed since the scan
    skipped_by_reason: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)  # what positions mean: processes, batch, accumulation, items
    stream: dict = field(default_factory=dict)  # the main process's position in a streamed source (shards)
    stream_position: Callable[[], dict] | None = field(default=None, repr=False)  # reads `stream`; not saved

    def state_dict(self) -> dict:
        if self.stream_position is not None:  # read at save time: where the stream stands after the consumed batches
            self.stream = self.stream_position()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stream_position"}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def check_layout(saved: dict, current: dict, resume_path) -> None:
    """Refuse to resume a checkpoint written with another layout (on every process alike: all read the same).

    The saved data position counts batches of that layout and the LR schedule counts its updates: under another
    process count, batch size, accumulation or item count the run would silently skip or repeat items and move the
    schedule. (A checkpoint from before layouts were recorded has none and is resumed as it is.)
    """
    if saved and saved != current:
        raise ValueError(
            f"`checkpointing.resume_from_checkpoint` {str(resume_path)!r} was written by a run with {saved}; this "
            f"run has {current}. Resuming across another layout would skip or repeat items and misplace the "
            "learning-rate schedule: resume with the same process count, `training.train_batch_size`, "
            "`training.gradient_accumulation_steps` and data, or start a new `output_dir`."
        )


def write_model_card(path: Path, config: dict, summary: dict) -> None:
    """A README.md for the output folder: base model, data, steps, final losses and how to load it."""
    model, data, training = config["model"], config["data"], config["training"]
    data_source = data.get("train_data_dir") or data.get("dataset_name") or config["dreambooth"]["instance_data_dir"]
    lora = training["finetune_method"] == "lora"
    base = model["pretrained_model_name_or_path"]
    if lora:
        what = f"LoRA rank {training['lora_rank']}, alpha {training['lora_alpha'] or training['lora_rank']}"
        what += " on the UNet and the text encoder" if training["train_text_encoder_lora"] else " on the UNet"
        use = [f'pipe = LDMInference.from_pretrained("{base}", lora=["{path.parent}"])']
        loads = ("`pytorch_lora_weights.safetensors` also loads with `StableDiffusionPipeline.load_lora_weights`; "
                 "`lora_kohya.safetensors` is the same LoRA for ComfyUI and AUTOMATIC1111.")  # fmt: skip
    else:
        what = "UNet fine-tune; VAE and text encoder frozen"
        use = [f'pipe = LDMInference.from_pretrained("{path.parent / "pipeline"}")']
        loads = "`pipeline/` also loads in `diffusers.StableDiffusionPipeline.from_pretrained`."
    lines = [
        "---",
        "library_name: diffusers",
        f"tags: [stable-diffusion, text-to-image, ldm_tune{', lora' if lora else ''}]",
        f"base_model: {base}",
        "---",
        "",
        f"# Fine-tuned from {base}",
        "",
        f"Trained with [ldm_tune](https://github.com/) ({what}).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| data | `{data_source}` ({summary.get('train_items')} items, {data['resolution']} px) |",
        f"| updates | {summary.get('global_step')} (batch {training['train_batch_size']} x accumulation "
        f"{training['gradient_accumulation_steps']} x {summary.get('num_processes', 1)} processes) |",
        f"| learning rate | {training['learning_rate']} ({training['lr_scheduler']}) |",
        f"| mixed precision | {training['mixed_precision']} |",
        f"| prediction type | {summary.get('prediction_type')} |",
        f"| EMA | {training['use_ema']} |",
        f"| final training loss | {summary.get('final_train_loss')} |",
        f"| best validation loss | {summary.get('best_val_loss')} (step {summary.get('best_val_step')}) |",
        "",
        "## Use",
        "",
        "```python",
        "from ldm_tune import LDMInference",
        "",
        *use,
        'images = pipe.generate("a prompt", seed=0)',
        "```",
        "",
        f"{loads} The resolved training",
        "configuration is in `config.yaml`, the metrics in `metrics.jsonl`.",
    ]
    path.write_text("\n".join(lines) + "\n")
