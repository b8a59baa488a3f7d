"""``dcp``: ``torch.distributed.checkpoint`` directories, read without running pickle (spec: ``formats/dcp.md``).

A DCP directory holds ``.metadata`` (a pickle of torch dataclasses: what every value is and where
its bytes are) and ``__<rank>_<n>.distcp`` files, each a run of complete ``torch.save`` archives
(one per value or tensor chunk) or, in the safetensors variant, archives for the non-tensor values
followed by one safetensors blob. ``.metadata`` is parsed by the restricted VM with handlers for
exactly those dataclasses; every storage entry is checked against the directory (a bare file
name, inside the file, no two segments overlapping) and every tensor's chunks against its size
(inside it, tiling it exactly). Tensors stay lazy: loading one reads only the segments of its
chunks and assembles them. Lightning Fabric's FSDP layout adds ``meta.pt``, merged on top like
Fabric's ``_load_distributed_checkpoint`` does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._fs import MappedFile, member_problem
from ..errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ..tree import Checkpoint, TensorRef, path_name
from . import Format, _zip, torch_pickle
from . import _safetensors as st
from ._pickle import BASE, DTYPE_GLOBALS, Handler, globals_in, load
from ._tiling import tiling_error

NAME = "dcp"
EXTENSIONS: tuple[str, ...] = ()
METADATA = ".metadata"
FABRIC_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
MAX_METADATA = 1 << 30

_MD = "torch.distributed.checkpoint.metadata."
_FS = "torch.distributed.checkpoint.filesystem."


def sniff(head: bytes, path: Path) -> bool:
    """A directory holding a ``.metadata`` file that starts like a pickle.

    Example:
        >>> sniff(b"", Path("checkpoints/step-100"))  # written by dcp.save
        True
    """
    meta = path / METADATA
    if not path.is_dir() or not meta.is_file():
        return False
    with open(meta, "rb") as f:
        return f.read(1) == b"\x80"


# -- .metadata: the dataclasses, as our own records --------------------------------------------------


@dataclass(frozen=True, eq=False)
class Chunk:
    """A box of a tensor: ``offsets`` where it starts in each dimension, ``sizes`` its extent."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True, eq=False)
class TensorItem:
    """``TensorStorageMetadata``: a tensor's dtype, full size and the chunks it was saved in."""

    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)


@dataclass(frozen=True, eq=False)
class BytesItem:
    """``BytesStorageMetadata``: a non-tensor value, saved as one ``torch.save`` archive."""


@dataclass(frozen=True)
class Index:
    """``MetadataIndex``: the key of a storage entry (``offset`` is a tensor chunk's offsets).

    The only record that is hashed (a dict key): equal on ``(fqn, offset)``, like torch's. The other
    records hash by identity, so a crafted pickle cannot make key hashing cost more than its bytes.
    """

    fqn: str
    offset: tuple[int, ...] | None


