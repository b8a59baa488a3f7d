"""Our own zip central-directory validator for torch archives: where every record's bytes are.

Python's ``zipfile`` is not used: torch writes CRC-0 files it refuses, it resolves duplicate names
to the last entry, and it knows nothing of torch's rules. `parse` checks the end-of-central-
directory (zip64 too), then every entry: one common ``<prefix>/`` directory, no duplicates, no
``..``/absolute/backslash names, stored (method 0) and unencrypted, the local header agreeing
with the central one, data inside the archive, no two entries overlapping. It returns each
record's absolute data offset so storages can be memory-mapped in place (spec: ``formats/torch.md``).

An archive may be a segment of a larger file (``torch.distributed.checkpoint`` ``.distcp`` files
are concatenations of complete torch zips): offsets inside it are relative to its first byte.

Example:
    >>> with open("friend.pt", "rb") as f:
    ...     archive = parse(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), source="friend.pt")
    >>> archive.prefix, archive.records["data.pkl"].offset
    ('friend', 64)
"""

from __future__ import annotations

import itertools
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["Archive", "Record", "looks_like_zip", "parse"]

LOCAL, CENTRAL, EOCD, EOCD64, LOCATOR64 = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_EOCD_SIZE, _CENTRAL_SIZE, _LOCAL_SIZE = 22, 46, 30
# the fields we check of a central directory entry and of a local header (the rest are skipped)
_CENTRAL = struct.Struct("<4s2xxxHH4xIIIHHHH6xI")
_LOCAL = struct.Struct("<4s4xHxxxxxxxxxxxxxxxxHH")
MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class Record:
    """One stored entry: ``name`` relative to the archive's prefix, ``offset`` absolute in the file."""

    name: str
    offset: int
    size: int
    crc32: int


@dataclass(frozen=True)
class Archive:
    """A validated torch archive: its top-level directory and its records by relative name."""

    prefix: str
    records: dict[str, Record]
    start: int
    end: int
    zip64: bool
    # compressed entries a caller chose to leave unread (TorchScript's code/): names only, never inflated
    skipped: tuple[str, ...] = ()

    def crc_problems(self, data: Any, source: str) -> list[str]:
        """Records whose recorded CRC-32 is not zero and disagrees with their bytes (torch may write 0).

        Example:
            >>> parse(data, source="friend.pt").crc_problems(data, "friend.pt")
            []
        """
        problems = []
        view = memoryview(data)
        for r in self.records.values():
            if r.crc32 == 0 or r.size == 0:
                continue
            crc = 0
            for i in range(r.offset, r.offset + r.size, 64 << 20):
                crc = zlib.crc32(view[i : min(i + (64 << 20), r.offset + r.size)], crc)
            if crc != r.crc32:
                problems.append(f"{source}: record {r.name!r} fails its CRC-32 (stored {r.crc32:08x}, read {crc:08x})")
        return problems


def looks_like_zip(head: bytes) -> bool:
    """A torch archive starts with a local file header whose name has a directory (``<prefix>/...``).

    Example:
        >>> looks_like_zip(Path("friend.pt").read_bytes()[:4096])
        True
    """
    if len(head) < _LOCAL_SIZE or head[:4] != LOCAL:
        return False
    (n,) = struct.unpack_from("<H", head, 26)
    return b"/" in head[_LOCAL_SIZE : _LOCAL_SIZE + n]


def _u(fmt: str, data: Any, at: int) -> tuple[Any, ...]:
    return struct.unpack_from(fmt, data, at)


