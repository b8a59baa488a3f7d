"""Reading and writing the safetensors container, shared by every format built on it.

Reading validates more than the safetensors library does (duplicate keys, a tensor named
``__metadata__``, non-string metadata), and is bounded: the header length is checked against the
100 MB cap and the file size before a byte of it is read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .. import _shapes, _sources
from .._fs import MappedFile, Span, atomic_write, checksum, copy_span, tensor_bytes, write_all
from ..errors import CorruptCheckpointError

MAX_HEADER = 100_000_000
MAX_DIMS = 64  # a shape of millions of dims costs a TensorRef, strides and messages per dim
MAGIC_MIN = 8 + 2  # length prefix + "{}"
# CRC-32 of the length prefix and the whole header (padding included) with this field's own 8 hex
# digits read as "00000000": covers every name, dtype, shape, offset, metadata value and the other
# checksums, which the per-tensor CRCs cannot (formats/safeckpt.md §2)
KEY_HEADER_CRC = "safeckpt.header_crc32"
# the metadata key of the per-tensor CRC-32s every safeckpt writer records (`write(checksum_key=...)`)
KEY_CRC = "safeckpt.crc32"

# safetensors dtype code -> torch dtype (F4 counts 4-bit elements: torch's last dim is halved)
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F4": torch.float4_e2m1fn_x2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# dtypes safetensors lacks, stored as their real view: complex128 as F64 [..., 2], complex32 as F16 [..., 2]
AS_REAL = {torch.complex128: torch.float64, torch.complex32: torch.float16}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header; ``begin``/``end`` are absolute file offsets."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.code]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        if self.code == "F4":
            return self.shape[:-1] + (self.shape[-1] // 2,)
        return self.shape


@dataclass
class Header:
    path: Path
    size: int  # file size
    data_start: int
    entries: dict[str, Entry]
    metadata: dict[str, str]


def looks_like(head: bytes) -> bool:
    """Cheap content check: a plausible u64 header length followed by JSON.

    Deliberately wider than what `read_header` accepts (lengths past the 100 MB cap, a JSON array)
    so that such damaged files are reported as corrupt safetensors rather than as unknown.
    """
    if len(head) < MAGIC_MIN:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n < 1 << 48 and head[8 : 8 + n].lstrip(b" \t\r\n")[:1] in (b"{", b"[")


def read_header(path: Path, f: BinaryIO | None = None) -> Header:
    """Parse and validate the header of the safetensors file at ``path``.

    Raises `CorruptCheckpointError` naming the file and the problem for anything the format
    forbids: a header longer than the file or than 100 MB, invalid UTF-8 or JSON, duplicate keys,
    a tensor named ``__metadata__``, non-string metadata, unknown dtypes, negative dims, sizes that
    disagree with shape and dtype, holes, overlaps or trailing bytes.
    """
    raw, size = read_raw_header(path, f)
    return parse_header(path, raw[8:], size)


def read_raw_header(path: Path, f: BinaryIO | None = None) -> tuple[bytes, int]:
    """The length prefix and header bytes of the file at ``path`` (bounds checked, not parsed), and the file's size.
    With ``f`` (``path`` opened), both come from that open file even if a save replaces ``path`` meanwhile."""
    if f is None:
        with open(path, "rb") as f:
            return read_raw_header(path, f)
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{path}: {size} bytes is too small for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"{path}: declared header of {n} bytes exceeds the 100 MB limit")
    if 8 + n > size:
        raise CorruptCheckpointError(
            f"{path}: declared header of {n} bytes runs past the end of the file ({size} bytes); truncated?"
        )
    raw = f.read(n)
    return prefix + raw, size


def parse_header(path: Path, raw: bytes, size: int) -> Header:
    """Validate header bytes ``raw`` of a file of ``size`` bytes (see `read_header`)."""

    def bad(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{path}: invalid safetensors header: {msg if len(msg) <= 500 else msg[:500] + '...'}"
        )

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 ({e})") from None
    if not text.lstrip().startswith("{"):
        raise bad("it must be a JSON object starting with '{'")
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except DuplicateKey as e:
        raise bad(f"duplicate key {e.args[0]!r}") from None
    except (ValueError, RecursionError) as e:
        raise bad(f"not valid JSON ({e})") from None
    meta = obj.pop("__metadata__", {})
    if isinstance(meta, dict) and "data_offsets" in meta:
        raise bad("a tensor is named '__metadata__', a name the format reserves for metadata; no reader accepts it")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings")
    for s in (*obj, *meta, *meta.values()):
        if not is_unicode(s):
            raise bad(
                f"string {s.encode('utf-8', 'backslashreplace')[:80]!r} holds an unpaired surrogate escape, which is not Unicode"
            )
    data_start = 8 + len(raw)
    entries: dict[str, Entry] = {}
    for name, info in obj.items():
        entries[name] = _entry(name, info, data_start, bad)
    pos = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != pos:
            raise bad(
                f"tensor {entry.name!r} starts at data offset {entry.begin - data_start}, expected {pos - data_start} (hole or overlap)"
            )
        pos = entry.end
    if pos != size:
        raise bad(f"tensor data ends at byte {pos} but the file has {size} bytes (truncated or trailing data)")
    return Header(path, size, data_start, entries, meta)


def _entry(name: str, info: Any, data_start: int, bad: Callable[[str], Exception]) -> Entry:
    if not name:
        raise bad("empty tensor name")
    if not isinstance(info, dict):
        raise bad(f"entry {name!r} must be an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or (code not in DTYPES and code not in BITS):
        raise bad(f"tensor {name!r} has unknown dtype {short(code)}; known: {', '.join([*DTYPES, *BITS])}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {name!r} has an invalid shape {short(shape)} (a list of non-negative integers)")
    if len(shape) > MAX_DIMS:
        raise bad(f"tensor {name!r} has {len(shape)} dimensions (limit {MAX_DIMS}, as torch files)")
    if not _shapes.fits_int64(shape):
        raise bad(f"tensor {name!r} has shape {short(shape)}, which spans more than 2**63-1 elements (limit)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(f"tensor {name!r} has invalid data_offsets {short(offsets)} (two integers, begin <= end)")
    if code == "F4" and (not shape or shape[-1] % 2):
        raise bad(f"tensor {name!r}: F4 needs an even last dimension to map onto torch.float4_e2m1fn_x2")
    # below 2**63 elements (fits_int64 above), so no shape makes this product costly
    bits = _shapes.numel(shape) * BITS.get(code, DTYPES[code].itemsize * 8 if code in DTYPES else 8)
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise bad(
            f"tensor {name!r}: shape {short(shape)} of {code} needs {bits // 8} bytes, data_offsets give {offsets[1] - offsets[0]}"
        )
    return Entry(name, code, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def short(x: Any, limit: int = 80) -> str:
    """``repr(x)`` cut to ``limit`` characters (a long list shows its first 16 items), for messages
    that quote file data.

    Example:
        >>> short(list(range(100)), 40)
        '[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1...'
    """
    text = repr(x) if not isinstance(x, list) or len(x) <= 16 else repr(x[:16])[:-1] + f", ... ({len(x)} items)]"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_unicode(s: str) -> bool:
    """Whether ``s`` is Unicode text (JSON escapes can produce unpaired surrogates, which are not).

    Example:
        >>> is_unicode("w"), is_unicode("\\ud800".encode().decode("unicode_escape"))
        (True, False)
    """
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class DuplicateKey(Exception):
    """A JSON object names this key (``args[0]``) twice (see `no_duplicates`)."""


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` ``object_pairs_hook`` that raises `DuplicateKey` for a key given twice
    (readers would otherwise disagree on which value wins).

    Example:
        >>> json.loads('{"a": 1, "a": 2}', object_pairs_hook=no_duplicates)
        Traceback (most recent call last):
        DuplicateKey: a
    """
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def entry_tensor(mapped: MappedFile, e: Entry) -> torch.Tensor:
    """The tensor an entry describes, backed by the file's map."""
    if e.code not in DTYPES:
        raise CorruptCheckpointError(
            f"{mapped.path}: tensor {e.name!r} has dtype {e.code}, which torch cannot represent"
        )
    return mapped.tensor(e.begin, e.end - e.begin, e.dtype, e.torch_shape)


