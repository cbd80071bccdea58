"""Hostile servers and resolvers against the download policy (offline: loopback and a resolver stub only).

Each case must end in its reason (or succeed) within its deadline: `total_timeout` for a fetch, `idle_timeout` for a
read of `open_url`, plus SLACK. read_timeout is set well past the deadline, so it is the watchdog that ends a
request, not a socket timeout. No test dials anything but 127.0.0.1: `dials` records every connection attempt and
refuses any other address, so "where did the connection go" is an assertion, not a packet on the network.
"""

import ipaddress
import shutil
import ssl
import subprocess
import threading
import time
from urllib.parse import quote

import pytest
from http_server import (  # noqa: F401  (fixtures)
    MAX_BYTES,
    PNG,
    _Server,
    fake_dns,
    no_proxy_fixture,
    png_of_size,
    server_fixture,
    serving,
    stream_bytes,
)

from ldm_tune.data import connections, netpolicy
from ldm_tune.data.download import DownloadError, DownloadOptions, SessionPool, fetch_image, open_url


DEADLINE = 1.5  # total_timeout of the fetches here
SLACK = 1.5  # what a refusal or a timeout may take past its deadline
LOOPBACK = ("127.0.0.0/8",)
EVERYTHING = ("0.0.0.0/0", "::/0")
METADATA = "http://169.254.169.254/latest/meta-data/"


def options(**overrides) -> DownloadOptions:
    values = dict(connect_timeout=2.0, read_timeout=30.0, total_timeout=DEADLINE, retries=0, backoff=0.01,
                  max_bytes=MAX_BYTES, allowed_networks=LOOPBACK)  # fmt: skip
    values.update(overrides)
    return DownloadOptions(**values)


def fetch(url, sessions=None, **overrides):
    """(outcome of fetch_image, seconds it took)."""
    own = sessions is None
    sessions = sessions or SessionPool()
    start = time.monotonic()
    try:
        outcome = fetch_image(url, sessions, options(**overrides))
    finally:
        if own:
            sessions.close()
    return outcome, time.monotonic() - start


def reason(outcome):
    return outcome if isinstance(outcome, str) else "success"


@pytest.fixture(name="dials")
def dials_fixture(monkeypatch):
    """Every address a download dials, in order; only loopback is really dialled."""
    dialled = []
    real = connections._connect

    def connect(address, port, *args, **kwargs):
        dialled.append(address)
        if not ipaddress.ip_address(address).is_loopback:
            raise ConnectionRefusedError(f"the tests dial loopback only, not {address}")
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(connections, "_connect", connect)
    return dialled


# --- deadlines ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/trickle-headers", "/gzip-forever", "/gzip-stall"])
def test_a_stalling_server_is_cut_at_the_deadline(server, path):
    # /trickle-headers: a header byte every 0.1 s, so no socket read waits long; /gzip-forever: bytes at full speed
    # that decompress to nothing, so the body loop never sees a chunk; /gzip-stall: silence after a gzip header.
    outcome, seconds = fetch(server.url(f"{path}?t=deadline"))
    assert outcome == "timeout"
    assert DEADLINE - 0.1 < seconds < DEADLINE + SLACK, seconds


def test_the_deadline_covers_dns(monkeypatch):
    release = threading.Event()

    def slow(number):
        release.wait(10)  # a resolver that does not answer within the deadline
        return ["8.8.8.8"]

    fake_dns(monkeypatch, {"slow.test": slow})
    try:
        outcome, seconds = fetch("http://slow.test/a.png")
    finally:
        release.set()
    assert outcome == "timeout"
    assert seconds < DEADLINE + SLACK