def parse(
    data: Any,
    *,
    source: str,
    start: int = 0,
    length: int | None = None,
    skip_compressed: Callable[[str], bool] | None = None,
) -> Archive:
    """Validate the zip archive in ``data[start:start+length]`` and locate its records.

    ``data`` is any buffer over the file (an ``mmap``, ``bytes``). Offsets recorded inside the
    archive count from ``start``; returned offsets are absolute in ``data``.

    Raises:
        CorruptCheckpointError: truncated or inconsistent structure, compressed or encrypted entries.
        UnsafeCheckpointError: names that escape the archive directory, duplicate names.

    Example:
        >>> parse(mm, source="a.distcp", start=1261, length=1536).records["data/0"].size
        96
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    end = len(view) if length is None else start + length
    if start < 0 or end > len(view) or end - start < _EOCD_SIZE + _LOCAL_SIZE:
        raise CorruptCheckpointError(f"{source}: too short to be a zip archive ({max(0, end - start)} bytes)")

    def err(what: str, hint: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: not a valid torch zip archive: {what}", hint=hint)

    if bytes(view[start : start + 4]) != LOCAL:
        raise err("it does not start with a local file header (PK\\x03\\x04)")

    # end of central directory: the record must end exactly at the end (its comment, if any, included)
    tail_from = max(start, end - _EOCD_SIZE - MAX_COMMENT)
    tail = bytes(view[tail_from:end])
    eocd = -1
    i = len(tail) - _EOCD_SIZE
    while i >= 0:
        i = tail.rfind(EOCD, 0, i + 4)
        if i < 0:
            break
        (comment_len,) = _u("<H", tail, i + 20)
        if i + _EOCD_SIZE + comment_len == len(tail):
            eocd = i
            break
        i -= 1
    if eocd < 0:
        raise err("no end-of-central-directory record at its end (truncated, or data appended)")
    eocd_at = tail_from - start + eocd  # relative to the archive
    # torch's reader (miniz) takes the last signature it finds scanning back from the end; two
    # records (one hidden in the other's comment, say) could send it and us to different directories
    if tail.find(EOCD, eocd + 4) >= 0:
        raise err("more than one end-of-central-directory record (readers could disagree on which counts)")
    disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _ = _u("<HHHHIIH", tail, eocd + 4)
    zip64 = False
    loc = eocd_at - 20
    # torch's reader uses the zip64 records whenever their locator is there (torch writes them even
    # for small archives), so we do too, and require the classic record to agree with them
    has_locator = loc >= 0 and bytes(view[start + loc : start + loc + 4]) == LOCATOR64
    if has_locator or 0xFFFF in (n_disk, n_total) or 0xFFFFFFFF in (cd_size, cd_offset):
        zip64 = True
        if loc < 0 or bytes(view[start + loc : start + loc + 4]) != LOCATOR64:
            raise err("a zip64 archive without its zip64 locator")
        _, eocd64_at, total_disks = _u("<IQI", view, start + loc + 4)
        if total_disks > 1 or eocd64_at + 56 > loc:
            raise err("bad zip64 locator")
        if bytes(view[start + eocd64_at : start + eocd64_at + 4]) != EOCD64:
            raise err("the zip64 end-of-central-directory record is missing")
        short = (n_disk, n_total, cd_size, cd_offset)
        _, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset = _u("<QHHIIQQQQ", view, start + eocd64_at + 4)
        if any(
            v not in (0xFFFF, 0xFFFFFFFF, w) for v, w in zip(short, (n_disk, n_total, cd_size, cd_offset), strict=True)
        ):
            raise err("the zip64 end record disagrees with the classic one (readers could take either)")
        cd_end_limit = eocd64_at
    else:
        cd_end_limit = eocd_at
    if disk or cd_disk or n_disk != n_total:
        raise err("multi-disk archives are not torch archives")
    between = bytes(view[start + min(cd_offset + cd_size, cd_end_limit) : start + cd_end_limit])
    if EOCD in between or EOCD64 in between:
        raise err("more than one end-of-central-directory record (readers could disagree on which counts)")
    if cd_offset + cd_size != cd_end_limit:
        # bytes between the directory and its end record are what another reader could take for entries
        raise err(
            f"the central directory [{cd_offset}, {cd_offset + cd_size}) does not end at its end record at {cd_end_limit}"
        )
    if n_total * _CENTRAL_SIZE > cd_size:
        raise err(f"{n_total} entries cannot fit in a central directory of {cd_size} bytes")
    if n_total == 0:
        raise err("the archive is empty")

    records: dict[str, Record] = {}
    skipped: list[str] = []
    spans: list[tuple[int, int, str]] = []
    prefix = ""
    # the whole directory in one read; each entry then costs no more than its own fields
    directory = bytes(view[start + cd_offset : start + cd_offset + cd_size])
    central, local_header = _CENTRAL.unpack_from, _LOCAL.unpack_from
    pos = 0
    plain = re.compile(r"(?!)")  # matches nothing until the first entry has given the prefix
    for index in range(n_total):
        if pos + _CENTRAL_SIZE > cd_size:
            raise err(f"central directory entry {index} is damaged", hint="the file is damaged")
        (sig, flags, method, crc, csize, usize, name_len, extra_len, comment_len, disk_start, local_at) = central(
            directory, pos
        )
        if sig != CENTRAL:
            raise err(f"central directory entry {index} is damaged", hint="the file is damaged")
        name_end = pos + _CENTRAL_SIZE + name_len
        entry_end = name_end + extra_len + comment_len
        if entry_end > cd_size:
            raise err(f"central directory entry {index} runs past the directory")
        raw_name = directory[pos + _CENTRAL_SIZE : name_end]
        extra = directory[name_end : name_end + extra_len]
        pos = entry_end
        usize, csize, local_at = _zip64_fields(extra, usize, csize, local_at, err)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise err(f"entry {index} has a name that is not UTF-8") from None
        if index == 0:
            prefix = name.split("/", 1)[0]
            if "/" not in name or not prefix:
                raise err(f"the first entry {name!r} is not inside a directory (torch archives are '<name>/...')")
        if not plain.match(name):  # torch's names pass at C speed; the rest get every check
            _check_name(name, prefix, source)
        if index == 0:  # the prefix has passed every check: names under it with plain parts are safe
            plain = re.compile(re.escape(prefix) + r"(/[A-Za-z0-9_][A-Za-z0-9_.-]*)+\Z")
        rel = name[len(prefix) + 1 :]
        if rel in records or rel in skipped:
            raise UnsafeCheckpointError(
                f"{source}: duplicate zip entry {name!r}: readers disagree on which copy counts, so safeckpt reads neither"
            )
        if flags & 0x1 or flags & 0x40:
            raise err(f"entry {name!r} is encrypted")
        skip = method != 0 and skip_compressed is not None and skip_compressed(rel)
        if method != 0 and not skip:
            raise err(
                f"entry {name!r} is compressed (method {method}, {csize} bytes expanding to {usize}); torch writes stored "
                "entries only, and safeckpt never inflates (a zip bomb would)"
            )
        if csize != usize and not skip:
            raise err(f"stored entry {name!r} declares {usize} bytes but stores {csize}")
        if disk_start != 0:
            raise err(f"entry {name!r} starts on another disk")
        if local_at + _LOCAL_SIZE > cd_offset:
            raise err(f"entry {name!r}: its local header at {local_at} lies past the entries' area")
        lh = start + local_at
        head = bytes(view[lh : lh + _LOCAL_SIZE + name_len])  # one read: the header and the name we expect
        l_sig, l_method, l_name_len, l_extra_len = local_header(head)
        if l_sig != LOCAL:
            raise err(f"entry {name!r}: no local header at {local_at}")
        if l_method != method or l_name_len != name_len or head[_LOCAL_SIZE:] != raw_name:
            raise UnsafeCheckpointError(
                f"{source}: entry {name!r}: the local header disagrees with the central directory (name or method)"
            )
        data_at = local_at + _LOCAL_SIZE + l_name_len + l_extra_len
        size = csize if skip else usize
        if data_at + size > cd_offset:
            raise err(f"entry {name!r} ({size} bytes at {data_at}) runs past the entries' area (ends at {cd_offset})")
        spans.append((local_at, data_at + size, name))
        if skip:
            skipped.append(rel)
        else:
            records[rel] = Record(rel, start + data_at, usize, crc)
    if pos != cd_size:
        raise err(f"the central directory holds {cd_size - pos} bytes after its {n_total} entries")
    spans.sort()
    for (_, a_end, a_name), (b_start, _, b_name) in itertools.pairwise(spans):
        if b_start < a_end:
            raise err(f"entries {a_name!r} and {b_name!r} overlap")
    return Archive(prefix, records, start, end, zip64, tuple(skipped))


def _zip64_fields(extra: bytes, usize: int, csize: int, local_at: int, err: Any) -> tuple[int, int, int]:
    """Replace the 0xFFFFFFFF placeholders with the zip64 extra field's 8-byte values, in order."""
    if 0xFFFFFFFF not in (usize, csize, local_at):
        return usize, csize, local_at
    i = 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, i)
        if tag == 0x0001:
            body, values = extra[i + 4 : i + 4 + n], []
            for j in range(0, len(body) - 7, 8):
                values.append(struct.unpack_from("<Q", body, j)[0])
            out = []
            for v in (usize, csize, local_at):
                if v == 0xFFFFFFFF:
                    if not values:
                        raise err("a zip64 extra field is too short")
                    v = values.pop(0)
                out.append(v)
            return out[0], out[1], out[2]
        i += 4 + n
    raise err("an entry needs a zip64 extra field and has none")


def _check_name(name: str, prefix: str, source: str) -> None:
    parts = name.split("/")
    if (
        not name.startswith(prefix + "/")
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in parts[1:-1])
        or parts[-1] in (".", "..")
    ):
        raise UnsafeCheckpointError(
            f"{source}: suspicious zip entry name {name!r} (outside the archive directory {prefix + '/'!r}, absolute, "
            "or with '..'): safeckpt never extracts, and refuses archives that try to"
        )
