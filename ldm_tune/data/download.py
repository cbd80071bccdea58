"""Download images from URLs into a content-addressed cache: safely, within bounds, and each URL only once.

Every URL ends either as a local file or as a short failure reason, never as an exception:
`invalid_url`, `private_address`, `dns_error`, `timeout`, `connection_error`, `http_<code>`, `too_many_redirects`,
`too_large`, `not_an_image`.

Safety and bounds: only http(s); every hop's host is resolved once, its addresses judged by the network policy
(public internet, or inside `allowed_networks`; never link-local or cloud metadata) and the connection pinned to
them, so a second lookup cannot point it elsewhere (see `netpolicy`). Redirects are followed by hand so each hop
is checked. Nothing comes from the environment (proxies, .netrc) unless `use_env_proxies`. The decoded body is
capped at `max_bytes` and the whole URL (DNS, connects, all attempts, hops and pauses) at `total_timeout` seconds,
enforced by a watchdog that closes the connection: a server that trickles bytes cannot hold a worker for ever.

Storage: `cache_dir/objects/<sha256[:2]>/<sha256>.<ext>`, written under a temporary name then renamed, and
`cache_dir/index.jsonl` mapping each URL to its object, so a later call returns known URLs without a request.

`open_url` streams one URL (a tar shard of any size) through the same policy, as a file object.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin

import requests
from PIL import Image
from tqdm.auto import tqdm
from urllib3 import exceptions as urllib3_errors

from ldm_tune.data.netpolicy import (
    WATCHDOG,
    DownloadError,
    Guard,
    IPNetwork,
    new_session,
    parse_networks,
    pinned,
    vet,
)


__all__ = ["DownloadError", "DownloadOptions", "DownloadReport", "SessionPool", "check_url", "download_images",
           "fetch_image", "open_url", "parse_networks"]  # fmt: skip

INDEX_NAME = "index.jsonl"
OBJECTS_DIR = "objects"
MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CHUNK_SIZE = 64 * 1024
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


@dataclass(frozen=True)
class DownloadOptions:
    """The bounds and network policy of one fetch; the defaults are those of `download_images`.

    `allowed_networks`: CIDR networks (e.g. `("127.0.0.0/8",)` for a mirror on this machine) whose non-public
    addresses may be reached; the public internet always may, link-local and cloud metadata addresses never (see
    `netpolicy.parse_networks`). Stored normalised ('127.0.0.1' becomes '127.0.0.1/32'); a bad entry is a
    ValueError here.

    `use_env_proxies`: send requests through the proxies of the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, as
    requests reads them; never .netrc credentials). The address check still runs on what this machine resolves,
    but it is the proxy that resolves and connects: it cannot protect the network behind the proxy (a name the
    proxy resolves to an internal address, a rebinding answer), so only use a proxy that applies its own policy.
    """

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 20 * 2**20
    allowed_networks: tuple[str, ...] = ()
    use_env_proxies: bool = False
    networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        networks = parse_networks(self.allowed_networks)
        object.__setattr__(self, "networks", networks)  # frozen: set once, here
        object.__setattr__(self, "allowed_networks", tuple(str(n) for n in networks))


def check_url(url: str, allowed_networks: Sequence[str] = (), *, timeout: float = 10.0) -> str | None:
    """The reason `url` may not be fetched (`invalid_url`, `dns_error`, `private_address`, `timeout`), or None when
    it may: the first hop's check of a download, without a request. Its redirects are checked when fetched."""
    try:
        vet(url, parse_networks(allowed_networks), timeout)
    except DownloadError as failure:
        return failure.reason
    return None


# --- network ----------------------------------------------------------------------------------------------------


class SessionPool:
    """One `requests.Session` per worker thread (a Session is not thread-safe); all closed when the call ends.
    Sessions come from `netpolicy.new_session`: pinned connections, nothing from the environment, no cookies."""

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = new_session()
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


def _failure(error: BaseException, guard: Guard, decode_reason: str) -> DownloadError:
    """The reason of a requests/urllib3/socket error; `timeout` whenever the watchdog had cut the connection."""
    if isinstance(error, DownloadError):
        return error
    if guard.fired or isinstance(error, (requests.Timeout, urllib3_errors.TimeoutError, TimeoutError)):
        return DownloadError("timeout")  # Timeout before ConnectionError: ConnectTimeout is both
    if isinstance(error, (urllib3_errors.DecodeError, requests.exceptions.ContentDecodingError)):
        return DownloadError(decode_reason)
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                          requests.exceptions.InvalidSchema)):  # fmt: skip
        return DownloadError("invalid_url")
    return DownloadError("connection_error")


