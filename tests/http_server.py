"""A local HTTP server on 127.0.0.1 for the download tests (offline), with the image bytes it serves.

A test module uses it by importing `server_fixture` (the module-scoped `server`, which counts requests per path
and query, so each test tags its URLs with a query of its own) and `no_proxy_fixture` (autouse `_no_proxy`).

Besides well-behaved routes it has hostile ones (a server trickling its headers, a gzip body that never yields a
byte, a stalled stream): each of those ends by itself within `HOSTILE_SECONDS`, or at once when the client hangs
up or the fixture ends (`server.stop`), so no test leaves a busy thread behind.
"""

import gzip
import io
import itertools
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


MAX_BYTES = 50_000  # the tests' max_bytes: BIG is over it, the small images far under
PNG = _encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")
JPEG = _encode(Image.new("RGB", (8, 8), (30, 200, 30)), "JPEG")
# A real PNG (noise does not compress), so without the size cap it would download fine.
BIG = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)), "PNG")
# Cut in half: the header parses (Image.open succeeds), the pixels do not (only .load() finds out).
TRUNCATED = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
TRUNCATED = TRUNCATED[: len(TRUNCATED) // 2]
HTML = b"<!doctype html><html><body><p>Not an image.</p></body></html>"
HOSTILE_SECONDS = 20  # the longest a hostile route keeps its connection busy
# A gzip member header, then empty stored deflate blocks (BFINAL=0, BTYPE=00, LEN=0, NLEN=0xFFFF, RFC 1951 3.2.4):
# a valid stream of any length that decompresses to nothing.
GZIP_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])
EMPTY_DEFLATE_BLOCK = b"\x00\x00\x00\xff\xff"


def png_of_size(size: int) -> bytes:
    """A PNG that decodes like `PNG` and is exactly `size` bytes long: padded by a private ancillary chunk after
    IHDR, which decoders skip (PNG spec, 5.4: lower-case first letter = ancillary, second = private)."""
    padding = size - len(PNG) - 12  # a chunk adds length, type and CRC: 12 bytes
    if padding < 0:
        raise ValueError(f"a PNG is at least {len(PNG) + 12} bytes here, got {size}")
    body = b"ldPd" + b"\0" * padding
    chunk = struct.pack(">I", padding) + body + struct.pack(">I", zlib.crc32(body))
    ihdr_end = 8 + 25  # the signature, then IHDR (length, type, 13 bytes of data, CRC)
    return PNG[:ihdr_end] + chunk + PNG[ihdr_end:]