# -- writing --------------------------------------------------------------------------------------


@dataclass
class Item:
    """A tensor to write: its name, what it is declared as, and how to get its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    get: Callable[[], torch.Tensor]
    span: Span | None = None  # bytes to copy file to file instead of calling `get`


def check_storable(x: torch.Tensor | Any, where: str) -> None:
    """Refuse, before anything is written, a tensor (or `TensorRef`) no safetensors-based file can
    hold (meta, sparse, a dtype with no lossless encoding); ``where`` names it in the message.

    Example:
        >>> check_storable(torch.empty(2, device="meta"), "state['w']")
        Traceback (most recent call last):
        TypeError: state['w'] is a meta tensor: it has no data to save
    """
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            raise TypeError(f"{where} is a meta tensor: it has no data to save")
        if x.layout != torch.strided:
            raise TypeError(f"{where} is a {x.layout} tensor; save x.to_dense() or its components instead")
    stored_as(x.dtype, tuple(x.shape), where)


def stored_as(dtype: torch.dtype, shape: tuple[int, ...], where: str) -> tuple[str, list[int]]:
    """The safetensors dtype code and header shape a torch tensor is written with."""
    if dtype in AS_REAL:
        return CODES[AS_REAL[dtype]], [*shape, 2]
    if dtype not in CODES:
        raise TypeError(
            f"{where} has dtype {dtype}, which safetensors cannot hold and safeckpt has no lossless encoding for; "
            "convert it (e.g. a quantized tensor's .int_repr() and its scale) before saving"
        )
    if dtype == torch.float4_e2m1fn_x2:
        return "F4", [*shape[:-1], shape[-1] * 2] if shape else [2]
    return CODES[dtype], list(shape)


def write(
    path: str | os.PathLike[str],
    items: Iterable[Item],
    metadata: dict[str, str],
    *,
    align: int = 64,
    checksum_key: str | None = None,
) -> Path:
    """Write a safetensors file atomically, streaming each tensor from its own memory.

    Tensors are laid out largest element size first (so each is naturally aligned) and the
    header is padded with spaces so the data starts on an ``align``-byte boundary. With
    ``checksum_key``, the metadata entry of that name holds each tensor's CRC-32 (8 hex digits, in
    data order), computed while writing.
    """
    items = sorted(items, key=lambda it: -AS_REAL.get(it.dtype, it.dtype).itemsize)
    header: dict[str, Any] = {}
    offset = 0
    for it in items:
        code, shape = stored_as(it.dtype, it.shape, it.name)
        nbytes = _shapes.nbytes(it.dtype, it.shape)
        header[it.name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    meta = dict(metadata)
    if checksum_key:
        meta[checksum_key] = "0" * 8 * len(items)
        meta[KEY_HEADER_CRC] = "0" * 8
    blob = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    if len(blob) > MAX_HEADER:
        raise ValueError(
            f"{path}: the header would be {len(blob)} bytes, over safetensors' 100 MB limit; store large values as tensors"
        )
    blob += b" " * (-(8 + len(blob)) % align)
    crcs: list[int] = []
    with atomic_write(path) as f, ThreadPoolExecutor(1) as pool:
        write_all(f, struct.pack("<Q", len(blob)) + blob)
        for it in items:
            nbytes = _shapes.nbytes(it.dtype, it.shape)
            span = it.span
            if span is not None and (span.crc32 is not None or not checksum_key) and copy_span(f, span, nbytes):
                crcs.append(span.crc32 or 0)
                continue
            t = it.get()
            if t.dtype != it.dtype or tuple(t.shape) != tuple(it.shape):
                raise ValueError(f"{path}: tensor {it.name!r} changed while saving (was {it.dtype} {list(it.shape)})")
            data = tensor_bytes(t)
            # the CRC of a large tensor runs on the other core while its bytes are written
            crc = pool.submit(checksum, data) if checksum_key and nbytes >= 1 << 20 else None
            small = checksum(data) if checksum_key and crc is None else 0
            write_all(f, data)
            crcs.append(crc.result() if crc is not None else small)
            del t, data  # let go before the next tensor is fetched: at most one is held at a time
        if checksum_key:
            head = bytearray(struct.pack("<Q", len(blob)) + blob)
            _patch(head, checksum_key, "".join(f"{c:08x}" for c in crcs))
            _patch(head, KEY_HEADER_CRC, f"{checksum(bytes(head)):08x}")  # last: it covers the tensor CRCs
            os.pwrite(f.fileno(), head, 0)  # same length: the data does not move
    return Path(path)


def _patch(head: bytearray, key: str, value: str) -> None:
    """Overwrite the reserved (zeroed, same-width) value of metadata ``key`` in ``head``."""
    marker = f'"{key}":"'.encode()
    at = head.index(marker) + len(marker)
    head[at : at + len(value)] = value.encode()


def checksums(header: Header, key: str) -> dict[str, int] | None:
    """The per-tensor CRC-32s recorded under metadata ``key`` (data order), or None if absent."""
    text = header.metadata.get(key)
    if text is None:
        return None
    order = sorted(header.entries.values(), key=lambda e: (e.begin, e.end))
    if len(text) != 8 * len(order):
        raise CorruptCheckpointError(
            f"{header.path}: metadata {key!r} lists {len(text) // 8} checksums for {len(order)} tensors"
        )
    try:
        return {e.name: int(text[8 * i : 8 * i + 8], 16) for i, e in enumerate(order)}
    except ValueError:
        raise CorruptCheckpointError(f"{header.path}: metadata {key!r} is not hexadecimal") from None


def _its_data(name: str) -> str:
    return "its data"


def checksum_problems(header: Header, key: str, describe: Callable[[str], str] = _its_data) -> list[str] | None:
    """Recompute every tensor's CRC-32 and compare with metadata ``key``; None if nothing is recorded.
    ``describe(name)`` says what is damaged in the messages (a format names where the tensor lives)."""
    recorded = checksums(header, key)
    if recorded is None:
        return None
    mapped = _sources.file(header.path, header.size).map
    view, page = memoryview(mapped), mmap.PAGESIZE
    entries = list(header.entries.values())

    def crc_of(e: Entry) -> int:
        if e.end == e.begin:
            return 0
        crc = checksum(view[e.begin : e.end])
        lo, hi = -(-e.begin // page) * page, e.end // page * page
        if hi > lo:  # pages read: hand them back, so checking a file does not grow RSS by its size
            mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return crc

    problems = []
    # CRC-32 releases the GIL: a large file is checked on every core (up to 4)
    workers = min(4, os.cpu_count() or 1) if header.size - header.data_start >= 64 << 20 else 1
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(crc_of, entries)) if workers > 1 else [crc_of(e) for e in entries]
    for entry, crc in zip(entries, found, strict=True):
        name = entry.name
        if crc != recorded[name]:
            problems.append(
                f"{header.path}: tensor {name!r} fails its checksum (stored {recorded[name]:08x}, read "
                f"{crc:08x}): {describe(name)} is damaged; restore the file from a copy or re-save it"
            )
    return problems


def header_problems(path: Path, raw: bytes | None = None) -> list[str] | None:
    """Check the CRC-32 of the length prefix and header (`KEY_HEADER_CRC`) on the raw bytes, so a
    damaged header is reported as such even when it no longer parses; None if the file records none.

    Example:
        >>> header_problems(Path("run.safeckpt"))
        []
    """
    if raw is None:
        raw, _ = read_raw_header(path)
    marker = f'"{KEY_HEADER_CRC}":"'.encode()
    at = raw.find(marker)
    if at < 0:
        return None
    at += len(marker)
    stored = raw[at : at + 8]
    if raw.find(marker, at) >= 0 or raw[at + 8 : at + 9] != b'"' or not all(c in b"0123456789abcdef" for c in stored):
        return [f"{path}: the header's checksum field {KEY_HEADER_CRC!r} is malformed: the header is damaged"]
    crc = checksum(raw[:at] + b"00000000" + raw[at + 8 :])
    if crc != int(stored, 16):
        return [
            f"{path}: the header fails its checksum (stored {stored.decode()}, read {crc:08x}): a tensor's name, "
            "dtype, shape or offsets, the metadata or the skeleton is damaged; restore the file from a copy or re-save it"
        ]
    return []


def verify_file(path: Path, key: str, *, required: bool, describe: Callable[[str], str] = _its_data) -> list[str]:
    """Every integrity problem of a safetensors file safeckpt wrote: its header checksum first (so
    a damaged header is named as such), its structure, then every tensor's CRC-32 (metadata ``key``).

    Files from other writers record neither checksum: with ``required=False`` that is no problem,
    but one checksum without the other is (a damaged key name). Never raises `CorruptCheckpointError`.

    Example:
        >>> verify_file(Path("run.safeckpt"), "safeckpt.crc32", required=True)
        []
    """
    try:
        raw, size = read_raw_header(path)
        head = header_problems(path, raw)
        if head:
            return head  # the header's parse, names and offsets cannot be trusted; tensors are not read
        header = parse_header(path, raw[8:], size)
        tensors = checksum_problems(header, key, describe)
    except CorruptCheckpointError as e:
        return [str(e)]
    if (head is None or tensors is None) and (required or head is not None or tensors is not None):
        missing = " and ".join(repr(k) for k, v in ((KEY_HEADER_CRC, head), (key, tensors)) if v is None)
        return [
            f"{path}: no checksum recorded ({missing} missing from the header's metadata): the header is damaged, "
            "or the file was not written by this safeckpt"
        ]
    return [*(head or []), *(tensors or [])]
