"""msgpack encoding of the non-tensor part of a checkpoint.

Plain msgpack carries ``None``, ``bool``, 64-bit ints, ``float`` (``nan``/``inf`` included), ``str``,
``bytes``, lists and dicts with any scalar keys. Everything else that may appear in training state
is a msgpack *ext* type whose payload is itself msgpack (codes below; ``formats/safeckpt.md`` is
the specification). Tensors never go through here: the tree holds a `TENSOR` ext naming the
tensor stored beside it. Nothing is ever imported or called on decode: each code maps to one
constructor from a fixed table, and a registered user type (`USER`, see `user_types`) is rebuilt
only by the converters the *loading* process registered under the name the file records.

Example:
    >>> data = encode({"step": 3, "betas": (0.9, 0.999), 0: {1, 2}}, tensor_name=None)
    >>> decode(data, tensor=None)
    {'step': 3, 'betas': (0.9, 0.999), 0: {1, 2}}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import math
import pathlib
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar, overload

import msgpack

from . import user_types
from ._budget import MAX_INT_BYTES, HashFloodError, KeyGuard
from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .tree import AttributeDict, TensorRef, is_tensor, map_leaves
from .user_types import Unregistered

if TYPE_CHECKING:  # torch and numpy are imported where a value of theirs is decoded (reading a header needs neither)
    import numpy as np
    import torch

__all__ = ["Ext", "decode", "encode", "keep_unregistered", "refuse_unbuilt", "register_type", "where"]


class Ext:
    """msgpack ext codes used by safeckpt (stable: part of the file format)."""

    TENSOR = 1  # [name, flags] -> the tensor stored under `name`
    TUPLE = 2  # [items]
    SET = 3  # [items]
    FROZENSET = 4  # [items]
    BIGINT = 5  # two's-complement big-endian bytes of an int outside [-2**63, 2**64)
    ORDERED_DICT = 6  # [map, _metadata or nil]
    ATTRIBUTE_DICT = 7  # map
    NAMESPACE = 8  # map of str -> value (argparse.Namespace)
    SIZE = 9  # [ints] (torch.Size)
    DTYPE = 10  # str, e.g. "float32"
    DEVICE = 11  # str, e.g. "cuda:1"
    NP_SCALAR = 12  # [dtype.str, raw bytes]
    NP_ARRAY = 13  # [dtype.str, shape, raw C-order bytes]
    PATH = 14  # [class name, str]
    COMPLEX = 15  # [real, imag]
    BYTEARRAY = 16  # bytes
    COUNTER = 17  # map (collections.Counter: MultiStepLR's milestones)
    USER = 18  # [registered name, data]: a type taught with safeckpt.register_type
    SPARSE = 19  # [layout, size, [TENSOR components], coalesced or nil] (see safeckpt.sparse)


_PATH_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path)
}
_LIGHTNING_ATTRIBUTE_DICTS = {
    "lightning_fabric.utilities.data",
    "lightning.fabric.utilities.data",
    "pytorch_lightning.utilities.parsing",
    "lightning.pytorch.utilities.parsing",
}
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
MAX_DEPTH = 512
# ext values (tuples, sets, ...) nested in ext values: each level is one more msgpack.unpackb call on
# the C stack (about 45 KB each: 200 levels overflow an 8 MB stack), so decoding refuses more
MAX_EXT_DEPTH = 64
_KEEP_UNREGISTERED: ContextVar[bool] = ContextVar("safeckpt_keep_unregistered", default=False)


@contextlib.contextmanager
def keep_unregistered() -> Iterator[None]:
    """Let `Unregistered` values (a registered type this process has not registered, or cannot
    rebuild; decoding always keeps them as such records) through `refuse_unbuilt` too: for tools
    that read any file, import no user code and write such values back unchanged.

    Example:
        >>> with keep_unregistered():
        ...     ckpt = safeckpt.open("run.safeckpt")   # ckpt["cfg"] is Unregistered('myproj.Config', {...})
    """
    token = _KEEP_UNREGISTERED.set(True)
    try:
        yield
    finally:
        _KEEP_UNREGISTERED.reset(token)


def where(path: tuple[Any, ...], root: str = "state") -> str:
    """Spell a tree path the way a user would index it: ``state['hparams']['callback']``."""
    return root + "".join(f"[{k!r}]" for k in path)


def _is_attribute_dict(obj: Any) -> bool:
    cls = type(obj)
    return cls is AttributeDict or (cls.__name__ == "AttributeDict" and cls.__module__ in _LIGHTNING_ATTRIBUTE_DICTS)


def encode(obj: Any, tensor_name: Callable[[tuple[Any, ...], torch.Tensor | Any], list[Any]] | None) -> bytes:
    """Encode a tree to msgpack bytes.

    ``tensor_name(path, tensor)`` returns the ``[name, flags]`` payload recorded for a tensor leaf
    (or for a `TensorRef`); with ``None``, tensors are refused. Any value outside the supported
    types raises ``TypeError`` naming its path, before anything is written.
    """
    global _by_class
    _by_class = _lookups().by_class  # torch's and numpy's classes, if imported since the last encode
    data = msgpack.packb(_prepare(obj, (), tensor_name, 0), use_bin_type=True, strict_types=True)
    try:
        _check_ext_depth(data, 0)
    except TypeError as e:
        raise TypeError(str(e)) from None  # one line, not a traceback as deep as the nesting
    return data


def _check_ext_depth(data: bytes, depth: int) -> None:
    """Refuse at save what `decode` refuses at load: ext values nested more than `MAX_EXT_DEPTH` deep."""

    def hook(code: int, payload: bytes) -> None:
        if depth >= MAX_EXT_DEPTH:
            raise TypeError(
                f"state nests tuples, sets or other non-list containers more than {MAX_EXT_DEPTH} deep inside "
                "each other, which safeckpt cannot read back; flatten it (lists and dicts may nest deeper)"
            )
        _check_ext_depth(payload, depth + 1)

    msgpack.unpackb(data, ext_hook=hook, raw=True, strict_map_key=False, use_list=False)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True)


def _prepare(obj: Any, path: tuple[Any, ...], tensor_name: Any, depth: int) -> Any:
    """Turn a value into msgpack natives and ExtTypes, checking every type on the way."""
    if depth > MAX_DEPTH:
        raise Refused(path, f" is nested more than {MAX_DEPTH} levels deep; flatten it before saving")
    cls = type(obj)
    if obj is None or cls in (bool, str, bytes, float) or (cls is int and _INT64_MIN <= obj <= _UINT64_MAX):
        return obj
    if cls is list:
        return [_prepare(v, path + (i,), tensor_name, depth + 1) for i, v in enumerate(obj)]
    if cls is dict:
        return _prepare_map(obj, path, tensor_name, depth)
    # exact classes first: none of them is a tensor, so the matched rows' order is kept
    row = _by_class.get(cls) or next((r for r in _MATCHED if r.match is not None and r.match(obj)), None)
    if row is None or row.encode is None:
        raise Unstorable(path, f" is a {cls.__module__}.{cls.__qualname__}, {unstorable_fix(cls)}", cls)
    return _ext(row.code, row.encode(obj, path, tensor_name, depth))


class Refused(TypeError):
    """The refusal of the value at tree path ``key`` (a tuple of keys); the message is
    ``where(key)`` followed by ``detail``, so a caller can name the place in its own words.

    Example:
        >>> e = Refused(("hparams", "cb"), " is nested too deep")
        >>> str(e), where(e.key, "checkpoint") + e.detail
        ("state['hparams']['cb'] is nested too deep", "checkpoint['hparams']['cb'] is nested too deep")
    """

    def __init__(self, key: tuple[Any, ...], detail: str) -> None:
        super().__init__(where(key) + detail)
        self.key, self.detail = key, detail

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.key, self.detail)


class Unstorable(Refused):
    """The refusal of a value whose type the codec does not store; ``cls`` is that type."""

    def __init__(self, key: tuple[Any, ...], detail: str, cls: type) -> None:
        super().__init__(key, detail)
        self.cls = cls

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.key, self.detail, self.cls)


def unstorable_fix(cls: type) -> str:
    """The end of the message refusing a value of ``cls``: why, and how to store it.

    Example:
        >>> unstorable_fix(Config)
        'which safeckpt stores only once its type is registered: call `safeckpt.register_type(myproj.Config)` ...'
    """
    name = f"{cls.__module__}.{cls.__qualname__}"
    if user_types.registrable(cls):
        fields = "" if issubclass(cls, enum.Enum) else " (and each dataclass or enum its fields hold)"
        return (
            f"which safeckpt stores only once its type is registered: call `safeckpt.register_type({name})`{fields} "
            "or decorate the class with `@safeckpt.register_type`, in code that runs before both saving and loading"
        )
    return (
        "which safeckpt cannot store without pickle. Store its state instead (a dict of plain values and tensors), "
        f"leave it out of the checkpoint, or teach safeckpt the type: "
        f"`safeckpt.register_type({name}, to_data=..., from_data=...)`"
    )


def _prepare_map(obj: dict[Any, Any], path: tuple[Any, ...], tensor_name: Any, depth: int) -> dict[Any, Any]:
    out = {}
    for k, v in obj.items():
        out[_prepare(k, path + ("<key>",), None, depth + 1)] = _prepare(v, path + (k,), tensor_name, depth + 1)
    return out


def _np_dtype_str(dtype: np.dtype, path: tuple[Any, ...]) -> str:
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufcSUmM":
        raise Refused(path, f" is a numpy value of dtype {dtype}; only plain numeric numpy data can be stored")
    return dtype.str


def _ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, _pack(payload))


def _is_sparse(obj: Any) -> bool:
    from . import sparse

    return sparse.is_sparse(obj)


def _enc_sparse(obj: Any, path: tuple[Any, ...], tensor_name: Any, depth: int) -> list[Any]:
    """A sparse tensor as its layout, size and dense components, each stored as a tensor."""
    from . import sparse

    if tensor_name is None:
        raise Refused(path, " is a sparse tensor where only plain values may appear")
    layout, size, comps, coalesced = sparse.parts(obj)
    names = sparse.COMPONENTS[layout]
    refs = [_ext(Ext.TENSOR, tensor_name((*path, n), c)) for n, c in zip(names, comps, strict=True)]
    return [layout, list(size), refs, coalesced]


def _sparse(value: Any) -> Any:
    from . import sparse

    if not (type(value) is list and len(value) == 4 and type(value[2]) is list):
        raise CorruptCheckpointError(f"malformed sparse tensor {value!r:.80} in the skeleton")
    layout, size = sparse.check(value[0], value[1], value[2], value[3])
    comps = value[2]
    if all(isinstance(c, TensorRef) for c in comps):
        return sparse.sparse_ref(
            comps[-1].name.rpartition("/")[0] or "sparse", comps[-1].source, layout, size, comps, value[3]
        )
    if not all(is_tensor(c) for c in comps):
        raise CorruptCheckpointError("a sparse tensor's components must be tensors")
    return sparse.build(layout, size, comps, value[3])


def decode(data: bytes, tensor: Callable[[Any], Any] | None, *, source: str = "<bytes>") -> Any:
    """Decode msgpack bytes written by `encode`; ``tensor(payload)`` builds each tensor leaf.

    Unknown ext codes, malformed payloads and over-deep nesting raise `CorruptCheckpointError`
    naming ``source``.
    """

    pending: list[Unregistered] = []  # user values not rebuilt, in the order they were met
    # ext values are the only skeleton values whose hashes a file can make collide (map keys, set
    # members); one guard over the whole file bounds what any map or set built from them costs
    keys = KeyGuard()
    loaded: dict[int, Any] = {}
    ext_depth = [0]

    def refuse_ext(code: int, payload: bytes) -> Any:
        raise CorruptCheckpointError(f"{source}: a tensor reference in the skeleton holds an ext value")

    def no_tensor(value: Any) -> Any:
        raise CorruptCheckpointError(f"{source}: a tensor reference where none may appear")

    tensor_of, tensor_code, unpack_payload = tensor or no_tensor, Ext.TENSOR, msgpack.unpackb

    def hook(code: int, payload: bytes) -> Any:
        if code == tensor_code:  # one per tensor: [name, flags], which holds no ext value (no depth to count)
            return tensor_of(unpack_payload(payload, ext_hook=refuse_ext, raw=False, strict_map_key=False))
        before = len(pending)
        ext_depth[0] += 1
        if ext_depth[0] > MAX_EXT_DEPTH:
            raise CorruptCheckpointError(
                f"{source}: the skeleton nests ext values (tuples, sets, ...) more than {MAX_EXT_DEPTH} deep (limit)"
            )
        try:
            value = _unpack(payload)
        finally:
            ext_depth[0] -= 1
        if code == Ext.USER:
            return _user(value, inner_pending=len(pending) > before)
        if code not in _BUILD:
            raise CorruptCheckpointError(f"{source}: unknown msgpack ext type {code} in the skeleton")
        try:
            built = _BUILD[code](value)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError, NotImplementedError) as e:
            raise CorruptCheckpointError(
                f"{source}: malformed {_EXT_NAMES.get(code, code)} value in the skeleton ({error_detail(e)})"
            ) from None
        if code in _HASHABLE_EXTS:
            try:
                keys.add(built)
            except HashFloodError as e:
                raise CorruptCheckpointError(f"{source}: the skeleton's map keys or set members: {e}") from None
        return built

    def _user(value: Any, inner_pending: bool) -> Any:
        if not (type(value) is list and len(value) == 2 and type(value[0]) is str):
            raise CorruptCheckpointError(f"{source}: malformed registered-type value {value!r:.80} in the skeleton")
        name, data = value
        entry = user_types.entry_for_name(name)
        if entry is None or inner_pending:  # a value holding one we cannot build stays data too
            pending.append(Unregistered(name, data))
            return pending[-1]
        try:
            # a registered object gets real tensors: tree walkers (which load TensorRefs) never look inside it
            return entry.from_data(map_leaves(data, _load))
        except Exception as e:
            pending.append(Unregistered(name, data, e))
            return pending[-1]

    def _load(_: tuple[Any, ...], x: Any) -> Any:
        if isinstance(x, TensorRef):
            if id(x) not in loaded:
                loaded[id(x)] = x.load()
            return loaded[id(x)]
        return x

    def _unpack(payload: bytes) -> Any:
        return msgpack.unpackb(payload, ext_hook=hook, raw=False, strict_map_key=False, use_list=True)

    try:
        tree = _unpack(data)
    except CorruptCheckpointError:
        raise
    except RecursionError:
        raise CorruptCheckpointError(f"{source}: the skeleton is nested too deeply") from None
    except MemoryError:
        raise
    except Exception as e:  # whatever msgpack or a constructor raises: only CheckpointErrors leave a reader
        raise CorruptCheckpointError(f"{source}: the msgpack skeleton is malformed ({error_detail(e)})") from None
    # A value this process cannot build stays an inert `Unregistered` record (name and data, nothing
    # imported): the rest of the file loads, and the error comes where that value is used
    # (`refuse_unbuilt`, or the record's own attribute access).
    return tree


def refuse_unbuilt(tree: Any, source: str, prefix: tuple[Any, ...] = ()) -> None:
    """Raise the error naming the path and the fix if ``tree`` holds a registered-type value this
    process could not build (an `Unregistered` record); nothing under `keep_unregistered`.

    Called where a value is put to use (loaded into the caller's state), not where a file is read.

    Example:
        >>> refuse_unbuilt(safeckpt.open("run.safeckpt")["hparams"], "run.safeckpt", ("hparams",))
        Traceback (most recent call last):
        UnsafeCheckpointError: run.safeckpt: state['hparams']['cfg'] is a value of registered type ...
    """
    if not _KEEP_UNREGISTERED.get() and _first_unregistered(tree, prefix) is not None:
        raise _unbuilt(tree, source, prefix)


def _unbuilt(tree: Any, source: str, prefix: tuple[Any, ...] = ()) -> CheckpointError:
    """The error for the first registered-type value that could not be rebuilt, at its path."""
    path, value = _first_unbuilt(tree, prefix)
    name, data = value.name, value.data
    if value.error is None:
        return UnsafeCheckpointError(
            f"{source}: {where(path)} is a value of registered type {name!r}, which this process has not "
            f"registered; nothing was imported or run. Call safeckpt.register_type({name}) before loading "
            f"(import the module that registers it), or register the class that now holds this data with "
            f"name={name!r}. `safeckpt inspect {source}` shows the stored data without it"
        )
    cls = user_types.entry_for_name(name)
    label = f"{cls.cls.__module__}.{cls.cls.__qualname__}" if cls is not None else name
    return CheckpointError(
        f"{source}: {where(path)} is a stored {name!r} that the registered {label} could not rebuild "
        f"({type(value.error).__name__}: {value.error}); if the class changed since the file was written, "
        f"register it with a from_data that accepts the stored data: {data!r:.200}"
    )


def _first_unbuilt(tree: Any, prefix: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], Unregistered]:
    """Path and value of the first `Unregistered` that is a cause, not merely holding one."""
    found = _first_unregistered(tree, prefix)
    assert found is not None
    while found[1].error is None and user_types.entry_for_name(found[1].name) is not None:
        inner = _first_unregistered(found[1].data, found[0])
        if inner is None:
            break
        found = inner
    return found


def _first_unregistered(tree: Any, prefix: tuple[Any, ...]) -> tuple[tuple[Any, ...], Unregistered] | None:
    stack: list[tuple[tuple[Any, ...], Any]] = [(prefix, tree)]
    while stack:
        path, node = stack.pop()
        children: list[tuple[tuple[Any, ...], Any]] = []
        if isinstance(node, Unregistered):
            return path, node
        if isinstance(node, dict):
            children = [(path + ("<key>",), k) for k in node] + [(path + (k,), v) for k, v in node.items()]
        elif isinstance(node, list):
            children = [(path + (i,), v) for i, v in enumerate(node)]
        else:
            row = next((r for r, classes in _CONTAINERS if isinstance(node, classes)), None)
            if row is not None and row.children is not None:
                children = [(path + (k,), v) for k, v in row.children(node)]
        stack.extend(reversed(children))
    return None


def error_detail(e: BaseException) -> str:
    """An exception as text that is never empty (``KeyError()`` has no message).

    Example:
        >>> error_detail(KeyError()), error_detail(ValueError("bad"))
        ('KeyError', 'ValueError: bad')
    """
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _list(value: Any, n: int | None = None) -> list[Any]:
    _need(type(value) is list and (n is None or len(value) == n), f"expected a list{'' if n is None else f' of {n}'}")
    return value  # type: ignore[no-any-return]


def _map(value: Any) -> dict[Any, Any]:
    _need(type(value) is dict, f"expected a map, got {type(value).__name__}")
    return value  # type: ignore[no-any-return]


def _bigint(raw: Any) -> int:
    _need(type(raw) is bytes and 0 < len(raw) <= MAX_INT_BYTES, f"an integer of 1 to {MAX_INT_BYTES} bytes")
    return int.from_bytes(raw, "big", signed=True)


def _ordered(value: Any) -> OrderedDict[Any, Any]:
    items, meta = _list(value, 2)
    out = OrderedDict(_map(items))
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _namespace(value: Any) -> argparse.Namespace:
    # an attribute may not shadow one of Namespace's own (its repr calls _get_kwargs)
    attrs = _map(value)
    _need(
        all(type(k) is str and not hasattr(argparse.Namespace, k) for k in attrs),
        "Namespace attribute names must be strings that are not Namespace's own",
    )
    return argparse.Namespace(**attrs)


def _size(value: Any) -> torch.Size:
    import torch

    _need(all(type(d) is int and 0 <= d < 1 << 63 for d in _list(value)), "torch.Size takes non-negative ints")
    return torch.Size(value)


def _device(value: Any) -> torch.device:
    from ._torch_values import checked_device

    _need(type(value) is str, "a device is a string")
    try:
        return checked_device(value)
    except CorruptCheckpointError as e:
        raise ValueError(str(e)) from None


def _complex(value: Any) -> complex:
    real, imag = _list(value, 2)
    _need(type(real) in (int, float) and type(imag) in (int, float), "complex takes two numbers")
    return complex(real, imag)


def _np_checked(arr: np.ndarray) -> np.ndarray:
    # numpy stores str_ data as UTF-32 code units; one past U+10FFFF makes the value unprintable
    if arr.dtype.kind == "U" and arr.size:
        units = arr.view(arr.dtype.byteorder.replace("=", "").replace("|", "") + "u4")
        _need(int(units.max()) < 0x110000, "a numpy string holds an invalid code point")
    return arr


def _np_scalar(value: Any) -> Any:
    dt, raw = _list(value, 2)
    dtype = _np_dtype(dt)
    _need(type(raw) is bytes and len(raw) == dtype.itemsize, f"a numpy {dtype} scalar needs {dtype.itemsize} bytes")
    import numpy as np

    return _np_checked(np.frombuffer(raw, dtype=dtype, count=1))[0]


def _np_array(value: Any) -> Any:
    dt, shape, raw = _list(value, 3)
    dtype = _np_dtype(dt)
    _need(all(type(d) is int and d >= 0 for d in _list(shape)) and len(shape) <= 32, "bad numpy shape")
    _need(type(raw) is bytes, "numpy data must be bytes")
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise ValueError(f"numpy array of shape {shape} and dtype {dt} needs {math.prod(shape) * dtype.itemsize} bytes")
    import numpy as np

    return _np_checked(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())


def _np_dtype(spec: Any) -> np.dtype:
    _need(type(spec) is str and len(spec) <= 16, "a numpy dtype is a short string")
    import numpy as np

    dtype = np.dtype(spec)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biufcSUmM":
        raise ValueError(f"numpy dtype {spec!r} is not allowed")
    _need(dtype.itemsize > 0, f"numpy dtype {spec!r} has no size")
    return dtype


# a path made on another OS becomes its pure flavour here (a WindowsPath cannot exist on Linux)
_HERE_PATH = type(pathlib.Path())


def _path(value: Any) -> Any:
    name, text = _list(value, 2)
    _need(type(name) is str and name in _PATH_TYPES and type(text) is str, "a path is [class name, text]")
    cls = _PATH_TYPES[name]
    if cls in (pathlib.PosixPath, pathlib.WindowsPath) and cls is not _HERE_PATH:
        cls = pathlib.PurePosixPath if cls is pathlib.PosixPath else pathlib.PureWindowsPath
    return cls(text)


def _dtype(name: Any) -> torch.dtype:
    import torch

    dtypes = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
    _need(type(name) is str and name in dtypes, f"unknown torch dtype {name!r:.40}")
    return dtypes[name]


def _bytes(value: Any) -> bytes:
    _need(type(value) is bytes, "expected bytes")
    return value  # type: ignore[no-any-return]


# -- encoders: (value, path, tensor_name, depth) -> the ext payload -----------------------------------


def _enc_bigint(obj: int, path: tuple[Any, ...], *_: Any) -> bytes:
    n = (obj.bit_length() + 8) // 8
    if n > MAX_INT_BYTES:  # refused at save as at load: it could not even be printed
        raise Refused(
            path,
            f" is an int of {n} bytes; safeckpt stores ints up to {MAX_INT_BYTES} bytes "
            "(about 4300 decimal digits, the most Python prints); store it as bytes or a string",
        )
    return obj.to_bytes(n, "big", signed=True)


def _enc_items(obj: Any, path: tuple[Any, ...], tensor_name: Any, depth: int) -> list[Any]:
    return [_prepare(v, path + (i,), tensor_name, depth + 1) for i, v in enumerate(obj)]


def _enc_members(obj: Any, path: tuple[Any, ...], _: Any, depth: int) -> list[Any]:
    return [_prepare(v, path + ("<item>",), None, depth + 1) for v in obj]


def _enc_ordered(obj: Any, path: tuple[Any, ...], tensor_name: Any, depth: int) -> list[Any]:
    meta = getattr(obj, "_metadata", None)
    meta_enc = _prepare(meta, path + ("_metadata",), None, depth + 1) if meta is not None else None
    return [_prepare_map(obj, path, tensor_name, depth), meta_enc]


def _enc_tensor(obj: Any, path: tuple[Any, ...], tensor_name: Any, _: int) -> Any:
    if tensor_name is None:
        raise Refused(
            path,
            " is a tensor where only plain values may appear (a dict key, set member or Namespace attribute); use a dict",
        )
    return tensor_name(path, obj)


def _enc_user(obj: Any, path: tuple[Any, ...], tensor_name: Any, depth: int) -> list[Any]:
    if type(obj) is Unregistered:
        return [obj.name, _prepare(obj.data, path, tensor_name, depth + 1)]
    entry = user_types.entry_for_class(type(obj))
    assert entry is not None  # the row matched it
    try:
        data = entry.to_data(obj)
    except Exception as e:
        raise Refused(path, f": to_data of registered type {entry.name!r} failed: {e}") from e
    return [entry.name, _prepare(data, path, tensor_name, depth + 1)]


def _enc_np_array(obj: np.ndarray, path: tuple[Any, ...], *_: Any) -> list[Any]:
    import numpy as np

    return [_np_dtype_str(obj.dtype, path), list(obj.shape), np.ascontiguousarray(obj).tobytes()]


def _is_np_scalar(obj: Any) -> bool:
    generic = getattr(sys.modules.get("numpy"), "generic", None)  # no numpy imported: no numpy value
    return generic is not None and isinstance(obj, generic) and type(obj).__module__ == "numpy"


def _is_registered(obj: Any) -> bool:
    return user_types.entry_for_class(type(obj)) is not None


def _map_of(obj: Any, path: tuple[Any, ...], tensor_name: Any, depth: int) -> dict[Any, Any]:
    return _prepare_map(obj, path, tensor_name, depth)


@dataclasses.dataclass(frozen=True)
class ExtType:
    """One row of the codec's type table: how one ext code is written and read.

    ``classes`` are stored by exact class; ``match`` recognises the values an exact class cannot
    (subclasses, Lightning's AttributeDict, registered types), tried in table order after the exact
    classes. ``encode(value, path, tensor_name, depth)`` returns the payload; ``decode(payload)``
    builds and validates the value (``None``: `decode` itself handles the code). ``hashable``
    values may be map keys or set members (bounded by the hash-flood guard); ``children`` lists a
    container's ``(key, value)`` pairs for walkers. ``bases`` are stored with all their subclasses
    (so registering one is refused). Classes of torch and numpy are named (``"torch.Size"``) and
    looked up once their module is imported: no value of theirs exists before, and reading a
    checkpoint's header imports neither (`_lookups`).
    """

    code: int
    classes: tuple[type | str, ...] = ()
    encode: Callable[[Any, tuple[Any, ...], Any, int], Any] | None = None
    decode: Callable[[Any], Any] | None = None
    match: Callable[[Any], bool] | None = None
    hashable: bool = False
    children: Callable[[Any], Iterable[tuple[Any, Any]]] | None = None
    bases: tuple[type | str, ...] = ()


# The one table of ext types (with `Ext`'s codes and payload layouts, and formats/safeckpt.md's table).
# Ints in [-2**63, 2**64), None, bool, float, str, bytes, list and dict are msgpack's own.
EXT_TYPES: tuple[ExtType, ...] = (
    ExtType(Ext.SPARSE, encode=_enc_sparse, decode=_sparse, match=_is_sparse),  # before TENSOR: also a tensor
    ExtType(Ext.TENSOR, (TensorRef,), _enc_tensor, match=lambda o: isinstance(o, TensorRef) or is_tensor(o),
            bases=("torch.Tensor",)),
    ExtType(Ext.TUPLE, (tuple,), _enc_items, lambda v: tuple(_list(v)), hashable=True, children=enumerate),
    ExtType(Ext.SET, (set,), _enc_members, lambda v: set(_list(v)), children=lambda s: (("<item>", v) for v in s)),
    ExtType(Ext.FROZENSET, (frozenset,), _enc_members, lambda v: frozenset(_list(v)), hashable=True,
            children=lambda s: (("<item>", v) for v in s)),
    ExtType(Ext.BIGINT, (int,), _enc_bigint, _bigint, hashable=True),  # ints outside msgpack's range
    ExtType(Ext.ORDERED_DICT, (OrderedDict,), _enc_ordered, _ordered),
    ExtType(Ext.ATTRIBUTE_DICT, (AttributeDict,), _map_of, lambda v: AttributeDict(_map(v)), match=_is_attribute_dict),
    ExtType(Ext.NAMESPACE, (argparse.Namespace,), lambda o, p, _, d: _prepare_map(vars(o), p, None, d), _namespace,
            children=lambda n: vars(n).items()),
    ExtType(Ext.SIZE, ("torch.Size",), lambda o, *_: list(o), _size, hashable=True),
    ExtType(Ext.DTYPE, ("torch.dtype",), lambda o, *_: str(o).removeprefix("torch."), _dtype),
    ExtType(Ext.DEVICE, ("torch.device",), lambda o, *_: str(o), _device),
    ExtType(Ext.NP_SCALAR, (), lambda o, p, *_: [_np_dtype_str(o.dtype, p), o.tobytes()], _np_scalar, _is_np_scalar,
            hashable=True, bases=("numpy.generic",)),
    ExtType(Ext.NP_ARRAY, ("numpy.ndarray",), _enc_np_array, _np_array),
    # PurePath: no value has it as its own class, but registering it would shadow these
    ExtType(Ext.PATH, (*_PATH_TYPES.values(), pathlib.PurePath), lambda o, *_: [type(o).__name__, str(o)], _path),
    ExtType(Ext.COMPLEX, (complex,), lambda o, *_: [o.real, o.imag], _complex, hashable=True),
    ExtType(Ext.BYTEARRAY, (bytearray,), lambda o, *_: bytes(o), lambda v: bytearray(_bytes(v))),
    ExtType(Ext.COUNTER, (Counter,), _map_of, lambda v: Counter(_map(v))),
    ExtType(Ext.USER, (Unregistered,), _enc_user, match=_is_registered),  # last: registered types
)  # fmt: skip

_MATCHED = tuple(row for row in EXT_TYPES if row.match is not None)
_CONTAINERS = tuple(
    (row, tuple(c for c in row.classes if isinstance(c, type))) for row in EXT_TYPES if row.children is not None
)
_BUILD = {row.code: row.decode for row in EXT_TYPES if row.decode is not None}
_EXT_NAMES = {v: k.lower() for k, v in vars(Ext).items() if isinstance(v, int)}
# ext values that can be dict keys or set members
_HASHABLE_EXTS = {row.code for row in EXT_TYPES if row.hashable}
_NAMED = tuple({c for row in EXT_TYPES for c in (*row.classes, *row.bases) if isinstance(c, str)})


@dataclasses.dataclass(frozen=True)
class _Lookups:
    by_class: dict[type, ExtType]
    native_classes: frozenset[type]
    native_bases: tuple[type, ...]


_LOOKUPS: dict[tuple[bool, ...], _Lookups] = {}
_by_class: dict[type, ExtType] = {}  # what `_prepare` dispatches on, set by `encode`


def _resolve(name: type | str) -> type | None:
    """A class, or the class a name such as ``"torch.Size"`` gives once its module is imported."""
    if not isinstance(name, str):
        return name
    module, _, attr = name.rpartition(".")
    cls = getattr(sys.modules.get(module), attr, None)
    return cls if isinstance(cls, type) else None


def _lookups() -> _Lookups:
    """The dispatch tables over the classes that exist now (torch's and numpy's once imported)."""
    key = tuple(_resolve(n) is not None for n in _NAMED)
    found = _LOOKUPS.get(key)
    if found is None:
        by_class = {cls: row for row in EXT_TYPES for c in row.classes if (cls := _resolve(c)) is not None}
        bases = tuple(cls for row in EXT_TYPES for b in row.bases if (cls := _resolve(b)) is not None)
        natives = frozenset((type(None), bool, int, float, str, bytes, list, dict, *by_class))
        found = _LOOKUPS[key] = _Lookups(by_class, natives, bases)
    return found


def stores_natively(cls: type) -> bool:
    """True for the classes the codec stores itself (registering one with `register_type` is refused).

    Example:
        >>> stores_natively(torch.Size), stores_natively(Config)
        (True, False)
    """
    tables = _lookups()
    return cls in tables.native_classes or issubclass(cls, tables.native_bases)


T = TypeVar("T", bound=type)


@overload
def register_type(
    cls: T,
    /,
    *,
    name: str | None = None,
    to_data: Callable[[Any], Any] | None = None,
    from_data: Callable[[Any], Any] | None = None,
) -> T: ...
@overload
def register_type(
    cls: None = None,
    /,
    *,
    name: str | None = None,
    to_data: Callable[[Any], Any] | None = None,
    from_data: Callable[[Any], Any] | None = None,
) -> Callable[[T], T]: ...
def register_type(
    cls: T | None = None,
    /,
    *,
    name: str | None = None,
    to_data: Callable[[Any], Any] | None = None,
    from_data: Callable[[Any], Any] | None = None,
) -> T | Callable[[T], T]:
    """Teach safeckpt to save and load ``cls`` as data; returns ``cls`` (so it works as a decorator).

    Without converters, a dataclass is stored as a map of its fields and rebuilt with
    ``cls(**init_fields)`` (then ``init=False`` fields are set); a ``NamedTuple`` as a map of its
    fields; an ``Enum`` member by its *name* (a ``Flag`` as the list of its members' names), so a
    renumbered enum still loads the member the code calls by that name. Any other class needs
    ``to_data(obj) -> value`` and ``from_data(value) -> obj``, where ``value`` is anything safeckpt
    stores (plain values, containers, tensors, other registered types). Field values must be
    storable themselves: register nested classes too.

    Register in code that runs before both saving and loading (e.g. next to the class). Files record
    ``name`` (default ``"module.QualName"``): pass a fixed ``name`` to keep loading old files after the
    class moves. Registering the same class again replaces its converters (a re-run notebook cell or
    a reloaded module, which defines a new class of the same module and name, replaces the old one);
    one name for two different classes, or two names for one class, is a ``ValueError``.

    Example:
        >>> @safeckpt.register_type
        ... @dataclasses.dataclass(frozen=True)
        ... class Optim:
        ...     lr: float = 1e-3
        ...     kind: str = "adamw"
        >>> safeckpt.register_type(Color)   # an enum.Enum
        >>> safeckpt.register_type(Interval, name="myproj.Interval", to_data=lambda i: [i.lo, i.hi],
        ...                        from_data=lambda d: Interval(*d))
    """
    if cls is None:
        return lambda c: register_type(c, name=name, to_data=to_data, from_data=from_data)
    if not isinstance(cls, type):
        raise TypeError(f"register_type takes a class, got {cls!r}")
    if stores_natively(cls):  # the codec's own table: registering its types would shadow them
        raise TypeError(
            f"register_type({cls.__module__}.{cls.__qualname__}): safeckpt stores {cls.__qualname__} values itself"
        )
    user_types.add(cls, name=name, to_data=to_data, from_data=from_data)
    return cls
