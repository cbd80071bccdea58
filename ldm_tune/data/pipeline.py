"""From a data config to checked items: read the sources, download URLs once, scan, split, repeat, bucket.

`prepare_data` is what the trainer and `ldm-tune inspect-data` both run. Under several processes the main process
runs it first (downloads, decodes, writes the caches); the others then find every answer cached, including the
failed downloads of this run, so all processes agree on the same item list.

The training split may join several sources: the `data` source, and DreamBooth's instance images and class images
(`dreambooth` config). Each is scanned and reported on its own, seen `repeats` times per epoch and carries its
loss weight; a `validation_split` is held out of the `data` source only, before repeats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm_tune.config import DataConfig, DreamBoothConfig
from ldm_tune.data.buckets import ItemSizes, assign_bucket, make_buckets
from ldm_tune.data.images import DECODE_VERSION
from ldm_tune.data.index import open_pair_list, resolve_urls
from ldm_tune.data.items import ItemTable
from ldm_tune.data.scan import DataReport, scan_source
from ldm_tune.data.sources import (
    ConcatSource,
    HFDatasetSource,
    RecordSource,
    read_image_folder,
    size_limits,
)


logger = logging.getLogger(__name__)
MAIN_SOURCE_KEYS = ("train_data_dir", "train_data_file", "dataset_name")  # train_shards is streamed, not prepared


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDM_TUNE_CACHE", Path.home() / ".cache" / "ldm_tune"))


@dataclass
class Split:
    """One split, ready for a dataset: the source, its usable items, each item's crop size and bucket id."""

    source: object
    items: ItemTable
    sizes: ItemSizes
    buckets: np.ndarray


@dataclass
class PreparedData:
    train: Split
    validation: Split | None
    report: DataReport
    validation_report: DataReport | None


def _file_source(rows, facts: dict, cfg: DataConfig, report: DataReport) -> RecordSource:
    report.add_skipped(facts)
    return RecordSource(rows, cfg.max_image_pixels, size_limits(cfg), cfg.image_formats)


def _list_source(cfg: DataConfig, cache_dir: Path, report: DataReport, progress: bool, reuse_failures: bool):
    """The source of a pair list: its index, with URL rows downloaded into shards (by the main process; the
    others, `reuse_failures`, read its shards without retrying anything)."""
    rows, facts = open_pair_list(cfg.train_data_file, cache_dir, cfg.caption_column, cfg.image_column, cfg.image_root)
    # Shards are named after the list's path, not its contents: an edited list reuses its unchanged shards.
    name = hashlib.sha256(str(Path(cfg.train_data_file).resolve()).encode()).hexdigest()[:24]
    rows, failed, downloads = resolve_urls(rows, cfg, cache_dir, name, progress, retry_failed=not reuse_failures)
    report.downloads = downloads.summary() if downloads is not None else None
    report.add_skipped(failed)
    return _file_source(rows, facts, cfg, report)


def _read(cfg: DataConfig, folder: str | None, cache_dir: Path, report: DataReport, progress: bool,
          reuse_failures: bool = False, key: str = "data.train_data_dir"):  # fmt: skip
    if folder is not None:
        return _file_source(*read_image_folder(folder, cfg.caption_column, key=key), cfg, report)
    if cfg.train_data_file is not None:
        return _list_source(cfg, cache_dir, report, progress, reuse_failures)
    return HFDatasetSource.from_config(cfg)


def has_main_source(cfg: DataConfig) -> bool:
    """Whether `data` names a source of its own (with DreamBooth it may hold only the instance images)."""
    return any(getattr(cfg, key) is not None for key in MAIN_SOURCE_KEYS)


def _scan_cache_path(cache_dir: Path, cfg: DataConfig, origin: str | Path | None = None) -> Path:
    origin = origin if origin is not None else cfg.train_data_dir or cfg.train_data_file or cfg.dataset_name
    # What the decode decides depends on these too: a changed setting or decoder scans again.
    key = json.dumps([str(origin), cfg.max_image_pixels, sorted(cfg.image_formats), DECODE_VERSION])
    return cache_dir / "scans" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.parquet"


