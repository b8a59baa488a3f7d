"""``torch``: files written by ``torch.save`` (and Lightning), read without running pickle.

Reads the zip format (any archive prefix, any recorded alignment, zip64, CRC-0), the legacy
non-zip format (five pickles then raw storages) and bare pickles, through the restricted VM
in `_pickle` with the torch globals below: nothing named by the file is imported or called.
Storages stay in the file: a tensor is a `TensorRef` whose loader maps its storage
(copy-on-write, zero copy where the file is aligned) and applies the pickled view (offset,
size, stride), checked against the storage's bounds when the file is opened. Writing
(``format="torch"``) exports with ``torch.save`` for tools that need a ``.pt``.
The spec, with the exact allow-list, is ``formats/torch.md``.
"""

from __future__ import annotations

import collections
import functools
import math
import operator
import os
import pathlib
import re
import struct
from argparse import Namespace
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _dtypes, _torch_values, sparse
from .._budget import MAX_VIEW_EXPANSION, VIEW_ALLOWANCE
from .._fs import MappedFile, Span
from .._storage import atomic_write
from ..errors import CheckpointError, CorruptCheckpointError, TruncatedCheckpointError, UnsafeCheckpointError
from ..tree import AttributeDict, Checkpoint, TensorRef, path_name
from . import Format, _omegaconf, _pickle, _zip
from ._pickle import Global, Handler, Inert

if TYPE_CHECKING:
    import torch

NAME = "torch"
EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_DEPTH = 256  # nesting of the object tree
MAX_DIMS = 64
MAX_ELEMENTS = 1 << 62  # an expanded (stride-0) view may be larger than its storage, not than this
_LEGACY_TAR_MEMBERS = (b"sys_info", b"pickle", b"storages", b"tensors")
_MAGIC_BYTES = LEGACY_MAGIC.to_bytes(10, "little")


# -- what the torch globals build -----------------------------------------------------------------


@dataclass(frozen=True)
class StorageType:
    """``torch.FloatStorage`` & co. as a value: the element type (``None``: untyped bytes)."""

    dtype: _dtypes.DType | None


