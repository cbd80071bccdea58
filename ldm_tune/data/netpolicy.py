"""The network policy of every download: which addresses a URL may reach, and connections that reach only those.

Downloads fetch untrusted URLs, so a URL must not become a way into the machine's own network (server-side request
forgery: https://owasp.org/Top10/A10_2021-Server-Side_Request_Forgery_%28SSRF%29/). Three parts:

Addresses (`address_allowed`). Public internet addresses are allowed. Any other address (loopback, private,
carrier-grade NAT, ...) only inside one of the caller's `allowed_networks`. Link-local and cloud metadata addresses
never, whatever the setting. An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64, ...) is judged by that
IPv4 address too, so `[::ffff:169.254.169.254]` is no way around the rules.

Pinning (`vet`, `pinned`, `PinnedAdapter`). A URL's host is resolved once and every answer judged; the connection
then dials exactly those addresses, in the resolver's order, and never resolves the host again: a name cannot answer
a public address to the check and 127.0.0.1 to the connection (DNS rebinding). The Host header, TLS SNI and the
certificate check keep the URL's name, since the pool is still keyed on it; only the dial changes.

Deadlines (`Watchdog`, `Guard`). Socket timeouts bound each wait, not a request: a server that trickles one header
byte a second, or a gzip body that decompresses to nothing, never lets one expire. A guard shuts down the sockets of
its fetch when its deadline passes, which ends any read blocked on them. DNS runs in a helper thread that is left
behind at the deadline (getaddrinfo cannot be interrupted).
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
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, ProxyManager
from urllib3 import exceptions as urllib3_errors
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import parse_url


DEFAULT_PORTS = {"http": 80, "https": 443}
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused whatever `allowed_networks` says: no dataset lives there, and a request there can hand out cloud
# credentials. Lists of such endpoints: https://github.com/swisskyrepo/PayloadsAllTheThings (SSRF, cloud instances).
NEVER_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local (RFC 3927): the metadata of AWS, GCP, Azure, OpenStack, Oracle, ...
        "fe80::/10",  # IPv6 link-local (RFC 4291)
        "fd00:ec2::254/128",  # AWS instance metadata over IPv6
        "fd20:ce::254/128",  # Google Compute Engine metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "192.0.0.192/32",  # Oracle Cloud Infrastructure Classic metadata
        "168.63.129.16/32",  # Azure WireServer: a public address that only the platform answers, with VM secrets
    )
)
# Not public, whatever `is_global` says on this Python version (3.11 counts fec0::/10 and ::/96 as global).
NOT_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "fec0::/10",  # IPv6 site-local, deprecated (RFC 3879) but still routed inside some sites
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): where its IPv4 address sits is a local choice
        "2001::/32",  # Teredo (RFC 4380): tunnels through the client's NAT
        "::/96",  # IPv4-compatible IPv6 (deprecated, RFC 4291 2.5.5.1): tunnels over IPv4
    )
)
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix (RFC 6052): IPv4 in the low 32 bits


class DownloadError(OSError):
    """A download refused or failed, with a short `reason` (`private_address`, `timeout`, `http_404`, ...)."""

    def __init__(self, reason: str, url: str | None = None):
        super().__init__(f"{reason}: {url}" if url else reason)
        self.reason = reason
        self.url = url

    def __reduce__(self):  # OSError pickles its args as (errno, strerror): keep ours across DataLoader workers
        return type(self), (self.reason, self.url)


# --- addresses --------------------------------------------------------------------------------------------------


def parse_networks(values: Iterable) -> tuple[IPNetwork, ...]:
    """The CIDR networks of `allowed_networks` (e.g. `("127.0.0.0/8",)` for a mirror on this machine).

    Raises ValueError naming the first bad entry: not a network, host bits set, or inside a link-local or metadata
    range (those are refused whatever this setting says; a wider entry such as 0.0.0.0/0 is accepted, and still
    does not allow them).
    """
    if isinstance(values, (str, bytes, bool)) or not isinstance(values, Iterable):
        raise ValueError(
            f"`allowed_networks` must be a list of CIDR networks, e.g. ['127.0.0.0/8'], got {values!r}. "
            "(It replaces `allow_private_urls`.)"
        )
    networks = []
    for value in values:
        try:
            if not isinstance(value, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise TypeError  # ip_network(1) would quietly read an int as the address 0.0.0.1
            network = ipaddress.ip_network(value)
        except (TypeError, ValueError) as error:
            detail = f" ({error})" if str(error) else ""
            raise ValueError(
                f"`allowed_networks` entry {value!r} is not a CIDR network, e.g. '127.0.0.0/8'{detail}."
            ) from None
        for never in NEVER_NETWORKS:
            if network.version == never.version and network.subnet_of(never):
                raise ValueError(
                    f"`allowed_networks` entry {value!r} lies inside {never}, a link-local or cloud metadata range "
                    "that is never allowed."
                )
        networks.append(network)
    return tuple(networks)


def address_allowed(ip: IPAddress, networks: tuple[IPNetwork, ...] = ()) -> bool:
    """Whether a download may connect to `ip`: public, or inside one of `networks`, and never link-local/metadata."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])  # the zone names an interface; the address is the same
    if any(ip in never for never in NEVER_NETWORKS):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # A translated address reaches its IPv4 address (the kernel, a 6to4 relay or a NAT64 gateway maps it): judge
        # that one alone. A tunnel (Teredo, IPv4-compatible) must pass on both: its IPv4 ends and its own address.
        translated = _translated_ipv4(ip)
        if translated is not None:
            return address_allowed(translated, networks)
        if not all(address_allowed(end, networks) for end in _tunnel_ends(ip)):
            return False
    return _is_public(ip) or any(ip in network for network in networks)


