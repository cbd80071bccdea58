"""The data check that runs before training: every item is opened once, and kept or skipped with a reason.

Each image is fully decoded once (in threads; PIL releases the GIL while decoding), so corrupt, truncated or
oversized files are skipped up front instead of failing mid-run. What the decode found about a file (size, hash,
repairs, or why it is bad) is cached, keyed by path, size and modification time, so later runs only re-check
captions. The report counts every reason; a run stops when more than `max_bad_fraction` of the items are bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ldm_tune.data.images import BadItem, check_size
from ldm_tune.data.items import ItemInfo, ItemTable, check_captions


logger = logging.getLogger(__name__)
SAVE_EVERY_S = 60.0  # how often a running scan writes its cache (a 1 M-entry cache takes about a second to write)


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


def _file_key(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


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


class ScanCache:
    """Decode facts of files, keyed by path, size and mtime (a changed file is decoded again)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries = json.loads(path.read_text()) if path is not None and path.is_file() else {}

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)  # atomic: an interrupted save leaves the previous cache


def scan_source(source, cfg, tokenizer=None, cache_path: Path | None = None, workers: int = 4,
                progress: bool = True, report: DataReport | None = None) -> tuple[ItemTable, DataReport]:  # fmt: skip
    """Check every item of `source`; return the usable ones and the report.

    `data.verify: lazy` checks only the captions here; each image is checked when first loaded (its source carries
    the size limits, see `ldm_tune.data.pipeline`), so training starts without a decode pass over the corpus.
    """
    report = report or DataReport()
    if cfg.verify == "lazy":
        return _captions_only(source, report), report
    cache = ScanCache(cache_path)
    keys = [_file_key(source.file(i)) if source.file(i) is not None else None for i in range(len(source))]
    todo = [i for i in range(len(source)) if keys[i] is None or keys[i] not in cache.entries]
    decoded = _decode_all(source, todo, keys, cache, workers, progress)
    items = []
    for i in range(len(source)):
        report.total += 1
        facts = decoded.get(i) or cache.entries[keys[i]]
        try:
            items.append(_check_item(source, i, facts, cfg, tokenizer, report))
            report.kept += 1
        except BadItem as error:
            report.add(report.bad, error.reason, source.origin(i))
    return ItemTable.from_infos(source, items), report


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


def _decode_all(source, todo: list[int], keys: list, cache: ScanCache, workers: int, progress: bool) -> dict:
    """Decode the `todo` items in threads; the cache is saved every `SAVE_EVERY_S` seconds and when the scan stops
    for any reason, so a scan of a large corpus that is killed or fails resumes where it was."""
    decoded, saved_at = {}, time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: (i, _decode_facts(source, i)), todo)
        try:
            for i, facts in tqdm(results, total=len(todo), desc="checking images", disable=not progress or not todo):
                decoded[i] = facts
                if keys[i] is not None:
                    cache.entries[keys[i]] = facts
                if time.monotonic() - saved_at > SAVE_EVERY_S:
                    cache.save()
                    saved_at = time.monotonic()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # stop decoding what is left; what was decoded is kept below
            raise
        finally:
            if decoded:
                cache.save()
    return decoded


def _check_item(source, index: int, facts: dict, cfg, tokenizer, report: DataReport) -> ItemInfo:
    if "reason" in facts:
        raise BadItem(facts["reason"])
    captions = check_captions(source.caption(index))
    width, height = facts["width"], facts["height"]
    check_size(width, height, cfg.min_image_size, cfg.max_aspect_ratio)
    for fix in facts["fixes"]:
        report.add(report.fixes, fix, source.origin(index))
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(captions, verbose=False).input_ids]
        if max(lengths) > tokenizer.model_max_length:
            # Kept: the text encoder sees the first model_max_length tokens, as at inference.
            report.add(report.fixes, "caption_truncated", source.origin(index))
    return ItemInfo(index, width, height, facts["sha256"], captions)