@dataclass(eq=False, slots=True)  # slots: one per tensor, built at half the cost
class Storage:
    """One storage record: ``numel`` elements of ``dtype`` at absolute file ``offset``."""

    key: str
    dtype: _dtypes.DType
    numel: int
    location: str
    offset: int = -1
    crc32: int | None = None  # the zip record's, when torch computed one

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(eq=False, slots=True)
class TensorSpec:
    """A tensor as pickled: a view of a storage, checked against its bounds."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: _dtypes.DType
    requires_grad: bool = False
    parameter: bool = False
    conj: bool = False
    neg: bool = False


def _bad(what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(what)


def _dims(x: Any, what: str) -> tuple[int, ...]:
    # C-level checks (run per tensor): exact ints only (not bools), none negative
    if not isinstance(x, (tuple, list)) or len(x) > MAX_DIMS or not set(map(type, x)) <= _INT or min(x, default=0) < 0:
        raise _bad(f"tensor {what} must be up to {MAX_DIMS} non-negative ints, got {x!r:.80}")
    return tuple(x)


_INT = {int}


def _tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    dtype: _dtypes.DType,
    requires_grad: Any,
    hooks: Any,
    metadata: Any,
) -> TensorSpec:
    if not isinstance(storage, Storage):
        raise _bad(f"a tensor is rebuilt from a {type(storage).__name__}, not from one of the file's storages")
    if type(offset) is not int or offset < 0:
        raise _bad(f"bad storage offset {offset!r}")
    size, stride = _dims(size, "size"), _dims(stride, "stride")
    if len(size) != len(stride):
        raise _bad(f"tensor size {list(size)} and stride {list(stride)} differ in length")
    # a 0 dim hides others from the product
    if max(size, default=0) > MAX_ELEMENTS or max(stride, default=0) > MAX_ELEMENTS or math.prod(size) > MAX_ELEMENTS:
        raise _bad(f"tensor size {list(size)} / stride {list(stride)} beyond {MAX_ELEMENTS} elements")
    if type(requires_grad) is not bool:
        raise _bad("requires_grad must be a bool")
    _check_grad(requires_grad, dtype)
    if hooks not in (None, {}) and not (isinstance(hooks, dict) and not hooks):
        raise _bad("a tensor with backward hooks (they are code; torch.save never writes them)")
    conj = neg = False
    if metadata is not None:
        if (
            not isinstance(metadata, dict)
            or not set(metadata) <= {"conj", "neg"}
            or not all(type(v) is bool for v in metadata.values())
        ):
            raise _bad(f"unknown tensor metadata {metadata!r:.80}")
        conj, neg = metadata.get("conj", False), metadata.get("neg", False)
    if storage.dtype is not dtype and storage.dtype is not _UINT8:
        raise _bad(f"a torch.{dtype.name} tensor over a torch.{storage.dtype.name} storage")
    available = storage.nbytes // dtype.itemsize
    if all(size):
        extent = offset + sum(map(operator.mul, size, stride)) - sum(stride) + 1  # offset + sum((n - 1) * s) + 1
        if extent > available:
            raise _bad(
                f"tensor view [{offset}, {extent}) exceeds its storage of {available} elements (storage {storage.key})"
            )
    elif offset > available:
        raise _bad(f"empty tensor at offset {offset} past its storage of {available} elements")
    return TensorSpec(storage, offset, size, stride, dtype, requires_grad, False, conj, neg)


_UINT8 = _dtypes.BY_NAME["uint8"]
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}


def _check_grad(requires_grad: bool, dtype: _dtypes.DType) -> None:
    # torch's is_floating_point / is_complex, by name
    if requires_grad and not dtype.name.startswith(("float", "bfloat", "complex")):
        raise _bad(f"a torch.{dtype.name} tensor cannot require gradients (only floating point and complex ones can)")


def _rebuild_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> TensorSpec:
    if not isinstance(storage, Storage):
        raise _bad(f"a tensor is rebuilt from a {type(storage).__name__}, not from one of the file's storages")
    return _tensor(storage, offset, size, stride, storage.dtype, requires_grad, hooks, metadata)


def _rebuild_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, metadata: Any = None
) -> TensorSpec:
    row = _dtypes.of(dtype) if _torch_values.is_a(dtype, "dtype") else None
    if row is None or row.name in _QUANTIZED:
        # torch writes quantized tensors with _rebuild_qtensor (refused): a bare quantized dtype has no quantizer
        raise _bad(f"_rebuild_tensor_v3 needs a plain dtype, got {dtype!r}")
    return _tensor(storage, offset, size, stride, row, requires_grad, hooks, metadata)


def _rebuild_v1(storage: Any, offset: Any, size: Any, stride: Any) -> TensorSpec:
    return _rebuild_v2(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> TensorSpec:
    if not isinstance(data, TensorSpec) or type(requires_grad) is not bool:
        raise _bad("a Parameter must wrap a tensor")
    _check_grad(requires_grad, data.dtype)
    if hooks not in (None, {}) and not (isinstance(hooks, dict) and not hooks):
        raise _bad("a Parameter with backward hooks")
    return TensorSpec(
        data.storage, data.offset, data.size, data.stride, data.dtype, requires_grad, True, data.conj, data.neg
    )


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> TensorSpec:
    # a tensor with Python attributes: attributes are dropped, the tensor kept (subclasses refused)
    if not isinstance(func, Global) or func.name not in _REBUILDERS or not isinstance(args, tuple):
        raise _bad(f"_rebuild_from_type_v2 of {func!r}")
    kind = new_type.name if isinstance(new_type, Global) else None
    if kind not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        raise UnsafeCheckpointError(f"tensor subclass {kind or type(new_type).__name__} is not allowed")
    assert func.handler.call is not None
    spec = func.handler.call(*args)
    if not isinstance(spec, TensorSpec):
        raise _bad("_rebuild_from_type_v2 did not rebuild a tensor")
    if kind == "torch.nn.parameter.Parameter":
        spec = TensorSpec(
            spec.storage, spec.offset, spec.size, spec.stride, spec.dtype, spec.requires_grad, True, spec.conj, spec.neg
        )
    return spec


_REBUILDERS = {
    "torch._utils._rebuild_tensor": _rebuild_v1,
    "torch._utils._rebuild_tensor_v2": _rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_v3,
}


@dataclass(frozen=True)
class SparseSpec:
    """A sparse tensor as pickled by ``_rebuild_sparse_tensor``: layout, size, dense components."""

    layout: str
    size: tuple[int, ...]
    components: tuple[TensorSpec, ...]
    coalesced: bool | None


def _rebuild_sparse(layout: Any, data: Any) -> SparseSpec:
    """torch's ``_rebuild_sparse_tensor(layout, data)``: recorded, built only when loaded (with
    torch's invariant checks)."""
    if not _torch_values.is_a(layout, "layout") or not isinstance(data, tuple):
        raise _bad("_rebuild_sparse_tensor takes a sparse layout and a tuple")
    name = sparse.layout_name(layout)
    if name == "sparse_coo":
        if len(data) not in (3, 4):
            raise _bad("a sparse COO tensor is (indices, values, size[, is_coalesced])")
        comps, size, coalesced = data[:2], data[2], (data[3] if len(data) == 4 else None)
    else:
        if len(data) != 4:
            raise _bad(f"a {name} tensor is (compressed_indices, plain_indices, values, size)")
        comps, size, coalesced = data[:3], data[3], None
    name, size = sparse.check(name, size, comps, coalesced)
    if not all(isinstance(c, TensorSpec) for c in comps):
        raise _bad(f"a {name} tensor's components must be tensors")
    return SparseSpec(name, size, tuple(comps), coalesced)


def _torch_table() -> dict[str, Handler]:
    table = {name: Handler(call=fn) for name, fn in _REBUILDERS.items()}  # type: ignore[arg-type]
    table["torch._utils._rebuild_parameter"] = Handler(call=_rebuild_parameter)
    table["torch._utils._rebuild_parameter_with_state"] = Handler(call=_rebuild_parameter)
    table["torch._tensor._rebuild_from_type_v2"] = Handler(call=_rebuild_from_type_v2)
    table["torch.Tensor"] = Handler()
    table["torch.nn.parameter.Parameter"] = Handler()
    for mod in ("torch", "torch.cuda"):
        for name, dtype in _dtypes.BY_STORAGE.items():
            if not name.startswith("Q"):  # torch pickles quantized tensors with _rebuild_qtensor (refused)
                table[f"{mod}.{name}"] = Handler(value=StorageType(dtype))
    table["torch.storage.UntypedStorage"] = table["torch.UntypedStorage"] = Handler(value=StorageType(None))
    table["torch._utils._rebuild_sparse_tensor"] = Handler(call=_rebuild_sparse)
    table.update(_omegaconf.handlers())  # Hydra configs in Lightning hyper_parameters, as plain data
    return table


