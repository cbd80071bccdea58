"""Image preprocessing with PIL and numpy (no torchvision): resize to cover, crop, flip, normalise to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
    "hamming": Image.Resampling.HAMMING,
}


def resize_to_cover(image: Image.Image, size: tuple[int, int], resample: str = "lanczos") -> Image.Image:
    """Scale (keeping the aspect ratio) so the image covers `size` = (width, height) with the least excess."""
    width, height = image.size
    scale = max(size[0] / width, size[1] / height)
    new_size = (max(size[0], round(width * scale)), max(size[1], round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, RESAMPLE[resample])


def crop(image: Image.Image, size: tuple[int, int], center: bool, rng: np.random.Generator) -> Image.Image:
    """Crop `size` = (width, height): centred, or at a position drawn from `rng`."""
    width, height = image.size
    if center:
        left, top = (width - size[0]) // 2, (height - size[1]) // 2
    else:
        left, top = int(rng.integers(0, width - size[0] + 1)), int(rng.integers(0, height - size[1] + 1))
    return image.crop((left, top, left + size[0], top + size[1]))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float32 in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def preprocess(image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool, rng: np.random.Generator,
               resample: str = "lanczos") -> torch.Tensor:  # fmt: skip
    """The training transform: resize to cover `size`, crop, optional horizontal flip, normalise."""
    image = crop(resize_to_cover(image, size, resample), size, center_crop, rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
