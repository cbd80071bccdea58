"""Pair lists as an on-disk, memory-mapped Arrow index: read once, shared by every process and loader worker.

A list of 10 M pairs read into Python objects costs ~10 GB in each process; as an Arrow file opened with
`datasets.Dataset.from_file` it is memory-mapped, so processes and workers share the same page-cache pages and a
row is read only when used. The list is parsed once (by the main process, in batches, never whole), each row
checked on the way: its image (a local path, made absolute, or an http(s) URL) and its captions (a str or a list
of str, stripped, at least one not empty). Rows that fail are counted by reason, with a few examples, and left
out; the index holds the rest as `image`, `captions` (list of str) and `origin` (`file:line`, for reports).

The index is cached under `cache_dir/index/`, keyed by the list's path, size and modification time and the
column names, so a later run (or another process of this one) opens it in milliseconds. It is written under a
temporary name and renamed: an interrupted build leaves no index, and the next run builds it again.

Rows whose image is a URL are downloaded into tar shards (`ldm_tune.data.shards`, the img2dataset model: a few
large files, not one per image) by `resolve_urls`, which gives the rows that point into the shards: `image` is
then the shard's path, `offset` and `size` where the image bytes lie in it (-1 for a plain file).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from ldm_tune.data.images import BadItem
from ldm_tune.data.items import check_captions


INDEX_VERSION = 2  # bump when the schema or the row checks change: older indexes are then rebuilt
BATCH_ROWS = 65_536  # rows parsed per Arrow record batch: bounds the Python objects alive during a build
IMAGE_KEYS = ("image", "image_url", "file_name", "url", "path")
SCHEMA = pa.schema([("image", pa.string()), ("captions", pa.list_(pa.string())), ("origin", pa.string())])
URL_PATTERN = "(?i)^https?://"  # schemes are case-insensitive (RFC 3986 3.1): HTTP:// is http://
EXAMPLES = 3  # origins kept per bad reason


class IndexBuilder:
    """Collects checked rows into Arrow record batches (and bad rows into counts), for a file or memory."""

    def __init__(self, sink=None):
        self.writer = pa.ipc.new_stream(sink, SCHEMA) if sink is not None else None
        self.batches: list[pa.RecordBatch] = []
        self.columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.total, self.bad, self.examples = 0, Counter(), {}

    def add(self, origin: str, image, caption) -> None:
        """One row: kept when `image` is a str and `caption` has usable text, else counted by reason."""
        try:
            if isinstance(image, BadItem):
                raise image
            if not _encodes(image):  # a file name that is not UTF-8 (read with surrogate escapes): Arrow needs UTF-8
                raise BadItem("non_utf8_path")
            captions = check_captions(caption)
            if not all(_encodes(c) for c in captions):  # a lone surrogate from a JSON "\ud800" escape
                raise BadItem("malformed_caption")
        except BadItem as error:
            return self.skip(origin, error.reason)
        self.total += 1
        origin = origin if _encodes(origin) else origin.encode("utf-8", "replace").decode()
        for name, value in zip(SCHEMA.names, (image, captions, origin), strict=True):
            self.columns[name].append(value)
        if len(self.columns["image"]) >= BATCH_ROWS:
            self._flush()

    def skip(self, origin: str, reason: str) -> None:
        """One row left out, counted by `reason`."""
        origin = origin if _encodes(origin) else origin.encode("utf-8", "replace").decode()  # for the report's JSON
        self.total += 1
        self.bad[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(origin)

    def _flush(self) -> None:
        if self.columns["image"]:
            batch = pa.record_batch(self.columns, schema=SCHEMA)
            self.writer.write_batch(batch) if self.writer is not None else self.batches.append(batch)
            self.columns = {name: [] for name in SCHEMA.names}

    def finish(self) -> dict:
        """Write what is left; the facts of the build (row count, bad counts and examples)."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
        return {"total": self.total, "bad": dict(self.bad), "examples": self.examples}

    def dataset(self):
        """The rows as an in-memory `datasets.Dataset` (small sources: image folders)."""
        import datasets

        self._flush()
        return datasets.Dataset(pa.Table.from_batches(self.batches, schema=SCHEMA))


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key(path: Path, image_column: str, caption_column: str, root: str) -> str:
    stat = path.stat()
    fields = [INDEX_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, image_column, caption_column, root]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


