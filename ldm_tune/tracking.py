"""Metrics: always a `metrics.jsonl` file; TensorBoard and Weights & Biases through Accelerate when asked for."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np


logger = logging.getLogger(__name__)

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def make_accelerator_trackers(report_to: str) -> list[str] | None:
    """The trackers to pass to `Accelerator(log_with=...)`: those asked for that are installed."""
    wanted = list(TRACKER_MODULES) if report_to == "all" else [] if report_to == "none" else [report_to]
    available = []
    for name in wanted:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            logger.warning(
                "`logging.report_to` asks for %s, which is not installed; logging to metrics.jsonl only.", name
            )
        else:
            available.append(name)
    return available or None


class MetricsLogger:
    """Appends one JSON object per line to `path` (main process only) and forwards scalars to the trackers."""

    def __init__(self, path: Path, accelerator):
        self.path, self.accelerator = Path(path), accelerator

    def log(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if scalars and self.accelerator.trackers:
            self.accelerator.log(scalars, step=record["step"])
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def log_images(accelerator, images, prompts: list[str], per_prompt: int, step: int) -> None:
    """Send validation images to TensorBoard / W&B (the PNGs are always on disk)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            captions = [prompts[i // per_prompt] for i in range(len(images))]
            tracker.log({"validation": [wandb.Image(im, caption=c) for im, c in zip(images, captions, strict=True)]})