@dataclass(frozen=True, eq=False)
class Storage:
    """``_StorageInfo``: bytes ``[offset, offset + length)`` of ``relative_path``."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class Metadata:
    """``Metadata``: what is saved (``items``), where it goes in the tree and where its bytes are."""

    items: dict[str, TensorItem | BytesItem]
    planner: dict[str, tuple[str | int, ...]] | None
    storage: dict[Index, Storage]
    version: str | None = None
    checkpoint_id: str | None = None


class _New:
    """What ``NEWOBJ`` of a DCP dataclass makes: a box that its ``BUILD`` fills with our record.

    ``BUILD`` fills the box in place rather than replacing it (the VM would then rescan its memo),
    and the box hashes by identity, so nothing is hashed while unpickling; `_unbox` takes the
    record out, checking its type.
    """

    __slots__ = ("cls", "value")

    def __init__(self, cls: str) -> None:
        self.cls = cls
        self.value: Any = None


def _unbox(x: Any, cls: type | tuple[type, ...]) -> Any:
    """The record in ``x`` (or ``x`` itself) if it is a ``cls``, else None."""
    v = x.value if isinstance(x, _New) else x
    return v if isinstance(v, cls) else None


class _MemFormat(int):
    """``_MEM_FORMAT_ENCODING`` member (0 contiguous, 1 channels_last, 2 preserve)."""


@dataclass(frozen=True, eq=False)
class _Properties:
    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class _StorageMeta:
    checkpoint_id: str | None


def _fields(state: Any, cls: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CorruptCheckpointError(f"{cls} state must be a dict of field names, got {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise CorruptCheckpointError(f"{cls} lacks field(s) {missing}")
    return {k: state.get(k) for k in required + optional}


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(x, (tuple, list))
        or len(x) > torch_pickle.MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in x)
    ):
        raise CorruptCheckpointError(f"{what} must be up to {torch_pickle.MAX_DIMS} non-negative ints, got {x!r:.80}")
    return tuple(x)


def _chunk(state: dict[str, Any]) -> Chunk:
    f = _fields(state, "ChunkStorageMetadata", ("offsets", "sizes"))
    offsets, sizes = _ints(f["offsets"], "chunk offsets"), _ints(f["sizes"], "chunk sizes")
    if len(offsets) != len(sizes):
        raise CorruptCheckpointError(f"chunk offsets {offsets} and sizes {sizes} differ in rank")
    return Chunk(offsets, sizes)


def _properties(state: Any) -> _Properties:
    # TensorProperties.__getstate__: (dtype, layout, requires_grad, memory format encoding, pin_memory)
    if not (isinstance(state, tuple) and len(state) == 5):
        raise CorruptCheckpointError("TensorProperties state must be a 5-tuple")
    dtype, layout, requires_grad, mem, pin = state
    if not isinstance(dtype, torch.dtype) or type(requires_grad) is not bool or type(pin) is not bool:
        raise CorruptCheckpointError(f"TensorProperties state {state!r:.120} has wrong types")
    if str(dtype).startswith("torch.q"):
        raise CorruptCheckpointError(f"a tensor of dtype {dtype}: DCP saves no quantized tensors")
    if layout is not torch.strided:
        raise CorruptCheckpointError(f"a tensor of layout {layout}: DCP saves strided tensors only")
    if not isinstance(mem, _MemFormat):
        raise CorruptCheckpointError("TensorProperties memory format is not a _MEM_FORMAT_ENCODING")
    return _Properties(dtype)


def _tensor_item(state: Any) -> TensorItem:
    f = _fields(state, "TensorStorageMetadata", ("properties", "size", "chunks"))
    props = _unbox(f["properties"], _Properties)
    chunks = [_unbox(c, Chunk) for c in f["chunks"]] if isinstance(f["chunks"], list) else [None]
    if props is None:
        raise CorruptCheckpointError("TensorStorageMetadata.properties is not a TensorProperties")
    if None in chunks:
        raise CorruptCheckpointError("TensorStorageMetadata.chunks is not a list of ChunkStorageMetadata")
    size = _ints(f["size"], "tensor size")
    if math.prod(d or 1 for d in size) >= 1 << 63:  # torch computes strides even when a 0 dim means no elements
        raise CorruptCheckpointError(f"tensor size {list(size)} spans more than 2**63-1 elements (limit)")
    return TensorItem(props.dtype, size, tuple(c for c in chunks if c is not None))


def _index(state: Any) -> Index:
    f = _fields(state, "MetadataIndex", ("fqn",), ("offset", "index"))
    if not isinstance(f["fqn"], str) or not (f["index"] is None or type(f["index"]) is int):
        raise CorruptCheckpointError(f"MetadataIndex {state!r:.120} has wrong types")
    return Index(f["fqn"], None if f["offset"] is None else _ints(f["offset"], "MetadataIndex.offset"))


def _storage(state: Any) -> Storage:
    f = _fields(state, "_StorageInfo", ("relative_path", "offset", "length"), ("transform_descriptors",))
    unknown = set(state) - set(f)
    if unknown:  # a newer torch describing its bytes in a way we would misread
        raise CorruptCheckpointError(f"_StorageInfo has fields {sorted(unknown)} that safeckpt does not know")
    path, offset, length, transforms = f["relative_path"], f["offset"], f["length"], f["transform_descriptors"] or ()
    if not isinstance(path, str) or type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise CorruptCheckpointError(f"_StorageInfo {state!r:.120} has wrong types or negative numbers")
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise CorruptCheckpointError("_StorageInfo.transform_descriptors must be strings")
    return Storage(path, offset, length, tuple(transforms))


def _storage_meta(state: Any) -> _StorageMeta:
    f = _fields(state, "StorageMeta", (), ("checkpoint_id",))
    cid = f["checkpoint_id"]
    return _StorageMeta(None if cid is None else str(cid) if isinstance(cid, (str, os.PathLike)) else None)


def _metadata(state: Any) -> Metadata:
    f = _fields(
        state, "Metadata", ("state_dict_metadata",), ("planner_data", "storage_data", "storage_meta", "version")
    )
    items, planner, storage = f["state_dict_metadata"], f["planner_data"], f["storage_data"]
    if isinstance(items, dict):
        items = {k: _unbox(v, (TensorItem, BytesItem)) for k, v in items.items()}
    if not isinstance(items, dict) or not all(isinstance(k, str) and v is not None for k, v in items.items()):
        raise CorruptCheckpointError("Metadata.state_dict_metadata must map names to Tensor/BytesStorageMetadata")
    if isinstance(storage, dict):  # equal keys: the last wins, as in the dict torch unpickles
        storage = {_unbox(k, Index): _unbox(v, Storage) for k, v in storage.items()}
    if not isinstance(storage, dict) or None in storage or None in storage.values():
        raise CorruptCheckpointError("Metadata.storage_data must map MetadataIndex to _StorageInfo (FileSystemWriter)")
    if planner is not None:
        ok = isinstance(planner, dict) and all(
            isinstance(k, str)
            and isinstance(v, tuple)
            and 0 < len(v) <= torch_pickle.MAX_DEPTH
            and all(isinstance(p, str) or (type(p) is int and p >= 0) for p in v)
            for k, v in planner.items()
        )
        if not ok:
            raise CorruptCheckpointError(
                f"Metadata.planner_data must map names to tuples of 1 to {torch_pickle.MAX_DEPTH} keys (str, int >= 0)"
            )
    version = f["version"] if isinstance(f["version"], str) else None
    meta = f["storage_meta"]
    if meta is not None and _unbox(meta, _StorageMeta) is None:
        raise CorruptCheckpointError("Metadata.storage_meta is not a StorageMeta")
    meta = _unbox(meta, _StorageMeta)
    return Metadata(items, planner, storage, version, meta.checkpoint_id if meta else None)


def _dataclass(cls: str, make: Callable[[Any], Any]) -> Handler:
    def new(*args: Any) -> _New:
        if args:
            raise CorruptCheckpointError(f"{cls} is built with NEWOBJ and no arguments")
        return _New(cls)

    def build(obj: Any, state: Any) -> Any:
        if not isinstance(obj, _New) or obj.cls != cls or obj.value is not None:
            raise CorruptCheckpointError(f"a second BUILD of a {cls}")
        obj.value = make(state)
        return obj

    return Handler(new=new, build=build)


def _no_state(obj: Any, state: Any) -> Any:
    if state not in (None, {}):
        raise CorruptCheckpointError(f"{type(obj).__name__} has no fields, the pickle sets {state!r:.80}")
    return obj


def _mem_format(value: Any) -> _MemFormat:
    if type(value) is not int or value not in (0, 1, 2):
        raise CorruptCheckpointError(f"_MEM_FORMAT_ENCODING({value!r}) is not a member")
    return _MemFormat(value)


HANDLERS: dict[str, Handler] = {
    _MD + "Metadata": _dataclass("Metadata", _metadata),
    _MD + "TensorStorageMetadata": _dataclass("TensorStorageMetadata", _tensor_item),
    # a dataclass without fields pickles as NEWOBJ alone (no BUILD)
    _MD + "BytesStorageMetadata": Handler(new=lambda: BytesItem(), build=_no_state),
    _MD + "ChunkStorageMetadata": _dataclass("ChunkStorageMetadata", _chunk),
    _MD + "TensorProperties": _dataclass("TensorProperties", _properties),
    _MD + "MetadataIndex": _dataclass("MetadataIndex", _index),
    _MD + "StorageMeta": _dataclass("StorageMeta", _storage_meta),
    _MD + "_MEM_FORMAT_ENCODING": Handler(call=_mem_format),
    _FS + "_StorageInfo": _dataclass("_StorageInfo", _storage),
}


# exactly what .metadata may name: the DCP dataclasses, torch.Size, layouts, dtypes, a pathlib path
META_GLOBALS = frozenset(
    [*HANDLERS, "torch.Size", "torch.serialization._get_layout"]
    + list(DTYPE_GLOBALS)
    + [n for n in BASE if n.startswith("pathlib.")]
)


def read_metadata(path: Path) -> Metadata:
    """Parse a DCP ``.metadata`` file through the restricted VM (no torch class is touched).

    Example:
        >>> meta = read_metadata(Path("ckpt/.metadata"))
        >>> meta.items["model.0.weight"].chunks
        (Chunk(offsets=(0, 0), sizes=(3, 4)), Chunk(offsets=(3, 0), sizes=(3, 4)))
    """
    size = path.stat().st_size
    if size > MAX_METADATA:
        raise CorruptCheckpointError(f"{path}: {size} bytes is more than any DCP .metadata (limit {MAX_METADATA})")
    data = path.read_bytes()
    try:
        refused = [n for n in globals_in(data) if n not in META_GLOBALS]
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(str(e).replace("<pickle>", str(path), 1)) from None
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: the DCP metadata refers to {', '.join(map(repr, refused[:8]))}, outside the classes torch writes "
            "there; nothing was imported or run. Do not load this checkpoint with torch either: "
            "torch reads .metadata with pickle.load"
        )
    obj = load(data, source=str(path), extra=HANDLERS).value
    meta = _unbox(obj, Metadata)
    if meta is None:
        raise CorruptCheckpointError(f"{path}: holds a {type(obj).__name__}, not a DCP Metadata")
    return meta


# -- the directory: files, segments, and what lies in them -----------------------------------------


class _Dir:
    """A checkpoint directory: its data files mapped once, and the segments parsed so far."""

    def __init__(self, path: Path, allow: tuple[str, ...]) -> None:
        self.path = path
        self.allow = allow
        self.meta_file = path / METADATA
        self._real = os.path.realpath(path)
        self._files: dict[str, MappedFile] = {}
        self._sizes: dict[str, int] = {}
        self._archives: dict[tuple[str, int], _zip.Archive] = {}
        self._blobs: dict[tuple[str, int], tuple[st.Header, dict[str, Any]]] = {}

    def bad(self, what: str, hint: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.meta_file}: {what}", path=self.meta_file, hint=hint)

    def file(self, name: str, fqn: str) -> MappedFile:
        """The data file ``name`` refers to: a plain file name inside the directory, nothing else."""
        if name not in self._files:
            if (
                not name
                or name in (".", "..", METADATA)
                or "/" in name
                or "\\" in name
                or "\x00" in name
                or os.path.isabs(name)
            ):
                raise self.bad(
                    f"the storage entry of {fqn!r} points to {name!r}, which is not a file name inside the checkpoint "
                    "directory; safeckpt reads only files next to .metadata (the file was crafted or damaged)",
                    hint="the file was crafted or damaged",
                )
            target = self.path / name
            if member_problem(self.path, name) is not None:  # the rule every directory format shares
                raise self.bad(
                    f"the storage entry of {fqn!r} points to {name!r}, which is missing or not a regular file in "
                    f"{self.path} (copy every .distcp file of the checkpoint)"
                )
            self._files[name] = MappedFile(target)
            self._sizes[name] = target.stat().st_size
        return self._files[name]

    def size(self, name: str) -> int:
        return self._sizes[name]

    def head(self, name: str, offset: int, n: int) -> bytes:
        size = self._sizes[name]
        if offset >= size:
            return b""
        return bytes(self._files[name].map[offset : min(size, offset + n)])

    def kind(self, name: str, offset: int) -> str:
        """``zip`` for a torch archive at ``offset``, ``safetensors`` for a safetensors blob."""
        head = self.head(name, offset, 64)
        if head[:4] == _zip.LOCAL:
            return "zip"
        if st.looks_like(head + b"  "):
            return "safetensors"
        raise self.bad(
            f"byte {offset} of {name} starts neither a torch.save archive nor a safetensors blob "
            f"({head[:8].hex() or 'end of file'}); the file is damaged or the metadata is wrong",
            hint="the file is damaged or the metadata is wrong",
        )

    def blob(self, s: Storage) -> tuple[st.Header, dict[str, Any]]:
        """The safetensors blob at ``s.offset`` (it runs to the end of the file) and its sharding info."""
        key = (s.relative_path, s.offset)
        if key not in self._blobs:
            mapped, size = self._files[s.relative_path], self._sizes[s.relative_path]
            where = _where(mapped.path, s)
            prefix = self.head(s.relative_path, s.offset, 8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(f"{where}: truncated safetensors blob")
            (n,) = struct.unpack("<Q", prefix)
            if n > st.MAX_HEADER or s.offset + 8 + n > size:
                raise CorruptCheckpointError(f"{where}: safetensors header of {n} bytes runs past the end of the file")
            raw = self.head(s.relative_path, s.offset + 8, n)
            header = st.parse_header(Path(where), raw, size - s.offset)
            sharding: dict[str, Any] = {}
            if "DCP_SHARDING_INFO" in header.metadata:
                try:
                    sharding = json.loads(header.metadata["DCP_SHARDING_INFO"])
                except (ValueError, RecursionError):
                    sharding = None  # type: ignore[assignment]
                if not isinstance(sharding, dict):
                    raise CorruptCheckpointError(f"{where}: DCP_SHARDING_INFO is not a JSON object")
            self._blobs[key] = (header, sharding)
        return self._blobs[key]

    def note_archive(self, s: Storage, archive: _zip.Archive) -> None:
        self._archives[s.relative_path, s.offset] = archive

    def archives(self) -> list[tuple[MappedFile, _zip.Archive]]:
        return [(self._files[name], a) for (name, _), a in self._archives.items()]


def _where(path: Path, s: Storage) -> str:
    return f"{path} (bytes {s.offset}..{s.offset + s.length})"


def _check_layout(d: _Dir, meta: Metadata) -> dict[tuple[str, int], str]:
    """Every storage entry inside its file, segments disjoint; returns each segment's kind."""
    by_file: dict[str, dict[int, list[tuple[Index, Storage]]]] = {}
    for idx, s in meta.storage.items():
        if s.transforms:
            raise d.bad(
                f"{idx.fqn!r} is stored through stream transforms {list(s.transforms)} (e.g. zstd compression), "
                "which safeckpt does not read; save the checkpoint without _extensions"
            )
        d.file(s.relative_path, idx.fqn)
        size = d.size(s.relative_path)
        if s.offset + s.length > size:
            raise d.bad(
                f"the bytes of {idx.fqn!r} [{s.offset}, {s.offset + s.length}) lie past the end of "
                f"{s.relative_path} ({size} bytes); the file is truncated"
            )
        by_file.setdefault(s.relative_path, {}).setdefault(s.offset, []).append((idx, s))
    kinds: dict[tuple[str, int], str] = {}
    for name, segments in by_file.items():
        spans: list[tuple[int, int, str]] = []
        for offset, entries in sorted(segments.items()):
            kind = kinds[name, offset] = d.kind(name, offset)
            first = entries[0][0].fqn
            if kind == "zip":
                if len(entries) > 1:
                    raise d.bad(f"{first!r} and {entries[1][0].fqn!r} claim the same bytes at {offset} of {name}")
                spans.append((offset, offset + entries[0][1].length, first))
            else:  # the safetensors variant: one blob per file, to its end, holding that file's tensor chunks
                plain = [i.fqn for i, _ in entries if i.offset is None]
                if plain:
                    raise d.bad(f"non-tensor value {plain[0]!r} points into the safetensors blob at {offset} of {name}")
                spans.append((offset, d.size(name), first))
        for (_, a_end, a), (b_start, _, b) in itertools.pairwise(spans):
            if b_start < a_end:
                raise d.bad(f"the bytes of {a!r} and {b!r} overlap in {name} (at {b_start}); the metadata was crafted")
    return kinds


