"""The training dataset. Items are addressed by (epoch, position) keys, not plain indices.

Keying every random choice by (seed, epoch, position) makes an item's caption, caption dropout, flip, crop and
(in the trainer) its noise and timestep independent of batch size, gradient accumulation, worker processes, GPU
count and resume point: a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm_tune.data.images import BadItem
from ldm_tune.data.transforms import preprocess


logger = logging.getLogger(__name__)
# Independent random streams per purpose, so adding a draw to one never shifts another.
STREAM_DATA, STREAM_NOISE, STREAM_MODEL = 1, 2, 3  # STREAM_MODEL: dropout inside the model (training.py)
STREAM_CLASS_IMAGES = 4  # the initial noise of generated DreamBooth class images (ldm_tune.dreambooth)
VALIDATION_EPOCH = -1  # validation items get fixed keys: the same noise and timesteps at every evaluation


def item_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item, mixed from its key with numpy's SeedSequence (well-spread, no collisions)."""
    state = np.random.SeedSequence([seed, stream, epoch + 1, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class TextImageDataset(Dataset):
    """Checked items of a source, preprocessed (or read from the caches); `dataset[(epoch, position)]`.

    Args:
        source: where images and captions are loaded from (see `ldm_tune.data.sources`).
        items: the usable items (`ItemInfo`, from the scan); positions index this list.
        sizes: the (width, height) each item is cropped to: its bucket, or resolution x resolution.
        latent_cache, text_cache: when given, items carry cached VAE posteriors / text embeddings instead of
            pixels / token ids.

    Every item also carries its `loss_weight` (`ItemInfo.weight`: 1, or DreamBooth's `prior_loss_weight`). A
    repeated item (`data.repeats`) is the same `ItemInfo` at several positions, so its random draws differ.
    """

    def __init__(self, source, items, sizes, tokenizer, center_crop: bool = False, random_flip: bool = False,
                 caption_dropout: float = 0.0, seed: int = 0, interpolation: str = "lanczos",
                 latent_cache=None, text_cache=None):  # fmt: skip
        self.source, self.items, self.sizes, self.tokenizer = source, items, sizes, tokenizer
        self.center_crop, self.random_flip, self.caption_dropout = center_crop, random_flip, caption_dropout
        self.seed, self.interpolation = seed, interpolation
        self.latent_cache, self.text_cache = latent_cache, text_cache

    def __len__(self) -> int:
        return len(self.items)

    def choices(self, epoch: int, position: int, captions: list[str]) -> tuple[str, bool, np.random.Generator]:
        """The item's keyed random choices: caption (after dropout) and flip; the generator continues to the crop."""
        rng = np.random.default_rng(item_seed(self.seed, STREAM_DATA, epoch, position))
        caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        # Caption dropout: train the unconditional branch that classifier-free guidance needs (Ho & Salimans 2022).
        if rng.random() < self.caption_dropout:
            caption = ""
        flip = self.random_flip and rng.random() < 0.5
        return caption, flip, rng

    def tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids[0]  # fmt: skip

    def _with_text(self, out: dict, caption: str) -> dict:
        if self.text_cache is not None:
            out["encoder_hidden_states"] = self.text_cache.load(caption)
        else:
            out["input_ids"] = self.tokenize(caption)
        return out

    def build(self, epoch: int, position: int, item, image, size: tuple[int, int]) -> dict:
        """The training item for a decoded `image` (also used by the streaming sources)."""
        caption, flip, rng = self.choices(epoch, position, item.captions)
        pixels = preprocess(image, size, self.center_crop, flip, rng, self.interpolation)
        out = {"key": torch.tensor([epoch, position]), "loss_weight": item.weight, "pixel_values": pixels}
        return self._with_text(out, caption)

    def __getitem__(self, key) -> dict:
        epoch, position = key
        item = self.items[position]
        try:
            return self._load(epoch, position, item)
        except BadItem as error:  # changed since the scan, checked only now (lazy), or a damaged cache file:
            _log_skip(self.source, item.index, error)  # skipped, and counted by the trainer
            return {"bad": error.reason, "key": torch.tensor([epoch, position])}

    def _load(self, epoch: int, position: int, item) -> dict:
        if self.latent_cache is not None:
            caption, flip, _ = self.choices(epoch, position, item.captions)
            mean, std = self.latent_cache.load(item.sha256, self.sizes[position], flip)
            out = {"key": torch.tensor([epoch, position]), "loss_weight": item.weight, "latent_mean": mean,
                   "latent_std": std}  # fmt: skip
            return self._with_text(out, caption)
        image, _ = self.source.load(item.index)
        return self.build(epoch, position, item, image, self.sizes[position])


_logged = Counter()
LOG_PER_REASON = 5  # the first few skips of each reason name their file; the counts are in metrics.jsonl


def _log_skip(source, index: int, error: BadItem) -> None:
    _logged[error.reason] += 1
    if _logged[error.reason] <= LOG_PER_REASON:
        logger.warning("Skipped %s (%s)%s", source.origin(index), error,
                       "; further ones of this reason are only counted" if _logged[error.reason] == LOG_PER_REASON
                       else "")  # fmt: skip


def collate(examples: list[dict]) -> dict:
    """Stack good items into a batch; items that failed to load are dropped and their reasons listed."""
    good = [e for e in examples if "bad" not in e]
    batch = {"keys": torch.stack([e["key"] for e in good]) if good else torch.zeros(0, 2, dtype=torch.long),
             "skipped": [e["bad"] for e in examples if "bad" in e],
             "loss_weights": torch.tensor([e.get("loss_weight", 1.0) for e in good], dtype=torch.float32)}  # fmt: skip
    for name in ("pixel_values", "input_ids", "latent_mean", "latent_std", "encoder_hidden_states"):
        if good and name in good[0]:
            batch[name] = torch.stack([e[name] for e in good]).contiguous()
    return batch
