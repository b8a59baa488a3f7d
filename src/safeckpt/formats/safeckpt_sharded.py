"""``safeckpt-sharded``: the native directory format (spec: ``formats/safeckpt-sharded.md``).

A directory of plain safetensors files holding tensor *chunks* (a whole tensor, or a box of it:
a rank's shard of a DTensor, or rows of a tensor split to respect ``max_shard_size``) and one
msgpack index, ``safeckpt-index.msgpack``, that says which box of which tensor lives in which
file at which byte offsets and carries the msgpack skeleton of the rest of the state. The index
is written last, atomically, so a checkpoint exists only once every shard is on disk; shard names
carry a per-save *generation* so a re-save never touches the files the previous index names.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from .. import _dtypes, _shapes, _sources, codec
from .._fs import MappedFile, Span, checksum, member_problem
from .._storage import GENERATION, Generation, Layout, Template, literal, naming, target_dir
from .._units import parse_size
from ..errors import CheckpointError, CorruptCheckpointError
from ..tree import Checkpoint, TensorRef, iter_leaves, unique_name
from . import Format
from . import _safetensors as st
from ._tiling import tiling_error
from .safeckpt import FLAG_PARAMETER, FLAG_REQUIRES_GRAD, tensor_leaf_decoder, tensor_leaf_encoder

if TYPE_CHECKING:
    import torch

NAME = "safeckpt-sharded"
EXTENSIONS: tuple[str, ...] = ()
VERSION = 1
INDEX = "safeckpt-index.msgpack"
KEY_GENERATION = "safeckpt.generation"
# the index's last key: the CRC-32 of the whole index file with this value read as "00000000"
KEY_INDEX_CRC = "crc32"
_CRC_TAIL = b"\xa5crc32\xa8"  # msgpack fixstr "crc32", then the fixstr header of 8 hex digits
# The names a save gives its files: shards of its generation (their temporaries and the index's
# are `Template.temporary()`), and the file a save in progress holds locked (a killed save's is
# left unlocked). Generations, commit and sweep: `_storage.Layout`.
SHARD = Template("shard-{gen}-{rank:05d}-{part:05d}.safetensors", gen=GENERATION, rank=r"\d{5}", part=r"\d{5}")
LOCK = Template(".safeckpt-{gen}.lock", gen=GENERATION)
# the dtypes an index may name, as torch-free rows: safetensors' own and the complex ones stored as their real view
_DTYPES = {name: row for name, row in _dtypes.BY_NAME.items() if row.code is not None or name in st.REAL_OF}


def sniff(head: bytes, path: Path) -> bool:
    """A directory holding our index, or the index file itself. A directory holding only the
    shards of a save that never committed is ours too, so that it is refused as such (`read`)
    rather than taken for a directory of plain safetensors files."""
    if path.is_dir():
        if (path / INDEX).is_file():
            return True
        with contextlib.suppress(OSError):
            return any(SHARD.match(e.name) for e in os.scandir(path))
        return False
    return path.name == INDEX and NAME.encode() in head[:64]


class Live(Generation):
    """A fresh generation for a save into ``root``, in progress until `release` (see
    `_storage.Generation`).

    Example:
        >>> with Live(root) as generation:
        ...     commit(root, generation, [...write_shards(root, generation, 0, pieces, None)], ...)
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root, LAYOUT)


def shard_name(generation: str, rank: int, part: int) -> str:
    """The file name of ``part`` of the shards ``rank`` writes in save ``generation``."""
    return SHARD.format(gen=generation, rank=rank, part=part)


