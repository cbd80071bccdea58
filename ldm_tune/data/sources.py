"""Where image-caption pairs come from: an image folder with metadata.jsonl, or a Hugging Face dataset.

A source is anything with `__len__` and `load(index) -> (PIL image, caption or list of captions)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_tune.config import DataConfig


class FolderSource:
    """An image folder with `metadata.jsonl`: one JSON object per line with `file_name` and a caption column."""

    def __init__(self, root: str | Path, caption_column: str = "text"):
        self.root = Path(root)
        metadata = self.root / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"`data.train_data_dir` {str(self.root)!r} has no metadata.jsonl; it must hold one JSON object per "
                f'line such as {{"file_name": "0001.png", "{caption_column}": "a red circle"}}.'
            )
        self.items: list[tuple[Path, object]] = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.items.append((self.root / record["file_name"], record[caption_column]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{str(metadata)!r} line {number} must be a JSON object with `file_name` and "
                    f"`{caption_column}`: {error!r}"
                ) from error
        if not self.items:
            raise ValueError(f"{str(metadata)!r} lists no images.")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int):
        path, caption = self.items[index]
        with Image.open(path) as image:
            image.load()
            return image, caption


class HFDatasetSource:
    """Any Hugging Face `datasets` dataset (hub name, local script/data folder, or a `save_to_disk` folder)."""

    def __init__(self, dataset, image_column: str, caption_column: str):
        missing = [c for c in (image_column, caption_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(f"Dataset columns {missing} not found; the dataset has {dataset.column_names}.")
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int):
        row = self.dataset[index]
        image = row[self.image_column]
        if isinstance(image, str):  # a path column
            with Image.open(image) as opened:
                opened.load()
                image = opened
        return image, row[self.caption_column]

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
        return cls(dataset, cfg.image_column, cfg.caption_column)


class SubsetSource:
    """A view of some indices of another source (the train/validation split)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.source.load(self.indices[index])


def build_sources(cfg: DataConfig, seed: int):
    """Training and validation sources from the data config (validation is None when not asked for)."""
    if cfg.train_data_dir is not None:
        source = FolderSource(cfg.train_data_dir, cfg.caption_column)
    else:
        source = HFDatasetSource.from_config(cfg)
    indices = np.arange(len(source))
    validation = None
    if cfg.validation_data_dir is not None:
        validation = FolderSource(cfg.validation_data_dir, cfg.caption_column)
    elif cfg.validation_dataset_split is not None:
        validation = HFDatasetSource.from_config(cfg, split=cfg.validation_dataset_split)
    elif cfg.validation_split > 0:
        # A seeded permutation, so the held-out items are the same on every run and every process.
        indices = np.random.default_rng(seed).permutation(len(source))
        held_out = max(1, round(cfg.validation_split * len(source)))
        if held_out >= len(source):
            raise ValueError(f"`data.validation_split` {cfg.validation_split} leaves no training items.")
        validation, indices = SubsetSource(source, np.sort(indices[:held_out])), np.sort(indices[held_out:])
    if cfg.max_train_samples is not None:
        indices = indices[: cfg.max_train_samples]
    train = source if len(indices) == len(source) else SubsetSource(source, indices)
    return train, validation
