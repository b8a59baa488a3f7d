"""Reading and writing the safetensors container, shared by every format built on it.

Reading validates more than the safetensors library does (duplicate keys, a tensor named
``__metadata__``, non-string metadata), and is bounded: the header length is checked against the
100 MB cap and the file size before a byte of it is read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import operator
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from operator import add, mul, sub
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from .. import _dtypes, _shapes, _sources
from .._fs import MappedFile, Span, checksum, copy_span, crc32, tensor_bytes, write_all
from .._storage import atomic_write
from ..errors import CorruptCheckpointError
from ..tree import TensorRef, is_tensor

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100_000_000
MAX_DIMS = 64  # a shape of millions of dims costs a TensorRef, strides and messages per dim
MAGIC_MIN = 8 + 2  # length prefix + "{}"
# CRC-32 of the length prefix and the whole header (padding included) with this field's own 8 hex
# digits read as "00000000": covers every name, dtype, shape, offset, metadata value and the other
# checksums, which the per-tensor CRCs cannot (formats/safeckpt.md §2)
KEY_HEADER_CRC = "safeckpt.header_crc32"
# the metadata key of the per-tensor CRC-32s every safeckpt writer records (`write(checksum_key=...)`)
KEY_CRC = "safeckpt.crc32"

# safetensors dtype code -> torch-free dtype row (F4 counts 4-bit elements: torch's last dim is halved);
# `DTYPES`/`CODES`/`AS_REAL`, the same tables with torch's dtypes, are built on first use (`__getattr__`)
ROWS: dict[str, _dtypes.DType] = dict(_dtypes.BY_CODE)
BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# bits per element of every code a header may name (F6 has no torch dtype: read as raw bytes)
_CODE_BITS = {**{c: d.itemsize * 8 for c, d in ROWS.items()}, **BITS}
_CODE_BYTES = {c: b // 8 for c, b in _CODE_BITS.items() if not b % 8}
# dtypes safetensors lacks, stored as their real view (by torch name): complex128 as F64 [..., 2],
# complex32 as F16 [..., 2]
REAL_OF = {"complex128": "float64", "complex32": "float16"}


def __getattr__(name: str) -> Any:
    """``DTYPES`` (code -> ``torch.dtype``), ``CODES`` (its inverse) and ``AS_REAL`` (complex
    ``torch.dtype`` -> its real view's), built when first asked for: they import torch."""
    if name == "DTYPES":
        value: Any = {code: _dtypes.to_torch(row) for code, row in ROWS.items()}
    elif name == "CODES":
        value = {v: k for k, v in __getattr__("DTYPES").items()}
    elif name == "AS_REAL":
        value = {_dtypes.to_torch(c): _dtypes.to_torch(r) for c, r in REAL_OF.items()}
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


class Entry(NamedTuple):
    """One tensor of a safetensors header; ``begin``/``end`` are absolute file offsets."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype_info(self) -> _dtypes.DType:
        """The torch-free dtype row (``KeyError`` for a code torch lacks, such as F6)."""
        return ROWS[self.code]

    @property
    def dtype(self) -> torch.dtype:
        return _dtypes.to_torch(ROWS[self.code])

    @property
    def torch_shape(self) -> tuple[int, ...]:
        if self.code == "F4":
            return self.shape[:-1] + (self.shape[-1] // 2,)
        return self.shape


_new_entry = partial(tuple.__new__, Entry)  # Entry(*fields) without the Python-level __new__


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
    """Validate header bytes ``raw`` of a file of ``size`` bytes (see `read_header`).

    One pass: the JSON is parsed in C (objects as tuples of pairs, so a duplicate key shows as a
    dict shorter than its pairs) and every entry is checked in one tight loop. Anything that loop
    does not accept as plainly valid is parsed again by `_parse_checked`, which names the problem.
    """
    header = _parse_fast(path, raw, size)
    return header if header is not None else _parse_checked(path, raw, size)


_BEGIN, _END = operator.itemgetter(0), operator.itemgetter(1)


def _parse_fast(path: Path, raw: bytes, size: int) -> Header | None:
    """`_parse_columns`, None where a value of an unexpected type met one of its column operations."""
    try:
        return _parse_columns(path, raw, size)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError):
        return None


def _parse_columns(path: Path, raw: bytes, size: int) -> Header | None:
    """The header if it is plainly valid, else None (then `_parse_checked` says what is wrong).
    Accepts only what `_parse_checked` accepts, with the same result.

    Every check runs over whole columns in C (map, zip, set, sorted): per-entry Python work made
    reading a 600-tensor header take ~10x safetensors' Rust. A duplicate key, which ``json``
    silently resolves, is found by counting: every ``"`` not escaped (one after an odd run of
    backslashes, counted once each ``\\\\`` pair is taken out) delimits a string, so the text
    holds exactly as many strings as the parsed dicts account for, or a key was given twice.
    """
    try:
        text = raw.decode("utf-8")
        if not text.lstrip().startswith("{"):
            return None
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(obj) is not dict:
        return None
    strings = 1 + 2 * len(obj["__metadata__"]) if type(obj.get("__metadata__")) is dict else 0
    metadata = obj.pop("__metadata__", {})
    if type(metadata) is not dict or "data_offsets" in metadata or set(map(type, metadata.values())) - {str}:
        return None
    escaped = "\\" in text
    # JSON text that is valid UTF-8 holds a lone surrogate only through a \u escape
    if escaped and "\\u" in text and not all(map(is_unicode, (*obj, *metadata, *metadata.values()))):
        return None
    data_start = 8 + len(raw)
    if not obj:
        return Header(path, size, data_start, {}, metadata) if data_start == size else None
    names, infos = list(obj), list(obj.values())
    if "" in obj or set(map(len, infos)) != {3}:
        return None
    try:  # objects of three keys (above), and these three; a list or string has no such keys
        codes, shapes, offsets = list(map(_DTYPE, infos)), list(map(_SHAPE, infos)), list(map(_OFFSETS, infos))
        kinds = set(codes)  # a list fails here, a code of no known dtype below
    except (KeyError, TypeError):
        return None
    if not kinds <= _CODE_BITS.keys() or set(map(type, shapes)) != {list} or max(map(len, shapes)) > MAX_DIMS:
        return None
    dims = list(chain.from_iterable(shapes))
    # lists of two ints: JSON makes nothing else that unpacks into two columns of ints (the zip
    # fails on other lengths, which `_parse_fast` takes as None; a dict or string yields strings)
    begins, ends = zip(*offsets, strict=True)
    if set(map(type, chain(dims, begins, ends))) != {int} or min(chain(dims, begins)) < 0:
        return None
    quotes = text.count('"')
    if escaped:  # less the escaped ones: a quote after an odd run of backslashes
        quotes -= text.replace("\\\\", "").count('\\"') if "\\\\" in text else text.count('\\"')
    if quotes != 2 * (5 * len(obj) + strings):
        return None  # a key given twice
    numels = list(map(math.prod, shapes))
    if max(numels) >= 1 << 63 or (0 in numels and not all(map(_shapes.fits_int64, shapes))):
        return None
    sizes = list(map(sub, ends, begins))  # never negative once each equals its shape's bytes
    if kinds <= _CODE_BYTES.keys():
        if list(map(mul, numels, map(_CODE_BYTES.__getitem__, codes))) != sizes:
            return None
    elif list(map(mul, numels, map(_CODE_BITS.__getitem__, codes))) != list(map(mul, sizes, repeat(8))):
        return None
    if "F4" in kinds and any(c == "F4" and (not sh or sh[-1] % 2) for c, sh in zip(codes, shapes, strict=True)):
        return None
    if 0 in sizes:  # no hole, no overlap, in (begin, end) order as the checked parse has it
        spans = sorted(zip(begins, ends, strict=True))
        if spans[0][0] != 0 or data_start + spans[-1][1] != size:
            return None
        if list(map(_BEGIN, spans[1:])) != list(map(_END, spans[:-1])):
            return None
    else:  # each non-empty span begins where another ends, but the first: they tile [0, end)
        firsts, lasts = sorted(begins), sorted(ends)
        if firsts[0] != 0 or data_start + lasts[-1] != size or firsts[1:] != lasts[:-1]:
            return None
    starts, stops = map(add, begins, repeat(data_start)), map(add, ends, repeat(data_start))
    entries = dict(zip(names, map(_new_entry, zip(names, codes, map(tuple, shapes), starts, stops, strict=True)), strict=True))
    return Header(path, size, data_start, entries, metadata)


_DTYPE, _SHAPE, _OFFSETS = map(operator.itemgetter, ("dtype", "shape", "data_offsets"))


def _parse_checked(path: Path, raw: bytes, size: int) -> Header:
    """`parse_header` entry by entry, raising `CorruptCheckpointError` that names the first problem."""

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
    if not isinstance(code, str) or code not in _CODE_BITS:
        raise bad(f"tensor {name!r} has unknown dtype {short(code)}; known: {', '.join(_CODE_BITS)}")
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
    bits = _shapes.numel(shape) * _CODE_BITS[code]
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
    if e.code not in ROWS:
        raise CorruptCheckpointError(
            f"{mapped.path}: tensor {e.name!r} has dtype {e.code}, which torch cannot represent"
        )
    return mapped.tensor(e.begin, e.end - e.begin, e.dtype, e.torch_shape)


def entry_bytes(mapped: MappedFile, e: Entry) -> torch.Tensor:
    """An entry's raw bytes as ``uint8`` (for dtypes torch lacks, such as F6)."""
    n = e.end - e.begin
    return mapped.tensor(e.begin, n, _dtypes.to_torch("uint8"), (n,))