def chunk_key(name: str, offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The name a chunk is stored under in its shard: the tensor's name, plus the box in slice
    notation when the chunk is not the whole tensor (``model/w[0:4,0:8]``)."""
    if tuple(sizes) == tuple(shape) and not any(offsets):
        return name
    return f"{name}[{','.join(f'{o}:{o + s}' for o, s in zip(offsets, sizes, strict=True))}]"


# -- reading ---------------------------------------------------------------------------------------


class _Shard:
    """One shard file of a checkpoint, its header read and its bytes mapped on first use."""

    def __init__(self, root: Path, name: str, size: int) -> None:
        self.path, self.size = root / name, size

    @functools.cached_property
    def header(self) -> st.Header:
        problem = member_problem(self.path.parent, self.path.name)
        if problem == "does not exist":
            raise self._missing()
        if problem is not None:  # a symlink out of the directory, a FIFO (which would hang open())
            raise CorruptCheckpointError(f"{self.path}: the shard {problem}; refusing to read it")
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing() from None
        with f:  # header and map from one open file
            actual = os.fstat(f.fileno()).st_size
            if actual != self.size:
                raise CorruptCheckpointError(
                    f"{self.path}: the index records {self.size} bytes, the file has {actual} (truncated or replaced)"
                )
            header = st.read_header(self.path, f)
            self._mapped = _sources.file(self.path, header.size, f)
        return header

    @functools.cached_property
    def mapped(self) -> MappedFile:
        self.header  # noqa: B018 - maps the file
        return self._mapped

    @functools.cached_property
    def crcs(self) -> dict[str, int]:
        """The CRC-32 its header records for each entry (none if it records none)."""
        return st.checksums(self.header, st.KEY_CRC) or {}

    def _missing(self) -> CorruptCheckpointError:
        m, now = SHARD.match(self.path.name), None
        with contextlib.suppress(CorruptCheckpointError, OSError):
            now = read_index(self.path.parent)["generation"]
        if m and now and now != m.group("gen"):
            return CorruptCheckpointError(
                f"{self.path}: shard gone: another save replaced this checkpoint (generation {m.group('gen')}, "
                f"now {now}) after it was opened; open it again"
            )
        return CorruptCheckpointError(
            f"{self.path}: shard missing; the index names it, so the checkpoint is incomplete"
        )


@dataclass(frozen=True)
class Chunk:
    """A box of a tensor, stored whole as one entry of a shard file.

    Attributes:
        offsets / sizes: where the box sits in the full tensor and how big it is.
        key: the entry's name in the shard; ``begin``/``end``: its absolute byte range there.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: _dtypes.DType
    shard: _Shard = field(repr=False)
    key: str
    begin: int
    end: int

    def entry(self) -> st.Entry:
        """The chunk's entry in its shard's header, checked to agree with the index (no torch)."""
        e = self.shard.header.entries.get(self.key)
        real = st.real_view(self.dtype)
        stored, shape = real or self.dtype, self.sizes + ((2,) if real is not None else ())
        if (
            e is None
            or e.code not in st.ROWS
            or e.dtype_info is not stored
            or e.torch_shape != shape
            or (e.begin, e.end) != (self.begin, self.end)
        ):
            found = "no such entry" if e is None else f"{e.code} {list(e.torch_shape)} at bytes [{e.begin}, {e.end})"
            raise CorruptCheckpointError(
                f"{self.shard.path}: entry {self.key!r} should be torch.{stored.name} {list(shape)} at bytes [{self.begin}, {self.end}) "
                f"as the index says, but the shard has {found}; the directory mixes files of different saves"
            )
        return e

    def tensor(self) -> torch.Tensor:
        """The whole chunk, backed by the shard's map (after checking the shard agrees with the index)."""
        import torch

        e, real = self.entry(), st.real_view(self.dtype)
        t = st.entry_tensor(self.shard.mapped, e)
        return torch.view_as_complex(t) if real is not None else t

    def read(self, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
        """The sub-box ``offsets``/``lengths`` (relative to this chunk), prefetching exactly the
        byte range it spans so the kernel reads those pages and no neighbours."""
        t = self.tensor()
        if t.numel() and all(lengths):
            first = sum(o * s for o, s in zip(offsets, t.stride(), strict=True))
            last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, t.stride(), strict=True))
            _prefetch(self.shard.mapped, self.begin + first * t.element_size(), (last + 1 - first) * t.element_size())
        for dim, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
            t = t.narrow(dim, o, n)
        return t


def _prefetch(mapped: MappedFile, start: int, length: int) -> None:
    # We know the exact range we touch: ask for it, and turn off fault read-around there, which
    # (read_ahead_kb is often MBs) would otherwise pull in other ranks' slices as well.
    if length <= 0 or not hasattr(mmap, "MADV_WILLNEED") or not mapped.local:
        return  # (a URL's bytes are one ranged read already: its map would fetch the whole shard)
    aligned = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mapped.map.madvise(mmap.MADV_RANDOM, aligned, length + start - aligned)
        mapped.map.madvise(mmap.MADV_WILLNEED, aligned, length + start - aligned)


