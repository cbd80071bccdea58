"""From a data config to checked items: read the source, download URLs once, scan, split, bucket.

`prepare_data` is what the trainer and `ldm-tune inspect-data` both run. Under several processes the main process
runs it first (downloads, decodes, writes the caches); the others then find every answer cached, including the
failed downloads of this run, so all processes agree on the same item list.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_tune.config import DataConfig
from ldm_tune.data.buckets import assign_bucket, make_buckets
from ldm_tune.data.scan import DataReport, ItemInfo, scan_source
from ldm_tune.data.sources import HFDatasetSource, RecordSource, read_image_folder, read_pair_list, resolve_urls


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDM_TUNE_CACHE", Path.home() / ".cache" / "ldm_tune"))


@dataclass
class Split:
    """One split, ready for a dataset: the source, its usable items and each item's crop size."""

    source: object
    items: list[ItemInfo]
    sizes: list[tuple[int, int]]
    buckets: list[int]


@dataclass
class PreparedData:
    train: Split
    validation: Split | None
    report: DataReport
    validation_report: DataReport | None


def _file_source(records, bad, cfg: DataConfig, cache_dir: Path, report: DataReport, progress: bool,
                 reuse_failures: bool = False):  # fmt: skip
    records, failed, downloads = resolve_urls(records, cfg, cache_dir, progress, reuse_failures)
    report.downloads = downloads.summary() if downloads is not None else None
    for origin, reason in bad + failed:
        report.total += 1
        report.add(report.bad, reason, origin)
    return RecordSource(records, cfg.max_image_pixels)


def _read(cfg: DataConfig, folder: str | None, cache_dir: Path, report: DataReport, progress: bool,
          reuse_failures: bool = False):  # fmt: skip
    if folder is not None:
        return _file_source(*read_image_folder(folder, cfg.caption_column), cfg, cache_dir, report, progress)
    if cfg.train_data_file is not None:
        records = read_pair_list(cfg.train_data_file, cfg.caption_column)
        return _file_source(*records, cfg, cache_dir, report, progress, reuse_failures)
    return HFDatasetSource.from_config(cfg)


def _scan_cache_path(cache_dir: Path, cfg: DataConfig) -> Path:
    origin = json.dumps([str(cfg.train_data_dir or cfg.train_data_file or cfg.dataset_name), cfg.max_image_pixels])
    return cache_dir / "scans" / f"{hashlib.sha256(origin.encode()).hexdigest()[:20]}.json"


def _sizes(items: list[ItemInfo], cfg: DataConfig) -> tuple[list[tuple[int, int]], list[int]]:
    if not cfg.bucketing:
        return [(cfg.resolution, cfg.resolution)] * len(items), [0] * len(items)
    buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
    ids = [assign_bucket(item.width, item.height, buckets) for item in items]
    return [buckets[i] for i in ids], ids


def _split(source, items: list[ItemInfo], cfg: DataConfig) -> Split:
    sizes, buckets = _sizes(items, cfg)
    return Split(source, items, sizes, buckets)


def prepare_data(cfg: DataConfig, tokenizer=None, seed: int = 0, cache_dir: str | Path | None = None,
                 progress: bool = True, workers: int | None = None, reuse_failures: bool = False,
                 train: bool = True) -> PreparedData:  # fmt: skip
    """Read, download, scan, split and bucket the data of `cfg`; raises if too much of it is bad.

    `reuse_failures`: take this run's failed downloads from the main process instead of retrying them.
    `train=False`: prepare only a separate validation source (the training data is streamed).
    """
    cache_dir = Path(cache_dir or cfg.cache_dir or default_cache_dir())
    workers = workers or max(2, os.cpu_count() or 2)
    scan_path = _scan_cache_path(cache_dir, cfg)
    report, source, items = DataReport(), None, []
    if train:
        source = _read(cfg, cfg.train_data_dir, cache_dir, report, progress, reuse_failures)
        items, report = scan_source(source, cfg, tokenizer, scan_path, workers, progress, report)
        _check_fraction(report, cfg, "training")
    validation, val_report = None, None
    if cfg.validation_data_dir is not None or cfg.validation_dataset_split is not None:
        val_report = DataReport()
        if cfg.validation_data_dir is not None:
            val_source = _read(cfg, cfg.validation_data_dir, cache_dir, val_report, progress)
        else:
            val_source = HFDatasetSource.from_config(cfg, split=cfg.validation_dataset_split)
        val_path = scan_path.with_name(scan_path.stem + "-validation.json")
        val_items, val_report = scan_source(val_source, cfg, tokenizer, val_path, workers, progress, val_report)
        _check_fraction(val_report, cfg, "validation")
        validation = _split(val_source, val_items, cfg)
    elif cfg.validation_split > 0:
        # A seeded permutation of the usable items, so the held-out ones are the same on every run and process.
        order = np.random.default_rng(seed).permutation(len(items))
        held_out = max(1, round(cfg.validation_split * len(items)))
        if held_out >= len(items):
            raise ValueError(f"`data.validation_split` {cfg.validation_split} leaves no training items.")
        keep = set(order[:held_out].tolist())
        validation = _split(source, [it for i, it in enumerate(items) if i in keep], cfg)
        items = [it for i, it in enumerate(items) if i not in keep]
    if cfg.max_train_samples is not None:
        items = items[: cfg.max_train_samples]
    if train and not items:
        raise ValueError(f"No usable training items.\n{report.format('training data')}")
    return PreparedData(_split(source, items, cfg), validation, report, val_report)


def _check_fraction(report: DataReport, cfg: DataConfig, name: str) -> None:
    if report.bad_fraction > cfg.max_bad_fraction:
        raise ValueError(
            f"{report.bad_fraction:.1%} of the {name} items are bad, more than `data.max_bad_fraction` "
            f"({cfg.max_bad_fraction:.1%}); fix the data or raise the limit.\n{report.format(name + ' data')}"
        )
