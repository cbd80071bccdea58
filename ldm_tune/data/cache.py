"""On-disk caches of VAE posteriors and text embeddings, so each image and caption is encoded once.

Keys make a stale cache impossible to hit: a latent file is named by the SHA-256 of the image bytes and the crop
size, inside a folder named by a fingerprint of the VAE weights and the preprocessing settings; a text file by the
SHA-256 of the caption inside a folder named by the text encoder and tokenizer. Each file is written to a
temporary name and renamed, so a cache left by an interrupted run holds only complete files and is reused.
Under several processes each fills its own share (item i goes to process i mod N), then all wait.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ldm_tune.data.images import BadItem
from ldm_tune.data.transforms import preprocess


def model_fingerprint(model: torch.nn.Module, extra: object = None) -> str:
    """SHA-256 of a model's config and weights (and `extra`): changes when any weight does."""
    digest = hashlib.sha256(json.dumps(getattr(model, "config", {}), sort_keys=True, default=str).encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class _MemoryLayer:
    """Files already read, kept in RAM up to a byte budget (first come, kept; then read from disk).

    A cached step reads one small file per item: ~10 ms of a 70 ms step for the demo's 8x8 latents. Each DataLoader
    worker holds its own copy, so the budget is per worker.
    """

    def __init__(self, budget_mib: float):
        self.budget, self.used, self.tensors = int(budget_mib * 2**20), 0, {}

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        tensors = self.tensors.get(path)
        if tensors is None:
            tensors = load_file(str(path))
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if self.used + size <= self.budget:
                self.tensors[path], self.used = tensors, self.used + size
        return tensors


def _save_atomic(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class LatentCache:
    """Posterior mean and std of each (image, crop size), plus the flipped image's when flips are used."""

    def __init__(self, root: Path, vae_fingerprint: str, settings: dict, memory_mib: float = 0):
        key = hashlib.sha256(json.dumps([vae_fingerprint, settings], sort_keys=True).encode()).hexdigest()[:20]
        self.folder, self.with_flip = Path(root) / "latents" / key, bool(settings.get("random_flip"))
        self.memory = _MemoryLayer(memory_mib)

    def path(self, sha256: str, size: tuple[int, int]) -> Path:
        return self.folder / sha256[:2] / f"{sha256}-{size[0]}x{size[1]}.safetensors"

    def has(self, sha256: str, size: tuple[int, int]) -> bool:
        return self.path(sha256, size).is_file()

    def load(self, sha256: str, size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self.memory.load(self.path(sha256, size))
        suffix = "_flip" if flip else ""
        return tensors["mean" + suffix], tensors["std" + suffix]

    def save(self, sha256: str, size: tuple[int, int], tensors: dict) -> None:
        _save_atomic(tensors, self.path(sha256, size))


class TextCache:
    """The text encoder's last hidden state for each caption."""

    def __init__(self, root: Path, fingerprint: str, memory_mib: float = 0):
        self.folder = Path(root) / "text" / fingerprint[:20]
        self.memory = _MemoryLayer(memory_mib)

    def path(self, caption: str) -> Path:
        sha = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.folder / sha[:2] / f"{sha}.safetensors"

    def has(self, caption: str) -> bool:
        return self.path(caption).is_file()

    def load(self, caption: str) -> torch.Tensor:
        return self.memory.load(self.path(caption))["hidden"]

    def save(self, caption: str, hidden: torch.Tensor) -> None:
        _save_atomic({"hidden": hidden}, self.path(caption))


@torch.no_grad()
def fill_latent_cache(cache: LatentCache, dataset, vae, batch_size: int, rank: int = 0, world: int = 1,
                      progress: bool = True) -> int:  # fmt: skip
    """Encode this process's share of missing latents; returns how many images were encoded."""
    todo = defaultdict(list)  # size -> positions
    for position, item in enumerate(dataset.items):
        if position % world == rank and not cache.has(item.sha256, dataset.sizes[position]):
            todo[dataset.sizes[position]].append(position)
    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=total, desc="caching latents", disable=not progress or total == 0)
    encoded = 0
    for size, positions in todo.items():
        for start in range(0, len(positions), batch_size):
            chunk, pixels = [], []
            for position in positions[start : start + batch_size]:
                try:
                    image, _ = dataset.source.load(dataset.items[position].index)
                except BadItem:
                    continue  # changed since the scan; the dataset skips it at load time too
                base = preprocess(image, size, True, False, np.random.default_rng(0), dataset.interpolation)
                chunk.append(position)
                pixels.append(base)
            if not chunk:
                continue
            batch = torch.stack(pixels).to(vae.device, vae.dtype)
            variants = {"": vae.encode(batch).latent_dist}
            if cache.with_flip:
                variants["_flip"] = vae.encode(torch.flip(batch, dims=[3])).latent_dist
            for row, position in enumerate(chunk):
                tensors = {}
                for suffix, dist in variants.items():
                    tensors["mean" + suffix] = dist.mean[row].float().cpu()
                    tensors["std" + suffix] = dist.std[row].float().cpu()
                cache.save(dataset.items[position].sha256, size, tensors)
            encoded += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return encoded


@torch.no_grad()
def fill_text_cache(cache: TextCache, captions: list[str], tokenizer, text_encoder, batch_size: int,
                    rank: int = 0, world: int = 1, progress: bool = True) -> int:  # fmt: skip
    """Encode this process's share of missing captions; returns how many were encoded."""
    todo = [c for i, c in enumerate(sorted(set(captions))) if i % world == rank and not cache.has(c)]
    for start in tqdm(range(0, len(todo), batch_size), desc="caching text", disable=not progress or not todo):
        chunk = todo[start : start + batch_size]
        ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)  # fmt: skip
        hidden = text_encoder(ids, return_dict=False)[0]
        for caption, row in zip(chunk, hidden, strict=True):
            cache.save(caption, row.float().cpu())
    return len(todo)
