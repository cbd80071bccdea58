"""Image preprocessing with PIL and numpy (no torchvision): orient, resize, crop, flip, normalise to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "hamming": Image.Resampling.HAMMING,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to RGB; transparency is composited on white, not black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, resample: str = "lanczos") -> Image.Image:
    """Scale so that the shorter side is `size` pixels, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, RESAMPLE[resample])


def crop_square(image: Image.Image, size: int, center: bool, rng: np.random.Generator) -> Image.Image:
    """Crop a `size` x `size` square: centred, or at a position drawn from `rng`."""
    width, height = image.size
    if center:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float32 in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def preprocess(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator,
               resample: str = "lanczos") -> torch.Tensor:  # fmt: skip
    """The training transform: RGB, resize the shorter side, square crop, optional flip, normalise."""
    image = crop_square(resize_shorter_side(to_rgb(image), resolution, resample), resolution, center_crop, rng)
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