def _check_chunks(d: _Dir, fqn: str, item: TensorItem, meta: Metadata) -> None:
    """The chunks lie inside the tensor and tile it exactly; each has its bytes stored."""
    nd, total = len(item.size), 0
    boxes: list[Chunk] = []
    for c in item.chunks:
        if len(c.offsets) != nd or any(o + s > n for o, s, n in zip(c.offsets, c.sizes, item.size, strict=True)):
            raise d.bad(
                f"tensor {fqn!r} of size {list(item.size)} has a chunk at {list(c.offsets)} of size {list(c.sizes)} "
                "outside it"
            )
        if c.numel:
            s = meta.storage.get(Index(fqn, c.offsets))
            if s is None:
                raise d.bad(f"tensor {fqn!r}: no storage entry for its chunk at {list(c.offsets)}")
            nbytes = c.numel * item.dtype.itemsize
            if nbytes > s.length:
                raise d.bad(
                    f"tensor {fqn!r}: the chunk at {list(c.offsets)} needs {nbytes} bytes, its storage entry has {s.length}"
                )
            boxes.append(c)
            total += c.numel
    if total != item.numel:
        raise d.bad(
            f"the chunks of tensor {fqn!r} cover {total} elements of its {item.numel}: they do not tile it "
            "(a gap, or chunks overlapping)"
        )
    _no_overlaps(d, fqn, boxes, tuple(item.size))