TORCH: dict[str, Handler] = _torch_table()


def allowed_globals() -> dict[str, Handler]:
    """The whole allow-list this format reads with: the VM's base table plus the torch globals.

    Example:
        >>> "torch._utils._rebuild_tensor_v2" in allowed_globals(), "posix.system" in allowed_globals()
        (True, False)
    """
    return {**_pickle.BASE, **TORCH}


# -- sniffing --------------------------------------------------------------------------------------


def _pickle_start(head: bytes) -> int | None:
    """Where the first opcode after PROTO (and FRAME) is, if ``head`` starts like a pickle of protocol >= 2."""
    if len(head) < 3 or head[0] != 0x80 or not 2 <= head[1] <= _pickle.HIGHEST_PROTOCOL:
        return None
    return 11 if head[2] == 0x95 else 2


def _looks_like_pickle(head: bytes) -> bool:
    """PROTO 2-5, then opcodes that parse until the head runs out (a safetensors length prefix
    can start with the same two bytes, but not with a valid opcode stream)."""
    if _pickle_start(head) is None:
        return False
    try:
        _pickle.scan(head, 0, "")
    except TruncatedCheckpointError:
        return True  # the head ran out first: a pickle longer than the head
    except CheckpointError:
        return False
    return True


def _is_legacy(head: bytes) -> bool:
    at = _pickle_start(head)
    return at is not None and head[at : at + 12] == b"\x8a\x0a" + _MAGIC_BYTES


def _is_legacy_tar(head: bytes) -> bool:
    return len(head) >= 512 and head[257:262] == b"ustar" and head[:100].rstrip(b"\x00") in _LEGACY_TAR_MEMBERS


def sniff(head: bytes, path: Path) -> bool:
    """A torch zip (local header with a ``<prefix>/`` name), a pickle of protocol 2-5, or a legacy tar.

    Example:
        >>> sniff(Path("friend.pt").read_bytes()[:4096], Path("friend.pt"))
        True
    """
    return _zip.looks_like_zip(head) or _looks_like_pickle(head) or _is_legacy_tar(head)


# -- reading ---------------------------------------------------------------------------------------


