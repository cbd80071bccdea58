"""Fetch one URL, safely and within bounds: the one network path of image downloads and of streamed shards.

Only http(s); every hop's host is resolved once, its addresses judged by the network policy (public internet, or
inside `allowed_networks`; never link-local or cloud metadata) and the connection pinned to them, so a second lookup
cannot point it elsewhere (see `netpolicy` and `connections`). Redirects are followed by hand so each hop is
checked. Nothing comes from the environment (proxies, .netrc) unless `use_env_proxies`. The decoded body is capped
at `max_bytes` and the whole URL (DNS, connects, all attempts, hops and pauses) at `total_timeout` seconds, enforced
by a watchdog that closes the connection: a server that trickles bytes cannot hold a worker for ever.

Kept apart from `download` (the cache and the many-URL driver) and `remote` (a response read as a file), which both
build on it.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin

import requests
from PIL import Image
from urllib3 import exceptions as urllib3_errors

from ldm_tune.data.connections import WATCHDOG, Guard, new_session, pinned
from ldm_tune.data.netpolicy import DownloadError, IPNetwork, parse_networks, vet


MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CHUNK_SIZE = 64 * 1024
# Only raster formats worth training on. It also keeps untrusted bytes away from decoders with a larger attack
# surface (EPS would run Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tiff"}  # other formats use their lower-case PIL name
RETRYABLE = frozenset({"timeout", "connection_error", "http_429"})


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


def download_options(cfg) -> DownloadOptions:
    """The `DownloadOptions` of a data config (`ldm_tune.config.DataConfig`)."""
    return DownloadOptions(connect_timeout=cfg.download_timeout, read_timeout=cfg.download_timeout,
                           total_timeout=cfg.download_total_timeout, retries=cfg.download_retries,
                           max_bytes=cfg.max_download_bytes, allowed_networks=tuple(cfg.allowed_networks),
                           use_env_proxies=cfg.use_env_proxies)  # fmt: skip


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
    Sessions come from `connections.new_session`: pinned connections, nothing from the environment, no cookies."""

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
