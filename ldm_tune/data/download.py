"""Download images from URLs into a content-addressed cache: each URL only once, many at a time.

Every URL ends either as a local file or as a short failure reason, never as an exception:
`invalid_url`, `private_address`, `dns_error`, `timeout`, `connection_error`, `http_<code>`, `too_many_redirects`,
`too_large`, `not_an_image`.

Storage: `cache_dir/objects/<sha256[:2]>/<sha256>.<ext>`, written under a temporary name then renamed, and
`cache_dir/index.jsonl` mapping each URL to its object, so a later call returns known URLs without a request.

This module is the cache and the many-URL driver. The fetch of one URL (network policy, redirects, retries, size
and time bounds) is `fetch`, and `open_url`, which streams one URL (a tar shard of any size) through the same
policy as a file object, is `remote`; the names callers use from them are importable from here as well.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ldm_tune.data.fetch import MAX_REDIRECTS as MAX_REDIRECTS  # re-exported: callers import it from here
from ldm_tune.data.fetch import DownloadOptions, SessionPool, check_url, fetch_image
from ldm_tune.data.fetch import download_options as download_options  # re-exported: callers import it from here
from ldm_tune.data.netpolicy import DownloadError, parse_networks
from ldm_tune.data.remote import open_url


__all__ = ["DownloadError", "DownloadOptions", "DownloadReport", "SessionPool", "check_url", "download_images",
           "fetch_image", "open_url", "parse_networks"]  # fmt: skip

INDEX_NAME = "index.jsonl"
OBJECTS_DIR = "objects"


@dataclass
class DownloadReport:
    """What one `download_images` call did: counts of downloads, cache hits, and failures by reason."""

    downloaded: int = 0
    cached: int = 0
    failed: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        """One line, e.g. 'downloaded 3, cached 5, failed 2 (http_404: 1, timeout: 1)'."""
        text = f"downloaded {self.downloaded}, cached {self.cached}, failed {sum(self.failed.values())}"
        if self.failed:
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.failed.items())) + ")"
        return text


# --- cache ------------------------------------------------------------------------------------------------------


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder: `path` is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # unique: two threads may store the same object
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # so the rename never publishes a file whose data is still only in the page cache
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Cache:
    """The objects folder and the URL index of one cache_dir."""

    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / INDEX_NAME
        self._lock = threading.Lock()
        self._entries = self._load_index()

    def _object_path(self, rel: object) -> Path | None:
        # The index is a plain file: accept only paths of the shape we write, never one leaving cache_dir.
        if not isinstance(rel, str):
            return None
        parts = PurePosixPath(rel).parts
        if len(parts) != 3 or parts[0] != OBJECTS_DIR or ".." in parts:
            return None
        return self.root.joinpath(*parts)

    def _load_index(self) -> dict[str, Path]:
        entries: dict[str, Path] = {}
        if not self.index_path.is_file():
            return entries
        last = b"\n"
        with open(self.index_path, "rb") as f:
            for line in f:
                last = line
                try:
                    record = json.loads(line)
                    url, path = record["url"], self._object_path(record["path"])
                except (ValueError, TypeError, KeyError):
                    continue  # a line cut short by an interrupted run
                if isinstance(url, str) and path is not None:
                    entries[url] = path
        if not last.endswith(b"\n"):
            # End the cut-short line, or the next record would be glued onto it and lost too.
            with open(self.index_path, "ab") as f:
                f.write(b"\n")
        return entries

    def lookup(self, url: str) -> Path | None:
        """The object of a URL downloaded before, if its file still exists."""
        path = self._entries.get(url)
        return path if path is not None and path.is_file() else None

    def store(self, url: str, body: bytes, ext: str) -> Path:
        """Save the body (once per content) and record the URL in the index."""
        digest = hashlib.sha256(body).hexdigest()
        rel = f"{OBJECTS_DIR}/{digest[:2]}/{digest}.{ext}"
        path = self.root / rel
        if not path.is_file():
            _write_atomically(path, body)
        line = json.dumps({"url": url, "sha256": digest, "path": rel}) + "\n"
        with self._lock:
            with open(self.index_path, "a", encoding="utf-8") as f:
                f.write(line)
            self._entries[url] = path
        return path


# --- driver -----------------------------------------------------------------------------------------------------


def _download_one(url: str, cache: _Cache, sessions: SessionPool, opts: DownloadOptions) -> Path | str:
    """The cached path of one URL, or its failure reason."""
    outcome = fetch_image(url, sessions, opts)
    if isinstance(outcome, str):
        return outcome
    body, ext = outcome
    return cache.store(url, body, ext)


def download_images(
    urls: list[str],
    cache_dir: str | Path,
    *,
    workers: int = 8,
    connect_timeout: float = 5.0,
    read_timeout: float = 10.0,
    total_timeout: float = 30.0,
    retries: int = 2,
    backoff: float = 0.5,
    max_bytes: int = 20 * 2**20,
    allowed_networks: Sequence[str] = (),
    use_env_proxies: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Path | str], DownloadReport]:
    """Returns url -> local file Path on success, or url -> failure reason string.

    Duplicate URLs are fetched once; URLs already in the cache's index are returned with no request.
    `total_timeout` bounds each URL as a whole (attempts, redirect hops and backoff pauses together).
    `allowed_networks` and `use_env_proxies`: see `DownloadOptions`.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    opts = DownloadOptions(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        total_timeout=total_timeout,
        retries=retries,
        backoff=backoff,
        max_bytes=max_bytes,
        allowed_networks=allowed_networks,
        use_env_proxies=use_env_proxies,
    )
    cache = _Cache(Path(cache_dir))
    unique = list(dict.fromkeys(urls))
    results: dict[str, Path | str] = {}
    report = DownloadReport()
    pending = []
    for url in unique:
        path = cache.lookup(url) if isinstance(url, str) else None
        if path is not None:
            results[url] = path
            report.cached += 1
        else:
            pending.append(url)

    sessions = SessionPool()
    bar = tqdm(total=len(unique), initial=report.cached, desc="downloading", unit="img", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(_download_one, url, cache, sessions, opts): url for url in pending}
        for future in as_completed(futures):
            outcome = future.result()
            results[futures[future]] = outcome
            if isinstance(outcome, Path):
                report.downloaded += 1
            else:
                report.failed[outcome] += 1
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # do not start queued URLs after an error or Ctrl-C
        raise
    finally:
        pool.shutdown(wait=True)
        sessions.close()
        bar.close()
    return {url: results[url] for url in unique}, report