def _split(source, items: ItemTable, cfg: DataConfig) -> Split:
    if not cfg.bucketing:
        ids, table = np.zeros(len(items), np.int64), [(cfg.resolution, cfg.resolution)]
    else:
        table = make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
        # One assignment per distinct image size, not per item.
        shapes, inverse = np.unique(np.stack([items.width, items.height], 1), axis=0, return_inverse=True)
        ids = np.asarray([assign_bucket(int(w), int(h), table) for w, h in shapes], np.int64)[inverse.ravel()]
    return Split(source, items, ItemSizes(ids, table), ids)


def prepare_data(cfg: DataConfig, tokenizer=None, seed: int = 0, cache_dir: str | Path | None = None,
                 progress: bool = True, workers: int | None = None, reuse_failures: bool = False,
                 train: bool = True, dreambooth: DreamBoothConfig | None = None) -> PreparedData:  # fmt: skip
    """Read, download, scan, split and bucket the data of `cfg`; raises if too much of it is bad.

    `reuse_failures`: take this run's failed downloads from the main process instead of retrying them.
    `train=False`: prepare only a separate validation source (the training data is streamed).
    `dreambooth`: with `instance_data_dir` set, its images (and the class images of prior preservation) join the
    training split as further sources; see `_dreambooth_parts`.
    """
    cache_dir = Path(cache_dir or cfg.cache_dir or default_cache_dir())
    scan = _Scanner(cfg, tokenizer, cache_dir, workers or max(2, os.cpu_count() or 2), progress)
    report, source, items = DataReport(repeats=cfg.repeats), None, None
    if train and has_main_source(cfg):
        source = _read(cfg, cfg.train_data_dir, cache_dir, report, progress, reuse_failures)
        items, report = scan(source, _scan_cache_path(cache_dir, cfg), report, "training")
    validation, val_report = None, None
    if cfg.validation_data_dir is not None or cfg.validation_dataset_split is not None:
        validation, val_report = _separate_validation(cfg, scan)
    elif cfg.validation_split > 0:
        if source is None:
            raise ValueError(
                f"`data.validation_split` {cfg.validation_split} holds out items of the `data` source, and there is "
                "none (only `dreambooth.instance_data_dir`): set `data.validation_data_dir` instead."
            )
        # A seeded permutation of the usable items, so the held-out ones are the same on every run and process.
        order = np.random.default_rng(seed).permutation(len(items))
        held_out = max(1, round(cfg.validation_split * len(items)))
        if held_out >= len(items):
            raise ValueError(f"`data.validation_split` {cfg.validation_split} leaves no training items.")
        # Both parts keep the scan's order.
        validation = _split(source, items.take(np.sort(order[:held_out])), cfg)
        items = items.take(np.sort(order[held_out:]))
    if cfg.max_train_samples is not None and items is not None:
        items = items.take(np.arange(min(cfg.max_train_samples, len(items))))
    parts = [_Part("data", source, items, report)] if source is not None else []
    if train and dreambooth is not None and dreambooth.instance_data_dir is not None:
        parts += _dreambooth_parts(dreambooth, scan)
    train_split, report = _combine(parts, cfg) if train else (_split(None, ItemTable(None, []), cfg), report)
    if train and not train_split.items:
        raise ValueError(f"No usable training items.\n{report.format('training data')}")
    return PreparedData(train_split, validation, report, val_report)


class _Scanner:
    """`scan_source` with the settings of one `prepare_data` call, checking the bad fraction of each source."""

    def __init__(self, cfg: DataConfig, tokenizer, cache_dir: Path, workers: int, progress: bool):
        self.cfg, self.tokenizer, self.cache_dir = cfg, tokenizer, cache_dir
        self.workers, self.progress = workers, progress

    def __call__(self, source, scan_path: Path, report: DataReport, name: str) -> tuple[ItemTable, DataReport]:
        items, report = scan_source(source, self.cfg, self.tokenizer, scan_path, self.workers, self.progress, report)
        _check_fraction(report, self.cfg, name)
        return items, report

    def folder(self, folder: str | Path, key: str, name: str, caption: str | None = None, limit: int | None = None):
        """Read and scan an image folder of a DreamBooth source; returns (source, items, report)."""
        report = DataReport()
        rows = read_image_folder(folder, self.cfg.caption_column, caption=caption, limit=limit, key=key)
        source = _file_source(*rows, self.cfg, report)
        items, report = self(source, _scan_cache_path(self.cache_dir, self.cfg, origin=folder), report, name)
        return source, items, report


