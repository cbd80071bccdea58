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
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError, features


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


# --- cut-short containers -------------------------------------------------------------------------------------------
#
# PIL decodes some cut-short files without an error: a PNG without its IEND chunk, a GIF without its trailer, and
# a JPEG whose scan stops early but which ends with an EOI marker (libjpeg warns "Corrupt JPEG data: premature end
# of data segment" and fills the missing blocks with flat grey; Pillow's JpegDecode.c drops libjpeg's warnings).
# Each container says where it ends; data that stops before that end is `truncated`.

# A marker after entropy-coded data: 0xFF then a code that is not a stuffed zero nor a restart marker RST0-7
# (ITU-T T.81, B.1.1.2 and F.1.2.3). A code of 0xFF is a fill byte before the marker. (`\xff+` before the code
# would make the search ~15x slower: re finds a one-byte literal prefix with a fast scan.)
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_JPEG_PARAMETERLESS = {0x01, 0xD8}  # TEM, SOI: no length field
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame; C4, C8, CC are DHT, JPG, DAC
_JPEG_SEQUENTIAL_HUFFMAN = {0xC0, 0xC1}  # baseline and extended sequential, Huffman coded
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}  # progressive (the others: sequential or lossless, Al is no level)


@dataclass
class _JpegLayout:
    eoi: int | None = None  # offset of the EOI marker ending the first picture; None when the data ends first
    scans: int = 0
    sequential: bool = False  # sequential Huffman coding (not progressive, not arithmetic)
    progressive: bool = False
    components: tuple = ()  # the frame's component ids
    # Per component: the point transform Al each coefficient was last coded at. A progression is finished when
    # every coefficient it started reaches Al = 0 (T.81, G.1.1.1.2: each refinement scan lowers Al by one).
    levels: dict = field(default_factory=dict)

    def unfinished(self) -> str | None:
        """Why the scans stop before the picture is complete (a component never coded, or a refinement not
        finished), or None. Catches a progressive file cut between scans, which decodes blurred without an error."""
        for component in self.components:
            if component not in self.levels:
                return f"component {component} is never coded"
            if any(self.levels[component]):
                return f"component {component} stops before its last refinement scan"
        return None


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Walk the markers of a JPEG (segments by their length, scan data to the next marker) to its first EOI."""
    layout, pos = _JpegLayout(), 2
    while (marker := _JPEG_MARKER.search(data, pos)) is not None:
        code, pos = data[marker.start() + 1], marker.end()
        if code == 0xFF:  # a fill byte: the marker starts at the next 0xFF
            pos -= 1
            continue
        if code == 0xD9:
            layout.eoi = marker.start()
            return layout
        if code in _JPEG_PARAMETERLESS:
            continue
        segment = data[pos + 2 : pos + int.from_bytes(data[pos : pos + 2], "big")]
        pos += int.from_bytes(data[pos : pos + 2], "big")  # the length counts itself, not the marker
        if pos > len(data):
            break
        if code in _JPEG_SOF and len(segment) >= 6:  # P, Y, X, Nf, then Nf x (C, H/V, Tq)
            layout.components = tuple(segment[6 : 6 + 3 * segment[5] : 3])
            layout.sequential, layout.progressive = code in _JPEG_SEQUENTIAL_HUFFMAN, code in _JPEG_PROGRESSIVE
        elif code == 0xDA and segment:  # Ns, Ns x (C, Td/Ta), Ss, Se, Ah/Al
            layout.scans += 1
            count = segment[0]
            if len(segment) >= 4 + 2 * count:
                start, stop, al = segment[1 + 2 * count], segment[2 + 2 * count], segment[3 + 2 * count] & 15
                for component in segment[1 : 1 + 2 * count : 2]:
                    levels = layout.levels.setdefault(component, [0] * 64)
                    if layout.progressive:
                        levels[start : min(stop, 63) + 1] = [al] * (min(stop, 63) + 1 - start)
    return layout


def _png_complete(data: bytes) -> bool:
    """Whether the chunks (length, type, data, CRC) reach IEND with its CRC inside `data` (PNG spec, 5.3)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos <= len(data)
    return False


