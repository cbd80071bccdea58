"""Score generated images of the shapes world by what their pixels show, and the `evaluate` command.

`classify` is a deterministic oracle (numpy/scipy geometry, no learned model): it finds the one object on a plain
background and names its colour and shape, or None where the pixels do not decide. `evaluate` samples a model at
several guidance scales from the same seed and reports how often the picture matches the prompt.
"""

from __future__ import annotations

import colorsys
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm_tune.data.shapes import COLORS, PALETTE, SHAPES
from ldm_tune.host_memory import keep_freed_memory


logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = (1.0, 3.0, 5.0, 7.5)
# Palette colours and light backgrounds are >= ~100 apart in RGB; 60 keeps blurred edges and sampling noise out.
FOREGROUND_DISTANCE = 60.0
MIN_OBJECT_FRACTION = 0.02  # the smallest shape drawn (35% of the side) is ~5% of the image
MIN_PURITY = 0.5  # the object must hold most of what differs from the background, or the image is noise/clutter
MIN_SATURATION, MIN_VALUE = 0.3, 0.2  # below: grey, white or black, whose hue means nothing
MAX_HUE_DISTANCE = 40.0  # degrees; further from every palette hue (e.g. magenta) is no palette colour
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}}  # plurals
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in PALETTE.items()}


def _object_mask(pixels: np.ndarray) -> np.ndarray | None:
    """The largest clean connected region that differs from the background (median border colour), or None."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    raw = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    # Opening drops specks and one-pixel halos of noise before the components are counted.
    mask = ndimage.binary_opening(raw)
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1))
    largest = labels == 1 + int(np.argmax(sizes))
    area = int(largest.sum())
    if area < MIN_OBJECT_FRACTION * mask.size or area < MIN_PURITY * raw.sum():
        return None
    return largest


def _color_of(pixels: np.ndarray, mask: np.ndarray) -> str | None:
    """Nearest palette hue to the object's median colour; None for unsaturated or off-palette colours."""
    interior = ndimage.binary_erosion(mask)
    # Edge pixels blend into the background; the interior gives the drawn colour where there is one.
    rgb = np.median(pixels[interior if interior.sum() >= 4 else mask], axis=0) / 255
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb)
    if saturation < MIN_SATURATION or value < MIN_VALUE:
        return None
    distances = {name: abs((hue * 360 - h + 180) % 360 - 180) for name, h in _HUES.items()}
    name = min(distances, key=distances.get)
    return name if distances[name] <= MAX_HUE_DISTANCE else None


def _shape_of(mask: np.ndarray) -> str | None:
    """Shape from the geometry of the object mask; None where it is none of the world's four shapes."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = box.shape
    # Every shape of the world has a near-square box (a triangle's is 1.15 : 1), fills at least half of it (a
    # triangle 1/2, a cross 5/9, a circle pi/4, a square 1) and covers its centre; anything else is not decided.
    if not 0.6 <= width / height <= 1.67 or box.mean() < 0.4 or not box[height // 2, width // 2]:
        return None
    # An upright triangle holds 3/4 of its area in the lower half; the other three are mirror-symmetric both
    # ways. Both axes are checked so that a triangle turned on its side is still one.
    if max(_half_asymmetry(box), _half_asymmetry(box.T)) > 0.2:
        return "triangle"
    # How far the object reaches along the diagonals relative to along the axes: a cross ~0.5, a circle 1, a
    # square sqrt(2). Measured from the centroid it holds up under blur better than the bounding-box fill,
    # which corner rounding pulls from a square's 1 towards a circle's 0.785 in small images.
    ratio = _diagonal_reach(mask)
    if ratio < 0.8:
        return "cross"
    return "square" if ratio > 1.12 else "circle"


def _half_asymmetry(box: np.ndarray) -> float:
    """|top - bottom| / total area of a mask, the middle row (odd heights) counted in neither half."""
    half = box.shape[0] // 2
    top, bottom = box[:half].sum(), box[box.shape[0] - half :].sum()
    return abs(float(top) - float(bottom)) / max(float(box.sum()), 1.0)


def _diagonal_reach(mask: np.ndarray, half_angle: float = 10.0) -> float:
    """Mean farthest reach from the centroid within +-`half_angle` degrees of the 4 diagonals / of the 4 axes."""
    ys, xs = np.nonzero(mask)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    radius, angle = np.hypot(dy, dx), np.degrees(np.arctan2(dy, dx))
    reach = []
    for direction in range(0, 360, 45):
        near = np.abs((angle - direction + 180) % 360 - 180) <= half_angle
        reach.append(radius[near].max() + 0.5 if near.any() else 0.0)  # + 0.5: to the pixel's edge, not centre
    axes, diagonals = np.mean(reach[0::2]), np.mean(reach[1::2])
    return float(diagonals / axes) if axes > 0 else 0.0


def classify(image: Image.Image) -> tuple[str | None, str | None]:
    """(colour, shape) of the one object in `image`; either part is None where the pixels do not decide it."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = _object_mask(pixels)
    if mask is None:
        return None, None
    return _color_of(pixels, mask), _shape_of(mask)


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """(colour, shape) a prompt asks for, e.g. "a red triangle on a white background" -> ("red", "triangle")."""
    words = re.findall(r"[a-z]+", prompt.lower())
    shapes = [i for i, word in enumerate(words) if word in _SHAPE_WORDS]
    # A colour word just before "background" names the background ("a circle on a blue background"), not the shape.
    colors = [i for i, word in enumerate(words) if word in PALETTE and words[i + 1 : i + 2] != ["background"]]
    if not shapes:
        return (words[colors[0]] if colors else None), None
    # The shape's colour is the adjective nearest before it.
    before = [i for i in colors if i < shapes[0]]
    return (words[before[-1]] if before else None), _SHAPE_WORDS[words[shapes[0]]]


