"""`download_to_shards` against the local HTTP server (offline): shard layout, offsets, resume, interruption."""

import dataclasses
import json
import re
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
from http_server import JPEG, MAX_BYTES, PNG, fake_dns, no_proxy_fixture, server_fixture  # noqa: F401  (fixtures)

from ldm_tune.data import shards
from ldm_tune.data.download import DownloadOptions
from ldm_tune.data.shards import ShardReport, download_to_shards, read_member


class Rows:
    """A Sequence of (url, caption) pairs that records which rows were read and refuses to be iterated whole."""

    def __init__(self, pairs):
        self.pairs = list(pairs)
        self.read: list[int] = []

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        self.read.append(i)
        return self.pairs[i]

    def __iter__(self):
        raise AssertionError("rows must be read one shard's slice at a time, not materialised")


def shard(rows, out_dir, **overrides):
    """download_to_shards with the tests' short bounds; the server is on 127.0.0.1, so loopback is allowed."""
    kwargs = dict(shard_size=3, workers=3, progress=False)
    options = dict(connect_timeout=2.0, read_timeout=2.0, total_timeout=3.0, retries=0, backoff=0.01,
                   max_bytes=MAX_BYTES, allowed_networks=("127.0.0.0/8",))  # fmt: skip
    option_names = {f.name for f in dataclasses.fields(DownloadOptions) if f.init}
    for name, value in overrides.items():
        (options if name in option_names else kwargs)[name] = value
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    return download_to_shards(rows, out_dir, DownloadOptions(**options), **kwargs)


def listing(out_dir):
    return sorted(p.name for p in out_dir.iterdir())


def test_shards_hold_each_row(server, tmp_path, monkeypatch):
    # Loopback is allowed, 10.0.0.0/8 is not: a name there is refused before a request.
    fake_dns(monkeypatch, {"intranet.test": ["10.1.2.3"]})
    private = f"http://intranet.test:{server.port}/img.png?t=rows-private"
    rows = [
        (server.url("/img.png?t=rows"), "a red square"),
        (server.url("/missing?t=rows"), "gone"),
        (server.url("/img2.jpg?t=rows"), ["green", "a green square"]),
        (server.url("/page.html?t=rows"), "html"),
        (private, "private"),
        ("ftp://x/y.png", None),
        (None, "no url"),
        (server.url("/redirect?t=rows"), None),  # a relative redirect to /img.png
    ]
    report = shard(rows, tmp_path)

    statuses = ["success", "http_404", "success", "not_an_image", "private_address", "invalid_url", "invalid_url",
                "success"]  # fmt: skip
    assert server.hits_of(private) == 0
    assert report.shard_names == ["00000.tar", "00001.tar", "00002.tar"] and report.shards == 3
    assert listing(tmp_path) == sorted(
        [f"0000{k}{suffix}" for k in range(3) for suffix in (".tar", ".parquet", "_stats.json")] + ["stats.json"]
    )
    assert report.downloaded == 3 and report.reused_shards == 0
    assert report.failed == Counter(http_404=1, not_an_image=1, private_address=1, invalid_url=2)
    assert report.summary() == (
        "shards 3 (reused 0), downloaded 3, failed 5 (http_404: 1, invalid_url: 2, not_an_image: 1, private_address: 1)"
    )

    table = report.table()
    assert table["row"].to_pylist() == list(range(8))
    assert table["status"].to_pylist() == statuses
    assert table["url"].to_pylist() == [url for url, _ in rows]
    assert table["shard"].to_pylist() == ["00000.tar"] * 3 + ["00001.tar"] * 3 + ["00002.tar"] * 2
    assert table["member"].to_pylist() == ["000000000.png", None, "000000002.jpg", None, None, None, None,
                                           "000020001.png"]  # fmt: skip
    assert [s is None for s in table["size"].to_pylist()] == [s != "success" for s in statuses]
    # Each shard's parquet holds its own rows, with the global row numbers.
    assert pq.read_table(tmp_path / "00001.parquet")["row"].to_pylist() == [3, 4, 5]

    served = {0: PNG, 2: JPEG, 7: PNG}
    for row, expected in served.items():
        record = table.slice(row, 1).to_pylist()[0]
        assert record["size"] == len(expected) and record["offset"] % 512 == 0  # tar data starts on a block
        assert read_member(tmp_path, record["shard"], record["offset"], record["size"]) == expected

    # Tar members: successes only, in row order, each image with its caption (a str only) and its json record.
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames() == ["000000000.png", "000000000.txt", "000000000.json", "000000002.jpg",
                                  "000000002.json"]  # fmt: skip
        assert tar.extractfile("000000000.txt").read() == b"a red square"
        assert json.loads(tar.extractfile("000000002.json").read()) == {
            "url": rows[2][0], "caption": ["green", "a green square"], "row": 2
        }  # fmt: skip
    with tarfile.open(tmp_path / "00001.tar") as tar:
        assert tar.getnames() == []
    with tarfile.open(tmp_path / "00002.tar") as tar:
        assert tar.getnames() == ["000020001.png", "000020001.json"]

    per_shard = [json.loads((tmp_path / f"0000{k}_stats.json").read_text()) for k in range(3)]
    assert [s["count"] for s in per_shard] == [3, 3, 2]
    assert [s["successes"] for s in per_shard] == [2, 0, 1]
    assert per_shard[1]["failed"] == {"invalid_url": 1, "not_an_image": 1, "private_address": 1}
    assert len({s["fingerprint"] for s in per_shard}) == 3
    overall = json.loads((tmp_path / "stats.json").read_text())
    assert (overall["shards"], overall["count"], overall["successes"]) == (3, 8, 3)
    assert overall["bytes"] == 2 * len(PNG) + len(JPEG) == sum(s["bytes"] for s in per_shard)
    assert overall["failed"] == dict(report.failed)