# --- sizes and schemes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["length", "close", "gzip"])
def test_a_body_of_exactly_max_bytes_is_fine_one_more_is_too_large(server, mode):
    # With a Content-Length, without one (the body ends when the connection closes), and gzipped (decoded size).
    exact, seconds = fetch(server.url(f"/sized?size={MAX_BYTES}&mode={mode}&t=limit"))
    assert reason(exact) == "success" and exact[0] == png_of_size(MAX_BYTES) and exact[1] == "png"
    assert seconds < SLACK
    over, seconds = fetch(server.url(f"/sized?size={MAX_BYTES + 1}&mode={mode}&t=limit"))
    assert over == "too_large"
    assert seconds < SLACK


@pytest.mark.parametrize("scheme", ["HTTP", "Http", "hTTp"])
def test_upper_case_schemes_are_http(server, scheme, dials):
    url = server.url("/img.png?t=scheme").replace("http", scheme, 1)
    outcome, _ = fetch(url)
    assert reason(outcome) == "success" and outcome[0] == PNG
    assert dials == ["127.0.0.1"]


# --- addresses ----------------------------------------------------------------------------------------------------


def test_metadata_is_refused_even_when_everything_is_allowed(server, monkeypatch, dials):
    fake_dns(monkeypatch, {"metadata.test": ["169.254.169.254"], "metadata6.test": ["fd00:ec2::254"]})
    urls = [
        server.url(f"/redirect?t=metadata&to={quote(METADATA, safe='')}"),
        METADATA,
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://100.100.100.200/latest/meta-data/",
        "http://metadata.test/computeMetadata/v1/",
        "http://metadata6.test/latest/meta-data/",
        "http://[fe80::1]/",
    ]
    for url in urls:
        outcome, seconds = fetch(url, allowed_networks=EVERYTHING)
        assert outcome == "private_address", url
        assert seconds < SLACK
    assert dials == ["127.0.0.1"]  # the first redirect only; no request ever left for a refused address


@pytest.mark.parametrize(
    "address", ["2002:7f00:1::", "2002:a00:1::", "fec0::1", "64:ff9b::7f00:1", "::ffff:127.0.0.1", "::7f00:1",
                "2001:0:4136:e378:8000:63bf:3fff:fdd2", "64:ff9b:1::a00:1", "100.64.0.1", "fc00::1"]
)  # fmt: skip
def test_non_public_answers_are_refused_without_a_connection(monkeypatch, dials, address):
    # 6to4 and NAT64 of 127.0.0.1 and 10.0.0.1, site-local, IPv4-mapped and -compatible loopback, Teredo, local-use
    # NAT64, carrier-grade NAT, unique-local: not public, and not in allowed_networks (none here).
    fake_dns(monkeypatch, {"tunnel.test": [address]})
    outcome, seconds = fetch("http://tunnel.test/a.png", allowed_networks=())
    assert outcome == "private_address"
    assert seconds < SLACK
    assert dials == []


def test_a_rebinding_name_is_connected_where_it_was_checked(server, monkeypatch, dials):
    # First answer 127.0.0.1 (allowed), then the metadata address: a second lookup when connecting would go there.
    lookups = fake_dns(monkeypatch, {"rebind.test": lambda n: ["127.0.0.1"] if n == 0 else ["169.254.169.254"]})
    target = f"http://rebind.test:{server.port}/img.png?t=rebind"
    outcome, _ = fetch(server.url(f"/redirect?t=rebind&to={quote(target, safe='')}"))
    assert reason(outcome) == "success" and outcome[0] == PNG
    assert lookups == ["rebind.test"]  # looked up once, by the check
    assert dials == ["127.0.0.1", "127.0.0.1"]  # the redirect, then the checked answer
    assert server.headers_of(target)["Host"] == f"rebind.test:{server.port}"  # the name, not the address