def default_prompts(
    colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None, background: str = "white"
) -> list[str]:
    """Every colour x shape prompt of the shapes world, captioned like its training data."""
    return [f"a {c} {s} on a {background} background" for c in (colors or COLORS) for s in (shapes or SHAPES)]


def _targets(prompts: Sequence[str]) -> list[tuple[str, str]]:
    targets = [parse_prompt(p) for p in prompts]
    unscorable = [p for p, (c, s) in zip(prompts, targets, strict=True) if c is None or s is None]
    if unscorable:
        raise ValueError(
            f"Every prompt must name a colour of {list(PALETTE)} and a shape of {list(SHAPES)}; these do not: "
            f"{unscorable}"
        )
    return targets


def score(images: Sequence[Image.Image], prompts: Sequence[str], per_prompt: int) -> dict:
    """Colour, shape and joint accuracy of `images` (`per_prompt` consecutive images per prompt), with details."""
    targets = _targets(prompts)
    if per_prompt < 1 or len(images) != len(prompts) * per_prompt:
        raise ValueError(f"Expected {len(prompts)} x {per_prompt} images, got {len(images)}.")
    details, hits = [], np.zeros((len(images), 3), dtype=bool)
    for number, (prompt, (color, shape)) in enumerate(zip(prompts, targets, strict=True)):
        first = number * per_prompt
        predictions = [classify(image) for image in images[first : first + per_prompt]]
        for offset, (got_color, got_shape) in enumerate(predictions):
            hits[first + offset] = (got_color == color, got_shape == shape, (got_color, got_shape) == (color, shape))
        ours = hits[first : first + per_prompt].mean(axis=0)
        details.append(
            {
                "prompt": prompt,
                "color": color,
                "shape": shape,
                "predictions": [list(p) for p in predictions],
                "color_accuracy": float(ours[0]),
                "shape_accuracy": float(ours[1]),
                "joint_accuracy": float(ours[2]),
            }
        )
    color_acc, shape_acc, joint_acc = (float(v) for v in hits.mean(axis=0))
    return {"color": color_acc, "shape": shape_acc, "joint": joint_acc, "images": len(images), "per_prompt": details}