def _no_overlaps(d: _Dir, fqn: str, boxes: list[Chunk], shape: tuple[int, ...]) -> None:
    if len(boxes) < 2:
        return
    if not shape:
        raise d.bad(f"scalar tensor {fqn!r} has {len(boxes)} chunks")
    error = tiling_error(shape, [(c.offsets, c.sizes) for c in boxes])  # O(n log n), shared with safeckpt-sharded
    if error is not None:
        raise d.bad(f"tensor {fqn!r}: {error}")


# -- the tree: planner_data paths, as torch's set_element rebuilds them ----------------------------


def _build_tree(d: _Dir, meta: Metadata, leaf: Callable[[str], Any]) -> dict[Any, Any]:
    """Nest every item at its ``planner_data`` path (``('optim', 'param_groups', 0, 'lr')``): a str key
    makes a dict, an int a list, exactly like ``_EmptyStateDictLoadPlanner`` + ``set_element``."""
    root: dict[Any, Any] = {}
    filled: dict[int, set[int]] = {}  # list id -> indices set (a value may itself be None)
    limit = len(meta.items)  # a list cannot have more elements than there are values

    def slot(node: Any, key: str | int, path: tuple[Any, ...], fqn: str) -> None:
        if isinstance(node, list):
            if type(key) is not int or key >= limit:
                raise d.bad(f"{fqn!r}: planner path {path} indexes a list with {key!r}")
            if key >= len(node):
                node.extend([None] * (key + 1 - len(node)))
        elif type(key) is int and key >= limit:
            raise d.bad(f"{fqn!r}: planner path {path} has an index past the number of values")

    for fqn in meta.items:
        path = meta.planner.get(fqn, (fqn,)) if meta.planner is not None else (fqn,)
        node: Any = root
        for i, key in enumerate(path[:-1]):
            want = dict if type(path[i + 1]) is str else list
            slot(node, key, path, fqn)
            taken = key in node if isinstance(node, dict) else key in filled.get(id(node), ())
            child = node[key] if taken else want()
            if not taken:
                node[key] = child
                if isinstance(node, list):
                    filled.setdefault(id(node), set()).add(key)  # type: ignore[arg-type]
            if type(child) is not want:
                raise d.bad(f"{fqn!r}: planner path {path} runs through a value saved at {path[: i + 1]}")
            node = child
        last = path[-1]
        slot(node, last, path, fqn)
        taken = last in node if isinstance(node, dict) else last in filled.get(id(node), ())
        if taken:
            raise d.bad(f"{fqn!r}: planner path {path} is already taken by another value or container")
        node[last] = leaf(fqn)
        if isinstance(node, list):
            filled.setdefault(id(node), set()).add(last)  # type: ignore[arg-type]
    return root