class _Reader:
    """One open file: its map, its storages, and how to turn them into tensors."""

    def __init__(self, path: Path, mapped: MappedFile | None = None, source: str | None = None) -> None:
        # dcp reads many archives out of one .distcp file: they share its map (``mapped``)
        self.path = path
        self.source = source or str(path)
        st = path.stat()
        size, self.stamp = st.st_size, (st.st_size, st.st_mtime_ns)
        if size == 0:
            raise CorruptCheckpointError(f"{path}: the file is empty")
        self.mapped = mapped or MappedFile(path, size)
        self.data = self.mapped.map
        self.size = size
        self.byteorder = "little"
        self.storages: dict[str, Storage] = {}
        self.info: dict[str, Any] = {}
        self.globals: list[str] = []  # every global the file's pickles name
        # storages copied to align them, shared by all their views: held while the checkpoint is (at
        # most the file's size; a weak map lost them as soon as a view was re-wrapped, by detach or
        # Parameter, and then copied each storage once per view)
        self.copies: dict[Any, torch.Tensor] = {}

    # zip ------------------------------------------------------------------------------------------
    def read_zip(self, allow: Iterable[str], start: int = 0, length: int | None = None) -> Any:
        """The object graph of the torch archive at ``[start, start+length)`` of the file (DCP
        segments are whole archives inside a ``.distcp``); feed it to `_Tree` for a tree."""
        archive = _zip.parse(self.data, source=self.source, start=start, length=length, skip_compressed=_script_code)
        records = archive.records
        script = _is_torchscript(archive)
        if "data.pkl" not in records:
            raise CorruptCheckpointError(f"{self.source}: the archive {archive.prefix + '/'!r} has no data.pkl")
        order = self._small(records.get("byteorder"))
        if order is not None:
            if order not in ("little", "big"):
                raise CorruptCheckpointError(f"{self.source}: byteorder record says {order!r}")
            self.byteorder = order
        self.info.update(container="zip", archive_prefix=archive.prefix, zip64=archive.zip64, byteorder=self.byteorder)
        for key in (".storage_alignment", ".format_version", "version"):
            value = self._small(records.get(key))
            if value is not None:
                self.info[key.lstrip(".")] = value.strip()
        self.archive = archive
        pkl = records["data.pkl"]

        def persistent_load(pid: Any) -> Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise _bad(f"bad persistent id {pid!r:.100} (expected ('storage', type, key, location, numel))")
            _, stype, key, location, numel = pid
            if (
                not isinstance(stype, StorageType)
                or not isinstance(location, str)
                or type(numel) is not int
                or numel < 0
            ):
                raise _bad(f"bad storage persistent id {pid!r:.100}")
            if not isinstance(key, str) or not (key.isdigit() and key.isascii() and len(key) <= 20):
                raise _bad(f"bad storage key {key!r:.40}")
            dtype = stype.dtype or _UINT8
            known = self.storages.get(key)
            if known is not None:
                if (known.dtype, known.numel) != (dtype, numel):
                    raise _bad(f"storage {key} is declared twice with different types or sizes")
                return known
            record = records.get(f"data/{key}")
            if record is None:
                raise _bad(f"storage {key} has no record data/{key} in the archive")
            storage = Storage(key, dtype, numel, location, record.offset, record.crc32 or None)
            if storage.nbytes != record.size:
                raise _bad(
                    f"storage {key}: declared {storage.nbytes} bytes ({numel} x torch.{dtype.name}), the record has {record.size}"
                )
            self.storages[key] = storage
            return storage

        data = bytes(self.data[pkl.offset : pkl.offset + pkl.size])  # the pickle alone, never the storages
        self._note_pickle(data)
        if not script:
            return self._unpickle(data, f"{self.source} (data.pkl)", persistent_load, allow)
        self.info["producer"] = "torchscript"
        extra = _script_records(_pickle.scan(data, 0, self.source)[0])
        out = _pickle.load(
            data,
            source=f"{self.source} (data.pkl)",
            persistent_load=persistent_load,
            allow=allow,
            extra={**TORCH, **extra},
        )
        self.globals.extend(n for n in out.globals if n not in extra)
        return script_state_dict(out.value, self.source)

    def _small(self, record: _zip.Record | None) -> str | None:
        if record is None:
            return None
        if record.size > 64:
            raise CorruptCheckpointError(
                f"{self.source}: record {record.name!r} is {record.size} bytes, expected a short text"
            )
        try:
            return bytes(self.data[record.offset : record.offset + record.size]).decode("ascii")
        except UnicodeDecodeError:
            raise CorruptCheckpointError(f"{self.source}: record {record.name!r} is not text") from None

    def _note_pickle(self, view: Any) -> None:
        if len(view) > 1 and view[0] == 0x80:
            self.info["pickle_protocol"] = view[1]

    def _unpickle(self, data: Any, source: str, persistent_load: Any, allow: Iterable[str]) -> Any:
        out = _pickle.load(data, source=source, persistent_load=persistent_load, allow=allow, extra=TORCH)
        self.globals.extend(out.globals)
        return out.value

    # legacy -----------------------------------------------------------------------------------
    def read_legacy(self, allow: Iterable[str]) -> Any:
        data = memoryview(self.data)
        src = self.source

        def next_pickle(
            pos: int, what: str, persistent_load: Any = None, allow_: Iterable[str] = ()
        ) -> tuple[Any, int]:
            extra = TORCH if persistent_load is not None else {}
            out = _pickle.load(
                data,
                pos,
                source=f"{src} (legacy {what} pickle)",
                persistent_load=persistent_load,
                allow=allow_,
                extra=extra,
                trailing=True,
            )
            self.globals.extend(out.globals)
            return out.value, out.end

        magic, pos = next_pickle(0, "magic")
        if magic != LEGACY_MAGIC:
            raise CorruptCheckpointError(f"{src}: not a legacy torch file (bad magic number)")
        version, pos = next_pickle(pos, "version")
        if version != LEGACY_PROTOCOL:
            raise CorruptCheckpointError(f"{src}: legacy protocol version {version!r}, expected {LEGACY_PROTOCOL}")
        sys_info, pos = next_pickle(pos, "sys_info")
        if not isinstance(sys_info, dict) or type(sys_info.get("little_endian")) is not bool:
            raise CorruptCheckpointError(f"{src}: legacy sys_info is malformed")
        self.byteorder = "little" if sys_info["little_endian"] else "big"
        self.info.update(container="legacy", byteorder=self.byteorder)
        self._note_pickle(data[pos:])

        def persistent_load(pid: Any) -> Storage:
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
                raise _bad(
                    f"bad legacy persistent id {pid!r:.100} (expected ('storage', type, key, location, numel, view))"
                )
            _, stype, key, location, numel, view_metadata = pid
            if (
                not isinstance(stype, StorageType)
                or not isinstance(key, str)
                or not isinstance(location, str)
                or type(numel) is not int
                or numel < 0
            ):
                raise _bad(f"bad legacy storage id {pid!r:.100}")
            if view_metadata is not None:
                raise _bad(
                    f"storage {key} is a legacy storage view (PyTorch < 1.0); load and re-save it with an old PyTorch"
                )
            dtype = stype.dtype or _UINT8
            known = self.storages.setdefault(key, Storage(key, dtype, numel, location))
            if (known.dtype, known.numel) != (dtype, numel):
                raise _bad(f"storage {key} is declared twice with different types or sizes")
            return known

        obj, pos = next_pickle(pos, "object", persistent_load, allow)
        keys, pos = next_pickle(pos, "storage keys")
        if (
            not isinstance(keys, list)
            or not all(isinstance(k, str) for k in keys)
            or len(set(keys)) != len(keys)
            or set(keys) != set(self.storages)
        ):
            raise CorruptCheckpointError(
                f"{src}: the legacy storage key list does not match the storages the object uses"
            )
        fmt = "<q" if self.byteorder == "little" else ">q"
        for key in keys:
            storage = self.storages[key]
            if pos + 8 > self.size:
                raise CorruptCheckpointError(f"{src}: truncated before the header of storage {key}")
            (numel,) = struct.unpack_from(fmt, data, pos)
            if numel != storage.numel:
                raise CorruptCheckpointError(
                    f"{src}: storage {key} holds {numel} elements, the pickle declared {storage.numel}"
                )
            storage.offset = pos + 8
            pos = storage.offset + storage.nbytes
            if pos > self.size:
                raise CorruptCheckpointError(
                    f"{src}: storage {key} ({storage.nbytes} bytes at {storage.offset}) runs past the end of the file"
                )
        if pos != self.size:
            raise CorruptCheckpointError(f"{src}: {self.size - pos} bytes of trailing data after the last storage")
        return obj

    def read_bare(self, allow: Iterable[str]) -> Any:
        self.info["container"] = "pickle"
        self._note_pickle(memoryview(self.data)[:2])
        return self._unpickle(memoryview(self.data), self.source, None, allow)

    # tensors ----------------------------------------------------------------------------------
    def tensor_loader(self, spec: TensorSpec) -> Any:
        mapped, swap, storage, path, stamp, copies = (
            self.mapped,
            self.byteorder != "little",
            spec.storage,
            self.path,
            self.stamp,
            self.copies,
        )

        def load() -> torch.Tensor:
            st = os.stat(path)  # pages past a truncated file's end would fault (SIGBUS), not raise
            if (st.st_size, st.st_mtime_ns) != stamp:
                raise CorruptCheckpointError(f"{path}: the file changed after it was opened; open it again")
            return materialize(mapped, storage, spec, swap, copies)

        return load