def entry_complex(mapped: MappedFile, e: Entry) -> torch.Tensor:
    """An entry stored as the real view of a complex tensor (``[..., 2]``), viewed as complex."""
    import torch

    return torch.view_as_complex(entry_tensor(mapped, e))


class EntryRef(TensorRef):
    """The `TensorRef` of a header entry, built without running Python per tensor: `entry_refs`
    makes a header's references with ``map`` over its columns in C, and each reads its fields off
    its `Entry` and `EntryFile` (``_e``, ``_file``) when asked. Its ``loader`` and ``span`` are made
    when first read. Opening a 600-tensor header with references built one by one, each with its
    loader and span, cost more than parsing the header did.

    ``read``: how the entry's bytes become a tensor (`entry_tensor`; `entry_bytes` for a dtype
    torch lacks, `entry_complex` for the real view of a complex tensor). ``dataclasses.replace``
    of one gives a plain `TensorRef` with the fields it had and those replaced.

    Example:
        >>> ref = entry_refs(EntryFile("m.safetensors", mapped, {}), header.entries)["w"]
        >>> ref.shape, ref.span.offset == header.entries["w"].begin
        ((4, 4), True)
    """

    __slots__ = ("_e", "_file")
    if TYPE_CHECKING:
        _e: Entry
        _file: EntryFile
    name = view = property(operator.attrgetter("_e.name"))  # type: ignore[assignment]
    source = storage = property(operator.attrgetter("_file.source"))  # type: ignore[assignment]
    shape = property(operator.attrgetter("_e.shape"))  # type: ignore[assignment]
    read = staticmethod(entry_tensor)
    # one tensor per file and name; built in C, as `Checkpoint.nbytes` asks it of every reference
    alias_key = property(operator.attrgetter("_file.source", "_e.name"))  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        return self._e.end - self._e.begin  # checked against the shape and dtype when the header was read

    def __new__(cls, *args: Any, **kwargs: Any) -> TensorRef:  # type: ignore[misc]
        # what dataclasses.replace and a caller's EntryRef(...) get: the fields live on the
        # instance there, which this class's properties would hide
        return TensorRef(*args, **kwargs)

    def __copy__(self) -> EntryRef:  # frozen: a copy is the reference itself (the default would call __new__)
        return self

    @property
    def _dtype(self) -> _dtypes.DType:
        return ROWS[self._e.code]

    @functools.cached_property
    def loader(self) -> Callable[[], torch.Tensor]:  # type: ignore[override]
        return partial(self.read, self._file.mapped, self._e)

    @functools.cached_property
    def span(self) -> Span:  # type: ignore[override]
        return Span(self._file.mapped, self._e.begin, self._file.crcs.get(self._e.name))


