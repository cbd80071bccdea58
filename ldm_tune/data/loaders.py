"""The trainer's data loaders: checked items, keyed datasets, bucket batch samplers and the optional caches."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader

from ldm_tune.components import vae_scale_factor
from ldm_tune.config import TrainConfig
from ldm_tune.data.buckets import BucketBatchSampler
from ldm_tune.data.cache import LatentCache, TextCache, fill_latent_cache, fill_text_cache, model_fingerprint
from ldm_tune.data.cache_policy import (
    FLOAT_BYTES,
    free_bytes,
    latent_choice,
    record_choices,
    resumed_choices,
    samples_seen,
    text_choice,
)
from ldm_tune.data.dataset import VALIDATION_EPOCH, TextImageDataset, collate
from ldm_tune.data.download import download_options
from ldm_tune.data.pipeline import PreparedData, default_cache_dir, prepare_data
from ldm_tune.data.streaming import (
    MainProcessStream,
    StreamingDataset,
    expand_shards,
    hf_streaming_samples,
    webdataset_samples,
)


logger = logging.getLogger(__name__)


@dataclass
class Loaders:
    train: DataLoader | MainProcessStream  # a stream has no length and is not prepared by Accelerate
    sampler: BucketBatchSampler | MainProcessStream  # what `start_epoch` is called on
    validation: DataLoader | None
    data: PreparedData
    latents_encoded: int = 0  # images encoded into the latent cache by this process in this run
    texts_encoded: int = 0


def _datasets(config: TrainConfig, data: PreparedData, tokenizer):
    d = config.data
    common = {"tokenizer": tokenizer, "seed": config.seed, "interpolation": d.image_interpolation_mode}
    train = TextImageDataset(data.train.source, data.train.items, data.train.sizes, center_crop=d.center_crop,
                             random_flip=d.random_flip, caption_dropout=d.caption_dropout, **common)  # fmt: skip
    validation = None
    if data.validation is not None:
        v = data.validation
        validation = TextImageDataset(v.source, v.items, v.sizes, center_crop=True, **common)
    return train, validation


def _distinct_images(dataset: TextImageDataset) -> SimpleNamespace:
    """The dataset's distinct (image, crop size) pairs, for the latent cache.

    A repeated item (`data.repeats`, DreamBooth's instance/class repeats) sits at several positions; encoding each
    once keeps processes from encoding the same image twice.
    """
    distinct = {}
    for item, size in zip(dataset.items, dataset.sizes, strict=True):
        distinct.setdefault((item.sha256, size), item)
    return SimpleNamespace(source=dataset.source, interpolation=dataset.interpolation,
                           items=list(distinct.values()), sizes=[size for _, size in distinct])  # fmt: skip


def _measured_choices(config, train_items: int, datasets, num_processes: int, vae, tokenizer, text_encoder) -> dict:
    """The cache choices for this run's data (ldm_tune.data.cache_policy): what each cache would encode and store."""
    d = config.data
    streamed = d.streaming or d.train_shards is not None
    seen = 0 if streamed else samples_seen(config, train_items, num_processes)
    free = free_bytes(Path(d.cache_dir or default_cache_dir()))
    flips = 2 if d.random_flip else 1
    images = [_distinct_images(dataset) for dataset in datasets]
    latent_bytes = 0
    if vae is not None:  # pixel space has none
        factor, channels = vae_scale_factor(vae), vae.config.latent_channels
        latent_bytes = sum(2 * channels * (w // factor) * (h // factor) * FLOAT_BYTES * flips
                           for distinct in images for w, h in distinct.sizes)  # fmt: skip
    captions = {""} | {c for dataset in datasets for item in dataset.items for c in item.captions}
    text_bytes = 0
    if text_encoder is not None:
        text_bytes = len(captions) * tokenizer.model_max_length * text_encoder.config.hidden_size * FLOAT_BYTES
    return {
        "latents": latent_choice(config, sum(len(x.items) for x in images) * flips, latent_bytes, seen, free),
        "text": text_choice(config, len(captions), text_bytes, seen, free),
    }


def _choose_caches(config, accelerator, train, datasets, vae, tokenizer, text_encoder) -> dict:
    """Settle `data.cache_latents` / `data.cache_text_embeddings` left unset: the main process decides (its disk is
    measured; a resumed run keeps its first choice) and every process takes its decision."""
    choices = None
    if accelerator.is_main_process:
        choices = resumed_choices(config) or _measured_choices(
            config, len(train.items), datasets, accelerator.num_processes, vae, tokenizer, text_encoder
        )
        record_choices(config, choices)
        for kind, choice in choices.items():
            logger.info("%s cache %s: %s.", kind, "on" if choice.on else "off", choice.reason)
    if accelerator.num_processes > 1:
        choices = broadcast_object_list([choices], from_process=0)[0]
    config.data.cache_latents, config.data.cache_text_embeddings = choices["latents"].on, choices["text"].on
    return {kind: asdict(choice) for kind, choice in choices.items()}


def _fill_caches(config, datasets, accelerator, tokenizer, vae, text_encoder, weight_dtype):
    """Encode what is missing (each process its share), then point the datasets at the caches."""
    d = config.data
    root = Path(d.cache_dir or default_cache_dir())
    rank, world, progress = accelerator.process_index, accelerator.num_processes, accelerator.is_local_main_process
    latents = texts = 0
    if d.cache_latents:
        settings = {"interpolation": d.image_interpolation_mode, "random_flip": d.random_flip, "crop": "center",
                    "dtype": str(weight_dtype)}  # fmt: skip
        cache = LatentCache(root, model_fingerprint(vae), settings, d.cache_memory_mib)
        for dataset in datasets:
            latents += fill_latent_cache(cache, _distinct_images(dataset), vae, d.cache_batch_size, rank, world,
                                         progress)  # fmt: skip
            dataset.latent_cache = cache
    if d.cache_text_embeddings:
        cache = TextCache(root, model_fingerprint(text_encoder, extra=tokenizer.model_max_length), d.cache_memory_mib)
        # Every caption an item can draw, plus the empty one that caption dropout and CFG use.
        captions = [""] + [c for dataset in datasets for item in dataset.items for c in item.captions]
        texts = fill_text_cache(cache, captions, tokenizer, text_encoder, d.cache_batch_size, rank, world, progress)
        for dataset in datasets:
            dataset.text_cache = cache
    accelerator.wait_for_everyone()
    return latents, texts


def stream_loader(config: TrainConfig, accelerator, train: TextImageDataset) -> MainProcessStream:
    """The loader of a streamed training source (WebDataset shards or a streaming HF dataset)."""
    d = config.data
    if d.train_shards is not None:
        shards = expand_shards(d.train_shards, tuple(d.allowed_networks))
        download = download_options(d)

        def samples(epoch, start=None):  # shards record positions: a resumed stream starts where it stood
            return webdataset_samples(shards, d.caption_column, config.seed, epoch, start,
                                      max_member_bytes=d.max_download_bytes, download=download)  # fmt: skip
    else:

        def samples(epoch, start=None):  # data files and row offsets: positions as for shards
            return hf_streaming_samples(d, config.seed, epoch, start)

    size = config.training.train_batch_size * accelerator.num_processes
    dataset = StreamingDataset(samples, train, d, size, config.seed, positions=True)
    return MainProcessStream(dataset, accelerator, d.dataloader_num_workers)


def build_loaders(config: TrainConfig, accelerator, tokenizer, vae, text_encoder, weight_dtype) -> Loaders:
    """Prepare the data (main process first), write the report, fill caches, and build the loaders."""
    d, t = config.data, config.training
    streaming = d.train_shards is not None or d.streaming
    with accelerator.main_process_first():
        data = prepare_data(d, tokenizer, config.seed, progress=accelerator.is_local_main_process,
                            reuse_failures=not accelerator.is_main_process, train=not streaming,
                            dreambooth=config.dreambooth)  # fmt: skip
    if accelerator.is_main_process:
        if not streaming:
            logger.info("%s", data.report.format("training data"))
        output = Path(config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        reports = {"train": data.report.to_dict() if not streaming else "streamed: counted during training"}
        if data.validation_report is not None:
            reports["validation"] = data.validation_report.to_dict()
    train, validation = _datasets(config, data, tokenizer)
    datasets = ([] if streaming else [train]) + ([validation] if validation is not None else [])
    caches = _choose_caches(config, accelerator, train, datasets, vae, tokenizer, text_encoder)
    if accelerator.is_main_process:
        (output / "data_report.json").write_text(json.dumps({**reports, "caches": caches}, indent=2))
    latents, texts = _fill_caches(config, datasets, accelerator, tokenizer, vae, text_encoder, weight_dtype)
    if streaming:
        loader = sampler = stream_loader(config, accelerator, train)
    else:
        sampler = BucketBatchSampler(data.train.buckets, t.train_batch_size, config.seed, accelerator.num_processes)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate, num_workers=d.dataloader_num_workers)
    val_loader = None
    if validation is not None:
        val_sampler = BucketBatchSampler(data.validation.buckets, config.validation.validation_batch_size or
                                         t.train_batch_size, config.seed, accelerator.num_processes, shuffle=False,
                                         epoch=VALIDATION_EPOCH)  # fmt: skip
        val_loader = DataLoader(validation, batch_sampler=val_sampler, collate_fn=collate,
                                num_workers=d.dataloader_num_workers)  # fmt: skip
    return Loaders(loader, sampler, val_loader, data, latents, texts)