def stream_bytes(size: int) -> bytes:
    """The deterministic bytes of the /stream route (a stand-in for a tar shard)."""
    return bytes(itertools.islice(itertools.cycle(range(251)), size))


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path] += 1
            self.server.headers_seen[self.path] = dict(self.headers)
            self.server.peers[self.path] = self.client_address  # the client's port tells a kept-alive connection
        parts = urlsplit(self.path)
        try:
            self._route(parts.path, parts.query, parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass  # the client stopped reading (too_large, timeout): that is the point of those routes

    def _hold(self, seconds: float = HOSTILE_SECONDS) -> None:
        """Keep the connection open and silent, until the fixture ends at the latest."""
        self.server.stop.wait(seconds)

    def _drip(self, pieces, every: float) -> None:
        """Write each of `pieces` (bytes), one every `every` seconds, for HOSTILE_SECONDS at most."""
        end = time.monotonic() + HOSTILE_SECONDS
        for piece in pieces:
            if time.monotonic() > end or self.server.stop.wait(every):
                return
            self.wfile.write(piece)

    def _send(self, code: int, body: bytes, content_type: str, length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route(self, path: str, query: str, params: dict) -> None:
        if path == "/img.png":
            self._send(200, PNG, "image/png")
        elif path == "/img2.jpg":
            self._send(200, JPEG, "image/jpeg")
        elif path == "/truncated.png":
            self._send(200, TRUNCATED, "image/png")
        elif path == "/page.html":
            self._send(200, HTML, "text/html")
        elif path == "/big":
            self._send(200, BIG, "image/png")
        elif path == "/big-nolength":  # HTTP/1.0 without a length: the body ends when the connection closes
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for start in range(0, len(BIG), 4096):
                self.wfile.write(BIG[start : start + 4096])
        elif path == "/declared-huge":  # only the header is too large: reading the body would end otherwise
            self._send(200, PNG, "image/png", length=10**9)
        elif path == "/slow":  # 5 bytes every 0.3 s: no single read ever times out
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "10000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x" * 5)
                time.sleep(0.3)
        elif path == "/stall":  # headers, then silence: each attempt ends by the read timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "10000")
            self.end_headers()
            time.sleep(3)
        elif path == "/loop":
            self._redirect(self.path)
        elif path == "/redirect":
            self._redirect(params.get("to", ["/img.png"])[0])  # relative by default
        elif path == "/sized":  # a PNG of exactly `size` bytes, sent with a length, close-delimited, or gzipped
            body, mode = png_of_size(int(params["size"][0])), params.get("mode", ["length"])[0]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if mode == "gzip":
                body = gzip.compress(body)
                self.send_header("Content-Encoding", "gzip")
            if mode != "close":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/trickle-headers":  # a status line, then header bytes one at a time, never a blank line
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._drip((bytes([b]) for b in itertools.cycle(b"X-Trickle: 1\r\n")), every=0.1)
        elif path == "/gzip-forever":  # gzip that decompresses to nothing, at full speed: the decoder never yields
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(GZIP_HEADER)
            self._drip(itertools.repeat(EMPTY_DEFLATE_BLOCK * 4096), every=0.005)
        elif path == "/gzip-stall":  # a gzip header, then silence
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(GZIP_HEADER)
            self._hold()
        elif path == "/stream":  # `size` bytes with a length; `stall_after` bytes, then silence
            size = int(params["size"][0])
            body = stream_bytes(size)[: int(params.get("stall_after", [size])[0])]
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(body)
            if len(body) < size:
                self._hold()
        elif path == "/flaky":
            with self.server.lock:
                first = query not in self.server.flaky_seen
                self.server.flaky_seen.add(query)
            if first:
                self._send(int(params.get("code", ["500"])[0]), b"try again", "text/plain")
            else:
                self._send(200, PNG, "image/png")
        else:
            self._send(404, b"not found", "text/plain")


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"  # connections stay open after a response with a Content-Length


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, keep_alive: bool = False):
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler if keep_alive else _Handler)
        self.lock = threading.Lock()
        self.hits: Counter = Counter()  # request path with query -> number of requests
        self.flaky_seen: set[str] = set()
        self.headers_seen: dict[str, dict] = {}  # request path with query -> the headers of its last request
        self.peers: dict[str, tuple] = {}  # request path with query -> the client address of its last request
        self.stop = threading.Event()  # set when the fixture ends: hostile routes let go at once

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits_of(self, url: str) -> int:
        parts = urlsplit(url)
        with self.lock:
            return self.hits[parts.path + (f"?{parts.query}" if parts.query else "")]

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.hits)

    def headers_of(self, url: str) -> dict | None:
        with self.lock:
            return self.headers_seen.get(self._key(url))

    def peer_of(self, url: str) -> tuple | None:
        with self.lock:
            return self.peers.get(self._key(url))

    @staticmethod
    def _key(url: str) -> str:
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


def fake_dns(monkeypatch, answers: dict) -> list[str]:
    """Make socket.getaddrinfo answer for the names in `answers`: a list of addresses, a callable taking the lookup's
    number (0, 1, ...) and returning such a list (a rebinding name answers differently the second time), or None
    for a name that does not exist. Other names and literals resolve as usual. Returns the names looked up."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        answer = answers[host]
        number = lookups.count(host)
        lookups.append(host)
        if callable(answer):
            answer = answer(number)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answer
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def serving(httpd: "_Server"):
    """Serve `httpd` in a thread for the fixture's lifetime; then stop it (its stalled routes too)."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module", name="server")
def server_fixture():
    yield from serving(_Server())


@pytest.fixture(autouse=True, name="_no_proxy")
def no_proxy_fixture(monkeypatch):
    # A proxy from the environment would receive the 127.0.0.1 requests instead of the test server.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
