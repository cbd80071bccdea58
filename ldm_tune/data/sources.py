"""Where image-caption pairs come from, all through one data config.

- an image folder with `metadata.jsonl` or `metadata.csv` (`file_name` + caption column), or with captions in
  `.txt` / `.caption` files next to the images;
- a JSONL, CSV or parquet list of pairs whose image is a local path (relative to the list) or an http(s) URL
  (`{"image": ..., "text": ...}`; LAION's `URL`, `TEXT` through `image_column`/`caption_column`), indexed once
  on disk (`ldm_tune.data.index`); URLs are downloaded once into a cache before training;
- any Hugging Face `datasets` dataset (hub name, local data folder or a `save_to_disk` folder).

A source has `__len__`, `load(i) -> (PIL image, caption)`, `caption(i)`, `origin(i)` (for the report) and
`file(i)` (the local file, or None). Folders and lists are read into the same Arrow rows (`ldm_tune.data.index`:
memory-mapped for lists); rows that are bad before any image is opened (malformed metadata, a path leaving the
data folder, no usable caption, a failed download) are left out and counted in the facts returned beside them.
`ConcatSource` reads several sources as one (DreamBooth's instance and class images beside the `data` source).
"""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path

from ldm_tune.config import DataConfig
from ldm_tune.data.images import DEFAULT_FORMATS, BadItem, check_size, decode_image
from ldm_tune.data.index import IndexBuilder, read_rows
from ldm_tune.data.shards import read_member


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS_DEFAULT = 89_478_485


class RecordSource:
    """Items whose images are local files: Arrow rows of `image` (path), `captions` and `origin`; rows of a URL
    list also have `offset` and `size`, and an image at offset >= 0 is that member of the tar shard at `image`.

    Rows are read from the Arrow columns directly (about a microsecond, against ~20 for `datasets`' row access);
    the `datasets.Dataset` is kept for pickling: a memory-mapped one travels to loader workers as its file path.
    """

    captions_checked = True  # the index keeps only rows with usable captions

    def __init__(self, rows, max_pixels: int = MAX_PIXELS_DEFAULT, limits: tuple | None = None,
                 formats: tuple[str, ...] = DEFAULT_FORMATS):  # fmt: skip
        self.rows, self.max_pixels, self.limits, self.formats = rows, max_pixels, limits, tuple(formats)

    def __len__(self) -> int:
        return len(self.rows)

    def _value(self, column: str, index: int):
        return self.rows.data.table.column(column)[index].as_py()

    def origin(self, index: int) -> str:
        return self._value("origin", index)

    def _offset(self, index: int) -> int:
        return self._value("offset", index) if "offset" in self.rows.column_names else -1

    def file(self, index: int) -> Path | None:
        return Path(self._value("image", index)) if self._offset(index) < 0 else None

    def caption(self, index: int):
        return self._value("captions", index)

    def load(self, index: int, fixes: list[str] | None = None):
        data, offset = self._value("image", index), self._offset(index)
        if offset >= 0:  # a downloaded image, inside its tar shard
            shard = Path(data)
            try:
                data = read_member(shard.parent, shard.name, offset, self._value("size", index))
            except (OSError, ValueError, EOFError) as error:  # the shard went away or was cut since the download
                raise BadItem("unreadable", f"{shard}: {error}") from error
        image = decode_image(data, self.max_pixels, fixes, self.formats)
        return _checked(image, self.limits), self.caption(index)


class HFDatasetSource:
    """Any Hugging Face `datasets` dataset (hub name, local script/data folder, or a `save_to_disk` folder)."""

    def __init__(self, dataset, image_column: str, caption_column: str, max_pixels: int = MAX_PIXELS_DEFAULT,
                 limits: tuple | None = None, formats: tuple[str, ...] = DEFAULT_FORMATS):  # fmt: skip
        missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(f"Dataset columns {missing} not found; the dataset has {dataset.column_names}.")
        import datasets

        # Read the raw bytes (decode=False) and decode ourselves, so a corrupt image is a counted BadItem.
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.max_pixels, self.limits, self.formats = max_pixels, limits, tuple(formats)

    def __len__(self) -> int:
        return len(self.dataset)

    def origin(self, index: int) -> str:
        return f"row {index}"

    def file(self, index: int) -> Path | None:
        return None

    def caption(self, index: int):
        return self.dataset[index][self.caption_column]

    def load(self, index: int, fixes: list[str] | None = None):
        row = self.dataset[index]
        value = row[self.image_column]
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise BadItem("missing_file", f"row {index} has no image")
        image = decode_image(value, self.max_pixels, fixes, self.formats)
        return _checked(image, self.limits), row[self.caption_column]

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str | None = None) -> HFDatasetSource:
        import datasets

        split = split or cfg.dataset_split
        path = Path(cfg.dataset_name)
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
                raise ValueError(f"`data.dataset_name` {cfg.dataset_name!r} has splits {list(loaded)}, not {split!r}.")
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=split)
        return cls(dataset, cfg.image_column, cfg.caption_column, cfg.max_image_pixels, size_limits(cfg),
                   cfg.image_formats)  # fmt: skip


