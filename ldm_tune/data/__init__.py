"""Image-caption data: sources (image folder, Hugging Face datasets), PIL/numpy transforms, a keyed dataset.

Every random choice about an item (which caption, caption dropout, crop, flip) is drawn from a generator keyed by
(seed, epoch, index), so a batch is the same whatever the batch size, worker count, process count or resume point.
"""

from ldm_tune.data.dataset import EpochSampler, TextImageDataset, collate, item_seed
from ldm_tune.data.sources import build_sources


__all__ = ["EpochSampler", "TextImageDataset", "build_sources", "collate", "item_seed"]
