"""Fuzzing the three doors untrusted bytes come in by, with hypothesis (derandomized: the same cases on every run).

- images: valid files of every allowed format, bit-flipped, cut, with bytes inserted or deleted and header fields
  overwritten, through `decode_image`: an RGB image or a `BadItem`, never another exception;
- pair lists: JSONL / CSV / parquet files of hostile rows (random bytes, wrong types, nested junk, huge numbers,
  NaN, byte-order marks, NUL bytes, lone surrogates) and damaged parquet files, through `open_pair_list`: rows and
  facts in which every row is kept or counted (`total == kept + sum(bad)`), or a ValueError naming the file;
- tar shards: random members (unsafe names, links, folders, odd formats) then damaged bytes, through
  `ShardSamples`: (key, bytes or BadItem, caption) entries, never an exception.

The strategies and the `*_outcome` checks are shared with `benchmarks/bench_fuzz.py`, which runs many more cases.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import signal
import tarfile
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm_tune.data.images import BadItem, decode_image


MAX_PIXELS = 2**22  # an overwritten width or height beyond this is a `decompression_bomb`, not an allocation
CASE_SECONDS = 20  # one case running longer is a hang: a failure, not a wait
SETTINGS = {"deadline": None, "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}  # fmt: skip


class Hang(BaseException):
    """A case past `CASE_SECONDS`: a BaseException, so no `except Exception` on the way can turn it into a result."""


@contextmanager
def time_limit(seconds: int = CASE_SECONDS):
    def expire(signum, frame):
        raise Hang(f"a case ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- byte mutations ----------------------------------------------------------------------------------------------

WIDTHS = (1, 2, 4)
EXTREMES = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),  # one bit at a position
    st.tuples(st.just("cut"), st.floats(0, 1)),  # keep this fraction of the bytes
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 256)),
    # A header field: a position among the first 64 bytes, a width, a value (often an extreme one).
    st.tuples(
        st.just("field"),
        st.integers(0, 63),
        st.sampled_from(WIDTHS),
        st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**32 - 1)),
        st.booleans(),
    ),  # fmt: skip
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


def mutate(data: bytes, operations) -> bytes:
    """`data` with each operation applied in turn (positions wrap around the current length)."""
    out = bytearray(data)
    for operation in operations:
        kind, n = operation[0], max(len(out), 1)
        if kind == "flip" and out:
            out[operation[1] % n] ^= 1 << operation[2]
        elif kind == "cut":
            del out[int(len(out) * operation[1]) :]
        elif kind == "insert":
            out[operation[1] % n : operation[1] % n] = operation[2]
        elif kind == "delete":
            del out[operation[1] % n : operation[1] % n + operation[2]]
        elif kind == "field":
            _, position, width, value, little = operation
            out[position : position + width] = (value % 256**width).to_bytes(width, "little" if little else "big")
        elif kind == "append":
            out += operation[1]
    return bytes(out)


# --- images -------------------------------------------------------------------------------------------------------


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(-20, 20, (height, width, 3))
    return Image.fromarray(np.clip(np.stack([x * 9, y * 13, x * y], -1) % 256 + noise, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    if "append_images" in options:
        options["append_images"] = [frame.copy() for frame in options["append_images"]]
    image.copy().save(buffer, fmt, **options)  # copies: PIL keeps encoder state on an image it saved
    return buffer.getvalue()


@functools.cache
def image_seeds() -> dict[str, bytes]:
    """Small valid files of every default format, in the variants that take different decoder paths."""
    picture, frames = _picture(24, 16), [_picture(24, 16, seed) for seed in (1, 2)]
    grey16 = Image.fromarray(np.arange(24 * 16, dtype=np.uint16).reshape(16, 24) * 170)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": _encode(picture, "JPEG", quality=80, exif=exif),
        "jpeg-progressive": _encode(picture, "JPEG", quality=80, progressive=True),
        "jpeg-restarts-cmyk": _encode(picture.convert("CMYK"), "JPEG", restart_marker_blocks=1),
        "mpo": _encode(picture, "MPO", save_all=True, append_images=frames[:1]),
        "png": _encode(picture, "PNG"),
        "png-16bit": _encode(grey16, "PNG"),
        "png-palette-transparent": _encode(picture.convert("P"), "PNG", transparency=0),
        "apng": _encode(picture, "PNG", save_all=True, append_images=frames),
        "gif-animated": _encode(picture, "GIF", save_all=True, append_images=frames),
        "webp": _encode(picture, "WEBP", quality=70),
        "webp-lossless-alpha": _encode(picture.convert("RGBA"), "WEBP", lossless=True),
        "webp-animated": _encode(picture, "WEBP", save_all=True, append_images=frames),
        "bmp": _encode(picture, "BMP"),
        "bmp-grey": _encode(picture.convert("L"), "BMP"),
        "tiff": _encode(picture, "TIFF"),
        "tiff-deflate": _encode(picture, "TIFF", compression="tiff_deflate"),
        "tiff-jpeg": _encode(picture, "TIFF", compression="jpeg"),
        "tiff-float": _encode(Image.fromarray(np.linspace(0, 1, 24 * 16, dtype=np.float32).reshape(16, 24)), "TIFF"),
        "tiff-multipage": _encode(picture, "TIFF", save_all=True, append_images=frames),
    }


image_cases = st.tuples(st.sampled_from(sorted(image_seeds())), mutations)


def decode_outcome(case) -> dict[str, int]:
    """{} when the mutated image decodes to RGB, {reason: 1} when it is a BadItem; any other exception escapes."""
    seed, operations = case
    data = mutate(image_seeds()[seed], operations)
    with time_limit():
        try:
            image = decode_image(data, MAX_PIXELS)
        except BadItem as error:
            return {error.reason: 1}
    assert image.mode == "RGB" and image.width * image.height <= MAX_PIXELS
    return {}


@settings(max_examples=300, **SETTINGS)
@given(image_cases)
def test_mutated_images_decode_or_are_bad_items(case):
    decode_outcome(case)


# --- pair lists ----------------------------------------------------------------------------------------------------

COLUMNS = ("image", "text", "caption", "file_name", "url", "image_url", "path", "other")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30) | st.sampled_from(["images/0.png", "/abs/x.png", "../../etc/passwd", "http://a/b.png",
                                              "HTTP://A/B.PNG", "file:///etc/passwd", "a\x00b.png", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
json_objects = st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6), json_values, max_size=5)
raw_lines = st.one_of(
    st.binary(max_size=120),  # random bytes, newlines and NULs included
    st.integers(300, 6000).map(lambda n: b'{"image": "a.png", "text": ' + b"9" * n + b"}"),  # over int() digits
    st.integers(10, 5000).map(lambda n: b"[" * n + b"]" * n),  # nested past the recursion limit
    st.sampled_from([b'{"image": "\\ud800.png", "text": "lone surrogate"}', b'{"image": "a.png", "text": "\\udfff"}',
                     b'{"image": "a.png", "text": NaN}', b'{"image": "a.png", "text": "x", "text": 5}',
                     b"\xef\xbb\xbf" + b'{"image": "a.png", "text": "after a BOM"}', b"\x00" * 40, b"null", b"[]",
                     b'"just a string"', b'{"image": ["a.png"], "text": {"nested": [1, 2]}}']),
)  # fmt: skip
jsonl_files = st.lists(st.one_of(json_objects.map(lambda o: json.dumps(o).encode()), raw_lines), max_size=12)
csv_cells = st.one_of(st.text(max_size=20), st.sampled_from(["images/0.png", "a\x00b", '"quoted, "', "\ufeff", ""]))
csv_files = st.tuples(
    st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=4),
    st.lists(st.lists(csv_cells, max_size=6), max_size=10),
    st.booleans(),  # a byte-order mark first
    st.sampled_from([b"", b"\x00\x00", b'"unclosed', b"\xff\xfe bad utf-8", b"x" * 140_000]),  # a raw last line
)
arrow_columns = st.sampled_from(["string", "int", "float", "binary", "list", "struct", "null", "large_string"])
parquet_files = st.tuples(
    st.dictionaries(st.sampled_from(COLUMNS), arrow_columns, max_size=4),
    st.integers(0, 8),  # rows
    st.one_of(st.just([]), mutations),  # damage to the file's bytes
)
pair_lists = st.one_of(
    st.tuples(st.just("jsonl"), jsonl_files), st.tuples(st.just("csv"), csv_files),
    st.tuples(st.just("parquet"), parquet_files),
)  # fmt: skip


def _arrow_column(kind: str, rows: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    values = {
        "string": lambda: pa.array(
            [f"images/{rng.integers(9)}.png" if rng.random() < 0.7 else None for _ in range(rows)]
        ),  # fmt: skip
        "large_string": lambda: pa.array(["x" * int(rng.integers(0, 300)) for _ in range(rows)], pa.large_string()),
        "int": lambda: pa.array(rng.integers(-(2**62), 2**62, rows)),
        "float": lambda: pa.array(rng.choice([np.nan, np.inf, 1e308, 0.5], rows)),
        "binary": lambda: pa.array([bytes(rng.integers(0, 256, 5, dtype=np.uint8)) for _ in range(rows)]),
        "list": lambda: pa.array([["a", None, "b"][: int(rng.integers(0, 4))] for _ in range(rows)]),
        "struct": lambda: pa.array([{"x": int(rng.integers(9)), "y": "z"} for _ in range(rows)]),
        "null": lambda: pa.nulls(rows),
    }
    return values[kind]()


def write_pair_list(folder: Path, case) -> Path:
    """The file of a generated pair-list case, under a name no other case uses (the index is keyed by path)."""
    kind, spec = case
    path = folder / f"list-{next(_numbers)}.{kind}"
    if kind == "jsonl":
        path.write_bytes(b"\n".join(spec))
    elif kind == "csv":
        header, rows, bom, last = spec
        text = io.StringIO()
        writer = csv.writer(text)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.getvalue().encode("utf-8", "surrogatepass") + last)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns, rows, damage = spec
        table = pa.table(
            {name: _arrow_column(type_name, rows, i) for i, (name, type_name) in enumerate(columns.items())}
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path.write_bytes(mutate(buffer.getvalue(), damage) if damage else buffer.getvalue())
    return path


_numbers = itertools.count()


def index_outcome(case, folder: Path) -> dict[str, int]:
    """The reasons rows were left out ({"file_refused": 1} for a ValueError naming the file); a ValueError that
    does not name the file, another exception, or facts that lose a row fail."""
    from ldm_tune.data.index import open_pair_list

    path = write_pair_list(folder, case)
    with time_limit():
        try:
            rows, facts = open_pair_list(path, folder / "cache", "text", "image")
        except ValueError as error:
            assert str(path) in str(error), f"the ValueError does not name the file: {error}"
            return {"file_refused": 1}
    assert facts["total"] == len(rows) + sum(facts["bad"].values()), facts
    return dict(facts["bad"])


@functools.cache
def _work_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="ldm-fuzz-"))


@settings(max_examples=80, **SETTINGS)
@given(pair_lists)
def test_hostile_pair_lists_are_indexed_with_every_row_counted_or_refused(case):
    index_outcome(case, _work_folder())


# --- tar shards ---------------------------------------------------------------------------------------------------

member_names = st.one_of(
    st.tuples(
        st.sampled_from(
            ["000", "a/b", "s1/0001", "x.y", "../up", "/abs/k", "c:/k", "dir\\k", "__key__", "", "k" * 150, "ü/ñ"]
        ),  # fmt: skip
        st.sampled_from(["jpg", "png", "webp", "txt", "json", "cls", "JPG", "tar.gz", ""]),
    ),
    st.tuples(st.text(max_size=12), st.text(max_size=5)),
)
member_types = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                         tarfile.CHRTYPE, tarfile.FIFOTYPE])  # fmt: skip
member_bodies = st.one_of(
    st.sampled_from(["jpeg", "png", "webp"]).map(lambda name: image_seeds()[name]),
    st.binary(max_size=200),
    st.sampled_from(
        [b"a caption", b"\xff\xfe not utf-8", b'{"text": "from json"}', b'{"text": 7}', b"[1, 2]", b"{not json", b""]
    ),  # fmt: skip
)
tar_files = st.tuples(
    st.lists(st.tuples(member_names, member_types, member_bodies), max_size=8),
    st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    st.one_of(st.just([]), mutations),
)


def write_tar(folder: Path, case) -> Path:
    members, tar_format, damage = case
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for (stem, extension), kind, body in members:
            info = tarfile.TarInfo(f"{stem}.{extension}" if extension else stem)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(body)
            else:
                info.linkname = "000.jpg"
            try:
                tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
            except ValueError:  # a name USTAR cannot hold: not written, like any tool would
                continue
    path = folder / f"shard-{next(_numbers)}.tar"
    path.write_bytes(mutate(buffer.getvalue(), damage) if damage else buffer.getvalue())
    return path


def shard_outcome(case, folder: Path) -> dict[str, int]:
    """The BadItem reasons of the shard's entries; an entry of another form, or an exception, fails."""
    from ldm_tune.data.streaming import ShardSamples

    path = write_tar(folder, case)
    reasons = Counter()
    with time_limit():
        for entry in ShardSamples(shards=[str(path)], caption_column="text", seed=0, epoch=0):
            key, image, _caption = entry
            assert isinstance(key, str) and isinstance(image, (bytes, BadItem)), entry
            if isinstance(image, BadItem):
                reasons[image.reason] += 1
    return dict(reasons)


@settings(max_examples=150, **SETTINGS)
@given(tar_files)
def test_hostile_tar_shards_give_entries_never_exceptions(case):
    shard_outcome(case, _work_folder())


TARGETS = {  # name: (strategy, outcome(case, folder)), for benchmarks/bench_fuzz.py
    "decode_image": (image_cases, lambda case, folder: decode_outcome(case)),
    "open_pair_list": (pair_lists, index_outcome),
    "ShardSamples": (tar_files, shard_outcome),
}