def test_a_rebinding_name_cannot_reach_loopback(server, monkeypatch, dials):
    # The classic attack: a public answer for the check, 127.0.0.1 for the connection. Pinned, the connection goes to
    # the public address (refused by `dials`), and the local server sees nothing.
    lookups = fake_dns(monkeypatch, {"rebind.test": lambda n: ["93.184.216.34"] if n == 0 else ["127.0.0.1"]})
    url = f"http://rebind.test:{server.port}/img.png?t=rebind-public"
    outcome, seconds = fetch(url, allowed_networks=())
    assert outcome == "connection_error"
    assert seconds < SLACK
    assert lookups == ["rebind.test"]
    assert dials == ["93.184.216.34"]
    assert server.hits_of(url) == 0


def test_the_checked_addresses_are_tried_in_order(server, monkeypatch, dials):
    # The first answer refuses the connection: the next one is dialled, without a new lookup.
    lookups = fake_dns(monkeypatch, {"multi.test": ["8.8.8.8", "127.0.0.1"]})
    outcome, _ = fetch(f"http://multi.test:{server.port}/img.png?t=order", allowed_networks=LOOPBACK)
    assert reason(outcome) == "success"
    assert dials == ["8.8.8.8", "127.0.0.1"] and lookups == ["multi.test"]


def test_allowing_everything_still_refuses_link_local():
    # 0.0.0.0/0 is a valid setting: it opens private networks, never link-local ones (nor metadata addresses).
    opts = options(allowed_networks=EVERYTHING)
    for address in ("169.254.169.254", "169.254.1.1", "fe80::1", "10.0.0.1", "127.0.0.1"):
        expected = not address.startswith(("169.254", "fe80"))
        assert netpolicy.address_allowed(ipaddress.ip_address(address), opts.networks) is expected, address
    with pytest.raises(ValueError, match="lies inside 169.254.0.0/16"):
        options(allowed_networks=("169.254.0.0/16",))


@pytest.fixture(scope="module")
def keep_alive_server():
    yield from serving(_Server(keep_alive=True))


def test_a_kept_alive_connection_is_watched_and_policed(keep_alive_server, monkeypatch, dials):
    httpd = keep_alive_server
    answers = {"mirror.test": ["127.0.0.1"]}
    fake_dns(monkeypatch, answers)
    url = lambda path: f"http://mirror.test:{httpd.port}{path}"  # noqa: E731
    sessions = SessionPool()
    try:
        assert reason(fetch(url("/img.png?t=keep1"), sessions)[0]) == "success"
        # The next fetch reuses the connection, and its deadline still cuts it (bytes flow: only the watchdog can).
        outcome, seconds = fetch(url("/gzip-forever?t=keep2"), sessions)
        assert outcome == "timeout" and seconds < DEADLINE + SLACK
        assert httpd.peer_of(url("/gzip-forever?t=keep2")) == httpd.peer_of(url("/img.png?t=keep1"))
        assert dials == ["127.0.0.1"]
        # Kept alive again, then the name moves to 127.0.0.2 and the policy allows only that address: the kept
        # connection (to 127.0.0.1) is not used; a new one dials 127.0.0.2, where nothing listens.
        assert reason(fetch(url("/img.png?t=keep3"), sessions)[0]) == "success"
        answers["mirror.test"] = ["127.0.0.2"]
        assert fetch(url("/img.png?t=keep4"), sessions, allowed_networks=("127.0.0.2/32",))[0] == "connection_error"
        assert httpd.hits_of(url("/img.png?t=keep4")) == 0
        assert dials == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    finally:
        sessions.close()