# -- reading ---------------------------------------------------------------------------------------


def _segment(d: _Dir, s: Storage, path: tuple[Any, ...]) -> Any:
    """The value of the ``torch.save`` archive at ``s``, read by the torch reader (restricted)."""
    mapped = d.file(s.relative_path, path_name(path))
    value, archive = torch_pickle.read_archive(
        mapped, start=s.offset, length=s.length, allow=d.allow, source=_where(mapped.path, s), path=path
    )
    d.note_archive(s, archive)
    return value


def _chunk_tensor(d: _Dir, fqn: str, item: TensorItem, c: Chunk, s: Storage, kind: str) -> torch.Tensor:
    mapped = d.file(s.relative_path, fqn)
    where = _where(mapped.path, s)
    what = f"chunk {list(c.offsets)} of tensor {fqn!r} ({item.dtype} {list(c.sizes)})"
    if kind == "zip":
        ref = _segment(d, s, (fqn,))
        if not isinstance(ref, TensorRef):
            raise CorruptCheckpointError(f"{where}: holds a {type(ref).__name__} where {what} should be")
        if ref.dtype != item.dtype or ref.shape != c.sizes:
            raise CorruptCheckpointError(f"{where}: holds {ref.dtype} {list(ref.shape)} where {what} should be")
        t = ref.load()
        return t.detach() if t.requires_grad or isinstance(t, torch.nn.Parameter) else t
    header, sharding = d.blob(s)
    entry = header.entries.get(fqn)
    if entry is None:
        raise CorruptCheckpointError(f"{where}: the safetensors blob has no tensor {fqn!r} ({what})")
    saved = (
        sharding.get(fqn, {}).get("saved_offsets", list(c.offsets)) if isinstance(sharding.get(fqn, {}), dict) else None
    )
    if (
        entry.code not in st.DTYPES
        or entry.dtype != item.dtype
        or entry.torch_shape != c.sizes
        or entry.end - entry.begin != s.length
        or saved != list(c.offsets)
    ):
        raise CorruptCheckpointError(
            f"{where}: the safetensors entry {fqn!r} ({entry.code} {list(entry.shape)}, {entry.end - entry.begin} bytes, "
            f"saved at {saved}) is not {what} of {s.length} bytes"
        )
    return mapped.tensor(s.offset + entry.begin, s.length, item.dtype, c.sizes)


