"""The data check that runs before training: every item is opened once, and kept or skipped with a reason.

Each image is fully decoded once (in threads; PIL releases the GIL while decoding), so corrupt, truncated or
oversized files are skipped up front instead of failing mid-run. What the decode found about a file (size, hash,
repairs, or why it is bad) is cached in a parquet table, keyed by path, size and modification time, so later runs
only re-check captions; the checks of millions of items are numpy operations over columns, not Python objects. The report counts every reason; a run stops when more than `max_bad_fraction` of the items are bad.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ldm_tune.data.images import BadItem
from ldm_tune.data.items import ItemTable, check_captions


logger = logging.getLogger(__name__)
SAVE_EVERY_S = 60.0  # how often a running scan writes its cache (a 1 M-entry cache takes about a second to write)
CHECK_BLOCK = 65_536  # items checked at once (see `_checked_items`)
CACHE_SCHEMA = pa.schema([("key", pa.binary(16)), ("width", pa.int32()), ("height", pa.int32()),
                          ("sha256", pa.binary(32)), ("fixes", pa.string()), ("reason", pa.string())])  # fmt: skip


@dataclass
class DataReport:
    """What the scan found: items kept, skipped by reason, repaired by kind, and a few examples of each.

    A split made of several sources (the `data` source, DreamBooth's instance and class images) has one report per
    source in `sources` and their sums here, with each example prefixed by its source's name.
    """

    total: int = 0
    kept: int = 0
    bad: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    downloads: str | None = None
    repeats: int = 1  # each kept item is seen this many times per epoch (kohya's num_repeats)
    sources: dict = field(default_factory=dict)  # source name -> DataReport

    @classmethod
    def combine(cls, parts: dict[str, DataReport]) -> DataReport:
        """The sums of several sources' reports, keeping each one under `sources`."""
        combined = cls(sources=dict(parts))
        for name, part in parts.items():
            combined.total += part.total
            combined.kept += part.kept
            combined.bad.update(part.bad)
            combined.fixes.update(part.fixes)
            combined.downloads = combined.downloads or part.downloads
            for reason, origins in part.examples.items():
                examples = combined.examples.setdefault(reason, [])
                examples += [f"{name}:{origin}" for origin in origins][: 3 - len(examples)]
        return combined

    @property
    def epoch_items(self) -> int:
        """Items per epoch: the kept items times their repeats."""
        if self.sources:
            return sum(part.epoch_items for part in self.sources.values())
        return self.kept * self.repeats

    def add_skipped(self, facts: dict | None) -> None:
        """Count the rows a reader left out (`{"bad": {reason: count}, "examples": {reason: [origin, ...]}}`)."""
        for reason, count in (facts or {}).get("bad", {}).items():
            self.total += count
            self.bad[reason] += count
            examples = self.examples.setdefault(reason, [])
            examples += facts["examples"].get(reason, [])[: 3 - len(examples)]

    def add(self, kind: Counter, reason: str, origin: str) -> None:
        kind[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(origin)

    @property
    def bad_fraction(self) -> float:
        return sum(self.bad.values()) / max(self.total, 1)

    def format(self, title: str = "data") -> str:
        lines = [f"{title}: {self.total} items, {self.kept} kept, {sum(self.bad.values())} skipped "
                 f"({self.bad_fraction:.1%})"]  # fmt: skip
        if self.downloads:
            lines.append(f"  downloads: {self.downloads}")
        for name, part in self.sources.items():
            lines.append(f"  source   {name:<24}{part.total:>7} items, {part.kept} kept, {sum(part.bad.values())} "
                         f"skipped, x{part.repeats} per epoch")  # fmt: skip
        if self.sources or self.repeats != 1:
            lines.append(f"  per epoch {self.epoch_items} items (with repeats)")
        for label, counts in (("skipped", self.bad), ("repaired", self.fixes)):
            for reason, count in counts.most_common():
                lines.append(f"  {label:<9}{reason:<24}{count:>7}   e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"total": self.total, "kept": self.kept, "bad": dict(self.bad), "fixes": dict(self.fixes),
               "examples": self.examples, "downloads": self.downloads}  # fmt: skip
        if self.repeats != 1:
            out["repeats"] = self.repeats
        if self.repeats != 1 or self.sources:
            out["epoch_items"] = self.epoch_items
        if self.sources:
            out["sources"] = {name: part.to_dict() for name, part in self.sources.items()}
        return out


def _file_key(path: Path | None) -> bytes | None:
    """16 bytes that change when the file does: a digest of its path, size and modification time."""
    try:
        stat = path.stat()
    except (OSError, AttributeError):  # gone, or no file at all (a dataset row's bytes)
        return None
    # abspath: a folder given as a relative path names other files from another working directory.
    name = os.path.abspath(path)
    return hashlib.blake2b(f"{name}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=16).digest()


def _decode_facts(source, index: int) -> dict:
    """What decoding the image tells: size, hash and repairs, or the reason it is bad."""
    fixes: list[str] = []
    try:
        image, _ = source.load(index, fixes)
        path = source.file(index)
        digest = hashlib.sha256(path.read_bytes() if path is not None else image.tobytes()).hexdigest()
    except BadItem as error:
        return {"reason": error.reason}
    except OSError as error:  # the file went away or became unreadable between decode and hash
        logger.warning("Skipped %s: %s", source.origin(index), error)
        return {"reason": "unreadable"}
    return {"width": image.width, "height": image.height, "sha256": digest, "fixes": fixes}


def _fixed(column, width: int) -> np.ndarray:
    """A fixed-size binary Arrow column as a numpy `S<width>` array, without a Python object per value."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros(0, f"S{width}")
    return np.frombuffer(array.buffers()[1], f"S{width}", count=len(array), offset=array.offset * width)


class ScanCache:
    """Decode facts of files, keyed by a digest of path, size and mtime (a changed file is decoded again).

    A parquet table (`key`, `width`, `height`, `sha256`, `fixes`, `reason`) looked up with Arrow's hash join: a
    cache of millions of files costs tens of bytes per file, not a Python dict entry each.
    """

    def __init__(self, path: Path | None):
        self.path, self.pending = path, {name: [] for name in CACHE_SCHEMA.names}
        self.table = CACHE_SCHEMA.empty_table()
        if path is not None and path.is_file():
            try:
                self.table = pq.read_table(path, schema=CACHE_SCHEMA)
            except (OSError, pa.ArrowException) as error:  # an unreadable cache is rebuilt, never trusted
                logger.warning("Scan cache %s unreadable (%s): checking every image again.", path, error)

    def add(self, key: bytes, facts: dict) -> None:
        values = (key, facts.get("width", 0), facts.get("height", 0), bytes.fromhex(facts.get("sha256", "00" * 32)),
                  ",".join(facts.get("fixes", [])), facts.get("reason", ""))  # fmt: skip
        for name, value in zip(CACHE_SCHEMA.names, values, strict=True):
            self.pending[name].append(value)

    def _merge(self) -> None:
        if self.pending["key"]:
            self.table = pa.concat_tables([self.table, pa.table(self.pending, schema=CACHE_SCHEMA)])
            self.pending = {name: [] for name in CACHE_SCHEMA.names}

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The cache row of each key (an `S16` array), -1 where there is none."""
        self._merge()
        found = pc.index_in(pa.array(keys, type=pa.binary(16)), value_set=self.table.column("key"))
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def save(self) -> None:
        self._merge()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            pq.write_table(self.table, tmp)
            os.replace(tmp, self.path)  # atomic: an interrupted save leaves the previous cache


def scan_source(source, cfg, tokenizer=None, cache_path: Path | None = None, workers: int = 4,
                progress: bool = True, report: DataReport | None = None) -> tuple[ItemTable, DataReport]:  # fmt: skip
    """Check every item of `source`; return the usable ones and the report.

    Each distinct file is decoded once (a list may name one file on many rows), and only when the cache does not
    know it. `data.verify: lazy` checks only the captions here; each image is checked when first loaded (its source
    carries the size limits, see `ldm_tune.data.pipeline`), so training starts without a decode pass.
    """
    report = report or DataReport()
    if cfg.verify == "lazy":
        return _captions_only(source, report), report
    cache = ScanCache(cache_path)
    keys, keyed = np.zeros(len(source), "S16"), np.zeros(len(source), bool)
    for i in range(len(source)):
        key = _file_key(source.file(i))
        if key is not None:
            keys[i], keyed[i] = key, True
    missing = np.flatnonzero(keyed & (cache.lookup(keys) < 0))
    _, first = np.unique(keys[missing], return_index=True)  # one decode per distinct file
    todo = np.concatenate([missing[np.sort(first)], np.flatnonzero(~keyed)])
    unkeyed = _decode_all(source, todo, keys, keyed, cache, workers, progress)
    rows = np.where(keyed, cache.lookup(keys), -1)
    return _checked_items(source, rows, unkeyed, cache.table, cfg, tokenizer, report), report


def _captions_only(source, report: DataReport) -> ItemTable:
    # Width and height 0: not known until loaded (no buckets, no latent cache: the config refuses both with lazy).
    if getattr(source, "captions_checked", False):  # indexed rows: every row has usable captions already
        report.total += len(source)
        report.kept += len(source)
        return ItemTable(source, np.arange(len(source)))
    kept = []
    for i in range(len(source)):
        report.total += 1
        try:
            check_captions(source.caption(i))
            kept.append(i)
            report.kept += 1
        except BadItem as error:
            report.add(report.bad, error.reason, source.origin(i))
    return ItemTable(source, kept)


def _decode_all(source, todo: np.ndarray, keys: np.ndarray, keyed: np.ndarray, cache: ScanCache, workers: int,
                progress: bool) -> dict:  # fmt: skip
    """Decode the `todo` items in threads into the cache (the facts of items without a file key are returned);
    the cache is saved every `SAVE_EVERY_S` seconds and when the scan stops for any reason, so a scan of a large
    corpus that is killed or fails resumes where it was."""
    unkeyed, saved_at, decoded = {}, time.monotonic(), 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: (i, _decode_facts(source, i)), todo.tolist())
        try:
            for i, facts in tqdm(
                results, total=len(todo), desc="checking images", disable=not progress or not len(todo)
            ):
                decoded += 1
                if keyed[i]:
                    cache.add(bytes(keys[i]).ljust(16, b"\0"), facts)  # numpy drops trailing NULs: put them back
                else:
                    unkeyed[i] = facts
                if time.monotonic() - saved_at > SAVE_EVERY_S:
                    cache.save()
                    saved_at = time.monotonic()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # stop decoding what is left; what was decoded is kept below
            raise
        finally:
            if decoded:
                cache.save()
    return unkeyed


def _facts_columns(rows: np.ndarray, unkeyed: dict, table: pa.Table, offset: int) -> dict:
    """Each item's width, height and the codes of its reason and fixes (into the `reasons` and `fix_sets` lists),
    as numpy columns gathered from the cache table: no Python object per item. `rows` are the cache rows of the
    items `offset`, `offset + 1`, ..."""
    taken = table.select(["width", "height", "fixes", "reason"]).take(np.maximum(rows, 0)) if len(table) else None
    n = len(rows)
    columns = {"width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
               "reason": np.zeros(n, np.int32), "fixes": np.zeros(n, np.int32), "reasons": [""], "fix_sets": [""]}  # fmt: skip
    if taken is not None:
        for name in ("width", "height"):
            columns[name] = np.array(taken.column(name), dtype=np.int32)  # writable: no-file items are set below
        for name, table_name in (("reason", "reasons"), ("fixes", "fix_sets")):
            encoded = pc.dictionary_encode(taken.column(name)).combine_chunks()
            columns[table_name] = encoded.dictionary.to_pylist()
            columns[name] = np.array(encoded.indices, dtype=np.int32)
    for i in (i for i in unkeyed if offset <= i < offset + n):  # items without a file: decoded now, not cached
        facts, local = unkeyed[i], i - offset
        for name, value in (("reason", facts.get("reason", "")), ("fixes", ",".join(facts.get("fixes", [])))):
            table_name = "reasons" if name == "reason" else "fix_sets"
            if value not in columns[table_name]:
                columns[table_name].append(value)
            columns[name][local] = columns[table_name].index(value)
        if "reason" not in facts:
            columns["width"][local], columns["height"][local] = facts["width"], facts["height"]
    return columns


def _checked_items(source, rows, unkeyed: dict, table: pa.Table, cfg, tokenizer, report: DataReport) -> ItemTable:
    """The usable items, and every skip and repair counted in `report`, a block of `CHECK_BLOCK` items at a time
    (the check's temporary columns stay small whatever the corpus)."""
    parts = [_check_block(source, rows[start : start + CHECK_BLOCK], start, unkeyed, table, cfg, tokenizer, report)
             for start in range(0, len(rows), CHECK_BLOCK)]  # fmt: skip
    if not parts:
        return ItemTable(source, [], sha256=np.zeros(0, "S32"))
    return ItemTable(source, *(np.concatenate(column) for column in zip(*parts, strict=True)))


def _check_block(source, rows, offset: int, unkeyed: dict, table: pa.Table, cfg, tokenizer, report: DataReport):
    """Items `offset`... of one block: decode reasons first, then captions, then size; repairs and truncated
    captions of the kept ones. Returns the kept items' (index, width, height, sha256) columns."""
    c = _facts_columns(rows, unkeyed, table, offset)
    report.total += len(rows)
    reason = np.array(c["reasons"], dtype=object)[c["reason"]]
    keep = c["reason"] == c["reasons"].index("") if "" in c["reasons"] else np.zeros(len(rows), bool)
    if not getattr(source, "captions_checked", False):
        for i in np.flatnonzero(keep):
            try:
                check_captions(source.caption(offset + int(i)))
            except BadItem as error:
                keep[i], reason[i] = False, error.reason
    short, long = np.minimum(c["width"], c["height"]), np.maximum(c["width"], c["height"])
    too_small = keep & (short < cfg.min_image_size)
    reason[too_small], keep[too_small] = "too_small", False
    elongated = keep & (long > cfg.max_aspect_ratio * np.maximum(short, 1))
    reason[elongated], keep[elongated] = "extreme_aspect_ratio", False
    for i in np.flatnonzero(~keep):
        report.add(report.bad, reason[i], source.origin(offset + int(i)))
    for code in np.unique(c["fixes"][keep]):
        for i in np.flatnonzero(keep & (c["fixes"] == code)):
            for fix in filter(None, c["fix_sets"][code].split(",")):
                report.add(report.fixes, fix, source.origin(offset + int(i)))
    kept = np.flatnonzero(keep)
    report.kept += len(kept)
    if tokenizer is not None:
        for i in kept:
            captions = check_captions(source.caption(offset + int(i)))
            if max(len(ids) for ids in tokenizer(captions, verbose=False).input_ids) > tokenizer.model_max_length:
                # Kept: the text encoder sees the first model_max_length tokens, as at inference.
                report.add(report.fixes, "caption_truncated", source.origin(offset + int(i)))
    sha256 = _fixed(table.column("sha256").take(np.maximum(rows[kept], 0)), 32).copy() if len(table) else None
    sha256 = np.zeros(len(kept), "S32") if sha256 is None else sha256
    for position, i in enumerate(kept):  # items without a file: their facts were not cached
        if offset + int(i) in unkeyed:
            sha256[position] = bytes.fromhex(unkeyed[offset + int(i)]["sha256"])
    return kept + offset, c["width"][kept], c["height"][kept], sha256
