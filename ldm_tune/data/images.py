"""Opening one image safely: every way a file can be bad ends in a `BadItem` with a reason, never a crash.

What can be repaired is repaired and reported as a fix: EXIF orientation applied, transparency composited on
white, CMYK/palette/greyscale converted, 16-bit scaled (not clipped) to 8-bit, the first frame of an animation.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadItem(Exception):
    """An item that is skipped and counted; `reason` is a short key of the data report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16-bit values at 255 (an almost white image); scale the range instead.
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if array.max(initial=0) > 255 else 255.0
    grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image, fixes: list[str] | None = None) -> Image.Image:
    """Orient by EXIF and convert any mode to 8-bit RGB; note each repair in `fixes`."""
    fixes = [] if fixes is None else fixes
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in (0, 1):
        image = ImageOps.exif_transpose(image)
        fixes.append("exif_rotated")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        fixes.append("sixteen_bit")
        return _sixteen_bit_to_rgb(image)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        fixes.append("transparency_on_white")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        fixes.append(f"converted_{mode.lower()}")
    return image.convert("RGB")


def check_size(width: int, height: int, min_size: int, max_aspect: float) -> None:
    """Raise `BadItem` for an image below `min_size` pixels on its short side or more elongated than `max_aspect`."""
    if min(width, height) < min_size:
        raise BadItem("too_small", f"{width}x{height}")
    if max(width, height) / min(width, height) > max_aspect:
        raise BadItem("extreme_aspect_ratio", f"{width}x{height}")


def decode_image(data: bytes | Path | str, max_pixels: int, fixes: list[str] | None = None) -> Image.Image:
    """Open, fully decode and convert an image from bytes or a path; raises `BadItem` with the reason."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise BadItem("missing_file", str(path))
        if path.stat().st_size == 0:
            raise BadItem("empty_file", str(path))
        data = path.read_bytes()
    elif len(data) == 0:
        raise BadItem("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            # The header gives the size before any pixel is decoded: refuse bombs before they take the memory.
            if image.width * image.height > max_pixels:
                raise BadItem("decompression_bomb", f"{image.width}x{image.height}")
            if getattr(image, "n_frames", 1) > 1 and fixes is not None:
                fixes.append("animated_first_frame")
            image.seek(0)
            image.load()
    except BadItem:
        raise
    except Image.DecompressionBombError as error:
        raise BadItem("decompression_bomb", str(error)) from error
    except UnidentifiedImageError as error:
        raise BadItem("corrupt", str(error)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = "truncated" if "truncated" in str(error).lower() else "corrupt"
        raise BadItem(reason, str(error)) from error
    return to_rgb(image, fixes)
