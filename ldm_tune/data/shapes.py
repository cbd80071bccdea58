"""A procedural image-caption world: coloured geometric shapes on plain backgrounds, captioned from what is drawn.

`make_shapes_dataset` writes image folders (PNG + metadata.jsonl) for `train/` and `validation/`, deterministic for
a seed. It lets the whole train-and-sample loop run offline and be scored by what the pixels show.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm_tune.io_utils import check_new_folder


COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
# Colours absent from the base data: a dataset made with `colors=["cyan", ...]` teaches a new concept to a model
# fine-tuned on the default colours. Kept apart from COLORS so the default datasets (and their seeds) never change.
NEW_COLORS = {"cyan": (30, 190, 200)}
PALETTE = {**COLORS, **NEW_COLORS}  # every named colour a shape may be drawn in
# `colors=["any"]`: each shape in a colour of uniformly random hue (saturation and brightness in the palette's
# range), captioned without a colour word. For training an autoencoder that must reconstruct colours no caption
# names (the demo's VAE), as Stable Diffusion's VAE is trained on a broad corpus, not on the fine-tuning data.
ANY_COLOR = "any"
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (205, 205, 205), "beige": (235, 220, 190)}


def _random_hue(rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.95))
    return tuple(round(255 * c) for c in rgb)


def draw_shape(size: int, color: str, shape: str, background: str, rng: np.random.Generator) -> Image.Image:
    """One image: `shape` in `color` at a random position and size on a plain `background`."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    canvas = ImageDraw.Draw(image)
    extent = rng.uniform(0.35, 0.6) * size  # the shape's bounding-box side
    cx, cy = (rng.uniform(extent / 2 + 1, size - extent / 2 - 1) for _ in range(2))
    half = extent / 2
    fill = _random_hue(rng) if color == ANY_COLOR else PALETTE[color]
    if shape == "circle":
        canvas.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        canvas.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        points = [
            (cx + half * math.cos(a), cy + half * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
        canvas.polygon(points, fill=fill)
    elif shape == "cross":
        arm = extent / 6
        canvas.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        canvas.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    else:
        raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}.")
    return image


def _write_split(folder: Path, items: list[tuple[str, str, str]], size: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    lines = []
    for number, (color, shape, background) in enumerate(items):
        name = f"{number:05d}.png"
        draw_shape(size, color, shape, background, rng).save(folder / name)
        words = shape if color == ANY_COLOR else f"{color} {shape}"
        record = {"file_name": name, "text": f"a {words} on a {background} background",
                  "color": color, "shape": shape, "background": background}  # fmt: skip
        lines.append(json.dumps(record))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_shapes_dataset(out_dir: str | Path, n: int = 1000, size: int = 64, seed: int = 0,
                        validation_fraction: float = 0.1, colors=None, shapes=None) -> Path:  # fmt: skip
    """Write `out_dir/train` and `out_dir/validation` image folders of `n` images in all; returns `out_dir`.

    `colors` may name any colour of COLORS or NEW_COLORS (default: COLORS only) or be `["any"]` (a random hue per
    image, no colour word in the captions); `shapes` any of SHAPES.
    """
    out_dir = check_new_folder(out_dir)
    colors, shapes = list(colors or COLORS), list(shapes or SHAPES)
    unknown = sorted(set(colors) - {*PALETTE, ANY_COLOR}) + sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"Unknown colors/shapes {unknown}; colors: {[*PALETTE, ANY_COLOR]}, shapes: {list(SHAPES)}.")
    if n < 2 or size < 16:
        raise ValueError(f"`n` must be >= 2 and `size` >= 16, got n={n}, size={size}.")
    rng = np.random.default_rng(seed)
    # Cycle through every (color, shape) pair so each split covers all of them evenly.
    combos = [(c, s) for c in colors for s in shapes]
    items = [(*combos[i % len(combos)], str(rng.choice(list(BACKGROUNDS)))) for i in range(n)]
    order = rng.permutation(n)
    held_out = max(1, round(validation_fraction * n)) if validation_fraction > 0 else 0
    _write_split(out_dir / "train", [items[i] for i in sorted(order[held_out:])], size, rng)
    if held_out:
        _write_split(out_dir / "validation", [items[i] for i in sorted(order[:held_out])], size, rng)
    return out_dir
