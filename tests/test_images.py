"""One image, every way it can be bad: the format allow-list, no exception but `BadItem`, truncation refused (not
grey-filled), greyscale scaled by its real range; and cache files that are damaged on disk, found and encoded again."""

import io
import logging
import os
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, ImageFile

from ldm_tune.data import images
from ldm_tune.data.images import DEFAULT_FORMATS, KNOWN_FORMATS, BadItem, decode_image, to_rgb


MAX = 10**8


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Gradients plus noise: compresses like a photo (a flat image would fit in a few bytes of scan data)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = np.random.default_rng(seed).integers(-25, 25, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def reason(data, **kwargs) -> str:
    with pytest.raises(BadItem) as caught:
        decode_image(data, MAX, **kwargs)
    return caught.value.reason


def pil_rgb(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


# Every allowed format, and the JPEG variants that take different decoding paths.
SAMPLES = {
    "jpeg": ("JPEG", {"quality": 90}),
    "jpeg-progressive": ("JPEG", {"quality": 90, "progressive": True}),
    "jpeg-restarts": ("JPEG", {"quality": 90, "restart_marker_blocks": 2}),
    "png": ("PNG", {}),
    "gif": ("GIF", {}),
    "webp": ("WEBP", {"quality": 80}),
    "webp-lossless": ("WEBP", {"lossless": True}),
    "bmp": ("BMP", {}),
    "tiff": ("TIFF", {}),
    "tiff-deflate": ("TIFF", {"compression": "tiff_deflate"}),
}


# --- formats ------------------------------------------------------------------------------------------------------


def test_known_formats_hold_the_defaults():
    assert set(DEFAULT_FORMATS) <= KNOWN_FORMATS
    with pytest.raises(ValueError, match=r"`formats` must be PIL format names from .*got \['PNG', 'EPS'\]"):
        decode_image(encode(photo(), "PNG"), MAX, formats=["PNG", "EPS"])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_allowed_format_decodes_as_pil_does(name):
    fmt, options = SAMPLES[name]
    data = encode(photo(), fmt, **options)
    image = decode_image(data, MAX)
    assert image.mode == "RGB" and image.tobytes() == pil_rgb(data)


def test_formats_outside_the_list_are_named_and_never_decoded(monkeypatch):
    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript must not run on untrusted bytes")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(BadItem, match="format_not_allowed: EPS"):
        decode_image(eps, MAX)
    for fmt in ("ICO", "PCX", "SGI", "QOI", "JPEG2000"):
        assert reason(encode(photo(32, 32), fmt)) == "format_not_allowed", fmt
    assert reason(encode(photo(), "JPEG"), formats=("PNG",)) == "format_not_allowed"
    assert reason(b"\x00" * 64 + os.urandom(64)) == "corrupt"  # no signature at all: noise, not a format


@pytest.mark.skipif("AVIF" not in KNOWN_FORMATS, reason="this Pillow has no AVIF decoder")
def test_avif_only_when_the_config_allows_it():
    data = encode(photo(), "AVIF")
    with pytest.raises(BadItem, match="format_not_allowed: AVIF"):
        decode_image(data, MAX)
    assert decode_image(data, MAX, formats=[*DEFAULT_FORMATS, "AVIF"]).size == (96, 64)


def test_mpo_counts_as_jpeg():
    data = encode(photo(), "MPO", save_all=True, append_images=[photo(seed=1)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    fixes = []
    assert decode_image(data, MAX, fixes).tobytes() == pil_rgb(data)
    assert "animated_first_frame" not in fixes  # a second view, not an animation


# --- nothing but BadItem ------------------------------------------------------------------------------------------


def test_unreadable_paths_are_bad_items_naming_the_path(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadItem, match=f"unreadable: {tmp_path / 'folder'}: not a regular file"):
        decode_image(tmp_path / "folder", MAX)
    os.mkfifo(tmp_path / "pipe")  # reading it would block forever
    assert reason(tmp_path / "pipe") == "unreadable"
    assert reason(str(tmp_path / "bad\0name.png")) == "unreadable"
    assert reason(tmp_path / "absent.png") == "missing_file"
    (tmp_path / "file").write_bytes(b"x")
    assert reason(tmp_path / "file" / "below.png") == "missing_file"
    (tmp_path / "cut.png").write_bytes(encode(photo(), "PNG")[:-20])
    with pytest.raises(BadItem, match=f"truncated: {tmp_path / 'cut.png'}: "):
        decode_image(tmp_path / "cut.png", MAX)
    assert reason(1234) == "corrupt"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(encode(photo(), "PNG"))
    path.chmod(0)
    try:
        with pytest.raises(BadItem, match="unreadable: .*locked.png: .*Permission denied"):
            decode_image(path, MAX)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("error", [TypeError, ValueError, struct.error, IndexError, ZeroDivisionError, RuntimeError,
                                   RecursionError, MemoryError, AssertionError])  # fmt: skip
def test_any_decoder_exception_is_a_bad_item(monkeypatch, error):
    def fails(self):
        raise error("inside the decoder")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fails)
    assert reason(encode(photo(), "PNG")) == "corrupt"


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_interrupts_still_stop_the_run(monkeypatch, error):
    def interrupted(self):
        raise error()

    monkeypatch.setattr(ImageFile.ImageFile, "load", interrupted)
    with pytest.raises(error):
        decode_image(encode(photo(), "PNG"), MAX)


def test_a_tiff_with_any_one_byte_changed_is_an_image_or_a_bad_item():
    """Every byte of a small TIFF set to three values: PIL alone raises more than OSError on some (asserted, so the
    test keeps testing that), decode_image only ever returns RGB or raises BadItem."""
    data = encode(photo(8, 6), "TIFF")
    others = set()
    for position in range(len(data)):
        for value in (0x00, 0xFF, data[position] ^ 0x10):
            mutated = data[:position] + bytes([value]) + data[position + 1 :]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PIL's notes on each broken tag
                    Image.open(io.BytesIO(mutated)).convert("RGB")
            except (OSError, SyntaxError, EOFError):
                pass
            except Exception as error:  # noqa: BLE001 - what PIL raises beyond its documented errors
                others.add(type(error).__name__)
            try:
                assert decode_image(mutated, MAX).mode == "RGB"
            except BadItem:
                pass
    assert others, "no mutation made PIL raise beyond OSError: the test lost its point"


# --- truncation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.99])
def test_cut_images_are_truncated(name, fraction):
    fmt, options = SAMPLES[name]
    data = encode(photo(), fmt, **options)
    assert reason(data[: int(len(data) * fraction)]) == "truncated"


@pytest.mark.parametrize("name", ["jpeg", "jpeg-progressive", "jpeg-restarts"])
@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
def test_a_jpeg_cut_and_closed_by_an_eoi_is_truncated_not_grey(name, fraction):
    """libjpeg decodes such a file with flat grey blocks for the missing data, and PIL raises nothing."""
    fmt, options = SAMPLES[name]
    data = encode(photo(), fmt, **options)
    cut = data[: int(len(data) * fraction)] + b"\xff\xd9"
    Image.open(io.BytesIO(cut)).load()  # what PIL alone does: no error
    assert reason(cut) == "truncated"


def test_a_progressive_jpeg_cut_between_scans_is_truncated():
    data = encode(photo(), "JPEG", progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    assert reason(data[:last_scan] + b"\xff\xd9") == "truncated"


def test_only_the_missing_end_marker_is_truncated_too():
    png, gif = encode(photo(), "PNG"), encode(photo(), "GIF")
    assert png.endswith(b"IEND\xaeB`\x82") and gif.endswith(b";")
    assert reason(png[:-12]) == "truncated"  # all pixels there, IEND chunk gone
    assert reason(gif[:-1]) == "truncated"
    assert reason(encode(photo(), "JPEG")[:-2]) == "truncated"


def test_complete_jpegs_of_every_kind_are_not_called_truncated():
    """Grey, CMYK, every subsampling and quality, restart intervals, progressive, bytes after the EOI."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        mode = ("RGB", "L", "CMYK")[trial % 3]
        options = {"quality": int(rng.integers(5, 100)), "progressive": trial % 2 == 0, "optimize": trial % 4 < 2}
        if mode == "RGB":
            options["subsampling"] = int(rng.integers(0, 3))
        if trial % 5 == 0:
            options["restart_marker_blocks"] = int(rng.integers(1, 4))
        image = photo(int(rng.integers(1, 120)), int(rng.integers(1, 120)), seed=trial).convert(mode)
        data = encode(image, "JPEG", **options) + (b"trailing bytes" if trial % 7 == 0 else b"")
        assert decode_image(data, MAX).tobytes() == pil_rgb(data), options


def test_truncated_images_are_refused_even_if_pil_is_told_to_load_them(monkeypatch, caplog):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(images, "_truncated_images_warned", False)
    data = encode(photo(), "PNG")
    with caplog.at_level(logging.WARNING, logger="ldm_tune.data.images"):
        assert reason(data[: len(data) // 2]) == "truncated"
        assert reason(encode(photo(), "JPEG")[:-100]) == "truncated"
    assert caplog.text.count("LOAD_TRUNCATED_IMAGES") == 1


def test_pil_does_not_load_truncated_images_by_default():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- ranges -------------------------------------------------------------------------------------------------------


def grey_of(data_or_image) -> list[int]:
    if isinstance(data_or_image, Image.Image):
        rgb = np.asarray(to_rgb(data_or_image))
    else:
        rgb = np.asarray(decode_image(data_or_image, MAX))
    assert (rgb == rgb[..., :1]).all()  # grey: R = G = B
    return rgb[..., 0].ravel().tolist()


def tiff(values, bits: int, sample_format: int, dtype) -> bytes:
    """A one-row greyscale TIFF with the given BitsPerSample and SampleFormat (PIL writes neither 16-bit signed nor
    32-bit unsigned)."""
    pixels = np.array(values, dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    entries = [(256, 3, 1, len(values)), (257, 3, 1, 1), (258, 3, 1, bits), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, len(pixels)), (339, 3, 1, sample_format)]  # fmt: skip
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 8 + len(pixels)) + pixels + directory


def test_sixteen_bit_is_scaled_by_65535_even_when_dark():
    dark = np.array([[0, 129, 255, 200]], dtype=np.uint16)  # all <= 255: a nearly black 16-bit image
    assert grey_of(encode(Image.fromarray(dark), "PNG")) == [0, 1, 1, 1]
    full = np.array([[0, 32768, 65535, 30000]], dtype=np.uint16)
    assert grey_of(encode(Image.fromarray(full), "PNG")) == [0, 128, 255, 117]
    assert grey_of(encode(Image.fromarray(full), "TIFF")) == [0, 128, 255, 117]
    big_endian = Image.frombytes("I;16B", (4, 1), full.astype(">u2").tobytes())
    assert grey_of(big_endian) == [0, 128, 255, 117]


def test_thirty_two_bit_integers_by_their_declared_range():
    assert grey_of(tiff([-32768, 0, 32767], 16, 2, np.int16)) == [0, 128, 255]  # signed 16-bit TIFF
    assert grey_of(tiff([0, 2**31, 2**32 - 1], 32, 1, np.uint32)) == [0, 128, 255]  # unsigned 32-bit TIFF
    signed = Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32))
    assert grey_of(encode(signed, "TIFF")) == [0, 128, 255]
    assert grey_of(signed) == [0, 128, 255]  # in memory, no tags: the int32 range


def test_floats_by_their_real_range():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32))
    assert grey_of(encode(unit, "TIFF")) == [0, 128, 255, 64]  # [0, 1]: x 255 (black before the fix)
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))
    assert grey_of(wide) == [0, 64, 255]  # any other range: minimum to maximum
    assert grey_of(Image.fromarray(np.full((1, 3), 300.0, dtype=np.float32))) == [255, 255, 255]  # constant
    for bad in (np.nan, np.inf, -np.inf):
        image = Image.fromarray(np.array([[0.0, bad]], dtype=np.float32))
        with pytest.raises(BadItem, match="corrupt: NaN or infinite"):
            to_rgb(image)
        assert reason(encode(image, "TIFF")) == "corrupt"


def test_eight_bit_and_repairs_are_unchanged():
    fixes = []
    grey = Image.fromarray(np.array([[0, 7, 255]], dtype=np.uint8))
    assert grey_of(encode(grey, "PNG")) == [0, 7, 255]
    lab = Image.new("LAB", (2, 2), (255, 128, 128))  # white in Lab; convert("RGB") would give (255, 128, 128)
    assert np.asarray(to_rgb(lab, fixes)).min() >= 250 and fixes == ["converted_lab"]
    with pytest.raises(BadItem, match="unsupported_mode: La"):
        to_rgb(Image.new("La", (2, 2)))


# --- cache files ----------------------------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled_header":
        path.write_bytes(data[:20] + b"\x00garbage" + data[28:])
    elif how == "garbled_values":  # the header is sound: only the checksum tells
        path.write_bytes(data[:header] + bytes(b ^ 0x5A for b in data[header : header + 16]) + data[header + 16 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "garbled_header", "garbled_values", "empty"])
def test_a_damaged_cache_file_is_a_bad_item_then_moved_aside(tmp_path, how):
    from ldm_tune.data.cache import LatentCache

    cache = LatentCache(tmp_path, "f" * 64, {"random_flip": False})
    tensors = {"mean": torch.randn(4, 8, 8), "std": torch.rand(4, 8, 8)}
    for sha in ("aa" * 32, "bb" * 32):
        cache.save(sha, (64, 64), tensors)
    damage(cache.path("aa" * 32, (64, 64)), how)
    for _ in range(2):  # the first read moves it aside; later reads (any process) still see a bad item, no crash
        with pytest.raises(BadItem, match="corrupt_cache"):
            cache.load("aa" * 32, (64, 64), flip=False)
    assert cache.discarded == 1 and not cache.has("aa" * 32, (64, 64))
    assert torch.equal(cache.load("bb" * 32, (64, 64), flip=False)[0], tensors["mean"])  # the sound one is kept
    cache.save("aa" * 32, (64, 64), tensors)  # encoded again: the moved-aside copy goes
    assert cache.has("aa" * 32, (64, 64)) and not list(tmp_path.rglob("*.corrupt"))


def test_cache_files_with_the_wrong_tensors_are_damaged(tmp_path):
    from safetensors.torch import save_file

    from ldm_tune.data.cache import LatentCache, _checksum

    cache = LatentCache(tmp_path, "f" * 64, {"random_flip": True})
    cache.latent_layout = (4, 8)  # as fill_latent_cache sets it from the VAE: 64x32 crops hold 4x4x8 latents
    good = {k: torch.zeros(4, 4, 8) for k in ("mean", "std", "mean_flip", "std_flip")}
    cases = {
        "no_flips": {"mean": torch.zeros(4, 4, 8), "std": torch.zeros(4, 4, 8)},
        "wrong_shape": {k: torch.zeros(4, 8, 8) for k in good},
        "wrong_dtype": {k: torch.zeros(4, 4, 8, dtype=torch.float16) for k in good},
        "nan": {**good, "std": torch.full((4, 4, 8), float("nan"))},
    }
    for i, tensors in enumerate(cases.values()):
        path = cache.path(f"{i:02d}" * 32, (64, 32))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"crc32": _checksum(tensors)})
        with pytest.raises(BadItem, match="corrupt_cache"):
            cache.load(f"{i:02d}" * 32, (64, 32), flip=True)
    cache.save("ff" * 32, (64, 32), good)
    assert cache.has("ff" * 32, (64, 32)) and cache.discarded == len(cases)


@pytest.fixture(scope="module")
def tiny_vae(tiny_model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae").eval()


def corpus_of(count: int):
    """What fill_latent_cache reads: items (sha256, index), their sizes, and a source that loads images."""
    pictures = [photo(40, 40, seed=i) for i in range(count)]
    source = SimpleNamespace(load=lambda index: (pictures[index], "caption"))
    items = [SimpleNamespace(sha256=f"{i:064x}", index=i) for i in range(count)]
    return SimpleNamespace(source=source, items=items, sizes=[(32, 32)] * count, interpolation="lanczos")


def test_a_damaged_latent_file_is_encoded_again_by_the_next_fill(tmp_path, tiny_vae, caplog):
    from ldm_tune.data.cache import LatentCache, fill_latent_cache

    corpus = corpus_of(5)

    def fill():
        cache = LatentCache(tmp_path, "vae", {"random_flip": True})
        return cache, fill_latent_cache(cache, corpus, tiny_vae, batch_size=4, progress=False)

    cache, encoded = fill()
    assert encoded == 5 and cache.discarded == 0
    before = {i: cache.load(item.sha256, (32, 32), flip=True)[0] for i, item in enumerate(corpus.items)}
    damage(cache.path(corpus.items[2].sha256, (32, 32)), "truncated")
    with caplog.at_level(logging.WARNING, logger="ldm_tune.data.cache"):
        cache, encoded = fill()
    assert encoded == 1 and cache.discarded == 1  # exactly the damaged one, named in the log
    assert corpus.items[2].sha256 in caplog.text and "1 damaged latent cache files" in caplog.text
    for i, item in enumerate(corpus.items):
        torch.testing.assert_close(cache.load(item.sha256, (32, 32), flip=True)[0], before[i])
    # Damage that only the values show is found when training reads the file: skipped, then encoded again.
    damage(cache.path(corpus.items[4].sha256, (32, 32)), "garbled_values")
    with pytest.raises(BadItem, match="corrupt_cache"):
        cache.load(corpus.items[4].sha256, (32, 32), flip=False)
    assert fill()[1] == 1


def test_a_damaged_text_file_is_encoded_again_by_the_next_fill(tmp_path, tiny_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm_tune.data.cache import TextCache, fill_text_cache

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()
    captions = ["a red square", "a blue circle", ""]

    def fill():
        cache = TextCache(tmp_path, "text")
        return cache, fill_text_cache(cache, captions, tokenizer, encoder, batch_size=2, progress=False)

    cache, encoded = fill()
    assert encoded == 3 and cache.hidden_shape == (tokenizer.model_max_length, encoder.config.hidden_size)
    damage(cache.path("a blue circle"), "garbled_header")
    cache, encoded = fill()
    assert encoded == 1 and cache.discarded == 1
    assert cache.load("a blue circle").shape == cache.hidden_shape