def _loader(
    d: _Dir, fqn: str, item: TensorItem, meta: Metadata, kinds: dict[tuple[str, int], str]
) -> Callable[[], torch.Tensor]:
    parts = [(c, meta.storage[Index(fqn, c.offsets)]) for c in item.chunks if c.numel]

    def load() -> torch.Tensor:
        pieces = [(c, _chunk_tensor(d, fqn, item, c, s, kinds[s.relative_path, s.offset])) for c, s in parts]
        if len(pieces) == 1 and pieces[0][0].sizes == item.size:
            return pieces[0][1]
        out = torch.empty(item.size, dtype=item.dtype)  # every element is written: the chunks tile it
        for c, t in pieces:
            out[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes, strict=True))].copy_(t)
        return out

    return load


def _open(path: Path, allow: tuple[str, ...]) -> tuple[Checkpoint, _Dir]:
    d = _Dir(path, allow)
    if not d.meta_file.is_file():
        raise CorruptCheckpointError(f"{path}: no .metadata file; not a torch.distributed.checkpoint directory")
    meta = read_metadata(d.meta_file)
    kinds = _check_layout(d, meta)
    for fqn, item in meta.items.items():
        if isinstance(item, TensorItem):
            _check_chunks(d, fqn, item, meta)
        elif Index(fqn, None) not in meta.storage:
            raise d.bad(f"no storage entry for the value {fqn!r}")

    def leaf(fqn: str) -> Any:
        item = meta.items[fqn]
        if isinstance(item, BytesItem):
            where = meta.planner.get(fqn, (fqn,)) if meta.planner is not None else (fqn,)
            return _segment(d, meta.storage[Index(fqn, None)], where)
        return TensorRef(fqn, item.dtype, item.size, str(path), _loader(d, fqn, item, meta, kinds))

    tree = _build_tree(d, meta, leaf)
    info: dict[str, Any] = {
        "dcp_version": meta.version,
        "files": sorted({s.relative_path for s in meta.storage.values()}),
        "serialization": sorted(set(kinds.values())),
    }
    if meta.checkpoint_id is not None:
        info["checkpoint_id"] = meta.checkpoint_id
    fabric = path / FABRIC_META
    if fabric.is_file():
        extra = torch_pickle.read(fabric, allow=allow).tree
        if not isinstance(extra, dict):
            raise CorruptCheckpointError(
                f"{fabric}: holds a {type(extra).__name__}; Fabric's meta.pt is a dict of the non-module state"
            )
        tree.update(extra)  # Fabric's _load_distributed_checkpoint: meta.pt keys win
        info["producer"] = "lightning-fabric"
    return Checkpoint(tree, format=NAME, path=path, info=info), d


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a DCP directory: ``.metadata`` and every storage entry are validated, non-tensor values
    read (restricted), tensors left on disk until loaded.

    Args:
        allow: globals (``"pkg.mod.Class"``) admitted as inert data in non-tensor values and
            ``meta.pt``, as for the torch format; never in ``.metadata``.

    Example:
        >>> ckpt = read(Path("checkpoints/fsdp"))  # written by dcp.save on 2 ranks
        >>> ckpt["step"], ckpt.tensors()["model/0.weight"].shape
        (3, (6, 4))
    """
    return _open(Path(path), tuple(allow))[0]


def verify(path: Path) -> list[str]:
    """Read every tensor and check every archive's CRC-32s; return the problems found.

    Example:
        >>> verify(Path("checkpoints/fsdp"))
        []
    """
    path = Path(path)
    try:
        ckpt, d = _open(path, ())
    except CheckpointError as e:
        return [str(e)]
    problems: list[str] = []
    for ref in ckpt.tensors().values():
        try:
            ref.load()
        except CheckpointError as e:
            problems.append(str(e))
    for mapped, archive in d.archives():
        problems += archive.crc_problems(mapped.map, str(mapped.path))
    if (path / FABRIC_META).is_file():
        problems += torch_pickle.verify(path / FABRIC_META)
    return problems

FORMAT = Format(NAME, EXTENSIONS, "dir", sniff=sniff, read=read, verify=verify)
