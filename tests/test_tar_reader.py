"""Untrusted tar shards: bounded members, unsafe names refused, a shard cut anywhere counted exactly once."""

import io
import tarfile

from ldm_tune.data.images import BadItem
from ldm_tune.data.tar_reader import tar_samples


def shard_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SAMPLES = {f"s/{i:04d}": {"png": bytes([i]) * (300 + 400 * i), "txt": f"caption {i}".encode()} for i in range(4)}


def read(data: bytes, max_member_bytes: int = 10**6):
    return list(tar_samples(io.BytesIO(data), max_member_bytes))


def test_whole_shard_reads_every_sample():
    assert read(shard_bytes(SAMPLES)) == list(SAMPLES.items())


def test_a_shard_cut_anywhere_loses_one_sample_counted_once():
    """At every cut: the samples before it come back whole, then one `truncated_shard` entry, nothing else: no
    sample both read and counted as truncated, none read partly, none silently gone."""
    data = shard_bytes(SAMPLES)
    end_of_members = data.rindex(b"caption 3") + len(b"caption 3")
    for cut in range(0, end_of_members, 37):
        entries = read(data[:cut])
        good = [(k, s) for k, s in entries if not isinstance(s, BadItem)]
        bad = [(k, s) for k, s in entries if isinstance(s, BadItem)]
        assert good == [(k, SAMPLES[k]) for k, _ in good], cut  # whole, never partial
        assert [k for k, _ in good] == list(SAMPLES)[: len(good)], cut
        assert len(bad) == 1 and bad[0][1].reason == "truncated_shard", (cut, entries)
        assert entries[-1][1] is bad[0][1], cut


def test_garbage_and_empty_input_end_in_one_reason():
    for data in (b"", b"\0" * 10, b"not a tar at all" * 100, bytes(range(256)) * 8):
        entries = read(data)
        assert all(isinstance(s, BadItem) for _, s in entries) and len(entries) <= 1, data[:20]


class CountingReader(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.largest_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.largest_read = max(self.largest_read, len(chunk))
        return chunk


def test_an_oversized_member_is_never_read_and_unsafe_names_are_refused():
    big = {"a/0000": {"png": b"x" * 200_000, "txt": b"big"}, "a/0001": {"png": b"ok", "txt": b"small"}}
    stream = CountingReader(shard_bytes(big))
    entries = list(tar_samples(stream, max_member_bytes=100_000))
    assert isinstance(entries[0][1], BadItem) and entries[0][1].reason == "too_large"
    assert entries[1] == ("a/0001", {"png": b"ok", "txt": b"small"}) and len(entries) == 2
    assert stream.largest_read < 100_000  # skipped, not read into memory
    escape = shard_bytes({"../up": {"png": b"x", "txt": b"y"}, "/abs/x": {"png": b"x"}, "ok": {"png": b"p"}})
    reasons = [s.reason if isinstance(s, BadItem) else s for _, s in read(escape)]
    assert reasons == ["unsafe_tar_member", "unsafe_tar_member", {"png": b"p"}]


def test_remote_shards_go_through_the_vetted_downloader(monkeypatch):
    """A shard URL is fetched by `download.open_url`: a private address is refused unless allowed, and a server
    that stalls mid-shard ends it after the idle timeout, the samples before kept, the stall counted once."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ldm_tune.data.download import DownloadOptions
    from ldm_tune.data.streaming import ShardSamples

    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    body = shard_bytes(SAMPLES)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path.startswith("/stall"):
                self.wfile.write(body[:3000])  # the first sample and a half, then silence
                self.wfile.flush()
                time.sleep(3)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        local = DownloadOptions(read_timeout=0.5, allowed_networks=("127.0.0.0/8",))
        whole = list(ShardSamples([f"{base}/a.tar"], "text", 0, 0, download=local))
        assert [(k.rsplit("/", 1)[-1], image) for k, image, _ in whole] == [
            (k.rsplit("/", 1)[-1], m["png"]) for k, m in SAMPLES.items()]  # fmt: skip
        refused = list(ShardSamples([f"{base}/a.tar"], "text", 0, 0, download=DownloadOptions()))
        assert len(refused) == 1 and refused[0][1].reason == "private_address"
        start = time.monotonic()
        stalled = list(ShardSamples([f"{base}/stall.tar"], "text", 0, 0, download=local))
        assert time.monotonic() - start < 2.5
        assert [e[2] for e in stalled[:-1]] == ["caption 0"] and stalled[-1][1].reason == "timeout"
    finally:
        server.shutdown()