def _translated_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d to the kernel
        return ip.ipv4_mapped
    if ip.sixtofour is not None:  # 2002:AABB:CCDD::/48 (RFC 3056)
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _tunnel_ends(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    if ip.teredo is not None:
        return ip.teredo  # (server, client)
    if ip in IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are not IPv4-compatible addresses (RFC 4291 2.5.5.1)
        return (ipaddress.IPv4Address(int(ip)),)
    return ()


def _is_public(ip: IPAddress) -> bool:
    # is_global alone is not enough on Python 3.11: it counts multicast (224.0.0.0/4) and fec0::/10 as global.
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not special and not ip.is_unspecified and not any(ip in n for n in NOT_PUBLIC)


# --- vetting a URL ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A URL that passed the policy: where it points and the addresses a connection to it may dial."""

    url: str  # as requests sends it (normalised: lower-case scheme, IDNA host, quoted path)
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    addresses: tuple[str, ...]  # every answer of the resolver, in its order, each allowed
    networks: tuple[IPNetwork, ...]  # the `allowed_networks` it was judged under


def split_url(url: str) -> tuple[str, str, str, int]:
    """(normalised url, scheme, host, port) of an http(s) URL, or DownloadError `invalid_url`."""
    # Parse with the code that opens the connection (requests then urllib3), and refuse a URL that two parsers read
    # differently: 'http://127.0.0.1:80\\@a.com/' is a.com to one and 127.0.0.1 to another.
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        parsed = parse_url(prepared.url)
        other_host = urlsplit(prepared.url).hostname or ""  # what requests keys the connection pool on
    except (requests.RequestException, urllib3_errors.HTTPError, ValueError, TypeError):
        raise DownloadError("invalid_url") from None
    scheme = (parsed.scheme or "").lower()  # prepare_url lower-cases it already: HTTP:// is http://
    host = (parsed.host or "").strip("[]").lower()
    if scheme not in DEFAULT_PORTS or not host or other_host != host:
        raise DownloadError("invalid_url")
    return prepared.url, scheme, host, parsed.port or DEFAULT_PORTS[scheme]


def vet(url: str, networks: tuple[IPNetwork, ...], timeout: float) -> Target:
    """Resolve `url`'s host (within `timeout` seconds) and judge every answer; DownloadError `invalid_url`,
    `dns_error`, `timeout` or `private_address` otherwise."""
    normalised, scheme, host, port = split_url(url)
    addresses = _resolve(host, port, timeout)
    # Refuse if ANY answer is refused: the verdict must not depend on which answer would be dialled first.
    if not all(address_allowed(ipaddress.ip_address(a), networks) for a in addresses):
        raise DownloadError("private_address")
    return Target(normalised, scheme, host, port, addresses, networks)


def _resolve(host: str, port: int, timeout: float) -> tuple[str, ...]:
    """The addresses of `host`, in the resolver's order, without duplicates or IPv6 zones."""
    with contextlib.suppress(ValueError):
        return (str(ipaddress.ip_address(host)),)  # a literal address: nothing to look up
    outcome: dict = {}

    def lookup():
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    # getaddrinfo cannot be cancelled: a lookup past the deadline is left to finish in its daemon thread (the
    # system resolver gives up by itself, after `timeout:5 attempts:2` per nameserver by default, resolv.conf(5)).
    thread = threading.Thread(target=lookup, name="ldm-tune-dns", daemon=True)
    thread.start()
    thread.join(None if timeout == math.inf else max(timeout, 0.0))
    if thread.is_alive():
        raise DownloadError("timeout")
    error = outcome.get("error")
    if isinstance(error, (ValueError, UnicodeError)):  # e.g. a NUL byte or an over-long IDNA label
        raise DownloadError("invalid_url")
    if error is not None:
        raise DownloadError("dns_error")
    addresses = (str(info[4][0]).split("%", 1)[0] for info in outcome["infos"])
    return tuple(dict.fromkeys(addresses))


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