# --- TLS ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """The test server over TLS, with a self-signed certificate for `pinned.test` only."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=pinned.test",
         "-addext", "subjectAltName=DNS:pinned.test"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    httpd = _Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd, str(cert)
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_tls_keeps_the_name_for_sni_and_the_certificate(tls_server, monkeypatch, dials):
    httpd, cert = tls_server
    fake_dns(monkeypatch, {"pinned.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    sessions = SessionPool()
    sessions.get().verify = cert  # trust the test certificate (and nothing else) in this thread's session
    try:
        outcome, _ = fetch(f"Https://pinned.test:{httpd.port}/img.png?t=tls", sessions)
        assert reason(outcome) == "success" and outcome[0] == PNG
        assert httpd.headers_of("/img.png?t=tls")["Host"] == f"pinned.test:{httpd.port}"
        # Same address, another name: the certificate is checked against the name, so the handshake fails.
        outcome, _ = fetch(f"https://other.test:{httpd.port}/img.png?t=tls-other", sessions)
        assert outcome == "connection_error"
        assert httpd.hits_of("/img.png?t=tls-other") == 0
    finally:
        sessions.close()
    assert dials == ["127.0.0.1", "127.0.0.1"]


# --- streams (open_url) -------------------------------------------------------------------------------------------


def test_open_url_streams_the_body(server):
    size = 300_000
    with open_url(server.url(f"/stream?size={size}&t=open"), options(), idle_timeout=2.0) as f:
        head = f.read(1000)
        time.sleep(0.3)  # time between reads is the reader's own: it does not count as idle
        assert head + f.read() == stream_bytes(size)


def test_open_url_ends_a_stalled_shard(server):
    idle = 0.5
    f = open_url(server.url("/stream?size=200000&stall_after=70000&t=stall"), options(), idle_timeout=idle)
    got = f.read(60_000)
    start = time.monotonic()
    with pytest.raises(DownloadError) as error, f:
        f.read()
    assert error.value.reason == "timeout" and "stall" in str(error.value)
    assert idle - 0.1 < time.monotonic() - start < idle + SLACK
    assert got == stream_bytes(60_000)


def test_open_url_ends_a_body_that_decodes_to_nothing(server):
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        with open_url(server.url("/gzip-forever?t=open"), options(), idle_timeout=0.5) as f:
            f.read(1)
    assert error.value.reason == "timeout"
    assert time.monotonic() - start < 0.5 + SLACK


def test_open_url_bounds_the_headers_by_total_timeout(server):
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        open_url(server.url("/trickle-headers?t=open"), options(), idle_timeout=30.0)
    assert error.value.reason == "timeout"
    assert time.monotonic() - start < DEADLINE + SLACK


def test_open_url_caps_the_size(server):
    with pytest.raises(DownloadError) as error:  # refused from its Content-Length, before a byte
        open_url(server.url("/stream?size=5000&t=cap"), options(), max_bytes=4999)
    assert error.value.reason == "too_large"
    with open_url(server.url("/stream?size=5000&t=cap"), options(), max_bytes=5000) as f:
        assert len(f.read()) == 5000
    # No Content-Length: the read that crosses the cap fails.
    with open_url(server.url(f"/sized?size={MAX_BYTES}&mode=close&t=cap"), options(), max_bytes=MAX_BYTES - 1) as f:
        with pytest.raises(DownloadError) as error:
            f.read()
        assert error.value.reason == "too_large"
        with pytest.raises(DownloadError, match="too_large"):  # again, not a quiet end of file
            f.read()


def test_open_url_applies_the_address_policy(server, monkeypatch, dials):
    with pytest.raises(DownloadError) as error:
        open_url(server.url("/stream?size=10&t=policy"), options(allowed_networks=()))
    assert error.value.reason == "private_address"
    to_metadata = server.url(f"/redirect?t=policy&to={quote(METADATA, safe='')}")
    with pytest.raises(DownloadError) as error:
        open_url(to_metadata, options(allowed_networks=EVERYTHING))
    assert error.value.reason == "private_address"
    assert dials == ["127.0.0.1"]
    lookups = fake_dns(monkeypatch, {"rebind.test": lambda n: ["127.0.0.1"] if n == 0 else ["169.254.169.254"]})
    with open_url(f"http://rebind.test:{server.port}/stream?size=10&t=policy", options()) as f:
        assert f.read() == stream_bytes(10)
    assert lookups == ["rebind.test"]
