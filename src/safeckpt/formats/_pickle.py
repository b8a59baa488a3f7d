"""A restricted pickle VM: reads protocols 0-5 without importing or calling anything named by the data.

Every ``GLOBAL``/``STACK_GLOBAL`` is looked up, by its exact ``module.name`` string, in a fixed
table of `Handler`s (`BASE` plus the caller's ``extra``). A handler is our own code: it checks its
arguments and builds a plain value (an ``OrderedDict``, a ``torch.Size``, a numpy array from its
bytes). A name outside the table raises `UnsafeCheckpointError` before the VM runs: the whole
pickle is scanned first (`globals_in`), so a refused file builds nothing. Opcodes that resolve
classes without a global (``INST``, ``OBJ``, ``EXT*``) and out-of-band buffers are refused, and
every length, the memo and the nesting are bounded by the input (spec: ``formats/torch.md``).

Example:
    >>> unpickle(pickle.dumps({"step": 3, "betas": (0.9, 0.99)}), source="x.pkl")
    {'step': 3, 'betas': (0.9, 0.99)}
    >>> unpickle(b"cposix\\nsystem\\n(S'id'\\ntR.", source="evil.pkl")
    Traceback (most recent call last):
    safeckpt.errors.UnsafeCheckpointError: evil.pkl: the pickle refers to global 'posix.system', ...
"""

from __future__ import annotations

import argparse
import codecs
import collections
import math
import pathlib
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _dtypes, _torch_values
from .._budget import MAX_INT_BYTES, HashFloodError, KeyGuard, collidable
from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..tree import AttributeDict

__all__ = [
    "BASE",
    "DENIED_MODULES",
    "Global",
    "Handler",
    "Inert",
    "globals_in",
    "is_denied",
    "load",
    "unpickle",
    "unpickle_at",
]

MAX_MEMO = 1 << 22  # memo entries (each costs at least one byte of input)
MAX_MARK_DEPTH = 10_000  # open MARKs
MAX_LONG_BYTES = MAX_INT_BYTES  # LONG1/LONG4 payload: larger ints cannot even be printed (4300 digits)
MAX_MEMO_INDEX = 1 << 32  # text PUT/GET indices: a huge one costs quadratic parsing and floods the memo's hash
MAX_KEY_ITEMS = 1024  # elements in a tuple/frozenset used as a dict key or set member (hashing cost)
HIGHEST_PROTOCOL = 5
ALLOC_PER_BYTE = 64  # bytes of objects the VM may build per byte of pickle, beyond ALLOC_ALLOWANCE
ALLOC_ALLOWANCE = 64 << 20
_SET_BYTES = 216  # sys.getsizeof(set()): built from one opcode byte
_MEMO_ENTRY_BYTES = 64

_NO_VALUE: Any = object()


@dataclass(frozen=True)
class Handler:
    """What one allowed global does in the VM. Every callable is safeckpt's own code.

    Attributes:
        value: pushed by ``GLOBAL`` when the name is a plain value (a dtype, a storage type).
            Without it, ``GLOBAL`` pushes a `Global` reference to this handler.
        call: ``REDUCE``: ``call(*args) -> object``.
        new: ``NEWOBJ``/``NEWOBJ_EX``: ``new(*args) -> object`` (keyword arguments are refused).
        build: ``BUILD`` on an object that ``call``/``new`` made: ``build(obj, state) -> obj``; it may
            return a different object, which replaces ``obj`` on the stack and in the memo.

    A handler raises `CorruptCheckpointError` (or `UnsafeCheckpointError`) for arguments it does
    not accept; ``TypeError``/``ValueError`` from it are turned into `CorruptCheckpointError`.

    Example:
        >>> extra = {"mylib.Point": Handler(call=lambda x, y: (float(x), float(y)))}
    """

    value: Any = _NO_VALUE
    call: Callable[..., Any] | None = None
    new: Callable[..., Any] | None = None
    build: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True, eq=False)
class Global:
    """A reference to an allowed global on the VM's stack (a class or function we never import)."""

    name: str
    handler: Handler

    def __repr__(self) -> str:
        return f"<global {self.name}>"


@dataclass(eq=False)
class Inert:
    """An object of a global admitted with ``allow=``: a record of how the pickle built it.

    Nothing of the named class is imported or called; ``args`` are what ``REDUCE``/``NEWOBJ``
    passed, ``state`` what ``BUILD`` set, ``items``/``listitems`` what ``SETITEM(S)``/``APPEND(S)``
    added. `as_dict` is the plain-dict form readers put in the checkpoint tree.
    """

    name: str
    args: tuple[Any, ...] | None = None
    state: Any = None
    items: dict[Any, Any] = field(default_factory=dict)
    listitems: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"__global__": self.name}
        if self.args is not None:
            out["args"] = self.args
        if self.state is not None:
            out["state"] = self.state
        if self.items:
            out["items"] = self.items
        if self.listitems:
            out["listitems"] = self.listitems
        return out


# -- the refusal list: never admitted, not even with allow= ----------------------------------------

DENIED_MODULES = frozenset(
    """os posix nt subprocess sys runpy importlib pkgutil operator functools pickle _pickle pickletools
    copyreg copy_reg marshal shutil socket webbrowser pty ctypes code codeop types inspect dill joblib
    cloudpickle asyncio multiprocessing threading signal tempfile io builtins __builtin__ torch.jit
    torch._inductor torch.utils._config_module numpy.lib.npyio""".split()  # noqa: SIM905
)
DENIED_NAMES = frozenset(
    {
        "torch.load",
        "torch.serialization.load",
        "torch.serialization._load",
        "torch.serialization._legacy_load",
        "torch.storage._load_from_bytes",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "numpy.load",
        "numpy.loads",
    }
)
GLOBAL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
# python 2 module names written by protocol <= 2 writers (torch.save's default protocol is 2)
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_PY2_NAMES = {"builtins.xrange": "builtins.range", "builtins.unicode": "builtins.str", "builtins.long": "builtins.int"}


def is_denied(name: str) -> bool:
    """True for globals that can run code or load other pickles; ``allow=`` cannot admit them.

    Example:
        >>> is_denied("posix.system"), is_denied("builtins.str.__class__"), is_denied("omegaconf.DictConfig")
        (True, True, False)
    """
    if name in DENIED_NAMES or "__" in name.rpartition(".")[2] or ".__" in name:
        return True
    return any(name == m or name.startswith(m + ".") for m in DENIED_MODULES)