class F4EntryRef(EntryRef):
    """An F4 entry: torch's ``float4_e2m1fn_x2`` packs two elements a byte (its last dim halved)."""

    __slots__ = ()
    shape = property(operator.attrgetter("_e.torch_shape"))  # type: ignore[assignment]


class RawEntryRef(EntryRef):
    """An entry of a dtype torch lacks (F6), read as its raw ``uint8`` bytes."""

    __slots__ = ()
    _dtype = _dtypes.BY_NAME["uint8"]  # type: ignore[assignment]
    read = staticmethod(entry_bytes)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self._e.end - self._e.begin,)


class ComplexEntryRef(EntryRef):
    """An entry stored as the ``[..., 2]`` real view of a complex tensor, read as the complex one."""

    __slots__ = ()
    read = staticmethod(entry_complex)

    @property
    def _dtype(self) -> _dtypes.DType:
        return _COMPLEX_OF[ROWS[self._e.code].name]

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self._e.shape[:-1]


_COMPLEX_OF = {real: _dtypes.BY_NAME[c] for c, real in REAL_OF.items()}  # float64 -> complex128 ...


class EntryFile(NamedTuple):
    """What a file's `EntryRef`s share: its name (``source``), its map, its recorded CRC-32s by name."""

    source: str
    mapped: MappedFile
    crcs: dict[str, int]


