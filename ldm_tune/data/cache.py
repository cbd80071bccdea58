"""On-disk caches of VAE posteriors and text embeddings, so each image and caption is encoded once.

Keys make a stale cache impossible to hit: a latent file is named by the SHA-256 of the image bytes and the crop
size, inside a folder named by a fingerprint of the VAE weights and the preprocessing settings; a text file by the
SHA-256 of the caption inside a folder named by the text encoder and tokenizer. Each file is written to a
temporary name and renamed, so a cache left by an interrupted run holds only complete files and is reused.
Under several processes each fills its own share (item i goes to process i mod N), then all wait.

A file damaged after it was written (a bad disk, a copy cut short, an edit) is never trusted: before a fill, each
file's header must parse and name exactly the expected float32 tensors and shapes; when read for training, its
values must also be finite and match the CRC-32 stored in its metadata. A damaged file is moved aside to
`<name>.corrupt` (an atomic rename, so every process and loader worker sees it the same way): a read of it raises
`BadItem("corrupt_cache")` (the batch skips the item), and the next fill encodes it again. Each cache counts what
it moved aside in `discarded`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ldm_tune.data.images import BadItem
from ldm_tune.data.transforms import preprocess


logger = logging.getLogger(__name__)

# Part of every cache folder's key: version 2 files carry the CRC-32 of their tensors. Files of version 1 (no
# checksum) are in other folders and never read.
CACHE_FORMAT = 2
DAMAGED_SUFFIX = ".corrupt"
LOGGED_DISCARDS = 5  # damaged files named in the log per cache; the rest are only counted


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

    def load(self, path: Path, read) -> dict[str, torch.Tensor]:
        tensors = self.tensors.get(path)
        if tensors is None:
            tensors = read(path)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if self.used + size <= self.budget:
                self.tensors[path], self.used = tensors, self.used + size
        return tensors


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].contiguous().numpy(), crc)
    return f"{crc:08x}"


def _save_atomic(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"crc32": _checksum(tensors)})
    os.replace(tmp, path)
    path.with_name(path.name + DAMAGED_SUFFIX).unlink(missing_ok=True)  # a damaged predecessor is replaced now


class _Damaged(Exception):
    """A cache file that exists but cannot be trusted; the message says why."""


class _CacheFiles:
    """Checked reads of one cache's files: `names` are the tensors a file must hold, each float32 of `ndim`
    dimensions and all of one shape; `expected_shape(key)`, when set, is that shape."""

    names: frozenset = frozenset()
    ndim = 0

    def __init__(self, memory_mib: float):
        self.memory, self.discarded = _MemoryLayer(memory_mib), 0

    def _inspect(self, path: Path, shape: tuple | None, read: bool) -> dict[str, torch.Tensor]:
        """The tensors of the file (empty when `read` is False: the header alone is checked); raises `_Damaged`."""
        try:
            with safe_open(str(path), "pt") as handle:  # parses the header, checks it covers the file exactly
                names, metadata = set(handle.keys()), handle.metadata() or {}
                if names != self.names:
                    raise _Damaged(f"holds tensors {sorted(names)}, expected {sorted(self.names)}")
                slices = {name: handle.get_slice(name) for name in sorted(names)}
                dtypes = {s.get_dtype() for s in slices.values()}
                shapes = {tuple(s.get_shape()) for s in slices.values()}
                if dtypes != {"F32"} or len(shapes) != 1 or len(next(iter(shapes))) != self.ndim:
                    raise _Damaged(f"holds {sorted(dtypes)} tensors of shapes {sorted(shapes)}")
                if shape is not None and shapes != {tuple(shape)}:
                    raise _Damaged(f"holds tensors of shape {next(iter(shapes))}, expected {tuple(shape)}")
                # Copied out of the file's memory map: a file changed or cut on disk later cannot change (or, cut,
                # crash with SIGBUS) the tensors a batch or the memory layer holds.
                tensors = {name: handle.get_tensor(name).clone() for name in slices} if read else {}
        except (_Damaged, FileNotFoundError):
            raise
        except Exception as error:  # SafetensorError, a header that is not JSON, an I/O error, ...
            raise _Damaged(f"is unreadable ({type(error).__name__}: {error})") from error
        if read:
            if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
                raise _Damaged("holds NaN or infinite values")
            if metadata.get("crc32") != _checksum(tensors):
                raise _Damaged(f"fails its checksum (stored {metadata.get('crc32')!r})")
        return tensors

    def _discard(self, path: Path, why: str) -> None:
        self.discarded += 1
        if self.discarded <= LOGGED_DISCARDS:
            logger.warning("Cache file %s %s: moved aside to encode it again.", path, why)
        try:
            os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
        except FileNotFoundError:
            pass  # another process or loader worker moved it first

    def _valid(self, path: Path, shape: tuple | None) -> bool:
        """Whether the file exists with a sound header; a damaged one is moved aside (then False)."""
        if not path.is_file():
            return False
        try:
            self._inspect(path, shape, read=False)
            return True
        except FileNotFoundError:
            return False
        except _Damaged as error:
            self._discard(path, str(error))
            return False

    def _load(self, path: Path, shape: tuple | None) -> dict[str, torch.Tensor]:
        """The file's checked tensors; raises BadItem("corrupt_cache") for a damaged file (moved aside), and
        FileNotFoundError where no file was ever written (the cache was not filled)."""

        def read(path: Path) -> dict[str, torch.Tensor]:
            if not path.is_file() and path.with_name(path.name + DAMAGED_SUFFIX).is_file():
                raise BadItem("corrupt_cache", f"{path} was damaged and is encoded again by the next fill")
            try:
                return self._inspect(path, shape, read=True)
            except FileNotFoundError:
                raise FileNotFoundError(f"Cache file {path} does not exist: fill the cache first.") from None
            except _Damaged as error:
                self._discard(path, str(error))
                raise BadItem("corrupt_cache", f"{path} {error}") from error

        return self.memory.load(path, read)


class LatentCache(_CacheFiles):
    """Posterior mean and std of each (image, crop size), plus the flipped image's when flips are used.

    `latent_layout` = (latent channels, VAE scale factor), set by `fill_latent_cache` from the VAE, gives the
    shape each file must hold: (channels, height // factor, width // factor); unset, only the rank is checked.
    """

    ndim = 3

    def __init__(self, root: Path, vae_fingerprint: str, settings: dict, memory_mib: float = 0):
        super().__init__(memory_mib)
        key = [CACHE_FORMAT, vae_fingerprint, settings]
        key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder, self.with_flip = Path(root) / "latents" / key, bool(settings.get("random_flip"))
        self.names = frozenset({"mean", "std", "mean_flip", "std_flip"} if self.with_flip else {"mean", "std"})
        self.latent_layout: tuple[int, int] | None = None

    def path(self, sha256: str, size: tuple[int, int]) -> Path:
        return self.folder / sha256[:2] / f"{sha256}-{size[0]}x{size[1]}.safetensors"

    def shape(self, size: tuple[int, int]) -> tuple[int, int, int] | None:
        """The latent shape of a crop `size` = (width, height), when `latent_layout` is known."""
        if self.latent_layout is None:
            return None
        channels, factor = self.latent_layout
        return channels, size[1] // factor, size[0] // factor

    def has(self, sha256: str, size: tuple[int, int]) -> bool:
        """Whether a sound file is cached (a damaged one is moved aside and counted: encode it again)."""
        return self._valid(self.path(sha256, size), self.shape(size))

    def load(self, sha256: str, size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self._load(self.path(sha256, size), self.shape(size))
        suffix = "_flip" if flip else ""
        return tensors["mean" + suffix], tensors["std" + suffix]

    def save(self, sha256: str, size: tuple[int, int], tensors: dict) -> None:
        _save_atomic(tensors, self.path(sha256, size))


class TextCache(_CacheFiles):
    """The text encoder's last hidden state for each caption: (tokens, hidden size); `hidden_shape`, set by
    `fill_text_cache`, is that shape."""

    names = frozenset({"hidden"})
    ndim = 2

    def __init__(self, root: Path, fingerprint: str, memory_mib: float = 0):
        super().__init__(memory_mib)
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint]).encode()).hexdigest()[:20]
        self.folder = Path(root) / "text" / key
        self.hidden_shape: tuple[int, int] | None = None

    def path(self, caption: str) -> Path:
        sha = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.folder / sha[:2] / f"{sha}.safetensors"

    def has(self, caption: str) -> bool:
        """Whether a sound file is cached (a damaged one is moved aside and counted: encode it again)."""
        return self._valid(self.path(caption), self.hidden_shape)

    def load(self, caption: str) -> torch.Tensor:
        return self._load(self.path(caption), self.hidden_shape)["hidden"]

    def save(self, caption: str, hidden: torch.Tensor) -> None:
        _save_atomic({"hidden": hidden}, self.path(caption))


def _log_discards(cache: _CacheFiles, kind: str, before: int) -> None:
    if cache.discarded > before:
        logger.warning("%d damaged %s cache files were moved aside and encoded again.", cache.discarded - before,
                       kind)  # fmt: skip


@torch.no_grad()
def fill_latent_cache(cache: LatentCache, dataset, vae, batch_size: int, rank: int = 0, world: int = 1,
                      progress: bool = True) -> int:  # fmt: skip
    """Encode this process's share of missing (or damaged) latents; returns how many images were encoded."""
    from ldm_tune.components import vae_scale_factor

    cache.latent_layout = (vae.config.latent_channels, vae_scale_factor(vae))  # the shape every file must hold
    discarded = cache.discarded
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
    _log_discards(cache, "latent", discarded)
    return encoded


@torch.no_grad()
def fill_text_cache(cache: TextCache, captions: list[str], tokenizer, text_encoder, batch_size: int,
                    rank: int = 0, world: int = 1, progress: bool = True) -> int:  # fmt: skip
    """Encode this process's share of missing (or damaged) captions; returns how many were encoded."""

    def encode(chunk: list[str]) -> torch.Tensor:
        ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)  # fmt: skip
        return text_encoder(ids, return_dict=False)[0]

    cache.hidden_shape = tuple(encode([""]).shape[1:])  # the shape every file must hold (one short forward pass)
    discarded = cache.discarded
    todo = [c for i, c in enumerate(sorted(set(captions))) if i % world == rank and not cache.has(c)]
    for start in tqdm(range(0, len(todo), batch_size), desc="caching text", disable=not progress or not todo):
        chunk = todo[start : start + batch_size]
        for caption, row in zip(chunk, encode(chunk), strict=True):
            cache.save(caption, row.float().cpu())
    _log_discards(cache, "text", discarded)
    return len(todo)
