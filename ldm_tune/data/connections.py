"""Connections that reach only the addresses the network policy vetted, and end when their deadline passes.

Kept apart from `netpolicy`, which decides what a URL may reach: this is the machinery that enforces the decision
inside requests/urllib3, with its own watchdog thread and socket handling.

Pinning (`pinned`, `PinnedAdapter`, `new_session`). A connection dials exactly the addresses of its vetted
`netpolicy.Target`, in the resolver's order, and never resolves the host again: a name cannot answer a public
address to the check and 127.0.0.1 to the connection (DNS rebinding). The Host header, TLS SNI and the certificate
check keep the URL's name, since the pool is still keyed on it; only the dial changes.

Deadlines (`Watchdog`, `Guard`). Socket timeouts bound each wait, not a request: a server that trickles one header
byte a second, or a gzip body that decompresses to nothing, never lets one expire. A guard shuts down the sockets of
its fetch when its deadline passes, which ends any read blocked on them.
"""

from __future__ import annotations

import contextlib
import heapq
import http.cookiejar
import ipaddress
import itertools
import math
import os
import socket
import threading
import time
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, ProxyManager
from urllib3 import exceptions as urllib3_errors
from urllib3.connection import HTTPConnection, HTTPSConnection

from ldm_tune.data.netpolicy import DownloadError, Target, address_allowed


# --- deadlines --------------------------------------------------------------------------------------------------


