"""Streaming sources for corpora larger than disk: WebDataset `.tar` shards and Hugging Face streaming datasets.

Samples are read in a seeded order (shards shuffled per epoch), checked one by one (a bad sample is skipped and its
reason travels with the next batch, to be counted by the trainer), preprocessed and grouped into batches of one
bucket. Shards are read by `tar_reader` (bounded members, nothing extracted to disk, absolute or `..` names
refused, a truncation counted once).

Only the main process reads the stream; `MainProcessStream` hands every process its slice of each batch, so that
under N processes every sample is trained on once per epoch, with no duplicates and no process waiting forever.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm_tune.data.buckets import assign_bucket, make_buckets
from ldm_tune.data.dataset import collate
from ldm_tune.data.images import BadItem, decode_image, to_rgb
from ldm_tune.data.items import ItemInfo, check_captions
from ldm_tune.data.tar_reader import tar_samples


logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")  # decode_image checks the format


def expand_shards(spec: str | list[str], allowed_networks: tuple[str, ...] = ()) -> list[str]:
    """Expand brace patterns (`data/{000..099}.tar`) and check every shard: local file, or http(s) URL."""
    from braceexpand import braceexpand

    from ldm_tune.data.download import check_url

    shards = [s for pattern in ([spec] if isinstance(spec, str) else spec) for s in braceexpand(pattern)]
    for shard in shards:
        if "://" in shard:
            reason = check_url(shard, allowed_networks)
            if reason is not None:
                raise ValueError(f"`data.train_shards` entry {shard!r} is refused: {reason}.")
        elif not Path(shard).is_file():
            raise FileNotFoundError(f"`data.train_shards` entry {shard!r} does not exist.")
    if not shards:
        raise ValueError(f"`data.train_shards` {spec!r} names no shard.")
    return shards


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


def shard_order(shards: list, seed: int, epoch: int) -> list:
    """The epoch's seeded order of the shards (or other parts of a stream)."""
    return [shards[i] for i in np.random.default_rng([seed, epoch + 1]).permutation(len(shards))]


def read_shard(url: str, max_member_bytes: int, download=None):
    """(key, {extension: bytes} or BadItem) per sample of one shard, nothing decoded (see `tar_reader`). A remote
    shard is streamed through the vetted downloader (`download.open_url`: address checks, pinned connections,
    idle deadline), never a shell tool."""
    try:
        if "://" in url:
            from ldm_tune.data.download import DownloadOptions, open_url

            opts = download or DownloadOptions()
            stream = _ShortReads(open_url(url, opts, idle_timeout=opts.read_timeout))  # a stall ends it, counted
        else:
            stream = open(url, "rb")  # closed below, whatever happens while reading
    except Exception as error:  # a shard that cannot be opened (missing, refused, unreachable) is counted and skipped
        yield f"{url}/open", BadItem(getattr(error, "reason", "unreadable_shard"), str(error))
        return
    with stream:
        yield from tar_samples(stream, max_member_bytes)