def evaluate(
    model_dir,
    prompts: Sequence[str],
    guidance_scales: Sequence[float] = DEFAULT_GUIDANCE,
    scheduler: str = "ddim",
    steps: int = 50,
    images_per_prompt: int = 4,
    seed: int = 0,
    checkpoint=None,
    device: str = "cpu",
    batch_size: int = 32,
    lora: list | None = None,
) -> dict:
    """Sample `model_dir` at every guidance scale from the same seeds and score the images with `classify`.

    Prompt `i` is generated with seed `seed + i`, so its starting noise is the same at every guidance scale and
    does not depend on which other prompts are evaluated. Prompts are sampled together, about `batch_size` images
    per call (one call per prompt when `images_per_prompt` exceeds it). `lora`: LoRAs to load on the model, as
    `LDMInference.from_pretrained` takes them. Returns one row of accuracies per guidance scale.
    """
    import torch

    from ldm_tune.inference import LDMInference

    prompts = list(prompts)
    _targets(prompts)  # refuse unscorable prompts before the model loads
    if not prompts or not guidance_scales or images_per_prompt < 1 or batch_size < 1:
        raise ValueError("`prompts` and `guidance_scales` must not be empty; `images_per_prompt` and `batch_size` "
                         f"must be >= 1, got {images_per_prompt} and {batch_size}.")  # fmt: skip
    pipe = LDMInference.from_pretrained(model_dir, checkpoint=checkpoint, scheduler=scheduler, device=device,
                                        lora=lora)  # fmt: skip
    chunk = max(1, batch_size // images_per_prompt)  # prompts per sampling call
    rows = []
    for guidance in guidance_scales:
        images = []
        for first in range(0, len(prompts), chunk):
            numbers = range(first, min(first + chunk, len(prompts)))
            # One generator per prompt, shared by its images: a prompt's noise depends on `seed + i` only, not on
            # the batch it is sampled in (diffusers draws each image of a generator list in turn).
            generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in numbers]
            images += pipe.generate(
                [prompts[i] for i in numbers],
                negative_prompt="",
                num_inference_steps=steps,
                guidance_scale=float(guidance),
                num_images_per_prompt=images_per_prompt,
                generator=[g for g in generators for _ in range(images_per_prompt)],
                progress=False,
            )
        rows.append({"guidance": float(guidance), **score(images, prompts, images_per_prompt)})
        logger.info("guidance %s: joint accuracy %.3f", guidance, rows[-1]["joint"])
    return {
        "rows": rows,
        "model": str(model_dir),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "lora": [{"path": lo.path, "scale": lo.scale, "sha256": lo.sha256} for lo in pipe.loras],
        "scheduler": scheduler,
        "steps": steps,
        "images_per_prompt": images_per_prompt,
        "batch_size": batch_size,
        "seed": seed,
        "prompts": prompts,
    }


def format_table(result: dict) -> str:
    """A markdown table of an `evaluate` result, one row per guidance scale."""
    lines = ["| guidance | colour | shape | joint | images |", "|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(
            f"| {row['guidance']:g} | {row['color']:.1%} | {row['shape']:.1%} | {row['joint']:.1%} | {row['images']} |"
        )
    return "\n".join(lines)


def add_evaluate_parser(subparsers) -> None:
    """Add the `evaluate` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Sample a model at several guidance scales and score colour/shape accuracy with a pixel oracle.",
    )
    parser.add_argument("--model", required=True, help="Stable-Diffusion-format folder or hub id.")
    parser.add_argument(
        "--checkpoint", help="Training checkpoint or output folder whose unet/ replaces the base UNet."
    )
    from ldm_tune.cli import _lora_arg  # `generate`'s PATH[:SCALE] parsing (cli imports this module at its top)

    parser.add_argument(
        "--lora", action="append", type=_lora_arg, default=[], metavar="PATH[:SCALE]",
        help="LoRA file or training folder to sample with, with an optional scale; repeat for several.",
    )  # fmt: skip
    parser.add_argument(
        "--suite", choices=["shapes"], default="shapes", help="shapes: coloured shapes, scored by `classify`."
    )
    parser.add_argument(
        "--prompts", help="Text file, one prompt per line (default: every colour x shape prompt of the suite)."
    )
    parser.add_argument("--scheduler", default="ddim", help="Sampler name (see `ldm-tune schedulers`).")
    parser.add_argument("--steps", type=int, default=50, help="Number of sampling steps.")
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=list(DEFAULT_GUIDANCE), help="Guidance scales to compare."
    )
    parser.add_argument("--images-per-prompt", type=int, default=4, help="Images generated per prompt.")
    parser.add_argument("--batch-size", type=int, default=32, help="About this many images per sampling call.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first prompt (prompt i uses seed + i).")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", help="Write the full result (per-prompt predictions included) to this new JSON file.")


def run_evaluate(args) -> None:
    """Run the `evaluate` subcommand: print the accuracy table and write the JSON result when --out is given."""
    out = None if args.out is None else Path(args.out)
    if out is not None and out.exists():
        raise FileExistsError(f"`out` {str(out)!r} already exists; choose a new path.")  # before minutes of sampling
    if args.prompts:
        lines = Path(args.prompts).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        prompts = default_prompts()
    keep_freed_memory()  # a process of its own: no page faults for each step's large activations on a CPU
    result = evaluate(
        args.model,
        prompts,
        guidance_scales=args.guidance,
        scheduler=args.scheduler,
        steps=args.steps,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        checkpoint=args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        lora=args.lora,
    )
    result["suite"] = args.suite
    print(
        f"{args.suite}: {len(prompts)} prompts x {args.images_per_prompt} images, {args.scheduler}, "
        f"{args.steps} steps, seed {args.seed}"
    )
    print(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {out}")
