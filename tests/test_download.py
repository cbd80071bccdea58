"""`download_images` against a local HTTP server on 127.0.0.1 (offline): reasons, safety, bounds, cache, retries,
and the network policy (allowed networks, nothing from the environment)."""

import hashlib
import ipaddress
import json
import re
import socket
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
from http_server import JPEG, MAX_BYTES, PNG, fake_dns, no_proxy_fixture, server_fixture  # noqa: F401  (fixtures)
from PIL import Image

from ldm_tune.data import download
from ldm_tune.data.download import MAX_REDIRECTS, DownloadOptions, DownloadReport, check_url, download_images
from ldm_tune.data.netpolicy import address_allowed, parse_networks


LOOPBACK = ("127.0.0.0/8",)  # the test server's network


def fetch(urls, cache_dir, **overrides):
    """download_images with the tests' short bounds; the server is on 127.0.0.1, so loopback is allowed."""
    kwargs = dict(
        workers=4,
        connect_timeout=2.0,
        read_timeout=2.0,
        total_timeout=3.0,
        retries=0,
        backoff=0.01,
        max_bytes=MAX_BYTES,
        allowed_networks=LOOPBACK,
        progress=False,
    )
    kwargs.update(overrides)
    return download_images(urls, cache_dir, **kwargs)


def objects(cache_dir):
    return sorted(p for p in (cache_dir / "objects").rglob("*") if p.is_file())


def test_each_url_ends_in_its_reason(server, tmp_path):
    img, img2 = server.url("/img.png?t=reasons"), server.url("/img2.jpg?t=reasons")
    expected = {
        server.url("/missing?t=reasons"): "http_404",
        server.url("/page.html?t=reasons"): "not_an_image",
        server.url("/truncated.png?t=reasons"): "not_an_image",
        server.url("/big?t=reasons"): "too_large",
        server.url("/big-nolength?t=reasons"): "too_large",
        server.url("/declared-huge?t=reasons"): "too_large",
        server.url("/slow?t=reasons"): "timeout",
        server.url("/loop?t=reasons"): "too_many_redirects",
        "ftp://x/y.png": "invalid_url",
        "not a url": "invalid_url",
        "file:///etc/passwd": "invalid_url",
        "http://": "invalid_url",
        "http://[::1": "invalid_url",
        "": "invalid_url",
    }
    redirect = server.url("/redirect?t=reasons")
    start = time.monotonic()
    results, report = fetch([img, img2, redirect, *expected], tmp_path, total_timeout=1.5, read_timeout=1.0)
    elapsed = time.monotonic() - start

    # /slow trickles for 30 s and never stalls a single read past read_timeout: only the total deadline ends it.
    assert elapsed < 5.0, elapsed
    assert {url: r for url, r in results.items() if isinstance(r, str)} == expected
    assert results[img].read_bytes() == PNG and results[img].suffix == ".png"
    assert results[img2].read_bytes() == JPEG and results[img2].suffix == ".jpg"
    for path in (results[img], results[img2]):
        with Image.open(path) as image:
            image.load()
    assert results[redirect] == results[img]  # the relative Location was followed to the same PNG
    assert server.hits_of(server.url("/loop?t=reasons")) == MAX_REDIRECTS + 1
    assert report.downloaded == 3 and report.cached == 0


def test_total_deadline_covers_retries(server, tmp_path):
    # The deadline is per URL, not per attempt: a timed-out URL is not retried past it.
    url = server.url("/slow?t=deadline")
    start = time.monotonic()
    results, _ = fetch([url], tmp_path, total_timeout=1.0, read_timeout=1.0, retries=2)
    assert results[url] == "timeout"
    assert time.monotonic() - start < 2.5
    assert server.hits_of(url) == 1

    # Read timeouts are retried, but only while the URL's deadline lasts (6 attempts of 0.4 s would be 2.4 s).
    url = server.url("/stall?t=deadline")
    start = time.monotonic()
    results, _ = fetch([url], tmp_path, total_timeout=1.0, read_timeout=0.4, retries=5)
    assert results[url] == "timeout"
    assert time.monotonic() - start < 2.0
    assert 2 <= server.hits_of(url) <= 3