class _ShortReads:
    """A network stream whose `read(n)` returns what has arrived (`read1`), as tarfile's stream reader handles:
    a buffered `read(n)` would wait for all n bytes, so the samples before a stall would never be seen."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read1(size) if size > 0 else self.stream.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


class PositionedSamples:
    """Samples read part by part (tar shards, or the data files of a Hugging Face stream), parts in the epoch's
    seeded order, recording where the stream stands so that a resumed run starts there.

    `position` is where the stream stands after the last entry yielded: the part's place in this reader's order and
    how many of its entries were yielded. Started at a position (`start`), earlier parts are not opened and the
    part's first entries are read past undecoded (raw tar members, or rows with undecoded image bytes).
    """

    def __init__(self, parts: list, seed: int, epoch: int, start: dict | None = None):
        order = shard_order(parts, seed, epoch)
        info = get_worker_info()
        if info is not None:  # each DataLoader worker reads its own parts (as webdataset's `split_by_worker`)
            order = order[info.id :: info.num_workers]
        self.order, self.seed, self.epoch = order, seed, epoch
        self.position = dict(start or {"shard": 0, "offset": 0})

    def __iter__(self):
        start = self.position
        for index in range(start["shard"], len(self.order)):
            skip = start["offset"] if index == start["shard"] else 0
            entries = self._entries(self.order[index], skip)
            for offset, entry in enumerate(entries, skip + 1):
                self.position = {"shard": index, "offset": offset}
                yield entry
        self.position = {"shard": len(self.order), "offset": 0}  # every part read: a resume opens none

    def _entries(self, part, skip: int):
        """(key, image or bytes or BadItem, caption) per entry of `part`, from its `skip`-th entry."""
        raise NotImplementedError


class ShardSamples(PositionedSamples):
    """(key, image bytes, caption) per sample of WebDataset tar shards; bad ones as BadItem.

    `max_member_bytes` bounds each tar member; `download` (`DownloadOptions`) is how remote shards are fetched.
    """

    def __init__(self, shards: list[str], caption_column: str, seed: int, epoch: int, start: dict | None = None,
                 max_member_bytes: int = 50 * 2**20, download=None):  # fmt: skip
        super().__init__(shards, seed, epoch, start)
        self.caption_column, self.max_member_bytes, self.download = caption_column, max_member_bytes, download

    def _entries(self, url: str, skip: int):
        return itertools.islice(self._samples(url), skip, None)

    def _samples(self, url: str):
        for key, sample in read_shard(url, self.max_member_bytes, self.download):
            if isinstance(sample, BadItem):
                yield f"{url}/{key}", sample, None
                continue
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            yield (
                f"{url}/{key}",
                image if image is not None else BadItem("missing_file", "no image member"),
                _caption_of(sample, self.caption_column),
            )


def webdataset_samples(shards: list[str], caption_column: str, seed: int, epoch: int, start: dict | None = None,
                       **limits):  # fmt: skip
    """The samples of the shards for `epoch`, from the start or from a position (see `ShardSamples`)."""
    return ShardSamples(shards, caption_column, seed, epoch, start, **limits)


class HFStreamSamples(PositionedSamples):
    """(key, image bytes, caption) per row of a Hugging Face dataset opened with `streaming=True`.

    The parts are the stream's data files (`IterableDataset.shard`); rows are shuffled within blocks of
    `SHUFFLE_BLOCK` by a generator seeded by (seed, epoch, part, block), in place of `datasets`' shuffle buffer,
    whose state a checkpoint cannot hold (`IterableDataset.state_dict` drops the buffer, so a resumed run would
    see another order). Images are read as bytes (`decode=False`): rows before a resume position are skipped
    without decoding, and a corrupt image is a counted BadItem.
    """

    SHUFFLE_BLOCK = 1000  # rows held at once, as the buffer of `datasets`' shuffle(buffer_size=1000) was

    def __init__(self, cfg, seed: int, epoch: int, start: dict | None = None):
        import datasets

        stream = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=cfg.dataset_split,
                                       streaming=True)  # fmt: skip
        if isinstance((stream.features or {}).get(cfg.image_column), datasets.Image):
            stream = stream.cast_column(cfg.image_column, datasets.Image(decode=False))
        self.stream, self.cfg = stream, cfg
        super().__init__(list(range(stream.num_shards)), seed, epoch, start)

    def _entries(self, part: int, skip: int):
        rows = iter(self.stream.shard(num_shards=self.stream.num_shards, index=part))
        block_number, skip_in_block = divmod(skip, self.SHUFFLE_BLOCK)
        for _ in itertools.islice(rows, block_number * self.SHUFFLE_BLOCK):  # read past whole blocks, undecoded
            pass
        while block := list(itertools.islice(rows, self.SHUFFLE_BLOCK)):
            rng = np.random.default_rng([self.seed, self.epoch + 1, part, block_number])
            for i in rng.permutation(len(block))[skip_in_block:]:
                yield self._entry(part, block_number * self.SHUFFLE_BLOCK + int(i), block[i])
            block_number, skip_in_block = block_number + 1, 0

    def _entry(self, part: int, number: int, row: dict):
        value = row.get(self.cfg.image_column)
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        return f"part{part}:{number}", value, row.get(self.cfg.caption_column)


def hf_streaming_samples(cfg, seed: int, epoch: int, start: dict | None = None) -> HFStreamSamples:
    """The rows of a streaming Hugging Face dataset for `epoch`, from the start or from a position."""
    return HFStreamSamples(cfg, seed, epoch, start)


class StreamingDataset(IterableDataset):
    """Batches of checked, preprocessed samples from a stream; each batch from one bucket.

    `batch_size` is the size of a batch for all processes together (per-process batch x processes).
    `samples_fn(epoch)` gives the epoch's samples; with `positions`, `samples_fn(epoch, start)` gives them from a
    position its iterable recorded (`.position`, see `ShardSamples`), and the stream can resume exactly mid-epoch.
    """

    def __init__(self, samples_fn, dataset, cfg, batch_size: int, seed: int = 0, positions: bool = False):
        self.samples_fn, self.dataset, self.cfg = samples_fn, dataset, cfg  # `dataset`: a TextImageDataset
        self.batch_size, self.seed, self.epoch, self.positions = batch_size, seed, 0, positions
        self.buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio) if cfg.bucketing else None
        self.resume_at = None  # a saved position the next iteration starts at (`load_state_dict`)
        self.live = None  # the iteration under way: its source, bucket buffers and pending skipped reasons

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        """Where the stream stands after the batches yielded so far; {} without positions or before any batch.

        The source's position, and the samples read but not yet yielded: raw (key, image bytes, caption), bucket by
        bucket in order, so that a resumed stream trains on each exactly once; and the skipped reasons that travel
        with the next batch.
        """
        live = self.live
        if not self.positions or live is None:
            return {}
        return {"epoch": live.epoch, "batches": live.batches, "source": dict(live.source.position),
                "buffers": [(size, [raw for raw, _ in entries]) for size, entries in live.buffers.items()],
                "skipped": list(live.skipped)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Start the next iteration at a position from `state_dict` (in its epoch)."""
        self.epoch, self.resume_at = state["epoch"], state

    def _item(self, key: str, image, caption):
        """One preprocessed item, or raises BadItem."""
        if isinstance(image, BadItem):
            raise image
        captions = check_captions(caption)
        if image is None:
            raise BadItem("missing_file")
        if isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            image = decode_image(image, self.cfg.max_image_pixels, formats=self.cfg.image_formats)
        width, height = image.size
        if min(width, height) < self.cfg.min_image_size:
            raise BadItem("too_small", f"{width}x{height}")
        if max(width, height) / min(width, height) > self.cfg.max_aspect_ratio:
            raise BadItem("extreme_aspect_ratio", f"{width}x{height}")
        size = self.buckets[assign_bucket(width, height, self.buckets)] if self.buckets else (self.cfg.resolution,) * 2
        index = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)  # a stable position for the keyed draws
        info = ItemInfo(index, width, height, "", captions)
        return size, self.dataset.build(self.epoch, index, info, image, size)

    def _start(self) -> SimpleNamespace:
        """The iteration's state: from the epoch's start, or from the position `load_state_dict` was given."""
        state, self.resume_at = self.resume_at, None
        if state is None:
            return SimpleNamespace(epoch=self.epoch, batches=0, source=self.samples_fn(self.epoch), buffers={},
                                   skipped=[])  # fmt: skip
        buffers = {}
        for size, raws in state["buffers"]:  # pending samples are built again from their bytes: same keyed draws
            buffers[tuple(size)] = [(raw, self._item(*raw)[1]) for raw in raws]
        return SimpleNamespace(epoch=self.epoch, batches=state["batches"], buffers=buffers,
                               source=self.samples_fn(self.epoch, state["source"]), skipped=list(state["skipped"]))  # fmt: skip

    def _batch(self, live: SimpleNamespace, entries: list) -> dict:
        """A batch of buffered (raw, item) entries, carrying the skipped reasons gathered since the last batch."""
        batch = collate([item for _, item in entries])
        batch["skipped"] = batch["skipped"] + live.skipped
        live.skipped.clear()
        live.batches += 1
        return batch

    def __iter__(self):
        # `self.live` is consistent at every `yield`: what a checkpoint taken after that batch must record.
        live = self.live = self._start()
        for key, image, caption in live.source:
            try:
                size, item = self._item(key, image, caption)
            except BadItem as error:
                live.skipped.append(error.reason)
                if len(live.skipped) == self.batch_size:  # a batch's worth of bad samples: report them (and progress)
                    yield self._batch(live, [])
                continue
            live.buffers.setdefault(size, []).append(((key, image, caption), item))
            if len(live.buffers[size]) == self.batch_size:
                yield self._batch(live, live.buffers.pop(size))
        for size in list(live.buffers):  # the end of the epoch: each bucket's last, smaller batch
            yield self._batch(live, live.buffers.pop(size))
        if live.skipped:
            yield self._batch(live, [])