def _gif_complete(data: bytes) -> bool:
    """Whether the blocks reach the trailer (0x3B) inside `data` (GIF89a spec, sections 17-27)."""
    if len(data) < 13:
        return False
    flags, pos = data[10], 13
    if flags & 0x80:  # global colour table
        pos += 3 << ((flags & 7) + 1)
    while pos < len(data):
        kind = data[pos]
        if kind == 0x3B:
            return True
        if kind == 0x21:  # extension: label, then data sub-blocks
            pos += 2
        elif kind == 0x2C:  # image descriptor, local colour table, LZW code size, then data sub-blocks
            if pos + 10 > len(data):
                return False
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0) + 1
        else:  # PIL steps over stray bytes between blocks (GifImagePlugin); so does this walk
            pos += 1
            continue
        while pos < len(data) and data[pos]:  # sub-blocks: a size byte, that many bytes; a zero size ends them
            pos += 1 + data[pos]
        pos += 1
    return False


def _isobmff_complete(data: bytes) -> bool:
    """Whether every top-level box (AVIF's ftyp, meta, mdat, ...) ends inside `data` (ISO/IEC 14496-12, 4.2)."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        if size == 1 and pos + 16 <= len(data):  # 64-bit size after the type
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:  # the box runs to the end of the file
            return True
        if size < 8:
            return False
        pos += size
    return pos == len(data)


# Bytes per value of each TIFF field type (TIFF 6.0, section 2: BYTE, ASCII, SHORT, LONG, RATIONAL, ..., DOUBLE).
_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_TIFF_DATA_TAGS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)


def _tiff_end(data: bytes) -> int:
    """Where the first picture ends by its directory (TIFF 6.0, section 2): the furthest of the directory, the
    values it points to, and its strips or tiles. Classic (not Big) TIFF only."""
    order = "little" if data[:2] == b"II" else "big"
    ifd = int.from_bytes(data[4:8], order)
    count = int.from_bytes(data[ifd : ifd + 2], order)
    end, values = ifd + 2 + 12 * count + 4, {}
    if end > len(data):  # the directory itself is cut (or its count is garbage): no need to read its entries
        return end
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(data) - 11), 12):
        tag, kind, n = (int.from_bytes(data[entry + a : entry + b], order) for a, b in ((0, 2), (2, 4), (4, 8)))
        size = _TIFF_SIZES.get(kind, 1)
        at = entry + 8 if n * size <= 4 else int.from_bytes(data[entry + 8 : entry + 12], order)
        end = max(end, at + n * size)
        if any(tag in pair for pair in _TIFF_DATA_TAGS) and kind in (3, 4) and n <= 1 << 16:
            values[tag] = [int.from_bytes(data[at + i * size : at + (i + 1) * size], order) for i in range(n)]
    for offsets, counts in _TIFF_DATA_TAGS:
        for offset, length in zip(values.get(offsets, ()), values.get(counts, ()), strict=False):
            end = max(end, offset + length)
    return end


def _truncation(fmt: str, data: bytes) -> str | None:
    """Why the container of `data` is cut short, or None when it holds all it says it holds."""
    if fmt == "PNG" and not _png_complete(data):
        return "the chunks stop before IEND"
    if fmt == "GIF" and not _gif_complete(data):
        return "the blocks stop before the trailer"
    if fmt == "WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        return f"the RIFF header says {8 + int.from_bytes(data[4:8], 'little')} bytes, got {len(data)}"
    if fmt == "TIFF" and data[2:4] in (b"*\x00", b"\x00*") and _tiff_end(data) > len(data):
        return f"the directory and strips reach byte {_tiff_end(data)}, the data has {len(data)}"
    if fmt == "AVIF" and not _isobmff_complete(data):
        return "the last box ends after the data"
    return None


# Put after a JPEG's scan data. Without 0xFF, the read-ahead filler is never a marker; libjpeg reads at most 8
# bytes ahead of the last block (MIN_GET_BITS in jdhuff.c), more is never used by a complete scan. The scan filler
# adds restart markers RST0-7: a scan cut at the end of a restart interval skips plain bytes while it looks for the
# next RST (jdmarker.c, `read_restart_marker`), but resumes decoding after one of these.
_JPEG_READ_AHEAD = b"\x55" * 16
_JPEG_SCAN_FILLER = b"\x55" * 8 + b"".join(bytes((0xFF, 0xD0 + k)) + b"\x55" * 4 for k in range(8))


def _load_jpeg(image: Image.Image, data: bytes, layout: _JpegLayout, allowed: tuple[str, ...]) -> Image.Image:
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
    layout = _jpeg_layout(data) if fmt == "JPEG" else None
    if layout is not None:
        problem = "no EOI marker after the scans" if layout.eoi is None else layout.unfinished()
    else:
        problem = _truncation(fmt, data)
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
