"""Download images from URLs into a content-addressed cache: safely, within bounds, and each URL only once.

Every URL ends either as a local file or as a short failure reason, never as an exception:
`invalid_url`, `private_address`, `dns_error`, `timeout`, `connection_error`, `http_<code>`, `too_many_redirects`,
`too_large`, `not_an_image`.

Safety and bounds: only http(s); every hop's host is resolved and refused when it points at a private, loopback,
link-local, multicast, reserved or unspecified address (server-side request forgery); redirects are followed by
hand so each hop is checked; the body is capped at `max_bytes` and the whole URL (all attempts, hops and pauses)
at `total_timeout` seconds, so a server that trickles bytes cannot hold a worker for ever.

Storage: `cache_dir/objects/<sha256[:2]>/<sha256>.<ext>`, written under a temporary name then renamed, and
`cache_dir/index.jsonl` mapping each URL to its object, so a later call returns known URLs without a request.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin

import requests
from PIL import Image
from tqdm.auto import tqdm
from urllib3 import exceptions as urllib3_errors
from urllib3.util import parse_url


INDEX_NAME = "index.jsonl"
OBJECTS_DIR = "objects"
MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CHUNK_SIZE = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
# Only raster formats worth training on. It also keeps untrusted bytes away from decoders with a larger attack
# surface (EPS would run Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tiff"}  # other formats use their lower-case PIL name
RETRYABLE = frozenset({"timeout", "connection_error", "http_429"})


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


class _Failure(Exception):
    """The final outcome of one URL; raised anywhere in its fetch and caught once, at the per-URL boundary."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DownloadOptions:
    """The bounds and safety switch of one fetch; the defaults are those of `download_images`."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 20 * 2**20
    allow_private_urls: bool = False


# --- address checks ---------------------------------------------------------------------------------------------


def _is_disallowed_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for addresses a downloader of untrusted URLs must not reach: anything not on the public internet."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel, whatever the IPv6 flags say
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        # Also refuse what is neither private nor global, e.g. 100.64.0.0/10, where some clouds put metadata.
        or not ip.is_global
    )


def _target(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) as requests/urllib3 will see them, or `invalid_url`."""
    # Parse with the same code that will open the connection, so the checked host is the connected host
    # (for 'http://127.0.0.1:80\\@a.com/' urllib.parse says a.com, but urllib3 connects to 127.0.0.1).
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        parsed = parse_url(prepared.url)
    except (requests.RequestException, urllib3_errors.HTTPError, ValueError):
        raise _Failure("invalid_url") from None
    scheme = (parsed.scheme or "").lower()
    host = (parsed.host or "").strip("[]")
    if scheme not in DEFAULT_PORTS or not host:
        raise _Failure("invalid_url")
    return scheme, host, parsed.port or DEFAULT_PORTS[scheme]