# -- TorchScript -----------------------------------------------------------------------------------
# A TorchScript archive (torch.jit.save) is a torch zip whose data.pkl pickles the module tree as
# objects of its compiled classes, ``__torch__.<path>.<Class>`` (names mangled ``___torch_mangle_N``),
# beside code/ (the compiled source, deflated by torch 2.x) and constants.pkl. We read only data.pkl:
# every ``__torch__`` object is an inert record (never imported, built or run) and the state dict is
# the tensors found walking the records' attributes. code/ and constants.pkl are never read.

_SCRIPT_NAME = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)+\Z")


def _script_code(name: str) -> bool:
    """The entries TorchScript may deflate: its compiled source and debug tables, which we never read."""
    return name.startswith("code/") or name.endswith(".debug_pkl")


def _is_torchscript(archive: _zip.Archive) -> bool:
    names = [*archive.records, *archive.skipped]
    return "constants.pkl" in names or any(n.startswith("code/") for n in names)


def _script_records(names: Iterable[str]) -> dict[str, Handler]:
    """An inert-record handler for each ``__torch__`` class the pickle names (mangled names included,
    which the generic allow rule refuses for their ``__``); nothing else is admitted."""

    def handler(name: str) -> Handler:
        return Handler(
            call=lambda *a: Inert(name, args=a), new=lambda *a: Inert(name, args=a), build=_pickle.inert_build
        )

    return {n: handler(n) for n in names if _SCRIPT_NAME.match(n)}


def script_state_dict(root: Any, source: str) -> collections.OrderedDict[str, Any]:
    """The state dict of a TorchScript module tree as unpickled records: every tensor attribute,
    keyed by its attribute path (``fc.weight``), submodules walked depth-first in pickle order.

    Example:
        >>> list(script_state_dict(obj, "m.pt"))[:2]
        ['fc.weight', 'fc.bias']
    """
    if not (isinstance(root, Inert) and root.name.startswith("__torch__.")):
        raise CorruptCheckpointError(f"{source}: a TorchScript archive whose data.pkl does not hold a module")
    out: collections.OrderedDict[str, Any] = collections.OrderedDict()
    stack: list[tuple[str, Inert, int]] = [("", root, 0)]
    seen: set[int] = set()
    while stack:
        prefix, node, depth = stack.pop()
        if id(node) in seen or depth > MAX_DEPTH:
            raise CorruptCheckpointError(
                f"{source}: the TorchScript module tree at {prefix or 'the root'!r} is cyclic or too deep"
            )
        seen.add(id(node))
        state = node.state if isinstance(node.state, dict) else {}
        subs = []
        for k, v in state.items():
            if isinstance(v, TensorSpec) and isinstance(k, str):
                out[prefix + k] = v
            elif isinstance(v, Inert) and v.name.startswith("__torch__.") and isinstance(k, str):
                subs.append((f"{prefix}{k}.", v, depth + 1))
        stack.extend(reversed(subs))
    return out