def size_limits(cfg: DataConfig) -> tuple[int, float] | None:
    """The size rules a source applies when it loads an image: with `data.verify: lazy` only (the upfront scan
    applies them from its cached decode facts)."""
    return (cfg.min_image_size, cfg.max_aspect_ratio) if cfg.verify == "lazy" else None


def _checked(image, limits: tuple[int, float] | None):
    if limits is not None:
        check_size(image.width, image.height, *limits)
    return image


def _inside(root: Path, path: Path) -> bool:
    # Resolving follows symlinks, so a link pointing out of the folder is caught like a `..` path.
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _sidecar_caption(image: Path):
    for suffix in (".txt", ".caption"):
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            try:
                return sidecar.read_bytes().decode("utf-8").strip()
            except UnicodeDecodeError:
                return BadItem("non_utf8_caption", str(sidecar))
    return None


def list_images(root: str | Path) -> list[Path]:
    """The image files under `root` (subfolders included), in a stable order: sorted paths."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def find_metadata(root: str | Path) -> Path | None:
    """The folder's `metadata.jsonl` or `metadata.csv`, or None when captions are in sidecar files."""
    return next((Path(root) / n for n in ("metadata.jsonl", "metadata.csv") if (Path(root) / n).is_file()), None)


def read_image_folder(root: str | Path, caption_column: str = "text", caption: str | None = None,
                      limit: int | None = None, key: str = "data.train_data_dir"):  # fmt: skip
    """The rows of an image folder (a `datasets.Dataset` of `image`, `captions`, `origin`) and the facts of the
    rows left out (`{"total", "bad", "examples"}`, see `ldm_tune.data.index`).

    Args:
        caption: one caption for every image instead of the folder's own (DreamBooth's `instance_prompt`).
        limit: read only the first `limit` entries (images, or metadata rows) in the folder's stable order.
        key: the config key of the folder, for the error message.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"`{key}` {str(root)!r} is not a folder.")
    metadata, builder = find_metadata(root), IndexBuilder()
    if metadata is None:
        for image in list_images(root)[:limit]:
            origin = str(image.relative_to(root))
            if not _inside(root, image):
                builder.skip(origin, "path_outside_folder")
            else:
                builder.add(origin, str(image), caption if caption is not None else _sidecar_caption(image))
        return builder.dataset(), builder.finish()
    for origin, row in itertools.islice(read_rows(metadata), limit):
        if row is None or not row.get("file_name"):
            builder.skip(origin, "malformed_metadata")
            continue
        image = root / str(row["file_name"])
        if Path(str(row["file_name"])).is_absolute() or not _inside(root, image):
            builder.skip(origin, "path_outside_folder")
            continue
        builder.add(origin, str(image), caption if caption is not None else row.get(caption_column))
    return builder.dataset(), builder.finish()


class ConcatSource:
    """Several sources read as one split: item `i` of the k-th source is item `offsets[k] + i` here.

    Used when DreamBooth's instance (and class) images join the `data` source; origins are prefixed by the source's
    name so a report says where an item came from.
    """

    def __init__(self, named_sources: list[tuple[str, object]]):
        self.names = [name for name, _ in named_sources]
        self.sources = [source for _, source in named_sources]
        self.offsets = [0]
        for source in self.sources:
            self.offsets.append(self.offsets[-1] + len(source))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        # The last source starting at or before `index` (bisect_right also steps over empty sources).
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def origin(self, index: int) -> str:
        k, i = self._locate(index)
        return f"{self.names[k]}:{self.sources[k].origin(i)}"

    def file(self, index: int) -> Path | None:
        k, i = self._locate(index)
        return self.sources[k].file(i)

    def caption(self, index: int):
        k, i = self._locate(index)
        return self.sources[k].caption(i)

    def load(self, index: int, fixes: list[str] | None = None):
        k, i = self._locate(index)
        return self.sources[k].load(i, fixes)
