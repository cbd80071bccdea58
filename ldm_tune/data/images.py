"""Opening one image safely: every way an item can be bad ends in a `BadItem` with a reason, never a crash.

An item's bytes are read (`missing_file`, `empty_file`, `unreadable`), identified among an allow-list of formats
(`format_not_allowed`: the decoder of another format never sees them), checked for a cut-short container
(`truncated`), sized before any pixel is decoded (`decompression_bomb`) and decoded in full (`corrupt`,
`truncated`). Any other exception a decoder raises on hostile bytes (TIFF alone raises TypeError, ValueError,
struct.error, IndexError, ZeroDivisionError, ...) is `corrupt` too; only KeyboardInterrupt and SystemExit pass.

What can be repaired is repaired and reported as a fix: EXIF orientation applied, transparency composited on
white, CMYK/palette/greyscale/Lab converted, 16-bit, 32-bit and float greyscale scaled by their range (not
clipped) to 8-bit, the first frame of an animation.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError, features

from ldm_tune.data.truncation import JpegLayout, jpeg_layout, truncation


logger = logging.getLogger(__name__)

# Bump when a decision of `decode_image` changes (a reason, a fix, the pixels): caches of decode results keyed by
# the file alone (the scan's) must fold it into their key. 2: allow-list, truncation checks, real ranges.
DECODE_VERSION = 2

# PIL format names. Only raster formats worth training on: it also keeps untrusted bytes away from decoders with a
# larger attack surface (EPS would run Ghostscript, PSD and the scientific formats have had many CVEs).
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def _pillow_opens(name: str) -> bool:
    try:
        return bool(features.check(name.lower()))
    except ValueError:  # a Pillow too old to know the feature
        return False


# What a config may allow (`data.image_formats`): the defaults, plus AVIF where the installed Pillow decodes it
# (Pillow >= 11.3 with libavif). An MPO file (a JPEG with more pictures after the first) counts as JPEG.
KNOWN_FORMATS = frozenset(DEFAULT_FORMATS) | ({"AVIF"} if _pillow_opens("AVIF") else set())


class BadItem(Exception):
    """An item that is skipped and counted; `reason` is a short key of the data report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# --- converting to 8-bit RGB -------------------------------------------------------------------------------------


def _declared_int_range(image: Image.Image) -> tuple[float, float]:
    """The value range of a mode "I" (32-bit integer) image: what its TIFF tags declare, else the int32 range.

    Mode "I" holds any integer type up to 32 bits, so the mode alone does not tell the range. A TIFF says it:
    BitsPerSample (tag 258) and SampleFormat (tag 339: 1 unsigned, 2 signed; TIFF 6.0 section 19). Without tags
    (an image built in memory) the type's own range is used, so a value always maps to the same grey.
    """
    tags = getattr(image, "tag_v2", None)
    bits, sample_format = (tags.get(258), tags.get(339)) if tags is not None else (None, None)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) and sample_format else sample_format
    if isinstance(bits, int) and 1 <= bits <= 32:
        if sample_format == 2:
            return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        return 0.0, 2.0**bits - 1
    return -(2.0**31), 2.0**31 - 1