def _full_name(module: str, name: str) -> str:
    full = f"{_PY2_MODULES.get(module, module)}.{name}"
    return _PY2_NAMES.get(full, full)


def allowed_by(patterns: Iterable[str]) -> Callable[[str], bool]:
    exact: set[str] = set()
    prefixes: list[str] = []
    for p in patterns:
        if not isinstance(p, str) or not GLOBAL_NAME.match(p.removesuffix(".*")):
            raise ValueError(f"allow= takes global names like 'package.module.Class' or 'package.*', got {p!r}")
        if p.endswith(".*"):
            prefixes.append(p[:-1])
        else:
            exact.add(p)
    return lambda name: name in exact or any(name.startswith(q) for q in prefixes)


# -- the base table: values every pickle-based reader may meet ---------------------------------------


def _bad(what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(what)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "latin_1", "utf-8", "utf8"):
        raise _bad(f"_codecs.encode only turns text into bytes, got ({type(text).__name__}, {encoding!r})")
    return text.encode(encoding)


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    if isinstance(data, str) and encoding is not None:
        data = _codecs_encode(data, encoding)
    if not isinstance(data, (bytes, bytearray)):
        raise _bad(f"bytearray from a {type(data).__name__}")
    return bytearray(data)


def _bytes(data: Any = b"") -> bytes:
    # protocols 0-2 write b"" as builtins.bytes() (other bytes go through _codecs.encode)
    if not isinstance(data, bytes):
        raise _bad(f"bytes() of a {type(data).__name__}")
    return data


def _check_key(obj: Any) -> None:
    """Refuse set members / dict keys that are not plain hashable data, or cost much to hash."""
    if isinstance(obj, (tuple, frozenset)):
        todo, seen = [obj], 0
        while todo:
            item = todo.pop()
            if isinstance(item, (tuple, frozenset)):
                seen += len(item)
                if seen > MAX_KEY_ITEMS:
                    raise _bad(f"a dict key or set member holds more than {MAX_KEY_ITEMS} items")
                todo.extend(item)
            else:
                _check_key(item)
    elif isinstance(obj, (list, dict, set, bytearray, Inert)):
        raise _bad(f"a {type(obj).__name__} cannot be a dict key or set member")


def _guard_keys(keys: Iterable[Any], guard: KeyGuard | None = None) -> None:
    """Refuse keys that are not plain data, cost much to hash, or flood one hash value."""
    guard = guard or KeyGuard()
    try:
        for k in keys:
            _check_key(k)
            guard.add(k)
    except HashFloodError as e:
        raise _bad(f"a dict or set: {e}") from None


def _set(items: Any = ()) -> set[Any]:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise _bad(f"set() of a {type(items).__name__}")
    _guard_keys(items)
    return set(items)


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(items))


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(type(x) in (int, float) for x in (real, imag)):
        raise _bad("complex() takes two numbers")
    return complex(real, imag)


def _ordered_dict(items: Any = ()) -> collections.OrderedDict[Any, Any]:
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in items):
        raise _bad("OrderedDict() takes a list of (key, value) pairs")
    _guard_keys(k for k, _ in items)
    return collections.OrderedDict(items)


def _ordered_dict_build(obj: collections.OrderedDict[Any, Any], state: Any) -> Any:
    # torch's state_dict() carries its per-module versions in `_metadata`; nothing else is expected
    if state in (None, {}):
        return obj
    if not isinstance(state, dict) or set(state) != {"_metadata"}:
        keys = sorted(map(repr, state)) if isinstance(state, dict) else type(state).__name__
        raise _bad(f"an OrderedDict may only carry the attribute '_metadata', this one sets {keys}")
    obj._metadata = state["_metadata"]  # type: ignore[attr-defined]
    return obj


def _counter(items: Any = None) -> collections.Counter[Any]:
    if items is not None and not isinstance(items, dict):
        raise _bad("Counter() takes a dict")
    _guard_keys(items or ())
    return collections.Counter(items or {})


def _attribute_dict(*args: Any) -> AttributeDict:
    if args and not (len(args) == 1 and isinstance(args[0], dict)):
        raise _bad("AttributeDict() takes at most one dict")
    return AttributeDict(args[0]) if args else AttributeDict()


def _empty_build(obj: Any, state: Any) -> Any:
    if state not in (None, {}):
        raise _bad(f"{type(obj).__name__} carries no attributes, the pickle sets {type(state).__name__} state")
    return obj


def _namespace(*args: Any) -> argparse.Namespace:
    if args:
        raise _bad("argparse.Namespace() takes no positional arguments")
    return argparse.Namespace()


def _namespace_build(ns: argparse.Namespace, state: Any) -> argparse.Namespace:
    # an attribute may not shadow one of Namespace's own (its repr calls _get_kwargs)
    if not isinstance(state, dict) or not all(isinstance(k, str) and not hasattr(argparse.Namespace, k) for k in state):
        raise _bad("argparse.Namespace state must be a dict of attribute names that are not Namespace's own")
    for k, v in state.items():
        setattr(ns, k, v)
    return ns


def _path(cls: type[pathlib.PurePath]) -> Callable[..., pathlib.PurePath]:
    def make(*parts: Any) -> pathlib.PurePath:
        if not all(isinstance(p, str) for p in parts):
            raise _bad(f"{cls.__name__}() takes strings")
        return cls(*parts)

    return make


def _size(dims: Any = ()) -> Any:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and d >= 0 for d in dims):
        raise _bad(f"torch.Size() takes non-negative ints, got {dims!r}")
    return _torch_values.real(_torch_values.Size(dims))


def _device(kind: Any, index: Any = None) -> Any:
    return _torch_values.real(_torch_values.device(kind, index))


checked_device = _torch_values.checked_device  # codec's name for it
_LAYOUTS = frozenset(
    f"torch.{n}"
    for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
)


def _layout(name: Any) -> Any:
    if name not in _LAYOUTS:
        raise _bad(f"unknown torch layout {name!r:.40}")
    return _torch_values.real(_torch_values.Layout(name.removeprefix("torch.")))


# numpy: plain numeric and string data only; object and structured dtypes never.
_NP_SPEC = re.compile(r"(b1|i[1248]|u[1248]|f[248]|c(8|16)|[SU][0-9]{1,9})\Z")