class Guard:
    """The deadline of one fetch (or of one read of a stream) over the sockets it watches: when the deadline passes,
    the watchdog shuts them down, which ends any read or write blocked on them as if the peer had hung up.

    `arm(deadline)` sets or moves the deadline, `disarm()` suspends it (a stream between two reads), `close()` ends
    the guard. `fired` says that an error or an early end of data was the watchdog's doing: report `timeout`.
    """

    def __init__(self, watchdog: Watchdog):
        self._watchdog = watchdog
        self.deadline = math.inf
        self.fired = False
        self.closed = False
        self._sockets: list[socket.socket] = []  # duplicates of the watched sockets' descriptors
        self._token: int | None = None  # the watchdog's live heap entry for this guard, and its deadline
        self._due = math.inf

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def arm(self, deadline: float) -> None:
        self._watchdog._arm(self, deadline)

    def disarm(self) -> None:
        self._watchdog._arm(self, math.inf)

    def watch(self, sock: socket.socket) -> None:
        self._watchdog._watch(self, sock)

    def check(self) -> None:
        """Raise DownloadError `timeout` if the deadline has passed: a read that 'ended' may have been cut short."""
        if self.fired:
            raise DownloadError("timeout")

    def close(self) -> None:
        self._watchdog._close(self)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watchdog:
    """One daemon thread for all guards: a heap of deadlines, woken when an earlier one arrives. All guard state is
    changed under its one lock, so a guard cannot fire half-way through being closed."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        # Also the state of a forked child (DataLoader workers), where the parent's thread does not run and its lock
        # may have been held at the fork.
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Guard]] = []
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def guard(self, deadline: float = math.inf) -> Guard:
        guard = Guard(self)
        if deadline < math.inf:
            self._arm(guard, deadline)
        return guard

    def _arm(self, guard: Guard, deadline: float) -> None:
        with self._cond:
            if guard.closed or guard.fired:
                return
            guard.deadline = deadline
            # A later deadline needs no new entry: the live one re-queues itself when it comes due.
            if deadline < guard._due:
                self._push(guard, deadline)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="ldm-tune-watchdog", daemon=True)
                    self._thread.start()
                self._cond.notify()

    def _push(self, guard: Guard, deadline: float) -> None:
        guard._token, guard._due = next(self._tokens), deadline  # any older entry of the guard is now stale
        heapq.heappush(self._heap, (deadline, guard._token, guard))

    def _watch(self, guard: Guard, sock: socket.socket) -> None:
        with self._cond:
            if guard.closed:
                return
            # A duplicate descriptor: shutdown() acts on the socket itself, whichever descriptor is used, and the
            # number cannot be reused by another file while the guard holds it (socket.dup, dup(2), shutdown(2)).
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            guard._sockets.append(dup)
            if guard.fired:
                _shutdown(dup)

    def _close(self, guard: Guard) -> None:
        with self._cond:
            guard.closed = True
            guard._token, guard._due = None, math.inf
            for sock in guard._sockets:
                sock.close()
            guard._sockets.clear()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, token, guard = heapq.heappop(self._heap)
                    if token != guard._token:
                        continue  # superseded by an earlier deadline, or the guard is closed
                    guard._token, guard._due = None, math.inf
                    if guard.deadline <= now:
                        guard.fired = True
                        for sock in guard._sockets:
                            _shutdown(sock)
                    elif guard.deadline < math.inf:  # moved later since it was queued
                        self._push(guard, guard.deadline)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its owner: nothing left to stop
        sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WATCHDOG._reset)


# --- pinned connections -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dial:
    target: Target
    addresses: tuple[str, ...] | None  # None: through a proxy, which resolves the host itself
    guard: Guard


_dialing = threading.local()


@contextlib.contextmanager
def pinned(target: Target, guard: Guard, *, via_proxy: bool = False):
    """Within this block, a connection this thread opens for `target` dials `target.addresses` (not a new lookup) and
    is watched by `guard`. A connection opened outside any such block is refused."""
    previous = getattr(_dialing, "current", None)
    _dialing.current = _Dial(target, None if via_proxy else target.addresses, guard)
    try:
        yield
    finally:
        _dialing.current = previous


def _connect(address: str, port: int, timeout: float, socket_options, source_address) -> socket.socket:
    """A TCP connection to one literal address (no name lookup), set up as urllib3's `create_connection` does."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for option in socket_options or ():
            sock.setsockopt(*option)
        if source_address:
            sock.bind(source_address)
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedConnectionMixin:
    """A urllib3 connection that dials its fetch's vetted addresses instead of resolving its host again."""

    _pinned_address: str | None = None
    _guard: Guard | None = None

    def _new_conn(self) -> socket.socket:
        dial: _Dial | None = getattr(_dialing, "current", None)
        if dial is None:
            raise urllib3_errors.NewConnectionError(self, "refused: no vetted address (open it inside `pinned`)")
        if dial.addresses is None:
            sock = super()._new_conn()  # to the proxy, which resolves the target itself
        else:
            if _host_key(self.host) != _host_key(dial.target.host):
                raise urllib3_errors.NewConnectionError(self, f"refused: {self.host!r} is not the vetted host")
            sock = self._dial_first(dial)
        dial.guard.watch(sock)
        self._guard = dial.guard
        return sock

    def _dial_first(self, dial: _Dial) -> socket.socket:
        """The first of the vetted addresses that accepts, each within the connect timeout and the deadline."""
        error: Exception = urllib3_errors.ConnectTimeoutError(self, "the deadline passed before connecting")
        for address in dial.addresses:
            remaining = dial.guard.remaining()
            if remaining <= 0:
                break
            timeout = remaining if self.timeout is None else min(self.timeout, remaining)
            try:
                sock = _connect(address, self.port, timeout, self.socket_options, self.source_address)
            except TimeoutError:
                error = urllib3_errors.ConnectTimeoutError(self, f"connecting to {address} timed out")
            except OSError as exc:
                error = urllib3_errors.NewConnectionError(self, f"failed to connect to {address}: {exc}")
            else:
                self._pinned_address = address
                return sock
        raise error

    def request(self, *args, **kwargs):
        dial: _Dial | None = getattr(_dialing, "current", None)
        if self.sock is not None and (dial is None or self._guard is not dial.guard):
            # Kept alive from an earlier fetch: reuse it only if its address passes this fetch's policy.
            reusable = dial is not None and (
                dial.addresses is None
                or self._pinned_address is not None
                and address_allowed(ipaddress.ip_address(self._pinned_address), dial.target.networks)
            )
            if reusable:
                dial.guard.watch(self.sock)
                self._guard = dial.guard
            else:
                self.close()  # http.client reconnects, through _new_conn
        return super().request(*args, **kwargs)


def _host_key(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


class _PinnedHTTPConnection(_PinnedConnectionMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnectionMixin, HTTPSConnection):
    pass


class _PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


_POOL_CLASSES = {"http": _PinnedHTTPConnectionPool, "https": _PinnedHTTPSConnectionPool}


class PinnedAdapter(HTTPAdapter):
    """requests' adapter, with connections that dial the addresses given by `pinned` (see the module docstring)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # not SOCKS, whose connections are of another kind
            manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager


def new_session() -> requests.Session:
    """A requests Session for untrusted URLs: pinned connections, nothing from the environment, no cookies."""
    session = requests.Session()
    # No proxy, .netrc credentials or CA bundle from the environment: a URL list must not be able to collect the
    # .netrc password of a host it names, nor be routed by variables the user set for something else.
    session.trust_env = False
    # One session serves many unrelated URLs: none may set state (a cookie) that another one's request carries.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = PinnedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