_new = object.__new__
_set_e, _set_file = EntryRef._e.__set__, EntryRef._file.__set__  # type: ignore[attr-defined]
PLAIN_CODES = frozenset(ROWS) - {"F4"}  # codes an `EntryRef` reads as they are


def entry_ref(file: EntryFile, e: Entry, cls: type[EntryRef] | None = None) -> EntryRef:
    """The reference to entry ``e`` of ``file``: of class ``cls``, or the one its dtype needs
    (`EntryRef`, `F4EntryRef`, `RawEntryRef` for a dtype torch lacks).

    Example:
        >>> entry_ref(EntryFile("m.safetensors", mapped, {}), header.entries["w"]).dtype
        torch.float32
    """
    if cls is None:
        cls = EntryRef if e.code in PLAIN_CODES else F4EntryRef if e.code == "F4" else RawEntryRef
    ref = _new(cls)
    _set_e(ref, e)
    _set_file(ref, file)
    return ref  # type: ignore[no-any-return]


def entry_refs(file: EntryFile, entries: dict[str, Entry]) -> dict[str, EntryRef]:
    """`entry_ref` of every entry, by name, in the header's order.

    Example:
        >>> refs = entry_refs(EntryFile(str(path), mapped, {}), read_header(path).entries)
    """
    es = list(entries.values())
    if not set(map(_CODE, es)) <= PLAIN_CODES:
        return {name: entry_ref(file, e) for name, e in entries.items()}
    refs = list(map(_new, repeat(EntryRef, len(es))))
    deque(map(_set_e, refs, es), maxlen=0)  # each a C call: no Python runs per tensor
    deque(map(_set_file, refs, repeat(file)), maxlen=0)
    return dict(zip(entries, refs, strict=True))


_CODE = operator.itemgetter(1)


# -- writing --------------------------------------------------------------------------------------


@dataclass
class Item:
    """A tensor to write: its name, what it is declared as, and how to get its bytes."""

    name: str
    dtype: torch.dtype | _dtypes.DType
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
    if is_tensor(x):  # torch is imported: x is one of its tensors
        import torch

        if x.device.type == "meta":
            raise TypeError(f"{where} is a meta tensor: it has no data to save")
        if x.layout != torch.strided:
            raise TypeError(f"{where} is a {x.layout} tensor; save x.to_dense() or its components instead")
    stored_as(x.dtype_info if isinstance(x, TensorRef) else x.dtype, tuple(x.shape), where)


def row_of(dtype: torch.dtype | _dtypes.DType) -> _dtypes.DType | None:
    """The torch-free row of a ``torch.dtype`` or `_dtypes.DType`; None for one the table lacks."""
    try:
        return _dtypes.of(dtype)
    except KeyError:
        return None


