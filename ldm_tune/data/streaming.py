"""Streaming sources for corpora larger than disk: WebDataset `.tar` shards and Hugging Face streaming datasets.

Samples are read in a seeded order (shards shuffled per epoch), checked one by one (a bad sample is skipped and its
reason travels with the next batch, to be counted by the trainer), preprocessed and grouped into batches of one
bucket. Nothing is extracted to disk, and a tar member with an absolute or `..` name is refused.

Only the main process reads the stream; `MainProcessStream` hands every process its slice of each batch, so that
under N processes every sample is trained on once per epoch, with no duplicates and no process waiting forever.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm_tune.data.buckets import assign_bucket, make_buckets
from ldm_tune.data.dataset import collate
from ldm_tune.data.images import BadItem, decode_image, to_rgb
from ldm_tune.data.scan import ItemInfo, check_captions


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str | list[str], allow_private_urls: bool = False) -> list[str]:
    """Expand brace patterns (`data/{000..099}.tar`) and check every shard: local file, or http(s) URL."""
    from braceexpand import braceexpand

    from ldm_tune.data.download import check_url

    shards = [s for pattern in ([spec] if isinstance(spec, str) else spec) for s in braceexpand(pattern)]
    for shard in shards:
        if "://" in shard:
            reason = check_url(shard, allow_private_urls)
            if reason is not None:
                raise ValueError(f"`data.train_shards` entry {shard!r} is refused: {reason}.")
        elif not Path(shard).is_file():
            raise FileNotFoundError(f"`data.train_shards` entry {shard!r} does not exist.")
    if not shards:
        raise ValueError(f"`data.train_shards` {spec!r} names no shard.")
    return shards


def safe_member_name(key: str) -> bool:
    """A tar member name must stay inside the archive: not absolute, no `..` part, no drive letter."""
    path = PurePosixPath(key)
    return not path.is_absolute() and ".." not in path.parts and ":" not in key and "\\" not in key


def _caption_of(sample: dict, caption_column: str):
    if "txt" in sample:
        try:
            return sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return BadItem("non_utf8_caption")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return BadItem("malformed_metadata")
        return meta.get(caption_column, meta.get("caption", meta.get("text"))) if isinstance(meta, dict) else None
    return None


def webdataset_samples(shards: list[str], caption_column: str, seed: int, epoch: int):
    """(key, image bytes, caption) per sample of the shards, shards in a seeded order; bad ones as BadItem."""
    import webdataset as wds

    order = [shards[i] for i in np.random.default_rng([seed, epoch + 1]).permutation(len(shards))]
    failures = []

    def record(error: Exception) -> bool:  # a corrupt shard is skipped and counted, the stream goes on
        failures.append(error)
        return True

    stream = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                            handler=record, empty_check=False)  # fmt: skip
    for sample in stream:
        while failures:
            yield f"shard-error-{len(failures)}", BadItem("corrupt_shard", str(failures.pop())), None
        key = f"{sample.get('__url__')}/{sample['__key__']}"
        if not safe_member_name(sample["__key__"]):
            yield key, BadItem("unsafe_tar_member", sample["__key__"]), None
            continue
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        yield (
            key,
            image if image is not None else BadItem("missing_file", "no image member"),
            _caption_of(sample, caption_column),
        )
    while failures:
        yield f"shard-error-{len(failures)}", BadItem("corrupt_shard", str(failures.pop())), None


def hf_streaming_samples(cfg, seed: int, epoch: int):
    """(key, image, caption) per row of a Hugging Face dataset opened with `streaming=True`."""
    import datasets

    stream = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=cfg.dataset_split, streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=1000)
    stream.set_epoch(epoch)
    info = get_worker_info()
    worker = info.id if info is not None else 0
    for number, row in enumerate(stream):
        value = row.get(cfg.image_column)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        yield f"{worker}:{number}", value, row.get(cfg.caption_column)


class StreamingDataset(IterableDataset):
    """Batches of checked, preprocessed samples from a stream; each batch from one bucket.

    `batch_size` is the size of a batch for all processes together (per-process batch x processes).
    """

    def __init__(self, samples_fn, dataset, cfg, batch_size: int, seed: int = 0):
        self.samples_fn, self.dataset, self.cfg = (
            samples_fn,
            dataset,
            cfg,
        )  # `dataset`: a TextImageDataset (transforms)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio) if cfg.bucketing else None

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _item(self, key: str, image, caption):
        """One preprocessed item, or raises BadItem."""
        if isinstance(image, BadItem):
            raise image
        captions = check_captions(caption)
        if image is None:
            raise BadItem("missing_file")
        image = to_rgb(image) if isinstance(image, Image.Image) else decode_image(image, self.cfg.max_image_pixels)
        width, height = image.size
        if min(width, height) < self.cfg.min_image_size:
            raise BadItem("too_small", f"{width}x{height}")
        if max(width, height) / min(width, height) > self.cfg.max_aspect_ratio:
            raise BadItem("extreme_aspect_ratio", f"{width}x{height}")
        size = self.buckets[assign_bucket(width, height, self.buckets)] if self.buckets else (self.cfg.resolution,) * 2
        index = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)  # a stable position for the keyed draws
        info = ItemInfo(index, width, height, "", captions)
        return size, self.dataset.build(self.epoch, index, info, image, size)

    def __iter__(self):
        buffers, skipped = {}, []
        for key, image, caption in self.samples_fn(self.epoch):
            try:
                size, item = self._item(key, image, caption)
            except BadItem as error:
                skipped.append(error.reason)
                if len(skipped) == self.batch_size:  # a batch's worth of bad samples: report them (and progress)
                    yield collate([]) | {"skipped": skipped}
                    skipped = []
                continue
            buffers.setdefault(size, []).append(item)
            if len(buffers[size]) == self.batch_size:
                batch = collate(buffers.pop(size))
                batch["skipped"], skipped = batch["skipped"] + skipped, []
                yield batch
        for items in buffers.values():  # the end of the epoch: each bucket's last, smaller batch
            batch = collate(items)
            batch["skipped"], skipped = batch["skipped"] + skipped, []
            yield batch
        if skipped:
            yield collate([]) | {"skipped": skipped}


class MainProcessStream:
    """Reads a streaming loader on the main process and hands every process its rows of each batch.

    Rows are split as evenly as possible (`numpy.array_split`); only a batch with fewer rows than processes
    repeats rows, so that no process is left without a batch.
    """

    def __init__(self, dataset: StreamingDataset, accelerator, num_workers: int = 0):
        self.dataset, self.accelerator = dataset, accelerator
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)

    def start_epoch(self, epoch: int) -> None:
        self.dataset.start_epoch(epoch)

    def __iter__(self):
        acc = self.accelerator
        if acc.num_processes == 1:
            for batch in self.loader:
                yield {k: v.to(acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            return
        import torch.distributed as dist

        iterator = iter(self.loader) if acc.is_main_process else None
        while True:
            batch = next(iterator, None) if acc.is_main_process else None
            meta = [None if batch is None else {k: (tuple(v.shape), v.dtype) for k, v in batch.items()
                                                if isinstance(v, torch.Tensor)} | {"skipped": batch["skipped"]}]  # fmt: skip
            dist.broadcast_object_list(meta, src=0)
            if meta[0] is None:
                return
            skipped = meta[0].pop("skipped")
            out = {"skipped": skipped if acc.is_main_process else []}
            rows = np.array_split(np.arange(meta[0]["keys"][0][0]), acc.num_processes)[acc.process_index]
            for name, (shape, dtype) in sorted(meta[0].items()):
                tensor = batch[name].to(acc.device) if acc.is_main_process else torch.empty(shape, dtype=dtype,
                                                                                             device=acc.device)  # fmt: skip
                dist.broadcast(tensor, src=0)
                out[name] = tensor[torch.as_tensor(rows if len(rows) else [acc.process_index % max(shape[0], 1)],
                                                   dtype=torch.long, device=acc.device)] if shape[0] else tensor  # fmt: skip
            yield out