def _grey_to_rgb(image: Image.Image, fixes: list[str]) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8-bit RGB, scaled by the range of the mode, not the values.

    PIL's convert("RGB") clips them at 255 (an almost white 16-bit image) or truncates floats (a [0, 1] image
    comes out black). A 16-bit image is scaled by 65535 even when it is dark: all values <= 255 are a nearly
    black picture, not an 8-bit one. Floats have no fixed range: [0, 1] is the usual one (x 255); any other range
    is stretched from its minimum to its maximum; NaN or infinity is corrupt data.
    """
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
        fixes.append("sixteen_bit")
    elif image.mode == "I":
        low, high = _declared_int_range(image)
        if low == 0 and high == 2.0**32 - 1:
            array = array.view(np.uint32)  # PIL holds unsigned 32-bit samples in int32: read them back unsigned
        fixes.append("thirty_two_bit")
    else:  # "F"
        if not np.isfinite(array).all():
            raise BadItem("corrupt", "NaN or infinite pixel values")
        low, high = (0.0, 1.0) if array.min() >= 0 and array.max() <= 1 else (float(array.min()), float(array.max()))
        fixes.append("float_range")
    values = array.astype(np.float64)
    if high > low:
        values = (values - low) / (high - low) * 255.0
    grey = np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)  # constant float image: its value, clipped
    return Image.fromarray(grey).convert("RGB")


def _oriented(image: Image.Image, fixes: list[str]) -> Image.Image:
    """The image turned as its EXIF orientation says (tag 0x0112, values 2-8); unreadable EXIF is ignored."""
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation in range(2, 9):
            image = ImageOps.exif_transpose(image)
            fixes.append("exif_rotated")
    except Exception:  # a corrupt EXIF block says nothing reliable about orientation; the pixels are still fine
        fixes.append("exif_ignored")
    return image


def to_rgb(image: Image.Image, fixes: list[str] | None = None) -> Image.Image:
    """Orient by EXIF and convert any mode to 8-bit RGB; note each repair in `fixes`. Raises only `BadItem`."""
    fixes = [] if fixes is None else fixes
    mode = image.mode
    try:
        image = _oriented(image, fixes)
        if mode.startswith("I;16") or mode in ("I", "F"):
            return _grey_to_rgb(image, fixes)
        if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in image.info):
            fixes.append("transparency_on_white")
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode == "LAB":  # convert("RGB") would read L, a, b as R, G, B: go through a colour transform instead
            fixes.append("converted_lab")
            lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                  "LAB", "RGB")  # fmt: skip
            return ImageCms.applyTransform(image, lab_to_srgb)
        if mode != "RGB":
            fixes.append(f"converted_{mode.lower()}")
        return image.convert("RGB")
    except BadItem:
        raise
    except ValueError as error:  # "conversion from X to Y not supported"
        raise BadItem("unsupported_mode", f"{mode}: {error}") from error
    except Exception as error:  # a lazily decoded image can still fail here
        raise BadItem("corrupt", f"{type(error).__name__}: {error}") from error


def check_size(width: int, height: int, min_size: int, max_aspect: float) -> None:
    """Raise `BadItem` for an image below `min_size` pixels on its short side or more elongated than `max_aspect`."""
    if min(width, height) < min_size:
        raise BadItem("too_small", f"{width}x{height}")
    if max(width, height) / min(width, height) > max_aspect:
        raise BadItem("extreme_aspect_ratio", f"{width}x{height}")


# --- identifying the format ---------------------------------------------------------------------------------------


def allowed_formats(formats, key: str = "formats") -> tuple[str, ...]:
    """`formats` checked against `KNOWN_FORMATS` (upper-cased, at least one); a ValueError names `key` (the
    config key, e.g. `data.image_formats`) and what it got."""
    if isinstance(formats, str):
        formats = (formats,)
    names = tuple(dict.fromkeys(str(f).upper() for f in formats))
    if not names or any(name not in KNOWN_FORMATS for name in names):
        raise ValueError(f"`{key}` must be PIL format names from {sorted(KNOWN_FORMATS)}, got {list(formats)}.")
    return names


def _sniff(prefix: bytes, allowed: tuple[str, ...]) -> str | None:
    """The format whose signature `prefix` carries: an allowed one first, else any PIL knows; None if none does.

    Only the plugins' `_accept` signature tests run on the bytes (a few byte comparisons each), so a format that
    is not allowed is named in the report without its decoder ever parsing the data.
    """
    Image.init()  # registers every plugin's signature test (once; Image.open would do it too)
    others = [name for name in Image.ID if name not in allowed]
    for name in (*allowed, *others):
        accept = Image.OPEN.get(name, (None, None))[1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a signature test that trips on short input has not recognised it
            continue
    return None


# Put after a JPEG's scan data. Without 0xFF, the read-ahead filler is never a marker; libjpeg reads at most 8
# bytes ahead of the last block (MIN_GET_BITS in jdhuff.c), more is never used by a complete scan. The scan filler
# adds restart markers RST0-7: a scan cut at the end of a restart interval skips plain bytes while it looks for the
# next RST (jdmarker.c, `read_restart_marker`), but resumes decoding after one of these.
_JPEG_READ_AHEAD = b"\x55" * 16
_JPEG_SCAN_FILLER = b"\x55" * 8 + b"".join(bytes((0xFF, 0xD0 + k)) + b"\x55" * 4 for k in range(8))


def _load_jpeg(image: Image.Image, data: bytes, layout: JpegLayout, allowed: tuple[str, ...]) -> Image.Image:
    """Decode a JPEG so that a scan cut short and closed by an EOI marker fails instead of decoding grey.

    A single sequential scan is decoded from its bytes with the EOI replaced by read-ahead filler: a complete scan
    decodes exactly as before (the filler is only read ahead), a cut one runs out of data in the next blocks and
    PIL raises "image file is truncated". libjpeg decodes progressive and multi-scan pictures whole before the
    first row comes out, which needs the EOI, so they are decoded twice, the second time with filler inserted
    before the EOI: a complete last scan ignores it (extraneous bytes and parameterless markers), a cut one
    decodes it as data, and the two pictures differ. A cut within the last few bytes of the scan can pass: the
    filler then completes the scan, and a few blocks hold noise.
    """
    eoi = layout.eoi
    if layout.scans == 1 and layout.sequential:
        probe = Image.open(io.BytesIO(data[:eoi] + _JPEG_READ_AHEAD), formats=list(allowed))
        probe.load()
        return probe
    image.load()
    probe = Image.open(io.BytesIO(data[:eoi] + _JPEG_SCAN_FILLER + data[eoi:]), formats=list(allowed))
    probe.load()
    if probe.tobytes() != image.tobytes():
        raise BadItem("truncated", "the last scan stops before its end")
    return image


# --- decoding -----------------------------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    """The bytes of a regular file; `missing_file`, `unreadable` or `empty_file` otherwise."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a folder, or a FIFO or device that would block or never end
            raise BadItem("unreadable", f"{path}: not a regular file")
        if info.st_size == 0:
            raise BadItem("empty_file", str(path))
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as error:
        raise BadItem("missing_file", str(path)) from error
    except MemoryError as error:
        raise BadItem("unreadable", f"{path}: too large to read into memory") from error
    except (OSError, ValueError) as error:  # permission, I/O error, symlink loop, a NUL byte in the name, ...
        raise BadItem("unreadable", f"{path}: {error}") from error