def materialize(
    mapped: MappedFile,
    storage: Storage,
    spec: TensorSpec,
    byteswap: bool = False,
    copies: MutableMapping[Any, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The tensor ``spec`` describes, over ``storage``'s bytes in the map (copied only when the bytes
    are misaligned for the dtype or stored big-endian). A copied storage is kept in ``copies`` (by
    the caller) so its other views share it, as torch's do, instead of copying it again.

    Example:
        >>> t = materialize(MappedFile(path), storage, TensorSpec(storage, 0, (2, 3), (3, 1), torch.float32))
    """
    import torch

    item = spec.dtype.itemsize
    count = storage.nbytes // item
    dtype = _dtypes.to_torch(spec.dtype)
    key = (storage.offset, storage.nbytes, dtype)
    base = copies.get(key) if copies is not None else None
    if base is not None:
        pass
    elif count == 0:
        base = torch.empty(0, dtype=dtype)
    else:
        copied = bool(storage.offset % item) or (byteswap and item > 1)
        if storage.offset % item:
            # legacy files put storages at unaligned offsets: copy once per storage, with one
            # memcpy (numpy's; torch's clone splits it across threads, slow on a loaded machine)
            aligned = np.frombuffer(mapped.map, dtype=np.uint8, count=count * item, offset=storage.offset).copy()
            raw = torch.from_numpy(aligned)
        else:
            raw = torch.frombuffer(mapped.map, dtype=torch.uint8, count=count * item, offset=storage.offset)
        if byteswap and item > 1:
            unit = item // 2 if dtype.is_complex else item
            raw = raw.view(-1, unit).flip(-1).reshape(-1)
        base = raw.view(dtype)
        if copied and copies is not None:
            copies[key] = base
    t = base.as_strided(spec.size, spec.stride, spec.offset)
    if spec.conj:
        t = t.conj()
    if spec.neg:
        t = torch._neg_view(t)
    if spec.requires_grad and not spec.parameter:
        t.requires_grad_(True)
    return t


# -- the object graph -> the checkpoint tree -------------------------------------------------------

_LEAF_TYPES = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    bytearray,
    complex,
    *_torch_values.STAND_INS,
    np.generic,
    np.ndarray,
    np.dtype,
)


class _Tree:
    """Turns the unpickled graph into a tree: shared containers are copied (with a budget, so a
    small pickle cannot describe a billion paths), cycles and deep nesting are refused."""

    def __init__(self, reader: _Reader, budget: int) -> None:
        self.reader = reader
        self.budget = budget
        self.active: set[int] = set()
        self.refs: dict[tuple[int, tuple[Any, ...]], TensorRef] = {}
        self.expanded = 0  # bytes the file's expanded views add once loaded
        self.leaf_types = _LEAF_TYPES + _torch_values.torch_types()

    def err(self, path: tuple[Any, ...], what: str) -> CorruptCheckpointError:
        where = "/".join(map(str, path)) or "the root"
        return CorruptCheckpointError(f"{self.reader.source}: {where}: {what}")

    def convert(self, obj: Any, path: tuple[Any, ...] = ()) -> Any:
        """The tree for ``obj`` (found at ``path``): `TensorRef` leaves, copied containers."""
        try:
            return self._convert(obj, path)
        except RecursionError:  # the caller's own stack was already deep
            raise self.err(path, "nested too deeply to read") from None

    def _convert(self, obj: Any, path: tuple[Any, ...], tensors: bool = True) -> Any:
        cls = type(obj)
        # the budget counts values of about a dict's size; a set costs four (216 bytes, not 64)
        self.budget -= 4 if cls is set or cls is frozenset else 1
        if self.budget < 0:
            raise self.err(path, "the pickle's shared references expand to too many values (a memo bomb?)")
        if len(path) > MAX_DEPTH:
            raise self.err(path[:8], f"nested more than {MAX_DEPTH} levels deep")
        if cls is TensorSpec and tensors:  # the common case first
            return self.tensor(obj, path)
        if isinstance(obj, self.leaf_types) and cls is not list and cls is not tuple:
            return obj
        if isinstance(obj, SparseSpec):
            if not tensors:
                raise self.err(path, "a sparse tensor where only plain values may appear")
            names = sparse.COMPONENTS[obj.layout]
            comps = [self.tensor(c, (*path, n)) for n, c in zip(names, obj.components, strict=True)]
            return sparse.sparse_ref(path_name(path), self.reader.source, obj.layout, obj.size, comps, obj.coalesced)
        if isinstance(obj, (TensorSpec, Storage)):
            if not tensors:
                raise self.err(
                    path, "a tensor where only plain values may appear (a dict key, a set, _metadata, a Namespace)"
                )
            return self.tensor(obj, path)
        if isinstance(obj, pathlib.PurePath):
            return obj
        if isinstance(obj, Inert):
            obj = obj.as_dict()
        elif isinstance(obj, Global):
            if (obj.name in _pickle.BASE or obj.name in TORCH) and obj.name not in _omegaconf.CLASSES:
                raise UnsafeCheckpointError(
                    f"{self.reader.source}: {path_name(path) or 'the root'} is the class or function {obj.name} itself, not data"
                )
            return {"__global__": obj.name}
        elif isinstance(obj, _pickle.NumpyDtype):
            return np.dtype(obj.spec)
        key = id(obj)
        if key in self.active:
            raise self.err(path, "the object graph has a cycle")
        self.active.add(key)
        try:
            return self._container(obj, path, tensors)
        finally:
            self.active.discard(key)

    def _container(self, obj: Any, path: tuple[Any, ...], tensors: bool) -> Any:
        cls = type(obj)
        if cls is list:
            return [self._convert(v, (*path, i), tensors) for i, v in enumerate(obj)]
        if cls is tuple:
            return tuple(self._convert(v, (*path, i), tensors) for i, v in enumerate(obj))
        try:
            if cls in (set, frozenset):
                return cls(self._convert(v, (*path, "<item>"), False) for v in obj)
            if cls in (dict, collections.OrderedDict, AttributeDict, collections.Counter):
                out: Any = cls()
                for k, v in obj.items():
                    value = self._convert(v, (*path, k), tensors)
                    if type(k) is str or type(k) is int:  # a plain key, counted as _convert counts it
                        self.budget -= 1
                        if self.budget < 0 or len(path) >= MAX_DEPTH:  # let _convert raise the error
                            self.budget += 1
                            k = self._convert(k, (*path, "<key>"), False)
                        out[k] = value
                    else:
                        out[self._convert(k, (*path, "<key>"), False)] = value
                meta = getattr(obj, "_metadata", None)
                if meta is not None:
                    out._metadata = self._convert(meta, (*path, "_metadata"), False)
                return out
        except TypeError:  # an admitted global used as a key became a (unhashable) inert record
            raise self.err(path, "a dict key or set member that is not plain data") from None
        if cls is Namespace:
            return Namespace(**{k: self._convert(v, (*path, k), False) for k, v in vars(obj).items()})
        raise self.err(path, f"holds a {cls.__module__}.{cls.__qualname__} that no allowed global builds")

    def tensor(self, obj: TensorSpec | Storage, path: tuple[Any, ...]) -> TensorRef:
        if isinstance(obj, Storage):  # a bare storage: read it as the 1-D tensor of its elements
            obj = TensorSpec(obj, 0, (obj.numel,), (1,), obj.dtype)
        s, reader = obj.storage, self.reader
        if math.prod(obj.size) * obj.dtype.itemsize > s.nbytes:  # an expanded view
            self._check_expansion(obj, path)
        ref = PickledRef.__new__(PickledRef)
        ref.__dict__.update(
            name=path_name(path),
            _dtype=obj.dtype,  # a DType row: resolved lazily
            shape=obj.size,
            source=reader.source,
            storage=(reader.source, s.offset),
            view=(obj.offset, obj.size, obj.stride, obj.conj, obj.neg),
            requires_grad=obj.requires_grad,
            parameter=obj.parameter,
            _spec=obj,
            _reader=reader,
        )
        return ref

    def _check_expansion(self, spec: TensorSpec, path: tuple[Any, ...]) -> None:
        """Views that address more bytes than they store (stride 0: torch.expand) cost memory once
        loaded or converted: all of a file's together may exceed its size at most by the resource
        model's bound (a 2**31-element view of 4 bytes was 8 GiB from a 384-byte file)."""
        logical = math.prod(spec.size) * spec.dtype.itemsize
        if logical <= spec.storage.nbytes:
            return
        self.expanded += logical - spec.storage.nbytes
        bound = MAX_VIEW_EXPANSION * self.reader.size + VIEW_ALLOWANCE
        if self.expanded > bound:
            raise self.err(
                path,
                f"an expanded view of {list(spec.size)} ({logical} bytes) over a storage of {spec.storage.nbytes} "
                f"bytes: the file's views would take {self.expanded} bytes once loaded, more than the limit of "
                f"{bound} (formats/resource-model.md); re-save the tensor contiguous (t.contiguous()) if it is real",
            )

class PickledRef(TensorRef):
    """A tensor of a pickled checkpoint. Its loader and its span (where its bytes lie as they
    are, if they do) are made when first read: opening a .pt builds one reference per tensor,
    and most opens read one tensor or none."""

    @functools.cached_property
    def loader(self) -> Callable[[], torch.Tensor]:  # type: ignore[override]
        return self._reader.tensor_loader(self._spec)  # type: ignore[attr-defined, no-any-return]

    @functools.cached_property
    def span(self) -> Span | None:  # type: ignore[override]
        return _span(self._reader, self._spec)  # type: ignore[attr-defined]


def _span(reader: _Reader, spec: TensorSpec) -> Span | None:
    """Where the tensor's bytes lie as they are, if they do (contiguous, little-endian, no
    lazy conjugation); the record's CRC when the tensor is its whole storage."""
    s, item = spec.storage, spec.dtype.itemsize
    if reader.byteorder != "little" or spec.conj or spec.neg or s.offset < 0:
        return None
    n = math.prod(spec.size)
    if n > 1:  # C order: each dimension of more than one element strides over the ones after it
        inner = 1
        for d, st in zip(reversed(spec.size), reversed(spec.stride), strict=True):
            if d > 1 and st != inner:
                return None
            inner *= d
    whole = spec.offset == 0 and n * item == s.nbytes
    return Span(reader.mapped, s.offset + spec.offset * item, s.crc32 if whole else None)


def _open(path: Path, allow: Iterable[str]) -> tuple[_Reader, Any, int]:
    reader = _Reader(path)
    head = bytes(reader.data[:4096])
    if _is_legacy_tar(head):
        raise UnsafeCheckpointError(
            f"{path}: a legacy tar checkpoint (PyTorch <= 0.1.10); torch's own loader for it extracts files and is "
            "refused even by torch.load(weights_only=True). Re-save it with an old PyTorch as a state_dict"
        )
    if head[:4] == _zip.LOCAL:
        tree = reader.read_zip(allow)
        pickle_size = reader.archive.records["data.pkl"].size
    elif _is_legacy(head):
        tree = reader.read_legacy(allow)
        pickle_size = reader.size - sum(s.nbytes for s in reader.storages.values())
    elif _pickle_start(head) is not None:
        tree = reader.read_bare(allow)
        pickle_size = reader.size
    else:
        raise CorruptCheckpointError(f"{path}: neither a torch zip archive, a legacy torch file, nor a pickle")
    return reader, tree, pickle_size


def read_archive(
    mapped: MappedFile, *, start: int, length: int, allow: Iterable[str], source: str, path: tuple[Any, ...] = ()
) -> tuple[Any, _zip.Archive]:
    """A ``torch.save`` archive stored inside a larger file (DCP's byte items), read as `read` reads
    a file: the restricted VM, tensors lazy over ``mapped``; returns the value and the archive's
    directory (for the caller's checks). ``path`` is where the value sits in the caller's tree.

    Example:
        >>> value, archive = read_archive(mapped, start=128, length=4096, allow=(), source="shard_0.distcp")
    """
    reader = _Reader(mapped.path, mapped, source=source)
    obj = reader.read_zip(allow, start=start, length=length)
    budget = 100_000 + 4 * reader.archive.records["data.pkl"].size
    return _Tree(reader, budget).convert(obj, path), reader.archive


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a ``torch.save``/Lightning file: parse its structure and pickle; tensors stay on disk.

    Args:
        allow: globals (``"pkg.mod.Class"`` or ``"pkg.*"``) to admit as inert data: each object of
            them becomes ``{"__global__": name, "args": ..., "state": ...}``; nothing is imported.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list (before anything is built).
        CorruptCheckpointError: the file is truncated or inconsistent.

    Example:
        >>> ckpt = read(Path("friend.pt"))
        >>> ckpt.tensors()["0.weight"].shape
        (16, 8)
    """
    return _load(Path(path), tuple(allow))[1]


def _load(path: Path, allow: tuple[str, ...]) -> tuple[_Reader, Checkpoint]:
    reader, obj, pickle_size = _open(path, allow)
    tree = _Tree(reader, 20_000 + 4 * pickle_size).convert(obj, ())
    info = dict(reader.info)
    info["globals"] = sorted({n for n, _ in globals_report(path, allow=allow, _reader=reader)})
    if isinstance(tree, dict):
        if "pytorch-lightning_version" in tree:
            info["lightning_version"] = tree["pytorch-lightning_version"]
            info["producer"] = "lightning-trainer"
        elif any(g.endswith(".AttributeDict") and "lightning" in g for g in info["globals"]):
            info["producer"] = "lightning"
    return reader, Checkpoint(tree, format=NAME, path=path, info=info)


def globals_report(path: Path, *, allow: Iterable[str] = (), _reader: _Reader | None = None) -> list[tuple[str, bool]]:
    """Every global the file's pickles refer to, with whether safeckpt admits it (nothing is built).

    Example:
        >>> globals_report(Path("evil.pt"))
        [('collections.OrderedDict', True), ('posix.system', False)]
    """
    names: dict[str, None] = dict.fromkeys(_reader.globals) if _reader is not None else _scan_globals(Path(path))
    table = allowed_globals()
    admitted = _pickle.allowed_by(allow)
    return [(n, n in table or (admitted(n) and not _pickle.is_denied(n) and not n.startswith("<"))) for n in names]


def _scan_globals(path: Path) -> dict[str, None]:
    """Every global the pickle(s) in ``path`` name, in order, found without running them."""
    reader = _Reader(Path(path))
    data = memoryview(reader.data)
    head = bytes(data[:4096])
    spans: list[tuple[int, int | None]] = []
    script = False
    if head[:4] == _zip.LOCAL:
        archive = _zip.parse(reader.data, source=reader.source, skip_compressed=_script_code)
        script = _is_torchscript(archive)
        r = archive.records.get("data.pkl")
        if r is None:
            raise CorruptCheckpointError(f"{reader.source}: the archive has no data.pkl")
        data = data[r.offset : r.offset + r.size]
        spans = [(0, None)]
    elif _pickle_start(head) is not None:
        spans = [(0, 5 if _is_legacy(head) else 1)]
    names: dict[str, None] = {}
    for start, count in spans:
        pos = start
        for _ in range(count or 1):
            found, pos = _pickle.scan(data, pos, reader.source)
            names.update(dict.fromkeys(n for n in found if not (script and _SCRIPT_NAME.match(n))))
            if pos >= len(data):
                break
    return names


def verify(path: Path) -> list[str]:
    """Integrity problems and refused globals, as messages (``[]`` for a clean file).

    Checks the zip structure, every record's CRC-32 where one was recorded (torch may write 0),
    storage sizes, tensor bounds and the whole pickle. Refused globals are reported, and the rest
    of the file is still checked with them read as inert data.

    Example:
        >>> verify(Path("friend.pt"))
        []
    """
    path = Path(path)
    problems: list[str] = []
    try:
        refused = [n for n, ok in globals_report(path) if not ok]
        if refused:
            problems.append(f"{path}: refers to globals safeckpt does not allow: {', '.join(refused)}")
            # only names allow= takes can be fed back to read the rest as inert data
            if any(_pickle.is_denied(n) or not _pickle.GLOBAL_NAME.match(n) for n in refused):
                return problems
        reader, _ = _load(path, tuple(refused))
        if reader.info.get("container") == "zip":
            problems += reader.archive.crc_problems(reader.data, str(path))
    except CheckpointError as e:
        problems.append(str(e))
    return problems


# -- writing (export) ------------------------------------------------------------------------------


def write(ckpt: Checkpoint, path: Path, *, pickle_protocol: int = 2) -> Path:
    """Export with ``torch.save`` (only on an explicit ``format="torch"``), atomically.

    The tree is materialized first (tensors read from their source); ``AttributeDict`` values are
    pickled as ``safeckpt.tree.AttributeDict``, which safeckpt reads back as itself.

    Example:
        >>> safeckpt.convert("run.safeckpt", "run.pt", format="torch")
        PosixPath('run.pt')
    """
    import torch

    obj = ckpt.to_python()
    with atomic_write(path) as f:
        torch.save(obj, f, pickle_protocol=pickle_protocol)
    return Path(os.path.realpath(os.fspath(path)))


__all__ = [
    "EXTENSIONS",
    "FORMAT",
    "NAME",
    "allowed_globals",
    "globals_report",
    "read",
    "read_archive",
    "sniff",
    "verify",
    "write",
]

FORMAT = Format(
    NAME,
    EXTENSIONS,
    "file",
    sniff=sniff,
    read=read,
    write=write,
    write_options=frozenset({"pickle_protocol"}),
    verify=verify,
    globals_report=globals_report,
)