@dataclass(frozen=True, eq=False, repr=False)  # TensorRef's repr, which needs no torch
class ShardedRef(TensorRef):
    """A `TensorRef` whose bytes are spread over chunks; ``load()`` assembles the full tensor
    (a chunk that covers the whole tensor is returned mapped, without a copy)."""

    chunks: tuple[Chunk, ...] = ()

    def check_readable(self) -> None:
        """Check every chunk against its shard's header, without reading the bytes or importing torch."""
        for c in self.chunks:
            c.entry()


def _assemble(dtype: _dtypes.DType, shape: tuple[int, ...], chunks: tuple[Chunk, ...]) -> torch.Tensor:
    import torch

    # Map (and so check against its shard) every chunk before allocating: the chunks tile the
    # tensor, so the allocation is never larger than data that is really on disk.
    parts = [c.tensor() for c in chunks]
    if len(chunks) == 1 and chunks[0].sizes == shape:
        return parts[0]
    out = torch.empty(shape, dtype=_dtypes.to_torch(dtype))
    for c, part in zip(chunks, parts, strict=True):
        dst = out
        for dim, (o, n) in enumerate(zip(c.offsets, c.sizes, strict=True)):
            dst = dst.narrow(dim, o, n)
        dst.copy_(part)
    return out


def read_index(root: Path) -> dict[str, Any]:
    """The index of the checkpoint in directory ``root``, with its structure validated."""
    path = root / INDEX
    try:
        raw = path.read_bytes()
        index = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{root}: no {INDEX}; the directory holds no committed safeckpt-sharded checkpoint (shard files "
            "without an index are what an interrupted save leaves: save again, or open another checkpoint)"
        ) from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{path}: the index is not valid msgpack ({codec.error_detail(e)}); the file is damaged",
            path=path,
            hint="the file is damaged",
        ) from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CorruptCheckpointError(
                f"{path}: invalid index: {what}; the file is damaged (restore it, or re-save)",
                path=path,
                hint="the file is damaged (restore it, or re-save)",
            )

    need(isinstance(index, dict) and index.get("format") == NAME, f"not a {NAME} index")
    version = index.get("version")
    if version != VERSION:
        raise CorruptCheckpointError(
            f"{path}: written as {NAME} version {version!r}, this safeckpt reads version {VERSION}; upgrade safeckpt"
        )
    need(isinstance(index.get("generation"), str), "'generation' must be a string")
    need(isinstance(index.get("skeleton"), bytes), "'skeleton' must be bytes")
    meta = index.get("metadata", {})
    need(
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()),
        "'metadata' must map strings to strings",
    )
    files = index.get("files")
    need(isinstance(files, list), "'files' must be a list")
    for f in files:
        need(
            isinstance(f, dict) and _is_name(f.get("name")) and _nat(f.get("size")),
            f"file record {f!r} needs a plain file 'name' and a 'size'",
        )
    tensors = index.get("tensors")
    need(isinstance(tensors, dict), "'tensors' must be a map")
    for name, t in tensors.items():
        need(
            isinstance(t, dict) and isinstance(t.get("dtype"), str) and t["dtype"] in _DTYPES,
            f"tensor {name!r} needs a known 'dtype' (got {t!r:.80})",
        )
        shape = t.get("shape")
        need(isinstance(shape, list) and all(_nat(d) for d in shape), f"tensor {name!r} has an invalid shape {shape!r}")
        need(_shapes.fits_int64(shape), f"tensor {name!r} has shape {shape!r}, which spans more than 2**63-1 elements (limit)")
        chunks = t.get("chunks")
        need(
            isinstance(chunks, list) and (len(chunks) > 0 or 0 in shape),
            f"tensor {name!r} needs a non-empty 'chunks' list",
        )
        for c in chunks:
            ok = (
                isinstance(c, dict)
                and type(c.get("file")) is int
                and 0 <= c["file"] < len(files)
                and isinstance(c.get("key"), str)
            )
            ok = ok and all(
                isinstance(c.get(k), list) and len(c[k]) == len(shape) and all(_nat(x) for x in c[k])
                for k in ("offsets", "sizes")
            )
            ok = ok and isinstance(c.get("bytes"), list) and len(c["bytes"]) == 2 and all(_nat(x) for x in c["bytes"])
            need(ok, f"tensor {name!r} has a malformed chunk {c!r:.120}")
            size = _shapes.nbytes(_DTYPES[t["dtype"]], c["sizes"])
            need(
                c["bytes"][1] - c["bytes"][0] == size,
                f"tensor {name!r}: chunk {c['key']!r} spans {c['bytes']} for {size} bytes of data",
            )
        _check_tiling(name, tuple(shape), [(tuple(c["offsets"]), tuple(c["sizes"])) for c in chunks], need)
    return index