def real_view(dtype: torch.dtype | _dtypes.DType) -> _dtypes.DType | None:
    """The dtype a complex type safetensors lacks is stored as (complex128 as float64), else None.

    Example:
        >>> real_view(torch.complex128), real_view(torch.float32)
        (torch.float64, None)
    """
    row = row_of(dtype)
    real = REAL_OF.get(row.name) if row is not None else None
    return _dtypes.BY_NAME[real] if real is not None else None


def stored_as(dtype: torch.dtype | _dtypes.DType, shape: tuple[int, ...], where: str) -> tuple[str, list[int]]:
    """The safetensors dtype code and header shape a tensor of ``dtype`` is written with."""
    real = real_view(dtype)
    if real is not None:
        return str(real.code), [*shape, 2]
    row = row_of(dtype)
    if row is None or row.code is None:
        shown = f"torch.{dtype.name}" if isinstance(dtype, _dtypes.DType) else str(dtype)
        raise TypeError(
            f"{where} has dtype {shown}, which safetensors cannot hold and safeckpt has no lossless encoding for; "
            "convert it (e.g. a quantized tensor's .int_repr() and its scale) before saving"
        )
    if row.code == "F4":
        return "F4", [*shape[:-1], shape[-1] * 2] if shape else [2]
    return row.code, list(shape)


def _stored_itemsize(dtype: torch.dtype | _dtypes.DType) -> int:
    real = real_view(dtype)
    return real.itemsize if real is not None else _dtypes.of(dtype).itemsize


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
    header is padded with spaces so the data starts on an ``align``-byte boundary, or on an 8-byte
    one where that keeps the bytes it copies from another file at their offset in a page
    (`_padding`). With
    ``checksum_key``, the metadata entry of that name holds each tensor's CRC-32 (8 hex digits, in
    data order), computed while writing.
    """
    items = sorted(items, key=lambda it: -_stored_itemsize(it.dtype))
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
    blob += b" " * _padding(8 + len(blob), align, items)
    with atomic_write(path) as f, ThreadPoolExecutor(1) as pool, contextlib.ExitStack() as opened:
        sources: dict[int, BinaryIO] = {}  # each source file opened once, however many spans it holds

        def source(span: Span) -> BinaryIO:
            """``span.file`` opened (`CorruptCheckpointError` if it changed since it was read)."""
            if id(span.file) not in sources:
                sources[id(span.file)] = opened.enter_context(span.file.open())
                # mapped now, while the path still holds it, as reading a tensor would: a writer
                # replacing its source (a reshard in place) leaves later readers (the check) the map
                span.file.map  # noqa: B018
            return sources[id(span.file)]

        write_all(f, struct.pack("<Q", len(blob)) + blob)
        crcs_or_pending: list[int | Future[int]] = []
        run: list[Any] = []  # [span, nbytes]: the bytes of spans that follow each other in one file

        def flush() -> None:  # copied as one, in the kernel
            if run:
                whole, n = run
                if not copy_span(f, whole, n, source(whole)):
                    write_all(f, span_bytes(whole, n))  # the kernel cannot: from the map
                run.clear()

        for it in items:
            nbytes = _shapes.nbytes(it.dtype, it.shape)
            span = it.span
            if span is not None:  # the source's bytes as they are: no torch, no copy through the process
                if span.crc32 is not None or not checksum_key:
                    crcs_or_pending.append(span.crc32 or 0)
                else:  # another writer's file records none: the other core reads the bytes for it
                    crcs_or_pending.append(pool.submit(span_crc, span, nbytes, source(span)))
                if run and run[0].file is span.file and run[0].offset + run[1] == span.offset:
                    run[1] += nbytes
                else:
                    flush()
                    run[:] = [span, nbytes]
                continue
            flush()
            t = it.get()
            if _dtypes.of(t.dtype) is not _dtypes.of(it.dtype) or tuple(t.shape) != tuple(it.shape):
                raise ValueError(f"{path}: tensor {it.name!r} changed while saving (was {it.dtype} {list(it.shape)})")
            data = tensor_bytes(t)
            # the CRC of a large tensor runs on the other core while its bytes are written
            crc = pool.submit(checksum, data) if checksum_key and nbytes >= 1 << 20 else None
            small = checksum(data) if checksum_key and crc is None else 0
            write_all(f, data)
            crcs_or_pending.append(crc.result() if crc is not None else small)
            del t, data  # let go before the next tensor is fetched: at most one is held at a time
        flush()
        crcs = [c if isinstance(c, int) else c.result() for c in crcs_or_pending]
        if checksum_key:
            head = bytearray(struct.pack("<Q", len(blob)) + blob)
            _patch(head, checksum_key, "".join(f"{c:08x}" for c in crcs))
            _patch(head, KEY_HEADER_CRC, f"{checksum(bytes(head)):08x}")  # last: it covers the tensor CRCs
            os.pwrite(f.fileno(), head, 0)  # same length: the data does not move
    return Path(path)


PAGE = 4096


def _padding(end: int, align: int, items: list[Item]) -> int:
    """Spaces after a header ending at byte ``end``: to the next ``align``-byte boundary or, where
    ``items`` copy a run of at least a page from another file (`Item.span`), to where the largest
    run keeps its offset within a page, if that is a multiple of 8 (safetensors' alignment, which
    keeps every tensor naturally aligned). The kernel copies a run page to page only then: 3 GB
    took 1.49 s so and 1.96 s with the destination 1000 bytes further on (ext4, copy_file_range;
    benchmarks/copy_floor.py)."""
    best, out = (0, 0), 0
    run: list[Any] = [None, 0, 0, 0]  # the file, source offset, output offset and bytes of a run
    for it in items:
        nbytes, span = _shapes.nbytes(it.dtype, it.shape), it.span
        if span is None:
            run = [None, 0, 0, 0]
        elif run[0] is span.file and run[1] + run[3] == span.offset:
            run[3] += nbytes
        else:
            run = [span.file, span.offset, out, nbytes]
        if run[0] is not None and run[3] > best[0]:
            best = (run[3], run[1] - run[2])
        out += nbytes
    if best[0] >= PAGE and best[1] % 8 == 0:
        return (best[1] - end) % PAGE
    return -end % align


def span_bytes(span: Span, nbytes: int) -> memoryview:
    """The ``nbytes`` at ``span`` in its file's map (`CorruptCheckpointError` if they run past its end)."""
    if nbytes == 0:
        return memoryview(b"")
    span.file.check_range(span.offset, nbytes, str(span.file.path))
    return memoryview(span.file.map)[span.offset : span.offset + nbytes]