def test_private_addresses_are_refused_without_a_request(server, tmp_path):
    urls = [
        server.url("/img.png?t=private"),
        f"http://localhost:{server.port}/img.png?t=private",
        f"http://[::ffff:127.0.0.1]:{server.port}/img.png?t=private",
        # urllib.parse reads the host as example.com here, urllib3 connects to 127.0.0.1
        f"http://127.0.0.1:{server.port}\\@example.com/img.png?t=private",
    ]
    before = server.snapshot()
    results, report = fetch(urls, tmp_path, allowed_networks=())
    assert results == dict.fromkeys(urls, "private_address")
    assert report.failed == Counter(private_address=len(urls))
    assert server.snapshot() == before
    assert objects(tmp_path) == []


def test_every_redirect_hop_is_checked(server, tmp_path, monkeypatch):
    # Loopback is allowed, so the first hop is fetched; its redirect to a name on 10.0.0.0/8 must be refused there.
    lookups = fake_dns(monkeypatch, {"intranet.test": ["10.1.2.3"]})
    target = f"http://intranet.test:{server.port}/img.png?t=hop"
    to_private = server.url(f"/redirect?t=hop1&to={quote(target, safe='')}")
    to_ftp = server.url(f"/redirect?t=hop2&to={quote('ftp://x/y.png', safe='')}")
    results, _ = fetch([to_private, to_ftp], tmp_path)
    assert results == {to_private: "private_address", to_ftp: "invalid_url"}
    assert server.hits_of(to_private) == 1
    assert server.hits_of(target) == 0
    assert lookups == ["intranet.test"]


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "240.0.0.1",
     "100.64.0.1", "100.100.100.200", "168.63.129.16", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "fec0::1",
     "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "2002:a9fe:a9fe::1", "64:ff9b::7f00:1", "::7f00:1",
     "::808:808", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "64:ff9b:1::808:808", "fd00:ec2::254"],
)  # fmt: skip
def test_non_public_addresses_are_disallowed(address):
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1",
                "64:ff9b::808:808"]
)  # fmt: skip
def test_public_addresses_are_allowed(address):
    assert address_allowed(ipaddress.ip_address(address))


def test_allowed_networks_open_their_addresses_only():
    loopback = parse_networks(["127.0.0.0/8"])
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), loopback)
    assert address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), loopback)  # the same address to the kernel
    assert address_allowed(ipaddress.ip_address("2002:7f00:1::"), loopback)  # 6to4 of 127.0.0.1
    assert not address_allowed(ipaddress.ip_address("10.0.0.1"), loopback)
    assert not address_allowed(ipaddress.ip_address("::1"), loopback)
    everything = parse_networks(["0.0.0.0/0", "::/0"])
    for never in ("169.254.169.254", "169.254.0.1", "fe80::1", "fd00:ec2::254", "100.100.100.200", "192.0.0.192",
                  "::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe", "fe80::1%1"):  # fmt: skip
        assert not address_allowed(ipaddress.ip_address(never), everything), never
    assert address_allowed(ipaddress.ip_address("10.0.0.1"), everything)
    assert address_allowed(ipaddress.ip_address("fec0::1"), everything)


def test_parse_networks_names_the_bad_entry():
    assert parse_networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"]) == tuple(
        ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.0/8", "fd00::/8")
    )
    assert parse_networks(["0.0.0.0/0", "100.64.0.0/10"])  # they contain metadata addresses, which stay refused
    for bad in ("localhost", "127.0.0.1/8", "10.0.0.0/33", "", 5):
        with pytest.raises(ValueError, match=re.escape(f"`allowed_networks` entry {bad!r} is not a CIDR network")):
            parse_networks(["127.0.0.0/8", bad])
    for never in ("169.254.0.0/16", "169.254.169.254", "fe80::/64", "fd00:ec2::254/128", "100.100.100.200/32"):
        with pytest.raises(ValueError, match=re.escape(f"`allowed_networks` entry {never!r} lies inside")):
            parse_networks([never])
    for not_a_list in ("127.0.0.0/8", True, None):  # a str would be read letter by letter; a bool is the old flag
        with pytest.raises(ValueError, match="must be a list of CIDR networks"):
            parse_networks(not_a_list)
    with pytest.raises(ValueError, match="is not a CIDR network"):
        DownloadOptions(allowed_networks=("127.0.0.0/33",))
    assert DownloadOptions(allowed_networks=["127.0.0.1"]).allowed_networks == ("127.0.0.1/32",)


