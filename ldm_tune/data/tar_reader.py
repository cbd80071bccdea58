"""Reading an untrusted WebDataset tar shard: samples grouped by key, every member bounded, every defect counted once.

webdataset's own reader (`tarfile_samples`) reads each member whole whatever its declared size, and a shard cut
short surfaces as one or two handler errors beside a partial sample, so a truncation could be counted twice or
not at all. This reader keeps webdataset's layout (a sample is the consecutive members sharing a key: the name up
to the first dot of its last part, webdataset's `base_plus_ext`) and adds the bounds:

- a member larger than `max_member_bytes` is never read (tarfile's stream mode skips its data) and its sample is
  `too_large`;
- a member name that is absolute or has a `..` part makes its sample `unsafe_tar_member`; links, devices and
  folders are ignored (nothing is ever extracted to disk);
- a shard that ends mid-way, or whose headers are garbage, ends with one `truncated_shard` entry, in place of the
  sample that was being read (it may have had more members), and the reader goes on with the next shard.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import PurePosixPath

from ldm_tune.data.images import BadItem


MEMBER = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # key, extension: webdataset's base_plus_ext
META = re.compile(r"__[^/]*__($|/)")  # webdataset's meta members (`__key__`...), skipped as it does


class _EndCheckedInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a header that is cut short, garbage or missing, as if it had reached
    the end-of-archive blocks; only the zero block is a real end here, anything else is a truncation."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive zero block: a whole shard
        except tarfile.HeaderError as error:
            raise tarfile.ReadError(f"the shard ends mid-way ({error or type(error).__name__})") from error


def safe_member_name(key: str) -> bool:
    """A tar member name must stay inside the archive: not absolute, no `..` part, no drive letter."""
    path = PurePosixPath(key)
    return not path.is_absolute() and ".." not in path.parts and ":" not in key and "\\" not in key


def tar_samples(fileobj, max_member_bytes: int):
    """(key, {extension: bytes} or BadItem) per sample of the tar stream `fileobj`, in archive order."""
    key, members, bad = None, {}, None
    try:
        # Stream mode: no seek, read once, front to back (a remote shard is a stream).
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndCheckedInfo) as tar:
            for info in tar:
                if not info.isfile() or META.search(info.name):
                    continue
                match = MEMBER.match(info.name)
                if match is None:
                    continue
                if match.group(1) != key:
                    if key is not None:
                        yield key, bad or members
                    key, members, bad = match.group(1), {}, None
                if not safe_member_name(info.name):
                    bad = BadItem("unsafe_tar_member", info.name)
                elif info.size > max_member_bytes:
                    bad = bad or BadItem("too_large", f"{info.name}: {info.size} bytes")
                elif bad is None:
                    members[match.group(2).lower()] = tar.extractfile(info).read()
    except Exception as error:  # any failure of an untrusted stream ends the shard, never the run
        # Cut short, garbled, or (a remote shard) stalled: the sample being read is lost with the rest of the
        # shard, counted once. A download failure keeps its own reason (`timeout`, `too_large`...).
        yield (key or "shard"), BadItem(getattr(error, "reason", "truncated_shard"), str(error))
        return
    if key is not None:
        yield key, bad or members