def open_pair_list(path: str | Path, cache_dir: Path, caption_column: str = "text", image_column: str = "image",
                   image_root: str | Path | None = None):  # fmt: skip
    """The index of a JSONL, CSV or parquet pair list, built on first use; returns `(rows, facts)`.

    `rows` is a memory-mapped `datasets.Dataset` of the good rows; `facts` has the row count and the bad rows'
    counts and examples by reason (`malformed_metadata`, `invalid_url`, `path_outside_folder`, `missing_caption`,
    ...). Local paths are relative to `image_root` (default: the list's folder) and must stay inside it: a list
    from elsewhere cannot make training read `/etc/...` or `../..` files.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`data.train_data_file` {str(path)!r} does not exist.")
    if path.suffix not in (".jsonl", ".csv", ".parquet"):
        raise ValueError(f"`data.train_data_file` must be a .jsonl, .csv or .parquet file, got {str(path)!r}.")
    root = os.path.abspath(image_root if image_root is not None else path.parent)
    target = cache_dir / "index" / _key(path, image_column, caption_column, root)
    arrow, facts_file = target.with_suffix(".arrow"), target.with_suffix(".json")
    if not (arrow.is_file() and facts_file.is_file()):
        _build(path, arrow, facts_file, caption_column, image_column, root)
    return datasets.Dataset.from_file(str(arrow)), json.loads(facts_file.read_text())


def _build(path: Path, arrow: Path, facts_file: Path, caption_column: str, image_column: str, root: str) -> None:
    arrow.parent.mkdir(parents=True, exist_ok=True)
    tmp = arrow.with_suffix(f".tmp{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            builder = IndexBuilder(sink)
            keys = (image_column, *IMAGE_KEYS)
            for origin, row in read_rows(path, [image_column, *IMAGE_KEYS, caption_column, "caption"]):
                builder.add(origin, _image(row, keys, root), _caption(row, caption_column))
            facts = builder.finish()
        os.replace(tmp, arrow)
    finally:
        tmp.unlink(missing_ok=True)
    facts_tmp = facts_file.with_suffix(f".tmp{os.getpid()}")
    facts_tmp.write_text(json.dumps(facts))
    os.replace(facts_tmp, facts_file)  # written last: the index counts as built only with its facts


def _image(row, keys: tuple[str, ...], root: str):
    """The row's image: an http(s) URL, or an absolute local path inside `root` (relative ones are relative to it)."""
    image = next((row[k] for k in keys if row.get(k)), None) if isinstance(row, dict) else None
    if not isinstance(image, str) or "\0" in image:
        return BadItem("malformed_metadata")
    if "://" in image:
        # file://, ftp://, s3://...: only http(s) and local paths
        return image if image[:8].lower().startswith(("http://", "https://")) else BadItem("invalid_url")
    # normpath, not realpath: a string check, so 10 M rows cost no file-system call (symlinks inside the root
    # are the root owner's choice).
    path = os.path.normpath(os.path.join(root, image))
    return path if path == root or path.startswith(root.rstrip(os.sep) + os.sep) else BadItem("path_outside_folder")


def _caption(row, caption_column: str):
    return row.get(caption_column, row.get("caption")) if isinstance(row, dict) else None


def read_rows(path: Path, columns: list[str] | None = None):
    """(origin, row dict, or None when malformed) for each row of a .jsonl, .csv or .parquet file (of a parquet
    file only `columns`), streamed: a list is never read whole."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, columns or [])
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    else:
        yield from jsonl_rows(path)


def _csv_rows(path: Path):
    # utf-8-sig: a byte-order mark (Excel writes one) would otherwise glue itself to the first column's name.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                yield f"{path.name}:{reader.line_num}", row
        except csv.Error as error:  # a NUL byte, a field over csv.field_size_limit(): the reader cannot go on
            raise ValueError(f"`data.train_data_file` {str(path)!r} after line {reader.line_num}: {error}.") from error


def jsonl_rows(path: Path):
    """(origin, dict or None when the line is not a JSON object) for each non-blank line of a .jsonl file."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig"))  # -sig: a byte-order mark on the first line
            except (ValueError, RecursionError):  # not UTF-8 or JSON, an over-long integer, nesting too deep
                row = None
            yield f"{path.name}:{number}", row if isinstance(row, dict) else None


