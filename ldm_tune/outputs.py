"""Writing generated images with their parameters, so that every image can be reproduced.

Each call to `save_generation` takes the next free run number in the folder (`00000-00.png`, `00000.json`, ...)
and opens every file with mode "x": an existing file is never overwritten. The run number is reserved before any
image is written, by creating its JSON with mode "x" (atomic: of two writers, one gets FileExistsError and takes
the next number), so a stray file of a run number never stops a call after the images are made.
Every PNG also carries its settings (see `ldm_tune.png_info`).
"""

from __future__ import annotations

import json
import math
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from diffusers.utils import make_image_grid
from PIL import Image

from ldm_tune.png_info import png_metadata


# Any file of a run: its images and grid (`00000-00.png`, `00000-grid.png`) and its JSON (`00000.json`).
_RUN_FILE = re.compile(r"^(\d{5,})[-.]")
_MAX_RESERVE_TRIES = 1000


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
    """One more than the highest run number of any file in `folder` (0 for an empty folder)."""
    ids = [int(m.group(1)) for p in folder.iterdir() if (m := _RUN_FILE.match(p.name))]
    return max(ids, default=-1) + 1


def reserve_run(folder: Path) -> tuple[int, Path]:
    """Take a run number no file in `folder` uses: create its JSON with mode "x", retrying the next number."""
    run = next_run_id(folder)
    for _ in range(_MAX_RESERVE_TRIES):
        path = folder / f"{run:05d}.json"
        try:
            path.open("xb").close()
        except FileExistsError:
            run += 1
            continue
        # Another writer may have put images of this number in place without a JSON (or before it).
        if any(p != path for p in folder.glob(f"{run:05d}[-.]*")):
            path.unlink()
            run += 1
            continue
        return run, path
    raise FileExistsError(f"No free run number in {str(folder)!r} after {_MAX_RESERVE_TRIES} tries.")


def _write_new(path: Path, write) -> None:
    with open(path, "xb") as handle:  # "x": fail rather than overwrite
        write(handle)


def _image_records(run: int, count: int, params: dict, seeds: list[int] | None) -> list[dict]:
    per_prompt = params.get("num_images_per_prompt", 1)
    prompts, negatives = params.get("prompt", []), params.get("negative_prompt", [])
    records = []
    for index in range(count):
        record = {"file": f"{run:05d}-{index:02d}.png", "batch_index": index}
        if prompts:
            record["prompt"] = prompts[index // per_prompt]
            record["negative_prompt"] = negatives[index // per_prompt] if negatives else ""
        record["seed"] = seeds[index] if seeds is not None else None
        records.append(record)
    return records


def _grid(images: list[Image.Image], params: dict) -> Image.Image:
    prompts, per_prompt = params.get("prompt", []), params.get("num_images_per_prompt", 1)
    rows = len(prompts) if prompts and len(prompts) * per_prompt == len(images) else 1
    cols = math.ceil(len(images) / rows)
    blanks = [Image.new("RGB", images[0].size)] * (rows * cols - len(images))
    return make_image_grid(list(images) + blanks, rows=rows, cols=cols)


def save_generation(
    images: list[Image.Image],
    params: dict,
    output_path: str | Path,
    grid: bool = False,
    seeds: list[int] | None = None,
    keep: list[int] | None = None,
) -> dict:
    """Write `images` as PNGs plus a JSON of `params` (and optionally a grid) into `output_path`.

    `seeds` gives each image's seed, recorded per image in the JSON and the PNGs. `keep` writes only the images of
    these batch indices (named by them, no grid): `--from-png` re-runs a whole call to make one image exactly.
    Returns the written paths: `{"images": [...], "params": ..., "grid": ... or None}`.
    """
    folder = Path(output_path)
    folder.mkdir(parents=True, exist_ok=True)
    run, params_path = reserve_run(folder)
    records = _image_records(run, len(images), params, seeds)
    if keep is not None:
        images, records = [images[i] for i in keep], [records[i] for i in keep]
    grid_path = folder / f"{run:05d}-grid.png" if grid and images and keep is None else None
    document = {
        **params,
        "images": records,
        "grid": grid_path.name if grid_path else None,
        "versions": package_versions(),
    }
    paths = []
    for image, record in zip(images, records, strict=True):
        path = folder / record["file"]
        info = png_metadata(document, record)
        _write_new(path, lambda handle, image=image, info=info: image.save(handle, format="PNG", pnginfo=info))
        paths.append(path)
    if grid_path is not None:
        canvas, info = _grid(images, params), png_metadata(document, None, parameters_of=records[0])
        _write_new(grid_path, lambda handle: canvas.save(handle, format="PNG", pnginfo=info))
    # The reserved (empty) JSON is ours: written last, so a complete JSON means a complete run.
    params_path.write_text(json.dumps(document, indent=2, default=str))
    return {"images": paths, "params": params_path, "grid": grid_path}
