"""Where an image container ends, to refuse data cut short before it.

PIL decodes some cut-short files without an error: a PNG without its IEND chunk, a GIF without its trailer, and a
JPEG whose scan stops early but which ends with an EOI marker. Each container says where it ends (JPEG markers and
segment lengths, PNG chunks, GIF blocks, ISO-BMFF boxes for AVIF, TIFF strip and tile offsets); `truncation` says
why data that stops before that end is cut short. Used by `ldm_tune.data.images.decode_image`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


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
class JpegLayout:
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


def jpeg_layout(data: bytes) -> JpegLayout:
    """Walk the markers of a JPEG (segments by their length, scan data to the next marker) to its first EOI."""
    layout, pos = JpegLayout(), 2
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


def truncation(fmt: str, data: bytes) -> str | None:
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
