"""A local HTTP server on 127.0.0.1 for the download tests (offline), with the image bytes it serves.

A test module uses it by importing `server_fixture` (the module-scoped `server`, which counts requests per path
and query, so each test tags its URLs with a query of its own) and `no_proxy_fixture` (autouse `_no_proxy`).
"""

import io
import threading
import time
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


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path] += 1
        parts = urlsplit(self.path)
        try:
            self._route(parts.path, parts.query, parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (too_large, timeout): that is the point of those routes

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter = Counter()  # request path with query -> number of requests
        self.flaky_seen: set[str] = set()

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


@pytest.fixture(scope="module", name="server")
def server_fixture():
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True, name="_no_proxy")
def no_proxy_fixture(monkeypatch):
    # A proxy from the environment would receive the 127.0.0.1 requests instead of the test server.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