def span_crc(span: Span, nbytes: int, source: BinaryIO) -> int:
    """The CRC-32 of the ``nbytes`` at ``span``, read from ``source`` (``span.file`` opened) in pieces,
    not through the shared map: the RSS of a conversion stays flat, and pages a caller wrote to
    are left alone."""
    crc, pos, left = 0, span.offset, nbytes
    buf = bytearray(min(nbytes, CRC_PIECE))
    while left:
        view = memoryview(buf)[: min(left, len(buf))]
        n = os.preadv(source.fileno(), [view], pos)
        if n == 0:
            raise CorruptCheckpointError(f"{span.file.path}: ends before byte {pos + left}")
        crc = crc32(view[:n], crc)
        pos, left = pos + n, left - n
    return crc


CRC_PIECE = 4 << 20


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
    order = sorted(header.entries.values(), key=_DATA_ORDER)
    if len(text) != 8 * len(order):
        raise CorruptCheckpointError(
            f"{header.path}: metadata {key!r} lists {len(text) // 8} checksums for {len(order)} tensors"
        )
    try:  # all at once in C; text fromhex reads differently (spaces) is parsed digit group by group
        values = struct.unpack(f">{len(order)}I", bytes.fromhex(text))
    except (ValueError, struct.error):
        values = None
    if values is not None:
        return dict(zip(map(_NAME, order), values, strict=True))
    try:
        return {e.name: int(text[8 * i : 8 * i + 8], 16) for i, e in enumerate(order)}
    except ValueError:
        raise CorruptCheckpointError(f"{header.path}: metadata {key!r} is not hexadecimal") from None


_DATA_ORDER, _NAME = operator.itemgetter(3, 4), operator.itemgetter(0)  # an Entry's (begin, end), name


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
    view = memoryview(raw)  # the CRC over the three pieces: the header is not copied to zero the field
    crc = crc32(view[at + 8 :], crc32(b"00000000", crc32(view[:at])))
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
