"""The network policy of every download: which addresses a URL may reach, and the check of a URL against it.

Downloads fetch untrusted URLs, so a URL must not become a way into the machine's own network (server-side request
forgery: https://owasp.org/Top10/A10_2021-Server-Side_Request_Forgery_%28SSRF%29/). This module decides; the
connections that carry the decision out (pinned to the vetted addresses, within a deadline) are `connections`.

Addresses (`address_allowed`). Public internet addresses are allowed. Any other address (loopback, private,
carrier-grade NAT, ...) only inside one of the caller's `allowed_networks`. Link-local and cloud metadata addresses
never, whatever the setting. An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64, ...) is judged by that
IPv4 address too, so `[::ffff:169.254.169.254]` is no way around the rules.

Vetting (`vet`). A URL's host is resolved once and every answer judged; the resulting `Target` lists the addresses
a connection may dial, and `connections` dials exactly those, never resolving the host again (DNS rebinding). DNS
runs in a helper thread that is left behind at the deadline (getaddrinfo cannot be interrupted).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from urllib3 import exceptions as urllib3_errors
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
