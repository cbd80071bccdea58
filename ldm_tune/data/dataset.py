"""The training dataset and its sampler. Items are addressed by (epoch, index) keys, not plain indices.

Keying every random choice by (seed, epoch, index) makes an item's caption, caption dropout, crop, flip and (in
the trainer) its noise and timestep independent of batch size, gradient accumulation, worker processes, GPU count
and resume point: a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ldm_tune.data.transforms import preprocess


# Independent random streams per purpose, so adding a draw to one never shifts another.
STREAM_DATA, STREAM_NOISE = 1, 2
VALIDATION_EPOCH = -1  # validation items get fixed keys: the same noise and timesteps at every evaluation


def item_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one item, mixed from its key with numpy's SeedSequence (well-spread, no collisions)."""
    state = np.random.SeedSequence([seed, stream, epoch + 1, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class TextImageDataset(Dataset):
    """Image-caption pairs, preprocessed and tokenized; `dataset[(epoch, index)]` returns one training item."""

    def __init__(self, source, tokenizer, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 caption_dropout: float = 0.0, seed: int = 0, interpolation: str = "lanczos"):  # fmt: skip
        self.source, self.tokenizer = source, tokenizer
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.caption_dropout, self.seed, self.interpolation = caption_dropout, seed, interpolation

    def __len__(self) -> int:
        return len(self.source)

    def choose_caption(self, caption, rng: np.random.Generator) -> str:
        if isinstance(caption, (list, tuple)):
            caption = caption[int(rng.integers(len(caption)))] if caption else ""
        if not isinstance(caption, str):
            raise ValueError(f"Captions must be strings or lists of strings, got {caption!r}.")
        # Caption dropout: train the unconditional branch that classifier-free guidance needs (Ho & Salimans 2022).
        return "" if rng.random() < self.caption_dropout else caption

    def __getitem__(self, key) -> dict:
        epoch, index = key
        rng = np.random.default_rng(item_seed(self.seed, STREAM_DATA, epoch, index))
        image, caption = self.source.load(index)
        caption = self.choose_caption(caption, rng)
        pixels = preprocess(image, self.resolution, self.center_crop, self.random_flip, rng, self.interpolation)
        input_ids = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids[0]  # fmt: skip
        return {"pixel_values": pixels, "input_ids": input_ids, "key": torch.tensor([epoch, index])}


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a permutation seeded by (seed, epoch), or the plain order when not shuffling.

    The epoch is set with `start_epoch`, deliberately not `set_epoch`: Accelerate calls `set_epoch` with its own
    iteration counter, which restarts at 0 when a run resumes, and would then replay the wrong epoch's order.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, epoch: int = 0):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, epoch

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = (
            np.random.default_rng([self.seed, self.epoch + 1]).permutation(self.size)
            if self.shuffle
            else range(self.size)
        )
        return iter([(self.epoch, int(i)) for i in order])


def collate(examples: list[dict]) -> dict:
    """Stack items into a batch: pixel_values (B, 3, H, W), input_ids (B, L), keys (B, 2)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "keys": torch.stack([e["key"] for e in examples]),
    }
