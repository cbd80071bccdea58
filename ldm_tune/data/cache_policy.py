"""Whether a run caches VAE latents and text embeddings: what `data.cache_latents` / `data.cache_text_embeddings`
mean when left unset (`null`, the default).

A cache is on where it is valid and costs no more than it saves:
- valid: the encoder's output for an item is the same at every step. Not so for a VAE that trains (`stage: vae`), a
  text encoder that trains (`train_text_encoder_lora`), a random crop (`center_crop: false`), pixel space (no
  latents), a streamed source (never stored) or `verify: lazy` (sizes unknown before training);
- cheaper: filling it encodes every item once before step 1 (each image and its flip with `random_flip`; every
  caption and the empty one), where training without it encodes one per sample seen. A short run over a large
  dataset (10k steps of batch 16 over a million images) would encode a million images before step 1 to spare 160k
  encodes, so the cache is on only when the run sees at least as many samples as the cache has entries;
- and it fits: the estimated files take at most half the free space under `data.cache_dir`.
The choice and its reason are logged and written to `data_report.json`; set the key to true or false to decide.
Every process takes the main process's decision (its disk is the one measured), so they fill caches together.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path


# Cache files hold float32 (ldm_tune.data.cache): the posterior mean and std per latent, the hidden state per caption.
FLOAT_BYTES = 4


@dataclass
class CacheChoice:
    on: bool
    reason: str


def samples_seen(config, train_items: int, num_processes: int) -> int:
    """Training samples the run will draw (all processes, all accumulation steps)."""
    t = config.training
    if t.max_train_steps is None:
        return t.num_train_epochs * train_items
    return t.max_train_steps * t.train_batch_size * t.gradient_accumulation_steps * num_processes


def _pays(kind: str, entries: int, total_bytes: int, seen: int, free: int) -> CacheChoice:
    if seen < entries:
        return CacheChoice(False, f"the run sees {seen:,} samples, fewer than the {entries:,} {kind} a cache would "
                                  f"encode first")  # fmt: skip
    if 2 * total_bytes > free:
        return CacheChoice(False, f"{entries:,} {kind} take ~{total_bytes / 2**30:.1f} GiB, more than half the "
                                  f"{free / 2**30:.1f} GiB free under `data.cache_dir`")  # fmt: skip
    return CacheChoice(True, f"{entries:,} {kind} (~{total_bytes / 2**20:,.1f} MiB) for {seen:,} samples")


def latent_choice(config, encodings: int, total_bytes: int, seen: int, free: int) -> CacheChoice:
    """`encodings`: distinct (image, crop size) pairs, twice with `random_flip`; `total_bytes`: their files."""
    d = config.data
    if d.cache_latents is not None:
        return CacheChoice(d.cache_latents, "set by `data.cache_latents`")
    invalid = [(config.stage == "vae", "the VAE trains (`stage: vae`)"),
               (config.model.space == "pixel", "pixel space has no latents"),
               (d.streaming or d.train_shards is not None, "a streamed source is never stored"),
               (not d.center_crop, "a random crop (`data.center_crop: false`) changes the latent every epoch"),
               (d.verify == "lazy", "`data.verify: lazy` reads no image before training")]  # fmt: skip
    reason = next((why for bad, why in invalid if bad), None)
    if reason is not None:
        return CacheChoice(False, reason)
    return _pays("image encodings", encodings, total_bytes, seen, free)


def text_choice(config, captions: int, total_bytes: int, seen: int, free: int) -> CacheChoice:
    """`captions`: distinct captions plus the empty one; `total_bytes`: their files."""
    d = config.data
    if d.cache_text_embeddings is not None:
        return CacheChoice(d.cache_text_embeddings, "set by `data.cache_text_embeddings`")
    invalid = [(config.stage == "vae", "the VAE stage has no text"),
               (config.training.train_text_encoder_lora, "the text encoder trains (`train_text_encoder_lora`)"),
               (d.streaming or d.train_shards is not None, "a streamed source is never stored")]  # fmt: skip
    reason = next((why for bad, why in invalid if bad), None)
    if reason is not None:
        return CacheChoice(False, reason)
    return _pays("captions", captions, total_bytes, seen, free)


def free_bytes(root: Path) -> int:
    """Free space where the cache goes (its nearest existing folder)."""
    path = Path(root)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# Where a run records its choices: a resumed run reads them back, since its own cache files now take disk space that
# the first choice counted as free (and a cache turned off halfway would change the numbers an exact resume keeps).
CHOICES_FILE = "cache_choices.json"


def record_choices(config, choices: dict[str, CacheChoice]) -> None:
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHOICES_FILE).write_text(json.dumps({kind: asdict(choice) for kind, choice in choices.items()}))


def resumed_choices(config) -> dict[str, CacheChoice] | None:
    """The choices of the run being resumed, for keys still unset; None when not resuming or nothing was recorded."""
    path = Path(config.output_dir) / CHOICES_FILE
    if config.checkpointing.resume_from_checkpoint is None or not path.exists():
        return None
    recorded = json.loads(path.read_text())
    explicit = {"latents": config.data.cache_latents, "text": config.data.cache_text_embeddings}
    return {kind: CacheChoice(explicit[kind], "set by the config") if explicit[kind] is not None
            else CacheChoice(recorded[kind]["on"], f"as when this run started ({recorded[kind]['reason']})")
            for kind in ("latents", "text")}  # fmt: skip