class MainProcessStream:
    """Reads a streaming loader on the main process and hands every process its rows of each batch.

    Rows are split as evenly as possible (`numpy.array_split`); only a batch with fewer rows than processes
    repeats rows, so that no process is left without a batch.
    """

    def __init__(self, dataset: StreamingDataset, accelerator, num_workers: int = 0):
        self.dataset, self.accelerator, self.num_workers = dataset, accelerator, num_workers
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        if num_workers and dataset.positions:
            logger.warning("Streaming shards with `data.dataloader_num_workers` %d: a checkpoint written mid-epoch "
                           "cannot be resumed (each worker's position stays in the worker).", num_workers)  # fmt: skip

    def start_epoch(self, epoch: int) -> None:
        self.dataset.start_epoch(epoch)

    def state_dict(self) -> dict:
        """The main process's position in the stream (see `StreamingDataset.state_dict`)."""
        if self.num_workers:  # each loader worker reads its own shards into its own buffers: nothing to record here
            return {"workers": self.num_workers}
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict, epoch: int, batches: int) -> bool:
        """Start the next iteration where a checkpoint's stream stood, after `batches` batches of `epoch`.

        Returns False where no position is recorded (a checkpoint from before positions were recorded): the caller
        must read past the consumed batches. Every process takes the same decision.
        """
        if not self.dataset.positions:
            return False
        workers = max(self.num_workers, state.get("workers", 0))
        if workers:
            raise ValueError(
                "`data.dataloader_num_workers` must be 0 to resume a streamed run mid-epoch (and must have been 0 when the checkpoint was written): each loader worker keeps its "
                f"stream parts' position and buffers to itself; got {self.num_workers} now and "
                f"{state.get('workers', 0)} in the checkpoint. Resume from a checkpoint written at the end of an "
                "epoch, or start a new `output_dir` with `data.dataloader_num_workers=0`."
            )
        if not state:
            return False
        if (state["epoch"], state["batches"]) != (epoch, batches):
            raise ValueError(
                f"`checkpointing.resume_from_checkpoint`: the stream position is after batch {state['batches']} of "
                f"epoch {state['epoch']}, the training state after batch {batches} of epoch {epoch}; got a "
                "checkpoint whose parts disagree."
            )
        self.dataset.load_state_dict(state)
        return True

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