def _send(session: requests.Session, url: str, opts: DownloadOptions, guard: Guard, read_timeout: float):
    """One GET of one hop (no redirects, body not read yet), connected to the addresses the policy vetted."""
    target = vet(url, opts.networks, guard.remaining())
    remaining = guard.remaining()
    if remaining <= 0:
        raise DownloadError("timeout")
    request = session.prepare_request(requests.Request("GET", target.url))
    proxies = requests.utils.get_environ_proxies(target.url) if opts.use_env_proxies else {}
    via_proxy = bool(requests.utils.select_proxy(target.url, proxies))
    try:
        with pinned(target, guard, via_proxy=via_proxy):
            response = session.send(
                request,
                stream=True,
                allow_redirects=False,
                timeout=(min(opts.connect_timeout, remaining), read_timeout),
                proxies=proxies,
            )
    except Exception as error:  # requests, urllib3 and socket errors alike
        raise _failure(error, guard, "connection_error") from None
    if guard.fired:  # cut while reading the headers: http.client takes an early end for the last header line
        response.close()
        raise DownloadError("timeout")
    return response


def _open(url: str, session: requests.Session, opts: DownloadOptions, guard: Guard, read_timeout: float):
    """The final response of `url` (status < 400, body not read), following up to MAX_REDIRECTS redirects by hand
    so that every hop is vetted."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        response = _send(session, current, opts, guard, read_timeout)
        location = response.headers.get("Location")
        if response.status_code in REDIRECT_CODES and location:
            response.close()
            current = urljoin(response.url, location)
            continue
        if response.status_code >= 400:
            response.close()
            raise DownloadError(f"http_{response.status_code}")
        return response
    raise DownloadError("too_many_redirects")


def _read_body(response: requests.Response, max_bytes: int, guard: Guard) -> bytes:
    """The whole (content-decoded) body, or `too_large` / `timeout` / `connection_error` / `not_an_image`."""
    length = response.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > max_bytes:
        raise DownloadError("too_large")  # refuse before reading a byte
    # read1 returns what one socket read brings (urllib3 >= 2.2), so memory stays within max_bytes + 1 however the
    # server sends; older urllib3 has read, which the watchdog bounds as well.
    read = getattr(response.raw, "read1", response.raw.read)
    body = bytearray()
    try:
        # Counting decoded bytes also bounds a gzip bomb, which Content-Length cannot. One byte past max_bytes is
        # asked for, to tell a body of exactly max_bytes (allowed) from a longer one.
        while chunk := read(min(CHUNK_SIZE, max_bytes + 1 - len(body)), decode_content=True):
            body += chunk
            if len(body) > max_bytes:
                raise DownloadError("too_large")
    except Exception as error:
        raise _failure(error, guard, "not_an_image") from None  # a broken gzip body cannot be an image
    guard.check()  # the watchdog's shutdown ends a read like an end of data
    return bytes(body)


def _retrying(attempt: Callable, opts: DownloadOptions, guard: Guard):
    """attempt(), again after transient failures, with exponential backoff, all within one `total_timeout`."""
    deadline = time.monotonic() + opts.total_timeout
    guard.arm(deadline)
    for n in range(opts.retries + 1):
        try:
            return attempt()
        except DownloadError as failure:
            pause = opts.backoff * 2**n
            # Give up now, keeping the reason, when the pause would overrun the deadline anyway.
            if n == opts.retries or not _retryable(failure.reason) or time.monotonic() + pause >= deadline:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")  # the loop always returns or raises


def _retryable(reason: str) -> bool:
    return reason in RETRYABLE or (reason.startswith("http_5") and len(reason) == 8)


def _fetch(url: str, session: requests.Session, opts: DownloadOptions) -> bytes:
    """The body of `url`, within its deadline whatever the server does."""

    def attempt() -> bytes:
        read_timeout = min(opts.read_timeout, max(guard.remaining(), 0.0))
        with _open(url, session, opts, guard, read_timeout) as response:
            return _read_body(response, opts.max_bytes, guard)

    with WATCHDOG.guard() as guard:
        return _retrying(attempt, opts, guard)


def _image_extension(body: bytes) -> str:
    """The file extension for a body that fully decodes as an image, else `not_an_image`."""
    try:
        with Image.open(io.BytesIO(body), formats=IMAGE_FORMATS) as image:
            image.load()  # headers can lie; only a full decode proves the pixels are there
            fmt = image.format or ""
    except Exception:  # any decoder failure, including Image.DecompressionBombError, means unusable bytes
        raise DownloadError("not_an_image") from None
    ext = EXTENSIONS.get(fmt, fmt.lower())
    return ext if ext.isalnum() else "img"


# --- streams ----------------------------------------------------------------------------------------------------


def open_url(
    url: str, opts: DownloadOptions | None = None, *, max_bytes: int | None = None, idle_timeout: float = 60.0
) -> io.BufferedReader:
    """A streamed, read-only binary file of `url` (a tar shard of any size: it is never read whole), opened through
    the same policy as the image downloads: address checks and pinning on every redirect hop, nothing from the
    environment, retries of transient failures.

    Bounds: opening (DNS, connects, redirects, response headers) within `opts.total_timeout`; then each read ends
    with an error when no byte has come for `idle_timeout` seconds, whether the server is silent or sends bytes
    that decode to nothing; time between reads does not count. `max_bytes` (None: no cap) caps the decoded body.

    Raises DownloadError (an OSError) with `.reason` among `invalid_url`, `private_address`, `dns_error`,
    `timeout`, `connection_error`, `http_<code>`, `too_many_redirects`, `too_large`, `decode_error`, from this call
    or from a read. Close the file (or use it in a `with` block) to release the connection.
    """
    opts = opts if opts is not None else DownloadOptions()
    if not idle_timeout > 0:
        raise ValueError(f"`idle_timeout` must be > 0, got {idle_timeout}.")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"`max_bytes` must be >= 0 or None, got {max_bytes}.")
    session = new_session()
    guard = WATCHDOG.guard()
    try:
        # The socket read timeout is the idle bound too: it stands between reads of the body.
        response = _retrying(lambda: _open(url, session, opts, guard, idle_timeout), opts, guard)
        length = response.headers.get("Content-Length", "").strip()
        if max_bytes is not None and length.isdigit() and int(length) > max_bytes:
            response.close()
            raise DownloadError("too_large")
    except DownloadError as failure:
        guard.close()
        session.close()
        raise DownloadError(failure.reason, url) from None
    except BaseException:
        guard.close()
        session.close()
        raise
    guard.disarm()  # armed again around each read
    raw = _ResponseStream(url, response, session, guard, max_bytes, idle_timeout)
    return io.BufferedReader(raw, buffer_size=CHUNK_SIZE)


class _ResponseStream(io.RawIOBase):
    """The decoded body of one response as a raw stream; the guard is armed only while a read waits."""

    def __init__(self, url, response, session, guard: Guard, max_bytes: int | None, idle_timeout: float):
        super().__init__()
        self.url = url
        self._response, self._session, self._guard = response, session, guard
        self._max_bytes, self._idle_timeout = max_bytes, idle_timeout
        self._read = getattr(response.raw, "read1", response.raw.read)
        self._count = 0
        self._error: DownloadError | None = None  # once failed, always failed: never a quiet early end of file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if self._error is not None:
            raise self._error
        size = len(buffer)
        if self._max_bytes is not None:
            size = min(size, self._max_bytes + 1 - self._count)  # one byte past the cap tells a longer body
        if size <= 0:
            return 0
        self._guard.arm(time.monotonic() + self._idle_timeout)
        try:
            data = self._read(size, decode_content=True)
            self._guard.check()  # a shutdown by the watchdog reads as an end of data
            self._count += len(data)
            if self._max_bytes is not None and self._count > self._max_bytes:
                raise DownloadError("too_large")
        except Exception as error:
            self._error = DownloadError(_failure(error, self._guard, "decode_error").reason, self.url)
            raise self._error from None
        finally:
            self._guard.disarm()
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
                self._session.close()
            finally:
                self._guard.close()
                super().close()


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
            raise DownloadError("invalid_url")
        body = _fetch(url, sessions.get(), opts)
        return body, _image_extension(body)
    except DownloadError as failure:
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