def _nat(x: Any) -> bool:
    return type(x) is int and x >= 0


def _is_name(x: Any) -> bool:
    return isinstance(x, str) and x not in ("", ".", "..") and "/" not in x and "\\" not in x and "\0" not in x


def _check_tiling(
    name: str,
    shape: tuple[int, ...],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
    need: Callable[[bool, str], None],
) -> None:
    """Chunks must cover the tensor exactly: inside it, not overlapping, volumes adding up (O(n log n))."""
    error = tiling_error(shape, boxes)
    need(error is None, f"tensor {name!r}: {error}")


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a sharded checkpoint: read its index and skeleton, and open every shard (its header
    read and its bytes mapped, not read): the checkpoint stays whole for as long as it is used,
    even if another save replaces it and deletes these shards. Should that happen between reading
    the index and opening the shards, the newer index is read instead.

    Example:
        >>> ckpt = read(Path("run/step-100"))
        >>> ckpt["step"], ckpt.tensors()["model/l1.weight"].shape
        (100, (512, 256))
    """
    root = path if path.is_dir() else path.parent
    for attempt in range(10):
        index = read_index(root)
        shards = [_Shard(root, f["name"], f["size"]) for f in index["files"]]
        try:
            for shard in shards:
                shard.mapped  # noqa: B018 - held from here on
            break
        except CorruptCheckpointError:
            with contextlib.suppress(CorruptCheckpointError, OSError):
                if read_index(root)["generation"] != index["generation"] and attempt < 9:
                    continue  # replaced meanwhile: read the new one
            raise

    def bind(name: str, flags: int, _: str | None) -> TensorRef:
        t = index["tensors"].get(name)
        if t is None:
            raise CorruptCheckpointError(
                f"{root / INDEX}: the skeleton refers to tensor {name!r}, which the index does not list"
            )
        dtype, shape = _DTYPES[t["dtype"]], tuple(t["shape"])
        chunks = tuple(
            Chunk(tuple(c["offsets"]), tuple(c["sizes"]), dtype, shards[c["file"]], c["key"], *c["bytes"])
            for c in t["chunks"]
        )
        span = None
        if len(chunks) == 1 and chunks[0].sizes == shape and st.real_view(dtype) is None:
            # stored whole: its bytes can be copied and compared file to file (checked against the shard first)
            whole = chunks[0]
            span = Span(whole.shard.mapped, whole.entry().begin, whole.shard.crcs.get(whole.key))
        return ShardedRef(
            name,
            dtype,  # type: ignore[arg-type]  # a torch-free row, resolved when .dtype is read
            shape,
            str(root),
            functools.partial(_assemble, dtype, shape, chunks),
            storage=str(root),
            view=name,
            requires_grad=bool(flags & FLAG_REQUIRES_GRAD),
            parameter=bool(flags & FLAG_PARAMETER),
            span=span,
            chunks=chunks,
        )

    tensor, refs = tensor_leaf_decoder(str(root / INDEX), bind)
    tree = codec.decode(index["skeleton"], tensor, source=str(root / INDEX))
    stray = set(index["tensors"]) - set(refs)
    if stray:
        raise CorruptCheckpointError(f"{root / INDEX}: tensors {sorted(stray)[:5]} are indexed but not in the skeleton")
    info = {
        "format_version": str(VERSION),
        "generation": index["generation"],
        "files": len(shards),
        "world_size": index.get("world_size", 1),
    }
    return Checkpoint(tree, format=NAME, path=root, metadata=index.get("metadata", {}), info=info)


# -- writing ---------------------------------------------------------------------------------------


@dataclass
class Piece:
    """A chunk to write: tensor ``name``'s box at ``offsets`` of ``sizes``, and how to get its values."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    get: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _shapes.nbytes(self.dtype, self.sizes)


