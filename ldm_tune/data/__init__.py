"""Image-caption data: sources, download, checks, buckets, caches, and the keyed dataset the trainer reads.

Every random choice about an item (which caption, caption dropout, flip, crop) is drawn from a generator keyed by
(seed, epoch, position), so a batch is the same whatever the batch size, worker count, process count or resume
point.
"""

from ldm_tune.data.buckets import BucketBatchSampler
from ldm_tune.data.dataset import TextImageDataset, collate, item_seed
from ldm_tune.data.pipeline import PreparedData, prepare_data


__all__ = ["BucketBatchSampler", "PreparedData", "TextImageDataset", "collate", "item_seed", "prepare_data"]