class NumpyDtype:
    """A numpy dtype waiting for its BUILD state (the byte order lives there)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> NumpyDtype:
    if not isinstance(spec, str) or not _NP_SPEC.match(spec) or type(align) is not bool or type(copy) is not bool:
        raise UnsafeCheckpointError(
            f"numpy dtype {spec!r} is not allowed (only bool, int, uint, float, complex and string dtypes; "
            "object arrays carry nested pickles)"
        )
    return NumpyDtype(spec)


def _np_dtype_build(obj: NumpyDtype, state: Any) -> np.dtype:
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] in (3, 4) and state[1] in ("<", ">", "|", "=")):
        raise _bad(f"numpy dtype {obj.spec!r}: unexpected state {state!r:.80}")
    _, order, subarray, names, fields, elsize, _alignment, _flags = state
    if subarray is not None or names is not None or fields is not None:
        raise UnsafeCheckpointError(f"numpy dtype {obj.spec!r}: structured and sub-array dtypes are not allowed")
    kind, order = obj.spec[0], "" if order in "|=" else order
    if kind in "SU" and type(elsize) is int and 0 <= elsize < 1 << 30:
        return np.dtype(f"{order}{kind}{elsize // 4 if kind == 'U' else elsize}")
    return np.dtype(f"{order}{obj.spec}")


def _real_dtype(d: Any) -> np.dtype:
    if isinstance(d, NumpyDtype):
        return np.dtype(d.spec)
    if not isinstance(d, np.dtype):
        raise _bad(f"expected a numpy dtype, got {type(d).__name__}")
    return d


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _real_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _bad(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class _NumpyArray:
    """A numpy array waiting for its BUILD state (shape, dtype and bytes live there)."""


def _np_reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _NumpyArray:
    if not (isinstance(cls, Global) and cls.name in ("numpy.ndarray",)):
        raise UnsafeCheckpointError(f"numpy _reconstruct of {cls!r}: only numpy.ndarray is allowed")
    return _NumpyArray()


def _array(shape: Any, dtype: np.dtype, fortran: Any, raw: Any) -> np.ndarray:
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape) or type(fortran) is not bool:
        raise _bad("numpy array: bad shape or order")
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafeCheckpointError(
            "numpy array without raw bytes: object arrays carry nested pickles and are not allowed"
        )
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise _bad(
            f"numpy array of shape {shape} and dtype {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, has {len(raw)}"
        )
    order = "F" if fortran else "C"
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy(order=order)  # type: ignore[call-overload]


def _np_reconstruct_build(obj: _NumpyArray, state: Any) -> np.ndarray:
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise _bad("numpy array: unexpected state")
    _, shape, dtype, fortran, raw = state
    arr = _array(shape, _real_dtype(dtype), fortran, raw)
    # numpy's own __setstate__ turns a non-native byte order into the native dtype (same values)
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="), order="A")


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # protocol 5 arrays pickled in-band: numpy.core.numeric._frombuffer(bytes, dtype, shape, order)
    if order not in ("C", "F"):
        raise _bad("numpy _frombuffer: bad order")
    return _array(tuple(shape) if isinstance(shape, (list, tuple)) else shape, _real_dtype(dtype), order == "F", buf)


# torch.float32 & co. (and torch's other spellings: torch.double...), pushed as values
DTYPE_GLOBALS: dict[str, _dtypes.DType] = {f"torch.{name}": _dtypes.by_name(name) for name in _dtypes.names()}


def _base() -> dict[str, Handler]:
    table: dict[str, Handler] = {
        "collections.OrderedDict": Handler(call=_ordered_dict, new=_ordered_dict, build=_ordered_dict_build),
        "collections.Counter": Handler(call=_counter),
        "_codecs.encode": Handler(call=_codecs_encode),
        "builtins.set": Handler(call=_set),
        "builtins.frozenset": Handler(call=_frozenset),
        "builtins.complex": Handler(call=_complex),
        "builtins.bytearray": Handler(call=_bytearray),
        "builtins.bytes": Handler(call=_bytes),
        "argparse.Namespace": Handler(call=_namespace, new=_namespace, build=_namespace_build),
        "torch.Size": Handler(call=_size),
        "torch.device": Handler(call=_device),
        "torch.serialization._get_layout": Handler(call=_layout),
        "numpy.dtype": Handler(call=_np_dtype, build=_np_dtype_build),
        "numpy.ndarray": Handler(),
    }
    for mod in ("numpy.core", "numpy._core"):
        table[f"{mod}.multiarray.scalar"] = Handler(call=_np_scalar)
        table[f"{mod}.multiarray._reconstruct"] = Handler(call=_np_reconstruct, build=_np_reconstruct_build)
        table[f"{mod}.numeric._frombuffer"] = Handler(call=_np_frombuffer)
    # a path made on another OS becomes its pure flavour here (a WindowsPath cannot exist on Linux)
    here = type(pathlib.Path())
    for mod in ("pathlib", "pathlib._local"):
        for cls in (
            pathlib.PurePath,
            pathlib.PurePosixPath,
            pathlib.PureWindowsPath,
            pathlib.Path,
            pathlib.PosixPath,
            pathlib.WindowsPath,
        ):
            real: type[pathlib.PurePath] = cls
            if cls in (pathlib.PosixPath, pathlib.WindowsPath) and cls is not here:
                real = pathlib.PurePosixPath if cls is pathlib.PosixPath else pathlib.PureWindowsPath
            table[f"{mod}.{cls.__name__}"] = Handler(call=_path(real))
    for mod in (
        "lightning_fabric.utilities.data",
        "lightning.fabric.utilities.data",
        "pytorch_lightning.utilities.parsing",
        "lightning.pytorch.utilities.parsing",
        "safeckpt.tree",
    ):
        table[f"{mod}.AttributeDict"] = Handler(call=_attribute_dict, new=_attribute_dict, build=_empty_build)
    for name, dtype in DTYPE_GLOBALS.items():
        table[name] = Handler(value=dtype)
    return table


BASE: dict[str, Handler] = _base()


# -- the VM ----------------------------------------------------------------------------------------


def _refusal(source: str, names: list[str], allowed: Callable[[str], bool]) -> UnsafeCheckpointError:
    opcodes = [n for n in names if n.startswith("<")]
    real = [n for n in names if not n.startswith("<")]
    parts = []
    if real:
        listing = ", ".join(repr(n) for n in real[:8]) + (", ..." if len(real) > 8 else "")
        parts.append(f"refers to global{'s' if len(real) > 1 else ''} {listing}")
    if opcodes:
        parts.append(
            f"uses {', '.join(opcodes)} (builds objects without naming an allowed global; torch never writes it)"
        )
    msg = f"{source}: the pickle {' and '.join(parts)}, which safeckpt does not allow; nothing was imported or run."
    denied = [n for n in real if is_denied(n)]
    if denied:
        msg += f" {denied[0]!r} can execute code or load another pickle: do not load this file unless you made it."
    elif any(n.startswith("torch.nn.modules.") for n in real):
        msg += (
            " It holds a whole pickled model (torch.save(model)): safeckpt reads weights, not model objects. Have it "
            "saved as torch.save(model.state_dict()); or, if you trust the file, read its tensors as inert records "
            f"by passing allow={real!r} to safeckpt.open (see formats/torch.md)."
        )
    elif any(not GLOBAL_NAME.match(n) for n in real):
        msg += " A name that is not a dotted Python identifier cannot name a real class: the file was crafted."
    elif real and not opcodes:
        msg += (
            " If you trust this file and these classes only hold data, read them as inert records: pass "
            f"allow={real!r} to safeckpt.open/load/load_raw/convert (or --allow NAME to the CLI; see formats/torch.md)."
        )
    return UnsafeCheckpointError(msg)


class _VM:
    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        pos: int,
        source: str,
        table: Mapping[str, Handler],
        allowed: Callable[[str], bool],
        persistent_load: Callable[[Any], Any] | None,
    ) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.n = len(self.data)
        self.pos = pos
        self.source = source
        self.table = table
        self.allowed = allowed
        self.persistent_load = persistent_load
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.buildable: dict[int, tuple[Any, Callable[[Any, Any], Any]]] = {}
        self.guards: dict[int, tuple[Any, KeyGuard]] = {}  # per dict/set that got collidable keys
        # bytes the VM may allocate for objects bigger than the opcode bytes that make them (an
        # empty set is 216 bytes from one opcode byte): the resource model's constant x input + allowance
        self.alloc_left = ALLOC_PER_BYTE * self.n + ALLOC_ALLOWANCE
        self.proto = 0
        self.base = 0  # where this pickle starts in its file (for messages)

    # -- reading ------------------------------------------------------------------------------
    def err(self, what: str, at: int | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.source}: malformed pickle at byte {self.base + (self.pos if at is None else at)}: {what}"
        )

    def read(self, k: int) -> bytes:
        if k < 0 or k > self.n - self.pos:
            raise self.err(f"needs {k} bytes, only {self.n - self.pos} remain (truncated, or a bogus length)")
        out = bytes(self.data[self.pos : self.pos + k])
        self.pos += k
        return out

    def unpack(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self.read(size))[0]

    def line(self) -> bytes:
        start = i = self.pos
        step = 256
        while i < self.n:
            j = min(self.n, i + step)
            k = bytes(self.data[i:j]).find(b"\n")
            if k >= 0:
                self.pos = i + k + 1
                return bytes(self.data[start : i + k])
            i, step = j, min(step * 2, 1 << 20)
        raise self.err("a text opcode's line has no end (truncated)")

    # -- stack ---------------------------------------------------------------------------------
    def pop(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.err("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.err("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.err("no MARK to pop to")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def guard(self, target: Any, keys: list[Any]) -> None:
        """Check keys added to a dict or set that already exists (SETITEMS, ADDITEMS), across calls."""
        if not any(collidable(k) for k in keys):
            for k in keys:
                _check_key(k)
            return
        entry = self.guards.get(id(target))
        if entry is None or entry[0] is not target:
            entry = self.guards[id(target)] = (target, KeyGuard())
        try:
            _guard_keys(keys, entry[1])
        except CorruptCheckpointError as e:
            raise self.err(str(e)) from None

    def charge(self, nbytes: int) -> None:
        self.alloc_left -= nbytes
        if self.alloc_left < 0:
            raise self.err(
                f"the pickle builds more than {ALLOC_PER_BYTE} bytes of objects per byte of input "
                "(an amplification flood, formats/resource-model.md)"
            )

    def memo_put(self, idx: int) -> None:
        if len(self.memo) >= MAX_MEMO and idx not in self.memo:
            raise self.err(f"more than {MAX_MEMO} memo entries")
        if idx not in self.memo:
            self.charge(_MEMO_ENTRY_BYTES)  # MEMOIZE: one byte for a dict slot and an int
        self.memo[idx] = self.top()

    def memo_get(self, idx: int) -> None:
        if idx not in self.memo:
            raise self.err(f"memo entry {idx} was never stored")
        self.stack.append(self.memo[idx])

    # -- globals and calls ---------------------------------------------------------------------
    def find(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.err("STACK_GLOBAL operands must be strings")
        full = _full_name(module, name)
        handler = self.table.get(full)
        if handler is None:
            if not self.allowed(full) or is_denied(full) or not GLOBAL_NAME.match(full):
                raise _refusal(self.source, [full], self.allowed)
            handler = Handler(call=lambda *a, _n=full: Inert(_n, args=a), new=lambda *a, _n=full: Inert(_n, args=a))
        return _torch_values.real(handler.value) if handler.value is not _NO_VALUE else Global(full, handler)

    def invoke(self, ref: Any, fn: str, args: Any) -> Any:
        if not isinstance(ref, Global):
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle calls a {type(ref).__name__}, which is not an allowed callable"
            )
        impl = getattr(ref.handler, fn)
        if impl is None:
            how = "called" if fn == "call" else "instantiated (NEWOBJ)"
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle tries to have {ref.name} {how}, which safeckpt does not allow"
            )
        if not isinstance(args, tuple):
            raise self.err(f"{ref.name} is given arguments that are not a tuple")
        try:
            obj = impl(*args)
        except (UnsafeCheckpointError, CorruptCheckpointError) as e:
            raise type(e)(f"{self.source}: {ref.name}: {e}") from None
        except (TypeError, ValueError, OverflowError, KeyError, IndexError, RecursionError) as e:
            raise self.err(f"bad arguments to {ref.name}: {e}") from None
        if ref.handler.build is not None:
            self.buildable[id(obj)] = (obj, ref.handler.build)
        elif isinstance(obj, Inert):
            self.buildable[id(obj)] = (obj, inert_build)
        return obj

    def build(self) -> None:
        state = self.pop()
        obj = self.top()
        entry = self.buildable.get(id(obj))
        if entry is None or entry[0] is not obj:
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle sets the state of a {type(obj).__name__} (BUILD), which safeckpt does not allow"
            )
        try:
            new = entry[1](obj, state)
        except (UnsafeCheckpointError, CorruptCheckpointError) as e:
            raise type(e)(f"{self.source}: {e}") from None
        except (TypeError, ValueError, OverflowError, KeyError, IndexError, RecursionError) as e:
            raise self.err(f"bad state for a {type(obj).__name__}: {e}") from None
        if new is not obj:
            self.stack[-1] = new
            for k, v in self.memo.items():
                if v is obj:
                    self.memo[k] = new

    def setitems(self, target: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise self.err("SETITEMS with an odd number of items")
        if isinstance(target, Inert):
            target = target.items
        if type(target) not in (dict, collections.OrderedDict, AttributeDict, collections.Counter):
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle sets items on a {type(target).__name__} (SETITEM), which is not a dict"
            )
        try:
            self.guard(target, items[0::2])
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        except CorruptCheckpointError as e:
            raise self.err(str(e)) from None
        except (TypeError, RecursionError) as e:
            raise self.err(f"unhashable dict key: {e}") from None

    def appends(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, Inert):
            target = target.listitems
        if type(target) is not list:
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle appends to a {type(target).__name__} (APPEND), which is not a list"
            )
        target.extend(items)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, allow_trailing: bool) -> Any:
        # the opcodes torch's pickles are made of are inlined; the rest go through _OPS
        data, n, st, memo, marks, ops = self.data, self.n, self.stack, self.memo, self.marks, _OPS
        unpack_from = struct.unpack_from
        pos = self.pos
        op = -1
        try:
            while True:
                op = data[pos]
                pos += 1
                if op == 0x71:  # BINPUT
                    if len(st) <= (marks[-1] if marks else 0) or len(memo) >= MAX_MEMO:
                        self.pos = pos
                        self.memo_put(data[pos])
                    memo[data[pos]] = st[-1]
                    pos += 1
                elif op == 0x68:  # BINGET
                    st.append(memo[data[pos]])
                    pos += 1
                elif op == 0x72:  # LONG_BINPUT
                    (k,) = unpack_from("<I", data, pos)
                    if len(st) <= (marks[-1] if marks else 0) or len(memo) >= MAX_MEMO:
                        self.memo_put(k)
                    memo[k] = st[-1]
                    pos += 4
                elif op == 0x6A:  # LONG_BINGET
                    st.append(memo[unpack_from("<I", data, pos)[0]])
                    pos += 4
                elif op == 0x58 or op == 0x8C:  # BINUNICODE, SHORT_BINUNICODE
                    if op == 0x58:
                        (k,) = unpack_from("<I", data, pos)
                        pos += 4
                    else:
                        k = data[pos]
                        pos += 1
                    if k > n - pos:
                        raise self.err(f"needs {k} bytes, only {n - pos} remain (truncated, or a bogus length)", pos)
                    st.append(str(data[pos : pos + k], "utf-8", "surrogatepass"))
                    pos += k
                elif op == 0x28:  # MARK
                    if len(marks) >= MAX_MARK_DEPTH:
                        raise self.err(f"more than {MAX_MARK_DEPTH} nested MARKs", pos)
                    marks.append(len(st))
                elif op == 0x4B:  # BININT1
                    st.append(data[pos])
                    pos += 1
                elif op == 0x4A:  # BININT
                    st.append(unpack_from("<i", data, pos)[0])
                    pos += 4
                elif op == 0x74:  # TUPLE
                    if not marks:
                        raise self.err("no MARK to pop to", pos)
                    at = marks.pop()
                    t = tuple(st[at:])
                    del st[at:]
                    st.append(t)
                elif 0x85 <= op <= 0x87:  # TUPLE1-3
                    k = op - 0x84
                    if len(st) - (marks[-1] if marks else 0) < k:
                        raise self.err("stack underflow", pos)
                    t = tuple(st[-k:])
                    del st[-k:]
                    st.append(t)
                elif op == 0x29:
                    st.append(())
                elif op == 0x89:
                    st.append(False)
                elif op == 0x88:
                    st.append(True)
                elif op == 0x4E:
                    st.append(None)
                elif op == 0x7D:
                    st.append({})
                elif op == 0x94:  # MEMOIZE
                    self.pos = pos
                    self.memo_put(len(memo))
                elif op == 0x2E:  # STOP
                    self.pos = pos
                    if len(st) != 1 or marks:
                        raise self.err(f"{len(st)} values and {len(marks)} open MARKs at STOP (expected one value)")
                    if not allow_trailing and pos != n:
                        raise CorruptCheckpointError(
                            f"{self.source}: {n - pos} bytes of trailing data after the pickle's STOP "
                            "(a second pickle hidden behind the first?)"
                        )
                    return st[0]
                else:
                    handler = ops.get(op)
                    self.pos = pos
                    if handler is None:
                        raise self._bad_opcode(op)
                    handler(self)
                    pos = self.pos
        except (UnsafeCheckpointError, CorruptCheckpointError):
            raise
        except (IndexError, struct.error) as e:
            if pos >= n or isinstance(e, struct.error):
                raise self.err("the pickle ends before its STOP opcode (truncated)", pos) from None
            raise self.err(f"opcode {op:#04x}: stack underflow", pos) from None
        except KeyError as e:
            raise self.err(f"opcode {op:#04x}: memo entry {e} was never stored", pos) from None
        except (ValueError, OverflowError, TypeError, AttributeError) as e:
            raise self.err(f"opcode {op:#04x}: {type(e).__name__}: {e}", pos) from None
        except RecursionError:
            raise self.err("a value nested too deeply to hash", pos) from None

    def _bad_opcode(self, op: int) -> CheckpointErrorT:
        at = self.pos - 1
        if op in _REFUSED:
            return UnsafeCheckpointError(
                f"{self.source}: the pickle uses opcode {_REFUSED[op]} at byte {at}, which safeckpt does not accept "
                "(it builds objects without an allowed global); nothing was run"
            )
        return self.err(f"unknown opcode {op:#04x}", at)


CheckpointErrorT = CorruptCheckpointError | UnsafeCheckpointError


def inert_build(obj: Inert, state: Any) -> Inert:
    obj.state = state
    return obj


def _frame(vm: _VM) -> None:
    size = vm.unpack("<Q", 8)
    if size > vm.n - vm.pos:
        raise vm.err(f"FRAME of {size} bytes, only {vm.n - vm.pos} remain")


def _proto(vm: _VM) -> None:
    vm.proto = vm.read(1)[0]
    if vm.proto > HIGHEST_PROTOCOL:
        raise vm.err(f"pickle protocol {vm.proto} (safeckpt reads protocols 0 to {HIGHEST_PROTOCOL})")


def _long(vm: _VM, k: int) -> None:
    if k < 0 or k > MAX_LONG_BYTES:
        raise vm.err(f"an integer of {k} bytes (limit {MAX_LONG_BYTES})")
    vm.stack.append(int.from_bytes(vm.read(k), "little", signed=True))


def _int_text(vm: _VM) -> None:
    s = vm.line()
    vm.stack.append(True if s == b"01" else False if s == b"00" else int(s))


def _string_text(vm: _VM) -> None:
    s = vm.line()
    if len(s) < 2 or s[:1] != s[-1:] or s[:1] not in (b"'", b'"'):
        raise vm.err("STRING is not quoted")
    vm.stack.append(codecs.escape_decode(s[1:-1])[0].decode("utf-8"))


def _memo_index(vm: _VM) -> int:
    line = vm.line()
    if len(line) > 10 or not line.strip().isdigit() or int(line) >= MAX_MEMO_INDEX:
        raise vm.err(f"a memo index must be an integer below {MAX_MEMO_INDEX}, got {line[:20]!r}")
    return int(line)


def _get_text(vm: _VM) -> None:
    vm.memo_get(_memo_index(vm))


def _put_text(vm: _VM) -> None:
    vm.memo_put(_memo_index(vm))


def _global(vm: _VM) -> None:
    module = vm.line().decode("utf-8")
    name = vm.line().decode("utf-8")
    vm.stack.append(vm.find(module, name))


def _stack_global(vm: _VM) -> None:
    name = vm.pop()
    module = vm.pop()
    vm.stack.append(vm.find(module, name))


def _reduce(vm: _VM) -> None:
    args = vm.pop()
    fn = vm.pop()
    vm.stack.append(vm.invoke(fn, "call", args))


def _newobj(vm: _VM) -> None:
    args = vm.pop()
    cls = vm.pop()
    vm.stack.append(vm.invoke(cls, "new", args))


def _newobj_ex(vm: _VM) -> None:
    kwargs = vm.pop()
    args = vm.pop()
    cls = vm.pop()
    if kwargs:
        raise UnsafeCheckpointError(
            f"{vm.source}: the pickle passes keyword arguments to {cls!r} (NEWOBJ_EX), which safeckpt does not allow"
        )
    vm.stack.append(vm.invoke(cls, "new", args))


def _persid(vm: _VM, pid: Any) -> None:
    if vm.persistent_load is None:
        raise UnsafeCheckpointError(
            f"{vm.source}: the pickle refers to external objects (persistent id {pid!r:.60}), which are not allowed here"
        )
    try:
        value = vm.persistent_load(pid)
    except (UnsafeCheckpointError, CorruptCheckpointError) as e:
        raise e if str(e).startswith(vm.source) else type(e)(f"{vm.source}: {e}") from None
    vm.stack.append(value)


def _dict(vm: _VM) -> None:
    items = vm.pop_mark()
    d: dict[Any, Any] = {}
    vm.setitems(d, items)
    vm.stack.append(d)


def _setitem(vm: _VM) -> None:
    v = vm.pop()
    k = vm.pop()
    vm.setitems(vm.top(), [k, v])


def _setitems(vm: _VM) -> None:
    items = vm.pop_mark()
    vm.setitems(vm.top(), items)


def _append(vm: _VM) -> None:
    v = vm.pop()
    vm.appends(vm.top(), [v])


def _appends(vm: _VM) -> None:
    items = vm.pop_mark()
    vm.appends(vm.top(), items)


def _additems(vm: _VM) -> None:
    items = vm.pop_mark()
    target = vm.top()
    if type(target) is not set:
        raise UnsafeCheckpointError(f"{vm.source}: the pickle adds set items to a {type(target).__name__} (ADDITEMS)")
    if not isinstance(items, list):
        raise vm.err("ADDITEMS without items")
    vm.guard(target, items)
    target.update(items)


def _empty_set(vm: _VM) -> None:
    vm.charge(_SET_BYTES)
    vm.stack.append(set())


def _frozenset_op(vm: _VM) -> None:
    items = vm.pop_mark()
    vm.charge(_SET_BYTES)
    try:
        _guard_keys(items)
    except CorruptCheckpointError as e:
        raise vm.err(str(e)) from None
    vm.stack.append(frozenset(items))


def _utf8(b: bytes) -> str:
    return b.decode("utf-8", "surrogatepass")


# the opcodes `_VM.run` does not inline
_OPS: dict[int, Callable[[_VM], object]] = {
    0x80: _proto,
    0x95: _frame,
    0x30: lambda vm: vm.pop() and None,
    0x31: lambda vm: vm.pop_mark() and None,
    0x32: lambda vm: vm.stack.append(vm.top()),
    0x4D: lambda vm: vm.stack.append(vm.unpack("<H", 2)),  # BININT2
    0x8A: lambda vm: _long(vm, vm.read(1)[0]),  # LONG1
    0x8B: lambda vm: _long(vm, vm.unpack("<i", 4)),  # LONG4
    0x47: lambda vm: vm.stack.append(vm.unpack(">d", 8)),  # BINFLOAT
    0x49: _int_text,  # INT
    0x4C: lambda vm: vm.stack.append(int(vm.line().rstrip(b"L"))),  # LONG
    0x46: lambda vm: vm.stack.append(float(vm.line())),  # FLOAT
    0x8D: lambda vm: vm.stack.append(_utf8(vm.read(vm.unpack("<Q", 8)))),  # BINUNICODE8
    0x56: lambda vm: vm.stack.append(vm.line().decode("raw_unicode_escape")),  # UNICODE
    0x55: lambda vm: vm.stack.append(vm.read(vm.read(1)[0]).decode("utf-8")),  # SHORT_BINSTRING
    0x54: lambda vm: vm.stack.append(vm.read(vm.unpack("<i", 4)).decode("utf-8")),  # BINSTRING
    0x53: _string_text,  # STRING
    0x43: lambda vm: vm.stack.append(vm.read(vm.read(1)[0])),  # SHORT_BINBYTES
    0x42: lambda vm: vm.stack.append(vm.read(vm.unpack("<I", 4))),  # BINBYTES
    0x8E: lambda vm: vm.stack.append(vm.read(vm.unpack("<Q", 8))),  # BINBYTES8
    0x96: lambda vm: vm.stack.append(bytearray(vm.read(vm.unpack("<Q", 8)))),  # BYTEARRAY8
    0x5D: lambda vm: vm.stack.append([]),
    0x6C: lambda vm: vm.stack.append(vm.pop_mark()),  # LIST
    0x64: _dict,
    0x8F: _empty_set,
    0x90: _additems,
    0x91: _frozenset_op,
    0x61: _append,
    0x65: _appends,
    0x73: _setitem,
    0x75: _setitems,
    0x70: _put_text,
    0x67: _get_text,
    0x63: _global,
    0x93: _stack_global,
    0x52: _reduce,
    0x81: _newobj,
    0x92: _newobj_ex,
    0x62: lambda vm: vm.build(),
    0x51: lambda vm: _persid(vm, vm.pop()),  # BINPERSID
    0x50: lambda vm: _persid(vm, vm.line().decode("ascii")),  # PERSID
}
_REFUSED = {
    0x69: "INST",
    0x6F: "OBJ",
    0x82: "EXT1",
    0x83: "EXT2",
    0x84: "EXT4",
    0x97: "NEXT_BUFFER",
    0x98: "READONLY_BUFFER",
}


# -- the static scan -------------------------------------------------------------------------------

# the static scan: opcode -> (argument kind, argument, values popped (-1: to MARK), values pushed);
# kinds: 0 none, 1 fixed size, 2 length-prefixed (struct format, size), 3 text lines
_SCAN: dict[int, tuple[int, Any, int, int]] = {
    0x80: (1, 1, 0, 0), 0x95: (1, 8, 0, 0), 0x28: (0, 0, 0, 0), 0x30: (0, 0, 1, 0), 0x31: (0, 0, -1, 0),
    0x32: (0, 0, 0, 1), 0x4E: (0, 0, 0, 1), 0x88: (0, 0, 0, 1), 0x89: (0, 0, 0, 1), 0x4B: (1, 1, 0, 1),
    0x4D: (1, 2, 0, 1), 0x4A: (1, 4, 0, 1), 0x8A: (2, ("<B", 1), 0, 1), 0x8B: (2, ("<i", 4), 0, 1),
    0x47: (1, 8, 0, 1), 0x49: (3, 1, 0, 1), 0x4C: (3, 1, 0, 1), 0x46: (3, 1, 0, 1), 0x58: (2, ("<I", 4), 0, 1),
    0x8C: (2, ("<B", 1), 0, 1), 0x8D: (2, ("<Q", 8), 0, 1), 0x56: (3, 1, 0, 1), 0x55: (2, ("<B", 1), 0, 1),
    0x54: (2, ("<i", 4), 0, 1), 0x53: (3, 1, 0, 1), 0x43: (2, ("<B", 1), 0, 1), 0x42: (2, ("<I", 4), 0, 1),
    0x8E: (2, ("<Q", 8), 0, 1), 0x96: (2, ("<Q", 8), 0, 1), 0x29: (0, 0, 0, 1), 0x74: (0, 0, -1, 1),
    0x85: (0, 0, 1, 1), 0x86: (0, 0, 2, 1), 0x87: (0, 0, 3, 1), 0x5D: (0, 0, 0, 1), 0x6C: (0, 0, -1, 1),
    0x7D: (0, 0, 0, 1), 0x64: (0, 0, -1, 1), 0x8F: (0, 0, 0, 1), 0x90: (0, 0, -1, 0), 0x91: (0, 0, -1, 1),
    0x61: (0, 0, 1, 0), 0x65: (0, 0, -1, 0), 0x73: (0, 0, 2, 0), 0x75: (0, 0, -1, 0), 0x70: (3, 1, 0, 0),
    0x71: (1, 1, 0, 0), 0x72: (1, 4, 0, 0), 0x94: (0, 0, 0, 0), 0x67: (3, 1, 0, 1), 0x68: (1, 1, 0, 1),
    0x6A: (1, 4, 0, 1), 0x63: (3, 2, 0, 1), 0x93: (0, 0, 2, 1), 0x52: (0, 0, 2, 1), 0x81: (0, 0, 2, 1),
    0x92: (0, 0, 3, 1), 0x62: (0, 0, 1, 0), 0x51: (0, 0, 1, 1), 0x50: (3, 1, 0, 1), 0x69: (3, 2, -1, 1),
    0x6F: (0, 0, -1, 1), 0x82: (1, 1, 0, 1), 0x83: (1, 2, 0, 1), 0x84: (1, 4, 0, 1), 0x97: (0, 0, 0, 1),
    0x98: (0, 0, 1, 1),
}  # fmt: skip
_STRING_OPS = {0x58, 0x8C, 0x8D, 0x55, 0x54}
_NAME_LIMIT = 1024  # longer strings cannot be (parts of) a global name worth resolving


def scan(data: bytes | bytearray | memoryview, pos: int, source: str) -> tuple[list[str], int]:
    """Every global a pickle names (first-seen order) and where its STOP ends; builds nothing."""
    n = len(data)
    names: dict[str, None] = {}
    stack: list[Any] = []  # (start, length) of short strings; None for any other value
    marks: list[int] = []
    memo: dict[int, Any] = {}
    table, unpack_from = _SCAN, struct.unpack_from

    def err(what: str, at: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: malformed pickle at byte {at}: {what}")

    def text(v: Any) -> str | None:
        if isinstance(v, tuple):
            return bytes(data[v[0] : v[0] + v[1]]).decode("utf-8", "surrogatepass")
        return v if isinstance(v, str) else None

    def line(at: int) -> tuple[bytes, int]:
        start = i = at
        step = 256
        while i < n:
            j = min(n, i + step)
            k = bytes(data[i:j]).find(b"\n")
            if k >= 0:
                return bytes(data[start : i + k]), i + k + 1
            i, step = j, min(step * 2, 1 << 20)
        raise err("a text opcode's line has no end (truncated)", at)

    while True:
        if pos >= n:
            raise err("no STOP opcode (truncated)", pos)
        at = pos
        op = data[pos]
        pos += 1
        spec = table.get(op)
        if spec is None:
            if op == 0x2E:
                return list(names), pos
            raise err(f"unknown opcode {op:#04x}", at)
        kind, arg, pops, pushes = spec
        value: Any = None
        try:
            if kind == 1:
                if pos + arg > n:
                    raise err("truncated argument", at)
                if op == 0x71 or op == 0x72:
                    memo[data[pos] if op == 0x71 else unpack_from("<I", data, pos)[0]] = stack[-1] if stack else None
                elif op == 0x68 or op == 0x6A:
                    value = memo.get(data[pos] if op == 0x68 else unpack_from("<I", data, pos)[0])
                elif op in (0x82, 0x83, 0x84):
                    code = int.from_bytes(bytes(data[pos : pos + arg]), "little")
                    names[f"<{_REFUSED[op]} extension code {code}>"] = None
                pos += arg
            elif kind == 2:
                fmt, size = arg
                if pos + size > n:
                    raise err("truncated length", at)
                (k,) = unpack_from(fmt, data, pos)
                pos += size
                if k < 0 or k > n - pos:
                    raise err(f"needs {k} bytes, only {n - pos} remain (truncated, or a bogus length)", pos)
                if op in _STRING_OPS and k <= _NAME_LIMIT:
                    value = (pos, k)
                pos += k
            elif kind == 3:
                first, pos = line(pos)
                if op == 0x63 or op == 0x69:
                    second, pos = line(pos)
                    names[_full_name(first.decode("utf-8"), second.decode("utf-8"))] = None
                elif op == 0x56:
                    value = first.decode("raw_unicode_escape")
                elif op == 0x53:
                    value = first.decode("raw_unicode_escape")[1:-1]
                elif op == 0x67 or op == 0x70:
                    # an index the VM refuses (too large to hash cheaply) is not recorded here
                    if len(first) > 10 or not first.strip().isdigit() or int(first) >= MAX_MEMO_INDEX:
                        pass
                    elif op == 0x67:
                        value = memo.get(int(first))
                    else:
                        memo[int(first)] = stack[-1] if stack else None
            elif op == 0x94:
                memo[len(memo)] = stack[-1] if stack else None
            elif op == 0x32:
                value = stack[-1] if stack else None
            elif op == 0x93:
                module, name = (text(stack[-2]), text(stack[-1])) if len(stack) >= 2 else (None, None)
                label = (
                    _full_name(module, name)
                    if module is not None and name is not None
                    else f"<STACK_GLOBAL at byte {at} with computed operands>"
                )
                names[label] = None
            elif op == 0x6F:
                names.setdefault("<OBJ opcode>", None)
            elif op == 0x97 or op == 0x98:
                names.setdefault(f"<{_REFUSED[op]} opcode>", None)
        except CorruptCheckpointError:
            raise
        except (UnicodeDecodeError, ValueError) as e:
            raise err(f"opcode {op:#04x}: {e}", at) from None
        if op == 0x28:
            marks.append(len(stack))
            continue
        if pops == -1:
            if not marks:
                raise err("no MARK to pop to", at)
            del stack[marks.pop() :]
        elif pops:
            if len(stack) - (marks[-1] if marks else 0) < pops:
                raise err("stack underflow", at)
            del stack[-pops:]
        if pushes:
            stack.append(value)


def globals_in(data: bytes | bytearray | memoryview) -> list[str]:
    """Every global one pickle refers to, in first-seen order, without building anything.

    ``STACK_GLOBAL`` names are resolved from the strings (or memo entries) that feed it; opcodes
    that name classes another way appear as ``<EXT1 extension code 7>``, ``<OBJ opcode>``...

    Example:
        >>> globals_in(pickle.dumps(collections.OrderedDict(), protocol=4))
        ['collections.OrderedDict']
    """
    return scan(data, 0, "<pickle>")[0]


def unpickle_at(
    data: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    source: str,
    persistent_load: Callable[[Any], Any] | None = None,
    allow: Iterable[str] = (),
    extra: Mapping[str, Handler] | None = None,
) -> tuple[Any, int]:
    """Unpickle the pickle that starts at ``offset``; return it and the offset just past its STOP.

    For files that hold several pickles in a row (torch's legacy format). See `unpickle`.

    Example:
        >>> obj, end = unpickle_at(data, 0, source="old.pt")
    """
    obj, end, _ = load(data, offset, source=source, persistent_load=persistent_load, allow=allow, extra=extra)
    return obj, end


def load(
    data: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    source: str,
    persistent_load: Callable[[Any], Any] | None = None,
    allow: Iterable[str] = (),
    extra: Mapping[str, Handler] | None = None,
) -> tuple[Any, int, list[str]]:
    """`unpickle_at` that also returns the globals the pickle names (scanned once, before anything is built).

    Example:
        >>> load(pickle.dumps(collections.OrderedDict(a=1), protocol=4), source="x.pkl")
        (OrderedDict([('a', 1)]), 52, ['collections.OrderedDict'])
    """
    allowed = allowed_by(allow)
    table = {**BASE, **(extra or {})}
    names, end = scan(data, offset, source)
    refused = [
        n
        for n in names
        if n not in table and (n.startswith("<") or not allowed(n) or is_denied(n) or not GLOBAL_NAME.match(n))
    ]
    if refused:
        raise _refusal(source, refused, allowed)
    # the VM runs on a copy of just this pickle: bytes are the fastest to index, and a legacy
    # file's storages after it are never copied
    whole = isinstance(data, bytes) and offset == 0 and end == len(data)
    vm = _VM(data if whole else bytes(memoryview(data)[offset:end]), 0, source, table, allowed, persistent_load)
    vm.base = offset
    obj = vm.run(allow_trailing=True)
    return obj, offset + vm.pos, names


def unpickle(
    data: bytes | bytearray | memoryview,
    *,
    source: str,
    persistent_load: Callable[[Any], Any] | None = None,
    allow: Iterable[str] = (),
    extra: Mapping[str, Handler] | None = None,
    allow_trailing: bool = False,
) -> Any:
    """Rebuild the object a pickle describes, through the allow-list only.

    Args:
        data: the pickle bytes.
        source: what to name in error messages (the file, and the record inside it).
        persistent_load: called with each persistent id (``BINPERSID``); without it, persistent
            ids are refused.
        allow: extra global names (``"pkg.mod.Class"`` or ``"pkg.*"``) to admit as `Inert`
            records; names in `DENIED_MODULES`/`DENIED_NAMES` stay refused.
        extra: more `Handler`s by exact global name (they take precedence over `BASE`).
        allow_trailing: accept bytes after STOP (otherwise `CorruptCheckpointError`).

    Raises:
        UnsafeCheckpointError: a global outside the table, or a refused opcode; raised before
            anything is built.
        CorruptCheckpointError: anything malformed: truncation, bad lengths, stack misuse.

    Example:
        >>> unpickle(pickle.dumps([1, {"a": (2, 3)}]), source="x.pkl")
        [1, {'a': (2, 3)}]
    """
    obj, end = unpickle_at(data, 0, source=source, persistent_load=persistent_load, allow=allow, extra=extra)
    n = len(memoryview(data))
    if not allow_trailing and end != n:
        raise CorruptCheckpointError(
            f"{source}: {n - end} bytes of trailing data after the pickle's STOP (a second pickle hidden behind the first?)"
        )
    return obj