def _parquet_rows(path: Path, columns: list[str]):
    """Rows of a parquet file (e.g. LAION's `URL`, `TEXT`), reading only `columns`, a batch at a time."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        wanted = [c for c in dict.fromkeys(columns) if c in table.schema_arrow.names]
        number = 0
        for batch in table.iter_batches(columns=wanted, batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield f"{path.name}:{number}", row
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"`data.train_data_file` {str(path)!r} is not a readable parquet file: {error}") from error


def resolve_urls(rows, cfg, cache_dir: Path, name: str, progress: bool = True, retry_failed: bool = True):
    """Download the rows' http(s) images into the shards of `cache_dir/shards/<name>`; returns `(rows, facts,
    report)`: the rows with shard references instead of URLs, the facts of the rows whose download failed (left
    out), and the `ShardReport` (None when no row is a URL).

    Complete shards are reused without a request; `retry_failed` fetches again the transient failures of earlier
    runs. Only the main process may retry: the others read its shards as they are, so all keep the same items.
    """
    import pyarrow.compute as pc

    from ldm_tune.data.download import download_options
    from ldm_tune.data.shards import download_to_shards

    table = rows.data.table
    positions = np.flatnonzero(pc.match_substring_regex(table.column("image"), URL_PATTERN).to_numpy(False))
    if not len(positions):
        return rows, None, None
    report = download_to_shards(_UrlRows(table, positions), cache_dir / "shards" / name, download_options(cfg),
                                 shard_size=cfg.download_shard_size, workers=cfg.download_workers,
                                 retry_failed=retry_failed, progress=progress)  # fmt: skip
    got = report.table()
    ok = pc.equal(got.column("status"), "success")
    failed = positions[~ok.to_numpy(False)]
    builder = IndexBuilder()  # counts the failures, with examples: only the failed rows become Python objects
    for position, status in zip(failed, got.column("status").filter(pc.invert(ok)).to_pylist(), strict=True):
        builder.skip(table.column("origin")[int(position)].as_py(), status)
    # Arrow's own kernels from here: no Python object per row, whatever the corpus size.
    at_url = np.zeros(len(table), bool)
    at_url[positions[ok.to_numpy(False)]] = True
    mask, kept = pa.array(at_url), got.filter(ok)
    shard_paths = pc.binary_join_element_wise(str(report.out_dir) + os.sep, kept.column("shard"), "")
    image = pc.replace_with_mask(table.column("image").combine_chunks(), mask, shard_paths.combine_chunks())
    unset = pa.array(np.full(len(table), -1, np.int64))
    offset, size = (pc.replace_with_mask(unset, mask, kept.column(c).combine_chunks()) for c in ("offset", "size"))
    keep = np.ones(len(table), bool)
    keep[failed] = False
    resolved = table.set_column(0, "image", image).append_column("offset", offset).append_column("size", size)
    resolved = resolved.filter(keep)
    return _write(resolved, cache_dir / "index" / f"{name}-shards.arrow"), builder.finish(), report


class _UrlRows:
    """(url, caption) of the URL rows, read one at a time from the Arrow columns (a Sequence for the shards)."""

    def __init__(self, table: pa.Table, positions: np.ndarray):
        self.images, self.captions, self.positions = table.column("image"), table.column("captions"), positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        captions = self.captions[int(self.positions[i])].as_py()
        # A single caption is written as the shard's `.txt`, so the shards also read as a WebDataset.
        return self.images[int(self.positions[i])].as_py(), captions[0] if len(captions) == 1 else captions


def _write(table: pa.Table, path: Path):
    import datasets

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(path))
