"""Writing generated images with their parameters, so that every image can be reproduced.

Each call to `save_generation` takes the next free run number in the folder (`00000-00.png`, `00000.json`, ...)
and opens every file with mode "x": an existing file is never overwritten.
"""

from __future__ import annotations

import json
import math
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from diffusers.utils import make_image_grid
from PIL import Image


_RUN_FILE = re.compile(r"^(\d{5,})-")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what an image looks like."""
    found = {}
    for name in ("ldm_tune", "torch", "diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def next_run_id(folder: Path) -> int:
    """One more than the highest run number already in `folder` (0 for an empty folder)."""
    ids = [int(m.group(1)) for p in folder.iterdir() if (m := _RUN_FILE.match(p.name))]
    return max(ids, default=-1) + 1


def _write_new(path: Path, write) -> None:
    with open(path, "xb") as handle:  # "x": fail rather than overwrite
        write(handle)


def save_generation(images: list[Image.Image], params: dict, output_path: str | Path, grid: bool = False) -> dict:
    """Write `images` as PNGs plus a JSON of `params` (and optionally a grid) into `output_path`.

    Returns the written paths: `{"images": [...], "params": ..., "grid": ... or None}`.
    """
    folder = Path(output_path)
    folder.mkdir(parents=True, exist_ok=True)
    run = next_run_id(folder)
    per_prompt = params.get("num_images_per_prompt", 1)
    prompts, negatives = params.get("prompt", []), params.get("negative_prompt", [])
    records, paths = [], []
    for index, image in enumerate(images):
        path = folder / f"{run:05d}-{index:02d}.png"
        _write_new(path, lambda handle, image=image: image.save(handle, format="PNG"))
        paths.append(path)
        record = {"file": path.name, "batch_index": index}
        if prompts:
            record["prompt"] = prompts[index // per_prompt]
            record["negative_prompt"] = negatives[index // per_prompt] if negatives else ""
        records.append(record)
    grid_path = None
    if grid and images:
        grid_path = folder / f"{run:05d}-grid.png"
        rows = len(prompts) if prompts and len(prompts) * per_prompt == len(images) else 1
        cols = math.ceil(len(images) / rows)
        canvas = make_image_grid(
            list(images) + [Image.new("RGB", images[0].size)] * (rows * cols - len(images)), rows=rows, cols=cols
        )
        _write_new(grid_path, lambda handle: canvas.save(handle, format="PNG"))
    params_path = folder / f"{run:05d}.json"
    document = {
        **params,
        "images": records,
        "grid": grid_path.name if grid_path else None,
        "versions": package_versions(),
    }
    _write_new(params_path, lambda handle: handle.write(json.dumps(document, indent=2, default=str).encode()))
    return {"images": paths, "params": params_path, "grid": grid_path}