def test_private_address_makes_no_request(server, tmp_path):
    url = server.url("/img.png?t=private")
    before = server.snapshot()
    report = shard([(url, "x")], tmp_path, allowed_networks=())
    assert report.table()["status"].to_pylist() == ["private_address"]
    assert server.snapshot() == before


def test_resume_requests_only_incomplete_shards(server, tmp_path):
    rows = [(server.url(f"/img.png?t=resume{i}"), f"image {i}") for i in range(8)]
    rows[1] = (server.url("/missing?t=resume"), "gone")
    first = shard(rows, tmp_path)
    table = first.table()
    assert first.downloaded == 7 and first.failed == Counter(http_404=1)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "stats.json"}

    # Everything is complete: no request at all (not even for the failure), and the same table back.
    before = server.snapshot()
    again = shard(rows, tmp_path)
    assert server.snapshot() == before
    assert (again.reused_shards, again.downloaded, again.failed) == (3, 0, Counter())
    assert again.table().equals(table)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in stamps} == stamps

    # A shard without its stats file is incomplete: only its URLs are requested again.
    (tmp_path / "00001_stats.json").unlink()
    before = server.snapshot()
    redone = shard(rows, tmp_path)
    assert server.snapshot() - before == Counter({f"/img.png?t=resume{i}": 1 for i in (3, 4, 5)})
    assert (redone.reused_shards, redone.downloaded) == (2, 3)
    assert redone.table().equals(table)

    # A changed URL changes its shard's fingerprint: that shard only is redone, and reads back the new bytes.
    rows[7] = (server.url("/img2.jpg?t=resume-changed"), "changed")
    before = server.snapshot()
    changed = shard(rows, tmp_path)
    assert server.snapshot() - before == Counter({"/img.png?t=resume6": 1, "/img2.jpg?t=resume-changed": 1})
    assert changed.reused_shards == 2
    record = changed.table().slice(7, 1).to_pylist()[0]
    assert record["url"] == rows[7][0] and record["member"] == "000020001.jpg"
    assert read_member(tmp_path, record["shard"], record["offset"], record["size"]) == JPEG


def test_retry_fetches_only_transient_failures_of_complete_shards(server, tmp_path):
    rows = [(server.url(f"/img.png?t=retry{i}"), f"image {i}") for i in range(6)]
    rows[1] = (server.url("/flaky?t=retry-503&code=503"), "flaky")  # 503 on the first request, then the image
    rows[4] = (server.url("/missing?t=retry"), "gone")  # a 404 is final: never requested again
    first = shard(rows, tmp_path)
    assert first.failed == Counter(http_503=1, http_404=1)
    before = server.snapshot()
    assert shard(rows, tmp_path).reused_shards == 2 and server.snapshot() == before  # no retry unless asked
    retried = shard(rows, tmp_path, retry_failed=True)
    assert server.snapshot() - before == Counter({"/flaky?t=retry-503&code=503": 1})  # the others from the tar
    assert (retried.reused_shards, retried.downloaded, retried.failed) == (1, 3, Counter())  # shard 1: a 404 only
    table = retried.table().to_pylist()
    assert [r["status"] for r in table] == ["success"] * 4 + ["http_404", "success"]
    assert all(read_member(tmp_path, r["shard"], r["offset"], r["size"]) == PNG for r in table if r["member"])


def test_a_changed_safety_setting_redoes_the_shards(server, tmp_path, monkeypatch):
    # 127.0.0.1 is not public: refused without a request, and that outcome must not outlive the setting.
    rows = [(server.url(f"/img.png?t=setting{i}"), "x") for i in range(2)]
    assert shard(rows, tmp_path, allowed_networks=()).failed == Counter(private_address=2)
    allowed = shard(rows, tmp_path)
    assert allowed.downloaded == 2 and allowed.reused_shards == 0
    # Other networks redo the shards; the same ones in another order do not.
    same = shard(rows, tmp_path, allowed_networks=("10.0.0.0/8", "127.0.0.0/8"))
    assert same.reused_shards == 0
    assert shard(rows, tmp_path, allowed_networks=["127.0.0.0/8", "10.0.0.0/8"]).reused_shards == 1


