"""Aspect-ratio buckets and the batch sampler that draws every batch from one bucket.

Buckets follow NovelAI's scheme as kohya sd-scripts implements it: sides are multiples of `step` pixels, the
area is at most resolution^2, aspect ratios up to `max_aspect`. Each image goes to the bucket whose aspect ratio is
closest (in log space), is resized to cover it and cropped, so little of the picture is lost.

The batch sampler is also how items are split over processes: it lays out one epoch's batches for all processes,
deterministically from (seed, epoch), with a batch count that is a multiple of the process count, so that
Accelerate hands each process whole batches and every item is seen exactly once per epoch, with no padding.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) buckets of area <= resolution^2 with sides multiple of `step`, square first."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            buckets.update({(width, height), (height, width)})  # both orientations
        width += step
    return sorted(buckets, key=lambda b: (b != (resolution, resolution), b[0] / b[1]))


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to the image's (compared in log space)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


class ItemSizes:
    """Each item's crop size, stored as one bucket id per item (numpy) and the table of bucket sizes."""

    def __init__(self, ids, table: list[tuple[int, int]]):
        self.ids, self.table = np.asarray(ids, dtype=np.int64), table

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> tuple[int, int]:
        return self.table[self.ids[position]]

    def __iter__(self):
        return (self.table[i] for i in self.ids)


class BucketBatchSampler(Sampler):
    """Yields batches of (epoch, index) keys, each batch from one bucket.

    Args:
        item_buckets: the bucket id of every item (all 0 without bucketing).
        batch_size: items per batch and process; a bucket's last batch may be smaller.
        num_processes: the batch count of an epoch is made a multiple of it (by splitting the largest batches).
        shuffle: shuffle items within buckets and the order of batches, seeded by (seed, epoch).

    `batch_size` is exposed as None (batches have varying lengths) so Accelerate shards whole batches. The epoch is
    set with `start_epoch`, not `set_epoch`: Accelerate calls `set_epoch` with its own counter, which restarts at 0
    when a run resumes and would replay the wrong epoch's order.
    """

    batch_size = None

    def __init__(self, item_buckets: list[int], batch_size: int, seed: int = 0, num_processes: int = 1,
                 shuffle: bool = True, epoch: int = 0):  # fmt: skip
        self.item_buckets, self.size = np.asarray(item_buckets, dtype=np.int64), batch_size
        self.seed, self.num_processes, self.shuffle, self.epoch = seed, num_processes, shuffle, epoch
        self._length = len(self._batches(0))

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch + 1])
        batches = []
        for bucket in np.unique(self.item_buckets):
            members = np.flatnonzero(self.item_buckets == bucket)
            if self.shuffle:
                members = rng.permutation(members)
            # numpy slices, not lists of ints: an epoch of a 10 M-item corpus stays a few arrays
            batches += [members[i : i + self.size] for i in range(0, len(members), self.size)]
        # Make the count a multiple of the process count without repeating an item: split the largest batches.
        while len(batches) % self.num_processes and max(len(b) for b in batches) > 1:
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            batch = batches.pop(largest)
            batches[largest:largest] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        epoch = self.epoch  # fixed when the iteration starts; keys are made one batch at a time
        return ([(epoch, int(i)) for i in batch] for batch in self._batches(epoch))
