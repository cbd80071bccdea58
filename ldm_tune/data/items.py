"""The usable items of a split, held as numpy columns instead of one Python object per item.

A corpus of millions of pairs would otherwise cost ~100-600 bytes of Python objects per item in every process
(and in every loader worker); here an item costs its few column bytes, and `ItemInfo`s are made on demand when
a position is read. Captions are not copied: an item's captions are read from its source (see
`ldm_tune.data.sources`, whose lists keep them in a memory-mapped Arrow index).

Split, repeats (kohya's `num_repeats`), `max_train_samples` and DreamBooth's joined sources are index
arithmetic over these columns (`take`, `concat`), never copies of per-item objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm_tune.data.images import BadItem


@dataclass(slots=True)
class ItemInfo:
    """A usable item: its index in the source, pixel size, content hash, valid captions and loss weight."""

    index: int
    width: int
    height: int
    sha256: str
    captions: list[str]
    weight: float = 1.0  # multiplies the item's loss: DreamBooth's prior_loss_weight for class items


def check_captions(caption) -> list[str]:
    """The usable captions of an item (a list may hold several); raises `BadItem` when there is none."""
    if caption is None:
        raise BadItem("missing_caption")
    if isinstance(caption, BadItem):
        raise caption
    captions = caption if isinstance(caption, (list, tuple)) else [caption]
    if not all(isinstance(c, str) for c in captions):
        raise BadItem("malformed_caption", repr(caption)[:80])
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise BadItem("empty_caption")
    return captions


class ItemTable:
    """Items of one source as columns: `index` into the source, `width`, `height` (0 until known: `data.verify:
    lazy`), `sha256` (the 32 raw bytes; None until known) and loss `weight`. `table[position]` is an `ItemInfo`
    (with the hex digest)."""

    def __init__(self, source, index, width=None, height=None, sha256=None, weight=None):
        n = len(index)
        self.source = source
        self.index = np.asarray(index, dtype=np.int64)
        self.width = np.zeros(n, np.int32) if width is None else np.asarray(width, dtype=np.int32)
        self.height = np.zeros(n, np.int32) if height is None else np.asarray(height, dtype=np.int32)
        # Fixed-width bytes, one buffer, no per-item str objects; None while unknown (`data.verify: lazy`).
        self.sha256 = None if sha256 is None else np.asarray(sha256, dtype="S32")
        self.weight = np.ones(n, np.float32) if weight is None else np.asarray(weight, dtype=np.float32)

    @classmethod
    def from_infos(cls, source, infos: list[ItemInfo]) -> ItemTable:
        """The table of a list of `ItemInfo` (what the upfront scan builds)."""
        return cls(source, [i.index for i in infos], [i.width for i in infos], [i.height for i in infos],
                   [bytes.fromhex(i.sha256) for i in infos], [i.weight for i in infos])  # fmt: skip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int | slice) -> ItemInfo | ItemTable:
        if isinstance(position, slice):
            return self.take(np.arange(len(self))[position])
        index = int(self.index[position])
        captions = check_captions(self.source.caption(index))
        return ItemInfo(index, int(self.width[position]), int(self.height[position]),
                        self._sha256(position), captions, float(self.weight[position]))  # fmt: skip

    def _sha256(self, position: int) -> str:
        if self.sha256 is None or not self.sha256[position]:  # unknown (a lazy part beside an upfront one)
            return ""
        return self.sha256[position].ljust(32, b"\0").hex()  # numpy drops trailing NUL bytes: put them back

    def __iter__(self):
        return (self[position] for position in range(len(self)))

    def take(self, positions) -> ItemTable:
        """The items at `positions` (any integer array: a subset, a permutation, or repeats)."""
        p = np.asarray(positions, dtype=np.int64)
        sha256 = None if self.sha256 is None else self.sha256[p]
        return ItemTable(self.source, self.index[p], self.width[p], self.height[p], sha256, self.weight[p])

    def repeat(self, times: int) -> ItemTable:
        """Every item `times` times, in order: the same item at several positions (each with its own draws)."""
        return self.take(np.tile(np.arange(len(self)), times))

    def with_weight(self, weight: float) -> ItemTable:
        return ItemTable(self.source, self.index, self.width, self.height, self.sha256,
                         np.full(len(self), weight, np.float32))  # fmt: skip

    @classmethod
    def concat(cls, source, tables: list[ItemTable], offsets: list[int]) -> ItemTable:
        """One table over `source` (a `ConcatSource`) from tables of its parts, part k's indices shifted by
        `offsets[k]`."""
        index = np.concatenate([t.index + offset for t, offset in zip(tables, offsets, strict=True)])
        columns = {c: np.concatenate([getattr(t, c) for t in tables]) for c in ("width", "height", "weight")}
        if any(t.sha256 is not None for t in tables):
            columns["sha256"] = np.concatenate([t.sha256 if t.sha256 is not None else np.zeros(len(t), "S32")
                                                for t in tables])  # fmt: skip
        return cls(source, index, **columns)