def test_interruption_leaves_complete_shards_only(server, tmp_path, monkeypatch):
    rows = Rows((server.url(f"/img.png?t=interrupt{i}"), f"image {i}") for i in range(8))
    real_fetch = shards.fetch_image

    def fetch_then_interrupt(url, sessions, opts):
        if url.endswith("interrupt4"):  # the middle row of the second shard
            raise KeyboardInterrupt
        return real_fetch(url, sessions, opts)

    # A file a killed run left behind, with no chance to clean up: the next run of that shard removes it.
    (tmp_path / "00001.tar.0123abcd.tmp").write_bytes(b"partial")
    with monkeypatch.context() as patch:
        patch.setattr(shards, "fetch_image", fetch_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            shard(rows, tmp_path, workers=1)
    assert listing(tmp_path) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert max(rows.read) == 5  # the third shard's rows were never read

    before = server.snapshot()
    report = shard(rows, tmp_path)
    assert report.reused_shards == 1 and report.downloaded == 5
    assert all(server.snapshot()[f"/img.png?t=interrupt{i}"] == before[f"/img.png?t=interrupt{i}"] for i in range(3))
    assert report.table()["status"].to_pylist() == ["success"] * 8
    assert not [name for name in listing(tmp_path) if name.endswith(".tmp")]


def test_redo_drops_the_old_stats_first(server, tmp_path, monkeypatch):
    rows = [(server.url(f"/img.png?t=redo{i}"), None) for i in range(2)]
    shard(rows, tmp_path)
    (tmp_path / "00000.tar").unlink()  # stats and parquet left: incomplete, so redone
    real_replace = shards.os.replace

    def replace_but_parquet(src, dst):
        if str(dst).endswith(".parquet"):
            raise OSError("disk went away")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(shards.os, "replace", replace_but_parquet)
        with pytest.raises(OSError, match="disk went away"):
            shard(rows, tmp_path)
    # The new tar is in place beside the old parquet: the old stats must not make that pair look complete.
    assert listing(tmp_path) == ["00000.parquet", "00000.tar", "stats.json"]
    before = server.snapshot()
    assert shard(rows, tmp_path).reused_shards == 0
    assert server.snapshot() - before == Counter({"/img.png?t=redo0": 1, "/img.png?t=redo1": 1})


def test_shards_read_as_webdataset(server, tmp_path):
    wds = pytest.importorskip("webdataset")
    rows = [
        (server.url("/img.png?t=wds0"), "first"),
        (server.url("/missing?t=wds"), "skipped"),
        (server.url("/img2.jpg?t=wds2"), "third"),
        (server.url("/img.png?t=wds3"), "fourth"),
    ]
    report = shard(rows, tmp_path, shard_size=2)
    paths = [str(tmp_path / name) for name in report.shard_names]
    samples = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["000000000", "000010000", "000010001"]
    assert [s.get("png", s.get("jpg")) for s in samples] == [PNG, JPEG, PNG]
    assert [s["txt"].decode() for s in samples] == ["first", "third", "fourth"]
    assert [json.loads(s["json"])["row"] for s in samples] == [0, 2, 3]


def test_keys_widen_with_the_shard_size(server, tmp_path):
    report = shard([("ftp://x/y.png", None), (server.url("/img.png?t=wide"), None)], tmp_path, shard_size=20_000)
    assert report.table()["member"].to_pylist() == [None, "0000000001.png"]


def test_read_member_refuses_other_paths(server, tmp_path):
    report = shard([(server.url("/img.png?t=member"), None)], tmp_path)
    record = report.table().to_pylist()[0]
    assert read_member(tmp_path, "00000.tar", record["offset"], record["size"]) == PNG
    for name in ("../00000.tar", "/etc/passwd", "00000.parquet", "0.tar", "00000.tar/..", "00000.tar\n", None):
        with pytest.raises(ValueError, match="shard_name"):
            read_member(tmp_path, name, 0, 1)
    with pytest.raises(ValueError, match="offset"):
        read_member(tmp_path, "00000.tar", -1, 1)
    with pytest.raises(EOFError):
        read_member(tmp_path, "00000.tar", record["offset"], 10**6)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape("`shard_size` must be >= 1, got 0.")):
        download_to_shards([], tmp_path, shard_size=0)
    with pytest.raises(ValueError, match=re.escape("`workers` must be >= 1, got 0.")):
        download_to_shards([], tmp_path, workers=0)
    with pytest.raises(TypeError, match="row 0: a caption must be"):
        download_to_shards([("http://example.com/a.png", 3)], tmp_path, progress=False)


def test_summary_and_empty_input(tmp_path):
    report = download_to_shards([], tmp_path, progress=False)
    assert report.summary() == "shards 0 (reused 0), downloaded 0, failed 0"
    assert report.table().num_rows == 0 and "shard" in report.table().column_names
    assert json.loads((tmp_path / "stats.json").read_text())["count"] == 0
    report = ShardReport(tmp_path, ["00000.tar"], downloaded=2, reused_shards=1, failed=Counter(timeout=1))
    assert report.summary() == "shards 1 (reused 1), downloaded 2, failed 1 (timeout: 1)"