def write_shards(
    root: Path, generation: str, rank: int, pieces: list[Piece], limit: int | None
) -> Iterator[tuple[Piece, dict[str, Any], dict[str, Any]]]:
    """Write ``pieces`` into shard files of at most ``limit`` bytes of data (a piece larger than
    ``limit`` gets a file of its own), each atomically and streaming.

    Yields ``(piece, file record, chunk record)``; the chunk record's ``file`` is the file's name
    (the caller turns it into an index position).
    """
    groups: list[list[Piece]] = []
    size = 0
    for p in pieces:
        if not groups or (limit is not None and size + p.nbytes > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    for part, group in enumerate(groups):
        name = shard_name(generation, rank, part)
        used: set[str] = set()
        keys = [unique_name(chunk_key(p.name, p.offsets, p.sizes, p.shape), used) for p in group]
        items = [st.Item(k, p.dtype, p.sizes, p.get) for k, p in zip(keys, group, strict=True)]
        st.write(root / name, items, {"format": "pt", KEY_GENERATION: generation}, checksum_key=st.KEY_CRC)
        header = st.read_header(root / name)
        record = {"name": name, "size": header.size}
        for k, p in zip(keys, group, strict=True):
            e = header.entries[k]
            yield (
                p,
                record,
                {"file": name, "key": k, "offsets": list(p.offsets), "sizes": list(p.sizes), "bytes": [e.begin, e.end]},
            )


def commit(
    root: Path,
    generation: str,
    written: list[tuple[str, dict[str, Any], dict[str, Any]]],
    declared: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    skeleton: bytes,
    metadata: dict[str, str],
    world_size: int = 1,
) -> Path:
    """Write the index (last, atomically) naming every chunk in ``written`` (``(tensor name, file
    record, chunk record)`` as `write_shards` yields them), then delete the files of other
    generations. Until the index is replaced the previous checkpoint stays whole."""
    packed, files = index_bytes(generation, written, declared, skeleton, metadata, world_size)
    return LAYOUT.commit(root, generation, packed, files)


def index_bytes(
    generation: str,
    written: list[tuple[str, dict[str, Any], dict[str, Any]]],
    declared: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    skeleton: bytes,
    metadata: dict[str, str],
    world_size: int = 1,
) -> tuple[bytes, dict[str, int]]:
    """The index naming every chunk in ``written`` (see `commit`), and the files it names (name:
    size): what a commit writes, here or on an object store (``_remote.DirectoryCommit``).

    Example:
        >>> packed, files = index_bytes(generation, written, declared, skeleton, {}, world_size=2)
    """
    files: dict[str, int] = {}
    file_records: list[dict[str, Any]] = []
    tensors: dict[str, dict[str, Any]] = {}
    for name, (dtype, shape) in declared.items():
        tensors[name] = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "chunks": []}
    for name, frec, crec in written:
        if frec["name"] not in files:
            files[frec["name"]] = len(file_records)
            file_records.append(frec)
        tensors[name]["chunks"].append({**crec, "file": files[frec["name"]]})
    for name, t in tensors.items():
        t["chunks"].sort(key=lambda c: c["offsets"])
        _check_tiling(name, tuple(t["shape"]), [(tuple(c["offsets"]), tuple(c["sizes"])) for c in t["chunks"]], _refuse)
    index = {
        "format": NAME,
        "version": VERSION,
        "generation": generation,
        "world_size": world_size,
        "producer": "safeckpt",
        "metadata": dict(metadata),
        "files": file_records,
        "tensors": tensors,
        "skeleton": skeleton,
        KEY_INDEX_CRC: "00000000",  # last: the file's last 8 bytes, filled in below (§3)
    }
    packed = msgpack.packb(index, use_bin_type=True)
    packed = packed[:-8] + f"{checksum(packed):08x}".encode()
    return packed, {rec["name"]: rec["size"] for rec in file_records}