def test_dns_failure_and_any_private_answer(monkeypatch, tmp_path):
    # Fake DNS: neither name needs (or reaches) a real resolver.
    fake_dns(monkeypatch, {"nowhere.invalid": None, "mixed.example": ["8.8.8.8", "10.0.0.7"]})
    urls = ["http://nowhere.invalid/a.png", "https://mixed.example/a.png"]
    results, _ = fetch(urls, tmp_path, allowed_networks=())
    assert results == {urls[0]: "dns_error", urls[1]: "private_address"}
    assert check_url(urls[0]) == "dns_error" and check_url(urls[1]) == "private_address"
    assert check_url(urls[1], ["10.0.0.0/8"]) is None


def test_nothing_comes_from_the_environment(server, tmp_path, monkeypatch):
    # A proxy that is not there, and .netrc credentials for the test server: neither may be used by default.
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    netrc = tmp_path / "home" / ".netrc"
    netrc.parent.mkdir()
    netrc.write_text("machine 127.0.0.1 login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(netrc.parent))
    monkeypatch.setenv("NETRC", str(netrc))

    url = server.url("/img.png?t=env")
    results, _ = fetch([url], tmp_path / "cache")
    assert results[url].read_bytes() == PNG  # straight to the server
    assert "Authorization" not in server.headers_of(url)

    # use_env_proxies: through the (dead) proxy, still without the .netrc password; NO_PROXY is honoured.
    url = server.url("/img.png?t=env-proxy")
    results, _ = fetch([url], tmp_path / "cache", use_env_proxies=True)
    assert results[url] == "connection_error" and server.hits_of(url) == 0
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    results, _ = fetch([url], tmp_path / "cache", use_env_proxies=True)
    assert results[url].read_bytes() == PNG
    assert "Authorization" not in server.headers_of(url)


def test_connection_refused_is_a_connection_error(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.png"
    results, report = fetch([url], tmp_path, retries=1)
    assert results[url] == "connection_error"
    assert report.failed == Counter(connection_error=1)


def test_second_call_uses_the_cache(server, tmp_path):
    img, img2 = server.url("/img.png?t=cache"), server.url("/img2.jpg?t=cache")
    redirect = server.url("/redirect?t=cache")
    missing = server.url("/missing?t=cache")
    urls = [img, img2, redirect, missing]
    first, report1 = fetch(urls, tmp_path)
    assert report1.downloaded == 3
    before = server.snapshot()

    second, report2 = fetch(urls, tmp_path)
    assert second == first
    assert (report2.downloaded, report2.cached, report2.failed) == (0, 3, Counter(http_404=1))
    # No request for the successes (nor the redirect's target); the failure is not cached, so it is retried.
    assert server.snapshot() - before == Counter({"/missing?t=cache": 1})

    first[img2].unlink()  # an index entry whose object is gone is downloaded again
    third, report3 = fetch(urls, tmp_path)
    assert (report3.downloaded, report3.cached) == (1, 2)
    assert third[img2] == first[img2] and first[img2].read_bytes() == JPEG


def test_same_bytes_are_stored_once(server, tmp_path):
    urls = [server.url("/img.png?t=dedup-a"), server.url("/img.png?t=dedup-b"), server.url("/flaky?t=dedup")]
    results, report = fetch(urls, tmp_path, retries=1)
    assert report.downloaded == 3
    assert len(set(results.values())) == 1
    assert objects(tmp_path) == [results[urls[0]]]
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["url"] for line in lines) == sorted(urls)


def test_retries_only_for_transient_failures(server, tmp_path):
    flaky_500, flaky_429 = server.url("/flaky?t=retry-500"), server.url("/flaky?t=retry-429&code=429")
    missing = server.url("/missing?t=retry")
    results, _ = fetch([flaky_500, flaky_429, missing], tmp_path, retries=1)
    assert isinstance(results[flaky_500], Path) and isinstance(results[flaky_429], Path)
    assert results[flaky_500].read_bytes() == PNG
    assert server.hits_of(flaky_500) == 2 and server.hits_of(flaky_429) == 2
    assert results[missing] == "http_404" and server.hits_of(missing) == 1

    no_retry = server.url("/flaky?t=retry-none")
    results, _ = fetch([no_retry], tmp_path, retries=0)
    assert results[no_retry] == "http_500" and server.hits_of(no_retry) == 1


def test_report_counts_add_up(server, tmp_path):
    cached = server.url("/img.png?t=report-cached")
    fetch([cached], tmp_path)
    urls = [
        cached,
        server.url("/img.png?t=report"),
        server.url("/img2.jpg?t=report"),
        server.url("/img2.jpg?t=report"),  # a duplicate: fetched once, reported once
        server.url("/missing?t=report"),
        server.url("/page.html?t=report"),
        server.url("/big?t=report"),
        "ftp://x/y.png",
        "ftp://x/y.png",
    ]
    results, report = fetch(urls, tmp_path)
    distinct = len(set(urls))
    assert list(results) == list(dict.fromkeys(urls))
    assert report.downloaded + report.cached + sum(report.failed.values()) == distinct == 7
    assert (report.downloaded, report.cached) == (2, 1)
    assert report.failed == Counter(http_404=1, not_an_image=1, too_large=1, invalid_url=1)
    assert server.hits_of(server.url("/img2.jpg?t=report")) == 1
    summary = report.summary()
    assert summary.startswith("downloaded 2, cached 1, failed 4 (")
    for reason in report.failed:
        assert f"{reason}: 1" in summary


def test_summary_format():
    report = DownloadReport(downloaded=3, cached=5, failed=Counter(timeout=1, http_404=1))
    assert report.summary() == "downloaded 3, cached 5, failed 2 (http_404: 1, timeout: 1)"
    assert DownloadReport().summary() == "downloaded 0, cached 0, failed 0"


def test_truncated_index_line_is_tolerated(server, tmp_path):
    gone = server.url("/img2.jpg?t=index-gone")
    index = tmp_path / "index.jsonl"
    # A record whose object file is missing, then a line cut short by a kill mid-append (no newline).
    index.write_text(
        json.dumps({"url": gone, "sha256": "0" * 64, "path": f"objects/00/{'0' * 64}.jpg"})
        + '\n{"url": "http://example.com/a.png", "sha2'
    )
    url = server.url("/img.png?t=index")
    results, report = fetch([url, gone], tmp_path)
    assert (report.downloaded, report.cached) == (2, 0)
    assert not [p for p in (tmp_path / "objects").rglob("*") if ".tmp" in p.name]
    records = []
    for line in index.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            assert line.startswith('{"url": "http://example.com/a.png"')  # only the old cut-short line
    new = {r["url"]: r for r in records[1:]}
    assert set(new) == {url, gone}  # not glued onto the cut-short line
    for record in new.values():
        path = tmp_path / record["path"]
        assert path == results[record["url"]]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
        assert path.relative_to(tmp_path).parts[:2] == ("objects", record["sha256"][:2])
    _, again = fetch([url, gone], tmp_path)
    assert (again.downloaded, again.cached) == (0, 2)


def test_interrupted_write_leaves_no_object(server, tmp_path, monkeypatch):
    def replace_fails(src, dst):
        raise OSError("disk went away")

    url = server.url("/img.png?t=atomic")
    with monkeypatch.context() as patch:
        patch.setattr(download.os, "replace", replace_fails)
        with pytest.raises(OSError, match="disk went away"):
            fetch([url], tmp_path)
    assert objects(tmp_path) == []  # neither a final object nor a temporary file
    assert not (tmp_path / "index.jsonl").exists() or url not in (tmp_path / "index.jsonl").read_text()
    results, report = fetch([url], tmp_path)
    assert report.downloaded == 1 and results[url].read_bytes() == PNG
