"""Download a list of (url, caption) rows into tar shards, the img2dataset model: millions of rows, few files.

Row i belongs to shard k = i // shard_size, which leaves three files in `out_dir`:

    {k:05d}.tar          the successful rows in row order: `{key}.{ext}` (image bytes as downloaded), `{key}.txt`
                         (a str caption), `{key}.json` ({"url", "caption", "row"}); keys sort in row order, so it
                         is also a WebDataset shard
    {k:05d}.parquet      one row per input row: row, url, status ("success" or the failure reason), and member,
                         offset, size: where the image bytes lie in the tar (null on failure)
    {k:05d}_stats.json   counts, failures by reason, bytes, seconds, and the shard's fingerprint

and `out_dir/stats.json` sums the shards of the last call.

Resume: tar and parquet are written under temporary names and renamed, the stats file last, so a shard is complete
exactly when its stats file records the fingerprint of the shard's URLs (and shard_size). A later call skips
complete shards without a request and redoes the rest: after a kill, a deleted stats file, or changed URLs.

Fetching (http(s) only, address checks and pinned connections on every redirect hop, size cap, deadline, retries, a
full image decode) is `download.fetch_image`, the one fetch path shared with `download_images`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import json
import operator
import os
import re
import tarfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ldm_tune.data.download import DownloadOptions, SessionPool, _write_atomically, fetch_image


STATS_NAME = "stats.json"
SHARD_NAME = re.compile(r"[0-9]{5,}\.tar")  # what read_member accepts: a plain name, never a path
SCHEMA = pa.schema(
    [("row", pa.int64()), ("url", pa.string()), ("status", pa.string()), ("member", pa.string()),
     ("offset", pa.int64()), ("size", pa.int64())]
)  # fmt: skip
# Failures worth a new try on a later run (`retry_failed`), with any 5xx: the server or the network may recover.
TRANSIENT = frozenset({"timeout", "connection_error", "dns_error", "http_429"})
# Fetches in flight per worker. Results are written in row order, so finished ones wait behind a slow one; the
# window bounds that wait's memory to about workers * IN_FLIGHT_PER_WORKER * max_bytes.
IN_FLIGHT_PER_WORKER = 4


@dataclass
class ShardReport:
    """What one `download_to_shards` call did. `downloaded` and `failed` count the rows of the shards fetched in
    this call (they add up to those rows); reused shards are counted in `reused_shards` only."""

    out_dir: Path
    shard_names: list[str] = field(default_factory=list)  # "00000.tar", ... in shard order, reused ones included
    downloaded: int = 0
    reused_shards: int = 0
    failed: collections.Counter = field(default_factory=collections.Counter)

    @property
    def shards(self) -> int:
        return len(self.shard_names)

    def summary(self) -> str:
        """One line, e.g. 'shards 3 (reused 1), downloaded 4, failed 2 (http_404: 1, timeout: 1)'."""
        text = (
            f"shards {self.shards} (reused {self.reused_shards}), downloaded {self.downloaded}, "
            f"failed {sum(self.failed.values())}"
        )
        if self.failed:
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(self.failed.items())) + ")"
        return text

    def table(self) -> pa.Table:
        """Every row of every shard, sorted by `row`: the shards' parquet columns plus `shard` (the tar's name), so
        row -> (shard, offset, size) is a column lookup, with no Python object per row."""
        tables = []
        for name in self.shard_names:
            part = pq.read_table(self.out_dir / name.replace(".tar", ".parquet"), schema=SCHEMA)
            tables.append(part.append_column("shard", pa.repeat(pa.scalar(name, pa.string()), part.num_rows)))
        if not tables:
            return SCHEMA.append(pa.field("shard", pa.string())).empty_table()
        return pa.concat_tables(tables).sort_by("row")


def read_member(out_dir: str | Path, shard_name: str, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of shard `shard_name` in `out_dir`: an image, given a parquet row's values."""
    # The name may come from a file or a caller: accept only the names we write, so it cannot leave out_dir.
    if not isinstance(shard_name, str) or not SHARD_NAME.fullmatch(shard_name):
        raise ValueError(f"`shard_name` must be a shard file name like '00000.tar', got {shard_name!r}.")
    offset, size = operator.index(offset), operator.index(size)
    if offset < 0 or size < 0:
        raise ValueError(f"`offset` and `size` must be >= 0, got {offset} and {size}.")
    with open(Path(out_dir) / shard_name, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise EOFError(f"{shard_name} ends before byte {offset + size}.")
    return data


def download_to_shards(
    rows: Sequence,
    out_dir: str | Path,
    opts: DownloadOptions | None = None,
    *,
    shard_size: int = 10_000,
    workers: int = 8,
    retry_failed: bool = False,
    progress: bool = True,
) -> ShardReport:
    """Download `rows` (a Sequence of (url, caption) pairs; caption a str, a list of str, or None) into shards.

    Only `len(rows)` and `rows[i]` are used, one shard's slice at a time, so rows may be a lazy view of a large
    table. `opts` (`download.DownloadOptions`): the bounds and network policy of each fetch; `total_timeout`
    bounds each URL as a whole (attempts, redirect hops and backoff pauses together).
    `retry_failed`: in complete shards, fetch again the rows that failed for a transient reason (`TRANSIENT`);
    the shard is rewritten with its other rows taken from its own tar, without a request.
    """
    if shard_size < 1:
        raise ValueError(f"`shard_size` must be >= 1, got {shard_size}.")
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1, got {workers}.")
    opts = opts or DownloadOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(rows)
    report = ShardReport(out)
    sessions = SessionPool()
    bar = tqdm(total=total, desc="downloading shards", unit="img", disable=not progress)
    # One pool for the whole call: its threads keep their sessions (and keep-alive connections) across shards.
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shards")
    fetch = functools.partial(fetch_image, sessions=sessions, opts=opts)
    try:
        for k, start in enumerate(range(0, total, shard_size)):
            pairs = [_pair(rows[i], i) for i in range(start, min(start + shard_size, total))]
            writer = _ShardWriter(out, k, start, shard_size, pairs, opts)
            report.shard_names.append(writer.tar_path.name)
            tasks = [functools.partial(fetch, url) for url, _ in pairs]
            if writer.is_complete():
                tasks = _retry_tasks(writer, fetch) if retry_failed else None
                if tasks is None:
                    report.reused_shards += 1
                    bar.update(len(pairs))
                    continue
            outcomes = _in_order(pool, tasks, workers * IN_FLIGHT_PER_WORKER)
            with contextlib.closing(outcomes):  # on an error, cancel this shard's queued fetches at once
                stats = writer.write(outcomes, bar)
            report.downloaded += stats["successes"]
            report.failed.update(stats["failed"])
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # start no queued URL after an error or Ctrl-C
        raise
    finally:
        pool.shutdown(wait=True)
        sessions.close()
        bar.close()
    _write_json(out / STATS_NAME, _sum_stats(out, report.shard_names, shard_size))
    return report


# --- one shard --------------------------------------------------------------------------------------------------


def _pair(row, index: int) -> tuple[object, str | list[str] | None]:
    """(url, caption) of one input row; the URL is checked later, by the fetch (a bad one ends as `invalid_url`)."""
    url, caption = row
    if caption is None or isinstance(caption, str):
        return url, caption
    if isinstance(caption, (list, tuple)) and all(isinstance(c, str) for c in caption):
        return url, list(caption)
    raise TypeError(f"row {index}: a caption must be a str, a list of str or None, got {type(caption).__name__}.")


def _retry_tasks(writer: _ShardWriter, fetch) -> list | None:
    """The outcome of each row of a complete shard when its transient failures are fetched again: a fetch for
    those, the bytes already in the tar for successes, the recorded reason otherwise; None when none is transient.
    """
    table = pq.read_table(writer.parquet_path, schema=SCHEMA).to_pylist()
    if not any(r["status"] in TRANSIENT or r["status"].startswith("http_5") for r in table):
        return None
    tasks = []
    for (url, _), r in zip(writer.pairs, table, strict=True):
        if r["status"] == "success":
            ext = r["member"].rsplit(".", 1)[1]
            read = functools.partial(read_member, writer.out, writer.tar_path.name, r["offset"], r["size"])
            tasks.append(functools.partial(_stored, read, ext))
        elif r["status"] in TRANSIENT or r["status"].startswith("http_5"):
            tasks.append(functools.partial(fetch, url))
        else:
            tasks.append(functools.partial(str, r["status"]))
    return tasks


def _stored(read, ext: str) -> tuple[bytes, str]:
    return read(), ext


def _in_order(pool: ThreadPoolExecutor, tasks: list, window: int):
    """Yield task() for each task in order, with at most `window` tasks submitted and not yet yielded."""
    pending: collections.deque = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:  # the consumer stopped (an error, Ctrl-C): do not start the rest
            future.cancel()


def _fingerprint(urls: list, shard_size: int, opts: DownloadOptions) -> str:
    """What makes a shard's files valid: its URLs, the row -> shard mapping (shard_size), and the options that
    decide an outcome for good (a `private_address` or `too_large` failure must not outlive its setting)."""
    fields = {"shard_size": shard_size, "urls": urls, "allowed_networks": sorted(set(opts.allowed_networks)),
              "max_bytes": opts.max_bytes}  # fmt: skip
    text = json.dumps(fields, default=repr)  # repr: a non-str URL still counts
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _ShardWriter:
    """The three files of shard k; `write` builds them from the fetch outcomes, in the order that makes resume
    safe (stats removed first, tar and parquet renamed into place, stats written last)."""

    def __init__(self, out: Path, k: int, start: int, shard_size: int, pairs: list, opts: DownloadOptions):
        self.out, self.k, self.start, self.shard_size, self.pairs = out, k, start, shard_size, pairs
        self.prefix = f"{k:05d}"
        self.tar_path = out / f"{self.prefix}.tar"
        self.parquet_path = out / f"{self.prefix}.parquet"
        self.stats_path = out / f"{self.prefix}_stats.json"
        self.fingerprint = _fingerprint([url for url, _ in pairs], shard_size, opts)
        # Key = shard number + index in the shard, the index as wide as shard_size needs, so keys sort in row order.
        self.index_width = max(4, len(str(shard_size - 1)))

    def is_complete(self) -> bool:
        try:
            recorded = json.loads(self.stats_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (
            isinstance(recorded, dict)
            and recorded.get("fingerprint") == self.fingerprint
            and self.tar_path.is_file()
            and self.parquet_path.is_file()
        )

    def write(self, outcomes, bar) -> dict:
        """Write the shard from `outcomes` ((body, ext) or a failure reason per row, in row order); its stats."""
        # From here until the new stats file lands the shard reads as incomplete, whatever else is on disk.
        self.stats_path.unlink(missing_ok=True)
        for stale in self.out.glob(f"{self.prefix}.*.tmp"):  # left by a run killed without a chance to clean up
            stale.unlink(missing_ok=True)
        began = time.monotonic()
        tmp_tar = self.out / f"{self.tar_path.name}.{uuid.uuid4().hex}.tmp"
        tmp_parquet = self.out / f"{self.parquet_path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp_tar, "xb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    table = self._fill(tar, f, outcomes, bar)
                _sync(f)
            with open(tmp_parquet, "xb") as f:
                pq.write_table(table, f)
                _sync(f)
            os.replace(tmp_tar, self.tar_path)
            os.replace(tmp_parquet, self.parquet_path)
        except BaseException:
            for tmp in (tmp_tar, tmp_parquet):
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        failed = collections.Counter(table["status"].to_pylist())
        successes = failed.pop("success", 0)
        stats = {
            "shard": self.tar_path.name,
            "first_row": self.start,
            "count": len(self.pairs),
            "successes": successes,
            "failed": dict(sorted(failed.items())),
            "bytes": pc.sum(table["size"]).as_py() or 0,
            "seconds": round(time.monotonic() - began, 3),
            "shard_size": self.shard_size,
            "fingerprint": self.fingerprint,
        }
        _write_json(self.stats_path, stats)  # last: this is what makes the shard complete
        return stats

    def _fill(self, tar: tarfile.TarFile, f, outcomes, bar) -> pa.Table:
        """Add the members of each successful row to `tar`, in row order; the shard's table, one row per row."""
        columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        for j, ((url, caption), outcome) in enumerate(zip(self.pairs, outcomes, strict=True)):
            row, status, member, offset, size = self.start + j, outcome, None, None, None
            if not isinstance(outcome, str):
                body, ext = outcome
                key = f"{self.prefix}{j:0{self.index_width}d}"
                status, member, size = "success", f"{key}.{ext}", len(body)
                offset = _add_member(tar, f, member, body)
                if isinstance(caption, str):
                    _add_member(tar, f, f"{key}.txt", caption.encode("utf-8"))
                record = json.dumps({"url": url, "caption": caption, "row": row}, ensure_ascii=False)
                _add_member(tar, f, f"{key}.json", record.encode("utf-8"))
            values = (row, url if isinstance(url, str) else None, status, member, offset, size)
            for name, value in zip(SCHEMA.names, values, strict=True):
                columns[name].append(value)
            bar.update(1)
        return pa.table(columns, schema=SCHEMA)


def _add_member(tar: tarfile.TarFile, f, name: str, data: bytes) -> int:
    """Append one member; the byte offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed, so the same downloads make the same shard bytes
    tar.addfile(info, io.BytesIO(data))
    # tarfile writes straight to `f` in mode "w": the data ends at f.tell() less its padding to a 512-byte block.
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return f.tell() - padded


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())  # so the rename never publishes a file whose data is still only in the page cache


def _write_json(path: Path, data: dict) -> None:
    _write_atomically(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _sum_stats(out: Path, shard_names: list[str], shard_size: int) -> dict:
    """The overall stats: the sum of the shards' stats files."""
    totals = {"shards": len(shard_names), "shard_size": shard_size, "count": 0, "successes": 0, "bytes": 0}
    failed: collections.Counter = collections.Counter()
    seconds = 0.0
    for name in shard_names:
        stats = json.loads((out / f"{name.removesuffix('.tar')}_stats.json").read_text(encoding="utf-8"))
        for key in ("count", "successes", "bytes"):
            totals[key] += stats[key]
        failed.update(stats["failed"])
        seconds += stats["seconds"]
    return {**totals, "failed": dict(sorted(failed.items())), "seconds": round(seconds, 3)}