_truncated_images_warned = False


def _warn_if_truncated_images_allowed() -> None:
    global _truncated_images_warned
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _truncated_images_warned:
        _truncated_images_warned = True
        logger.warning("`PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is True in this process (set by other code): images "
                       "cut short inside their pixel data may decode with grey rows instead of being skipped as "
                       "`truncated`. Set it back to False.")  # fmt: skip


def _decode(data: bytes, max_pixels: int, fixes: list[str] | None, allowed: tuple[str, ...]) -> Image.Image:
    fmt = _sniff(data[:16], allowed)
    if fmt is None:
        raise BadItem("corrupt", "not an image format PIL knows")
    if fmt not in allowed:
        raise BadItem("format_not_allowed", fmt)
    layout = jpeg_layout(data) if fmt == "JPEG" else None
    if layout is not None:
        problem = "no EOI marker after the scans" if layout.eoi is None else layout.unfinished()
    else:
        problem = truncation(fmt, data)
    if problem is not None:
        raise BadItem("truncated", problem)
    image = Image.open(io.BytesIO(data), formats=list(allowed))
    if image.format not in allowed and not (image.format == "MPO" and "JPEG" in allowed):
        raise BadItem("format_not_allowed", image.format or "unknown")
    # The header gives the size before any pixel is decoded: refuse bombs before they take the memory.
    if image.width * image.height > max_pixels:
        raise BadItem("decompression_bomb", f"{image.width}x{image.height}")
    # An MPO's further pictures are other views or previews, not frames of an animation.
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1 and fixes is not None:
        fixes.append("animated_first_frame")
    image.seek(0)
    if fmt == "JPEG":
        image = _load_jpeg(image, data, layout, allowed)
    else:
        image.load()
    return to_rgb(image, fixes)


def decode_image(data: bytes | Path | str, max_pixels: int, fixes: list[str] | None = None,
                 formats=DEFAULT_FORMATS) -> Image.Image:  # fmt: skip
    """Read, identify, fully decode and convert an image from bytes or a path to 8-bit RGB.

    Args:
        data: the image's bytes, or the path of its file.
        max_pixels: images with more pixels (by their header) are refused as `decompression_bomb`.
        fixes: a list the repairs made are appended to (see `to_rgb`).
        formats: the PIL format names accepted (a subset of `KNOWN_FORMATS`); others are `format_not_allowed`.

    Raises `BadItem` with its reason for any fault of the item (the detail names the path when there is one), and
    ValueError only for `formats` outside `KNOWN_FORMATS`.
    """
    allowed = allowed_formats(formats)
    _warn_if_truncated_images_allowed()
    where = ""
    if isinstance(data, (str, os.PathLike)):
        where = f"{data}: "
        data = _read(Path(data))
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
    else:
        raise BadItem("corrupt", f"expected image bytes or a path, got {type(data).__name__}")
    if not data:
        raise BadItem("empty_file")
    try:
        # catch_warnings is not thread-safe (the scan decodes in threads): at worst these ignore filters outlive
        # the call, which only silences the same warnings elsewhere.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `max_pixels` is the limit here
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # "Corrupt EXIF data", ...
            return _decode(data, max_pixels, fixes, allowed)
    except BadItem as error:
        if not where:
            raise
        raise BadItem(error.reason, where + error.detail) from error
    except Image.DecompressionBombError as error:  # PIL's own limit, when `max_pixels` is above it
        raise BadItem("decompression_bomb", where + str(error)) from error
    except UnidentifiedImageError as error:
        raise BadItem("corrupt", where + str(error)) from error
    except MemoryError as error:  # a bomb the header did not show (a huge palette, strip or chunk)
        raise BadItem("corrupt", where + "out of memory while decoding") from error
    except Exception as error:  # OSError, SyntaxError, EOFError, and whatever else hostile bytes raise in a decoder
        message = f"{type(error).__name__}: {error}"
        reason = "truncated" if "truncated" in message.lower() else "corrupt"
        raise BadItem(reason, where + message) from error
