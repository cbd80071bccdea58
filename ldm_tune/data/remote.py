"""Remote files as streams: `open_url` reads one URL (a tar shard of any size) as a file object, never whole.

It opens the URL through the same policy and retries as the image downloads (`fetch`), then hands the body out read
by read. Kept apart from `fetch`, whose bodies are bounded and read whole within one deadline: here the deadline is
armed around each read instead, so a slow consumer is not a stalled server.
"""

from __future__ import annotations

import io
import time

from ldm_tune.data.connections import WATCHDOG, Guard, new_session
from ldm_tune.data.fetch import CHUNK_SIZE, DownloadOptions, _failure, _open, _retrying
from ldm_tune.data.netpolicy import DownloadError


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