def _refuse(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(
            f"safeckpt cannot index this save: {what}; please report it (the previous checkpoint is untouched)"
        )


def write(ckpt: Checkpoint, path: Path, *, max_shard_size: int | str | None = None) -> Path:
    """Write ``ckpt`` as a sharded directory in this process, shards of at most ``max_shard_size``
    bytes of tensor data. A tensor larger than that is split by rows across files (a single row
    larger than the limit is stored whole). Tied tensors are written once.

    Example:
        >>> write(Checkpoint({"model": sd, "step": 3}, format="memory", path="<memory>"), Path("run"), max_shard_size="2GB")
        PosixPath('run')
    """
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    pieces: list[Piece] = []
    declared: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def add(name: str, x: torch.Tensor | TensorRef) -> None:
        declared[name] = (x.dtype, tuple(x.shape))
        pieces.extend(_split(name, x, limit))

    skeleton = codec.encode(ckpt.tree, tensor_leaf_encoder(add))
    root = target_dir(path)
    try:
        with Live(root) as generation:
            try:
                written = [(p.name, frec, crec) for p, frec, crec in write_shards(root, generation, 0, pieces, limit)]
                return commit(root, generation, written, declared, skeleton, ckpt.metadata)
            except BaseException:
                LAYOUT.discard(root, generation)
                raise
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise naming(e, root, "checkpoint") from e


def _split(name: str, x: torch.Tensor | TensorRef, limit: int | None) -> list[Piece]:
    shape = tuple(x.shape)
    get = x.load if isinstance(x, TensorRef) else (lambda: x)
    whole = Piece(name, x.dtype, shape, (0,) * len(shape), shape, get)
    if limit is None or whole.nbytes <= limit or not shape or shape[0] <= 1:
        return [whole]
    rows = max(1, limit // (whole.nbytes // shape[0]))
    out = []
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        out.append(
            Piece(
                name,
                x.dtype,
                shape,
                (start,) + (0,) * (len(shape) - 1),
                (n, *shape[1:]),
                functools.partial(_rows, get, start, n),
            )
        )
    return out


def _rows(get: Callable[[], torch.Tensor], start: int, n: int) -> torch.Tensor:
    return get().narrow(0, start, n)


def verify(path: Path) -> list[str]:
    """Check every chunk against its shard's header and recompute every shard's CRC-32s; return
    the problems found.

    Example:
        >>> verify(Path("run/step-100"))
        []
    """
    root = path if path.is_dir() else path.parent
    problems = index_problems(root)
    if problems:
        return problems  # nothing the index says can be trusted
    try:
        ckpt = read(root)
    except CorruptCheckpointError as e:
        return [str(e)]
    paths: dict[str, list[str]] = {}
    for p, x in iter_leaves(ckpt.tree):
        if isinstance(x, TensorRef):
            paths.setdefault(x.name, []).append(codec.where(p))
    chunks: dict[tuple[str, str], str] = {}  # (shard name, entry key) -> how to name it in a message
    for ref in {r.name: r for r in ckpt.tensors().values()}.values():
        for c in getattr(ref, "chunks", ()):
            where = ", ".join(paths.get(ref.name, [repr(ref.name)]))
            box = ",".join(f"{o}:{o + n}" for o, n in zip(c.offsets, c.sizes, strict=True))
            chunks[(c.shard.path.name, c.key)] = (
                f"the data of {where}" if c.key == ref.name else f"box [{box}] of {where} (tensor {ref.name!r})"
            )
            try:
                c.entry()
            except CorruptCheckpointError as e:
                problems.append(str(e))
    for f in read_index(root)["files"]:
        shard = _Shard(root, f["name"], f["size"])
        try:
            shard.header  # noqa: B018 - present, of the size the index records
        except CorruptCheckpointError as e:
            problems.append(str(e))
            continue
        describe = functools.partial(lambda name, key: chunks.get((name, key), "its data"), f["name"])
        problems.extend(st.verify_file(shard.path, st.KEY_CRC, required=True, describe=describe))
    return problems


def index_problems(root: Path) -> list[str]:
    """Check the index's own CRC-32 (its last 8 bytes, §3); return the problems found.

    Example:
        >>> index_problems(Path("run/step-100"))
        []
    """
    path = root / INDEX
    try:
        raw = path.read_bytes()
    except OSError as e:
        return [f"{path}: cannot read the index ({e.strerror}); the directory holds no committed checkpoint"]
    stored = raw[-8:]
    if raw[-len(_CRC_TAIL) - 8 : -8] != _CRC_TAIL or not all(c in b"0123456789abcdef" for c in stored):
        return [
            f"{path}: the index does not end with its checksum: it is damaged or truncated (restore it, or re-save)"
        ]
    crc = checksum(raw[:-8] + b"00000000")
    if crc != int(stored, 16):
        return [
            f"{path}: the index fails its checksum (stored {stored.decode()}, read {crc:08x}): it is damaged "
            "(restore it, or re-save)"
        ]
    return []


LAYOUT = Layout(literal(INDEX), SHARD, LOCK, committed=lambda root: read_index(root)["generation"])

FORMAT = Format(
    NAME, EXTENSIONS, "any", sniff=sniff, read=read, write=write, write_options=frozenset({"max_shard_size"}), verify=verify
)