def _separate_validation(cfg: DataConfig, scan: _Scanner) -> tuple[Split, DataReport]:
    val_report = DataReport()
    if cfg.validation_data_dir is not None:
        val_source = _read(cfg, cfg.validation_data_dir, scan.cache_dir, val_report, scan.progress,
                           key="data.validation_data_dir")  # fmt: skip
    else:
        val_source = HFDatasetSource.from_config(cfg, split=cfg.validation_dataset_split)
    scan_path = _scan_cache_path(scan.cache_dir, cfg)
    val_path = scan_path.with_name(scan_path.stem + "-validation.parquet")
    val_items, val_report = scan(val_source, val_path, val_report, "validation")
    return _split(val_source, val_items, cfg), val_report


@dataclass
class _Part:
    """One source of the training split: its usable items (before repeats), report and loss weight."""

    name: str
    source: object
    items: ItemTable
    report: DataReport  # `report.repeats`: how often each item is seen per epoch
    weight: float = 1.0


def _dreambooth_parts(db: DreamBoothConfig, scan: _Scanner) -> list[_Part]:
    """DreamBooth's sources (arXiv 2208.12242): the instance images, and the class images of prior preservation.

    Instance items have loss weight 1; class items `prior_loss_weight`, so the trainer's per-item weighted loss is
    the paper's `L_instance + lambda * L_prior` (diffusers' train_dreambooth.py) when a batch holds both kinds.
    """
    source, items, report = scan.folder(db.instance_data_dir, "dreambooth.instance_data_dir", "instance",
                                        caption=db.instance_prompt)  # fmt: skip
    if not items:
        raise ValueError(
            f"`dreambooth.instance_data_dir` {db.instance_data_dir!r} holds no usable images.\n"
            f"{report.format('instance data')}"
        )
    report.repeats = db.instance_repeats
    parts = [_Part("instance", source, items, report)]
    if db.with_prior_preservation:
        folder = Path(db.class_data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"`dreambooth.class_data_dir` {str(folder)!r} is not a folder; `ldm-tune train` creates it and "
                "generates the class images before training."
            )
        # The first num_class_images in the folder's stable order: the same ones ensure_class_images counted.
        source, items, report = scan.folder(folder, "dreambooth.class_data_dir", "class", caption=db.class_prompt,
                                            limit=db.num_class_images)  # fmt: skip
        if report.total < db.num_class_images:
            logger.warning("`dreambooth.class_data_dir` %s holds %d of the %d class images (`num_class_images`); "
                           "training generates the rest.", folder, report.total, db.num_class_images)  # fmt: skip
        report.repeats = db.class_repeats
        parts.append(_Part("class", source, items, report, db.prior_loss_weight))
    return parts


def _combine(parts: list[_Part], cfg: DataConfig) -> tuple[Split, DataReport]:
    """One training split of all sources, each item repeated `repeats` times (kohya's num_repeats).

    Repeats are extra positions holding the same item, not copies of files: caches (keyed by image hash and
    caption) are shared, while each position's keyed draws (caption dropout, flip, crop, noise, timestep) differ.
    """
    if [part.name for part in parts] == ["data"]:  # one source: read it directly, as without DreamBooth
        part = parts[0]
        return _split(part.source, part.items.repeat(part.report.repeats), cfg), part.report
    source = ConcatSource([(part.name, part.source) for part in parts])
    tables = [part.items.with_weight(part.weight).repeat(part.report.repeats) for part in parts]
    items = ItemTable.concat(source, tables, source.offsets[:-1])
    return _split(source, items, cfg), DataReport.combine({p.name: p.report for p in parts})


def _check_fraction(report: DataReport, cfg: DataConfig, name: str) -> None:
    if report.bad_fraction > cfg.max_bad_fraction:
        raise ValueError(
            f"{report.bad_fraction:.1%} of the {name} items are bad, more than `data.max_bad_fraction` "
            f"({cfg.max_bad_fraction:.1%}); fix the data or raise the limit.\n{report.format(name + ' data')}"
        )