def _check_target(url: str, allow_private: bool) -> None:
    """Refuse a URL that is not http(s), whose host does not resolve, or (unless allowed) resolves privately."""
    _, host, port = _target(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError:  # e.g. a host with a NUL byte or an over-long IDNA label
        raise _Failure("invalid_url") from None
    except OSError:
        raise _Failure("dns_error") from None
    if allow_private:
        return
    for info in infos:
        # Refuse if ANY address is private: the connection may use any of them.
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if _is_disallowed_ip(ip):
            raise _Failure("private_address")


def check_url(url: str, allow_private: bool = False) -> str | None:
    """The reason `url` may not be fetched (`invalid_url`, `dns_error`, `private_address`), or None when it may."""
    try:
        _check_target(url, allow_private)
    except _Failure as failure:
        return failure.reason
    return None


# --- network ----------------------------------------------------------------------------------------------------


class SessionPool:
    """One `requests.Session` per worker thread (a Session is not thread-safe); all closed when the call ends."""

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Accept"] = "image/*,*/*;q=0.5"
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _get(session: requests.Session, url: str, opts: DownloadOptions, deadline: float) -> requests.Response:
    """One GET (no redirects, body not read yet); timeouts are capped by what is left of the URL's deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Failure("timeout")
    timeout = (min(opts.connect_timeout, remaining), min(opts.read_timeout, remaining))
    try:
        return session.get(url, timeout=timeout, stream=True, allow_redirects=False)
    except requests.Timeout:  # before ConnectionError: ConnectTimeout is both
        raise _Failure("timeout") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema):
        raise _Failure("invalid_url") from None
    except requests.RequestException:
        raise _Failure("connection_error") from None


def _body_chunks(response: requests.Response):
    """Yield the (content-decoded) body as it arrives."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2: iter_content waits for a whole chunk, so use small ones
        yield from response.iter_content(8192)
        return
    # read1 returns whatever one socket read brings. iter_content (urllib3's stream) blocks until a whole chunk
    # has arrived, so a server trickling a few bytes per second would never reach the deadline check.
    while chunk := read1(CHUNK_SIZE, decode_content=True):
        yield chunk


def _read_body(response: requests.Response, max_bytes: int, deadline: float) -> bytes:
    """The whole body, or `too_large` / `timeout` / `connection_error` as soon as a bound is crossed."""
    length = response.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > max_bytes:
        raise _Failure("too_large")  # refuse before reading a byte
    body = bytearray()
    try:
        for chunk in _body_chunks(response):
            body += chunk
            # Counting decoded bytes also bounds a gzip bomb, which Content-Length cannot.
            if len(body) > max_bytes:
                raise _Failure("too_large")
            if time.monotonic() > deadline:
                raise _Failure("timeout")
    except (urllib3_errors.TimeoutError, requests.Timeout):
        raise _Failure("timeout") from None
    except (urllib3_errors.DecodeError, requests.exceptions.ContentDecodingError):
        raise _Failure("not_an_image") from None  # a broken gzip/deflate/brotli body cannot be an image
    except (urllib3_errors.HTTPError, requests.RequestException, OSError):
        raise _Failure("connection_error") from None
    return bytes(body)


def _fetch_once(url: str, session: requests.Session, opts: DownloadOptions, deadline: float) -> bytes:
    """One attempt: follow up to MAX_REDIRECTS redirects by hand, checking every hop, then read the body."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        _check_target(current, opts.allow_private_urls)
        with _get(session, current, opts, deadline) as response:
            location = response.headers.get("Location")
            if response.status_code in REDIRECT_CODES and location:
                current = urljoin(current, location)
                continue
            if response.status_code >= 400:
                raise _Failure(f"http_{response.status_code}")
            return _read_body(response, opts.max_bytes, deadline)
    raise _Failure("too_many_redirects")


def _retryable(reason: str) -> bool:
    return reason in RETRYABLE or (reason.startswith("http_5") and len(reason) == 8)


def _fetch(url: str, session: requests.Session, opts: DownloadOptions) -> bytes:
    """The body of `url`, retrying transient failures with exponential backoff within one total deadline."""
    deadline = time.monotonic() + opts.total_timeout
    for attempt in range(opts.retries + 1):
        try:
            return _fetch_once(url, session, opts, deadline)
        except _Failure as failure:
            pause = opts.backoff * 2**attempt
            # Give up now, keeping the reason, when the pause would overrun the deadline anyway.
            if attempt == opts.retries or not _retryable(failure.reason) or time.monotonic() + pause >= deadline:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")  # the loop always returns or raises


def _image_extension(body: bytes) -> str:
    """The file extension for a body that fully decodes as an image, else `not_an_image`."""
    try:
        with Image.open(io.BytesIO(body), formats=IMAGE_FORMATS) as image:
            image.load()  # headers can lie; only a full decode proves the pixels are there
            fmt = image.format or ""
    except Exception:  # any decoder failure, including Image.DecompressionBombError, means unusable bytes
        raise _Failure("not_an_image") from None
    ext = EXTENSIONS.get(fmt, fmt.lower())
    return ext if ext.isalnum() else "img"


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


def fetch_image(url: object, sessions: SessionPool, opts: DownloadOptions) -> tuple[bytes, str] | str:
    """(body, extension) of one URL whose body fully decodes as an image, or its failure reason; never raises
    for a bad URL or server. The one fetch path of both `download_images` and `shards.download_to_shards`."""
    try:
        if not isinstance(url, str):
            raise _Failure("invalid_url")
        body = _fetch(url, sessions.get(), opts)
        return body, _image_extension(body)
    except _Failure as failure:
        return failure.reason


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
    allow_private_urls: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Path | str], DownloadReport]:
    """Returns url -> local file Path on success, or url -> failure reason string.

    Duplicate URLs are fetched once; URLs already in the cache's index are returned with no request.
    `total_timeout` bounds each URL as a whole (attempts, redirect hops and backoff pauses together).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    opts = DownloadOptions(
        connect_timeout, read_timeout, total_timeout, retries, backoff, max_bytes, allow_private_urls
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
