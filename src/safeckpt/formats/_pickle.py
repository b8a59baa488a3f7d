"""A restricted pickle VM: reads protocols 0-5 without importing or calling anything named by the data.

Every ``GLOBAL``/``STACK_GLOBAL`` is looked up, by its exact ``module.name`` string, in a fixed
table of `Handler`s (`BASE` plus the caller's ``extra``). A handler is our own code: it checks its
arguments and builds a plain value (an ``OrderedDict``, a ``torch.Size``, a numpy array from its
bytes). A name outside the table raises `UnsafeCheckpointError` before the VM runs: the whole
pickle is scanned first (`globals_in`), so a refused file builds nothing. Opcodes that resolve
classes without a global (``INST``, ``OBJ``, ``EXT*``) and out-of-band buffers are refused, and
every length, the memo and the nesting are bounded by the input (spec: ``formats/torch.md``).

Example:
    >>> load(pickle.dumps({"step": 3, "betas": (0.9, 0.99)}), source="x.pkl").value
    {'step': 3, 'betas': (0.9, 0.99)}
    >>> load(b"cposix\\nsystem\\n(S'id'\\ntR.", source="evil.pkl")
    Traceback (most recent call last):
    safeckpt.errors.UnsafeCheckpointError: evil.pkl: the pickle refers to global 'posix.system', ...
"""

from __future__ import annotations

import argparse
import codecs
import collections
import math
import pathlib
import pickle
import pickletools
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _dtypes, _torch_values
from .._budget import MAX_INT_BYTES, HashFloodError, KeyGuard, collidable
from ..errors import CorruptCheckpointError, TruncatedCheckpointError, UnsafeCheckpointError
from ..tree import AttributeDict

__all__ = [
    "BASE",
    "DENIED_MODULES",
    "Global",
    "Handler",
    "Inert",
    "Unpickled",
    "globals_in",
    "is_denied",
    "load",
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
    if type(items) is tuple and not items:  # torch pickles an empty one (a tensor's hooks) per tensor
        return collections.OrderedDict()
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
        data: bytes,
        pos: int,
        source: str,
        table: Mapping[str, Handler],
        allowed: Callable[[str], bool],
        persistent_load: Callable[[Any], Any] | None,
    ) -> None:
        self.data = data
        self.n = len(data)
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
        end = _line_end(self.data, self.pos)
        if end < 0:
            raise self.err("a text opcode's line has no end (truncated)")
        out, self.pos = self.data[self.pos : end], end + 1
        return out

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
        if type(ref) is not Global:
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle calls a {type(ref).__name__}, which is not an allowed callable"
            )
        handler = ref.handler
        impl = handler.call if fn == "call" else handler.new
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
        if handler.build is not None:
            self.buildable[id(obj)] = (obj, handler.build)
        elif type(obj) is Inert:
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
    def run(self) -> Any:
        """Execute the (already scanned) pickle; the value its STOP returns."""
        data, n, st, memo, marks, ops, invoke = self.data, self.n, self.stack, self.memo, self.marks, _OPS, self.invoke
        push, u16, u32, i32, max_memo = st.append, _U16.unpack_from, _U32.unpack_from, _I32.unpack_from, MAX_MEMO
        # torch's opcodes are inlined, most frequent first; the opcode bytes are locals, which
        # compare as fast as literals (module globals made this loop 8-12% slower)
        (
            LONG_BINPUT, BINGET, BININT1, MARK, TUPLE, REDUCE, BININT2, EMPTY_TUPLE, BINUNICODE, NEWFALSE,
            BINPERSID, TUPLE1, TUPLE3, LONG_BINGET, BINPUT, EMPTY_DICT, BININT, MEMOIZE, SHORT_BINUNICODE,
            NEWTRUE, NONE, STOP,
        ) = _RUN_OPS  # fmt: skip
        pos = self.pos
        op = -1
        try:
            while True:
                op = data[pos]
                pos += 1
                if op == LONG_BINPUT:
                    (k,) = u32(data, pos)
                    if len(st) <= (marks[-1] if marks else 0) or len(memo) >= max_memo:
                        self.memo_put(k)
                    memo[k] = st[-1]
                    pos += 4
                elif op == BINGET:
                    push(memo[data[pos]])
                    pos += 1
                elif op == BININT1:
                    push(data[pos])
                    pos += 1
                elif op == MARK:
                    if len(marks) >= MAX_MARK_DEPTH:
                        raise self.err(f"more than {MAX_MARK_DEPTH} nested MARKs", pos)
                    marks.append(len(st))
                elif op == TUPLE:
                    if not marks:
                        raise self.err("no MARK to pop to", pos)
                    at = marks.pop()
                    t = tuple(st[at:])
                    del st[at:]
                    push(t)
                elif op == REDUCE:
                    if len(st) - (marks[-1] if marks else 0) < 2:
                        raise self.err("stack underflow", pos)
                    args = st.pop()
                    self.pos = pos
                    st[-1] = invoke(st[-1], "call", args)
                elif op == BININT2:
                    push(u16(data, pos)[0])
                    pos += 2
                elif op == EMPTY_TUPLE:
                    push(())
                elif op == BINUNICODE or op == SHORT_BINUNICODE:  # noqa: SIM109 (a tuple of locals is built per test)
                    if op == BINUNICODE:
                        (k,) = u32(data, pos)
                        pos += 4
                    else:
                        k = data[pos]
                        pos += 1
                    if k > n - pos:
                        raise self.err(f"needs {k} bytes, only {n - pos} remain (truncated, or a bogus length)", pos)
                    push(str(data[pos : pos + k], "utf-8", "surrogatepass"))
                    pos += k
                elif op == NEWFALSE:
                    push(False)
                elif op == BINPERSID:
                    if len(st) <= (marks[-1] if marks else 0):
                        raise self.err("stack underflow", pos)
                    self.pos = pos
                    _persid(self, st.pop())
                elif TUPLE1 <= op <= TUPLE3:  # TUPLE1, TUPLE2, TUPLE3
                    k = op - TUPLE1 + 1
                    if len(st) - (marks[-1] if marks else 0) < k:
                        raise self.err("stack underflow", pos)
                    t = tuple(st[-k:])
                    del st[-k:]
                    push(t)
                elif op == LONG_BINGET:
                    push(memo[u32(data, pos)[0]])
                    pos += 4
                elif op == BINPUT:
                    if len(st) <= (marks[-1] if marks else 0) or len(memo) >= max_memo:
                        self.pos = pos
                        self.memo_put(data[pos])
                    memo[data[pos]] = st[-1]
                    pos += 1
                elif op == EMPTY_DICT:
                    push({})
                elif op == BININT:
                    push(i32(data, pos)[0])
                    pos += 4
                elif op == MEMOIZE:
                    self.pos = pos
                    self.memo_put(len(memo))
                elif op == NEWTRUE:
                    push(True)
                elif op == NONE:
                    push(None)
                elif op == STOP:
                    self.pos = pos
                    if len(st) != 1 or marks:
                        raise self.err(f"{len(st)} values and {len(marks)} open MARKs at STOP (expected one value)")
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
        # the storage helpers raise without the file; one that names it has set ``path``
        raise e if e.path is not None else type(e)(f"{vm.source}: {e}", path=vm.source, key=e.key, hint=e.hint) from None
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


_U16, _U32, _I32 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<i")


def _codes(names: str) -> tuple[int, ...]:
    """The bytes of pickle's opcodes by name (``"MARK STOP"``): what the loops compare ``op`` with."""
    return tuple(getattr(pickle, name)[0] for name in names.split())


_RUN_OPS = _codes(
    """LONG_BINPUT BINGET BININT1 MARK TUPLE REDUCE BININT2 EMPTY_TUPLE BINUNICODE NEWFALSE BINPERSID TUPLE1 TUPLE3
    LONG_BINGET BINPUT EMPTY_DICT BININT MEMOIZE SHORT_BINUNICODE NEWTRUE NONE STOP"""
)
# the opcodes `_VM.run` does not inline
_OPS: dict[int, Callable[[_VM], object]] = {
    pickle.PROTO[0]: _proto,
    pickle.FRAME[0]: _frame,
    pickle.POP[0]: lambda vm: vm.pop() and None,
    pickle.POP_MARK[0]: lambda vm: vm.pop_mark() and None,
    pickle.DUP[0]: lambda vm: vm.stack.append(vm.top()),
    pickle.LONG1[0]: lambda vm: _long(vm, vm.read(1)[0]),
    pickle.LONG4[0]: lambda vm: _long(vm, vm.unpack("<i", 4)),
    pickle.BINFLOAT[0]: lambda vm: vm.stack.append(vm.unpack(">d", 8)),
    pickle.INT[0]: _int_text,
    pickle.LONG[0]: lambda vm: vm.stack.append(int(vm.line().rstrip(b"L"))),
    pickle.FLOAT[0]: lambda vm: vm.stack.append(float(vm.line())),
    pickle.BINUNICODE8[0]: lambda vm: vm.stack.append(_utf8(vm.read(vm.unpack("<Q", 8)))),
    pickle.UNICODE[0]: lambda vm: vm.stack.append(vm.line().decode("raw_unicode_escape")),
    pickle.SHORT_BINSTRING[0]: lambda vm: vm.stack.append(vm.read(vm.read(1)[0]).decode("utf-8")),
    pickle.BINSTRING[0]: lambda vm: vm.stack.append(vm.read(vm.unpack("<i", 4)).decode("utf-8")),
    pickle.STRING[0]: _string_text,
    pickle.SHORT_BINBYTES[0]: lambda vm: vm.stack.append(vm.read(vm.read(1)[0])),
    pickle.BINBYTES[0]: lambda vm: vm.stack.append(vm.read(vm.unpack("<I", 4))),
    pickle.BINBYTES8[0]: lambda vm: vm.stack.append(vm.read(vm.unpack("<Q", 8))),
    pickle.BYTEARRAY8[0]: lambda vm: vm.stack.append(bytearray(vm.read(vm.unpack("<Q", 8)))),
    pickle.EMPTY_LIST[0]: lambda vm: vm.stack.append([]),
    pickle.LIST[0]: lambda vm: vm.stack.append(vm.pop_mark()),
    pickle.DICT[0]: _dict,
    pickle.EMPTY_SET[0]: _empty_set,
    pickle.ADDITEMS[0]: _additems,
    pickle.FROZENSET[0]: _frozenset_op,
    pickle.APPEND[0]: _append,
    pickle.APPENDS[0]: _appends,
    pickle.SETITEM[0]: _setitem,
    pickle.SETITEMS[0]: _setitems,
    pickle.PUT[0]: _put_text,
    pickle.GET[0]: _get_text,
    pickle.GLOBAL[0]: _global,
    pickle.STACK_GLOBAL[0]: _stack_global,
    pickle.NEWOBJ[0]: _newobj,
    pickle.NEWOBJ_EX[0]: _newobj_ex,
    pickle.BUILD[0]: lambda vm: vm.build(),
    pickle.PERSID[0]: lambda vm: _persid(vm, vm.line().decode("ascii")),
}
# opcodes that build objects without naming a global: refused by the scan and the VM
_REFUSED = {_codes(name)[0]: name for name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER")}


# -- the static scan -------------------------------------------------------------------------------

# how the scan steps over each opcode, derived from pickletools' descriptions (as fickling does):
# (kind, argument, values popped (-1: to MARK), values pushed). Kinds: no argument, a fixed-size
# one (its size), a length-prefixed one (the length's struct format and size), text lines (how
# many); _TRACKED: an opcode whose effect on the memo or the names the scan follows (a fixed
# argument's size, or 0)
_NONE, _FIXED, _SIZED, _LINES, _TRACKED = 0, 1, 2, 3, 4
_TRACKED_OPS = {"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "MEMOIZE", "DUP", "STACK_GLOBAL", "OBJ"}
_TRACKED_OPS |= {"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
_LENGTH = {  # length-prefixed arguments: the struct format of the length
    pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1),
    pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
    pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4),
    pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8),
}
# pickletools describes an opcode that replaces its operands by a result of the same kind
# (REDUCE: [any, any] -> [any]) just like one that leaves the stack's bottom item in place
# (BUILD: [any, any] -> [any]); the first kind is spelled out here
_STACK_EFFECT = {
    "REDUCE": (2, 1),
    "NEWOBJ": (2, 1),
    "NEWOBJ_EX": (3, 1),
    "BINPERSID": (1, 1),
    "READONLY_BUFFER": (1, 1),
}


def _scan_row(op: pickletools.OpcodeInfo, follow_memo: bool) -> tuple[int, Any, int, int]:
    arg = op.arg
    size: Any = 0
    if arg is None:
        kind = _NONE
    elif arg.n >= 0:
        kind, size = _FIXED, arg.n
    elif arg.n == pickletools.UP_TO_NEWLINE:
        kind, size = _LINES, 2 if arg.name.endswith("_pair") else 1
    else:
        kind, size = _SIZED, _LENGTH[arg.n]
    if op.name in _TRACKED_OPS and (follow_memo or op.name not in _MEMO_OPS):
        kind = _TRACKED
    before, after = op.stack_before, op.stack_after
    keep = 0  # items left in place under the operands (APPEND's list, BUILD's object)
    while (
        keep < min(len(before), len(after))
        and before[keep] is after[keep]
        and before[keep] is not pickletools.markobject
    ):
        keep += 1
    if op.name in _STACK_EFFECT:
        pops, pushes = _STACK_EFFECT[op.name]
    elif pickletools.markobject in before:
        pops, pushes = -1, len(after) - before.index(pickletools.markobject)
    else:
        pops, pushes = len(before) - keep, len(after) - keep
    return kind, size, pops, pushes


# the memo matters only for STACK_GLOBAL's operands, which pickle writes from protocol 4 on: an
# older pickle is scanned stepping over its memo opcodes (they are 40% of torch's). Should one use
# STACK_GLOBAL on names from the memo all the same, the scan cannot name them, and refuses them.
_MEMO_OPS = {"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "MEMOIZE", "DUP"}
_SCAN: list[tuple[int, Any, int, int] | None] = [None] * 256
_SCAN_NO_MEMO: list[tuple[int, Any, int, int] | None] = [None] * 256
for _op in pickletools.opcodes:
    if _op.name not in ("MARK", "STOP"):  # the loop handles these two itself
        _SCAN[ord(_op.code)] = _scan_row(_op, True)
        _SCAN_NO_MEMO[ord(_op.code)] = _scan_row(_op, False)
assert all(r[2] == 0 for r in (*_SCAN, *_SCAN_NO_MEMO) if r is not None and r[0] == _FIXED)  # see scan()
_STRING_OPS = frozenset(_codes("BINUNICODE SHORT_BINUNICODE BINUNICODE8 SHORT_BINSTRING BINSTRING"))
_SCAN_OPS = _codes("MARK STOP BINPUT LONG_BINPUT BINGET LONG_BINGET MEMOIZE DUP")
_NAME_OPS = _codes("GLOBAL INST STACK_GLOBAL UNICODE STRING GET PUT OBJ")
_NAME_LIMIT = 1024  # longer strings cannot be (parts of) a global name worth resolving


def _line_end(data: bytes | bytearray | memoryview, pos: int) -> int:
    """Where the text argument starting at ``pos`` ends (its newline), or -1; never copies more
    than it searches (``data`` may map a whole legacy file)."""
    if isinstance(data, bytes):
        return data.find(b"\n", pos)
    i, n, step = pos, len(data), 256
    while i < n:
        j = min(n, i + step)
        k = bytes(data[i:j]).find(b"\n")
        if k >= 0:
            return i + k
        i, step = j, min(step * 2, 1 << 20)
    return -1


def scan(data: bytes | bytearray | memoryview, pos: int, source: str) -> tuple[list[str], int]:
    """Every global a pickle names (first-seen order) and where its STOP ends; builds nothing."""
    n = len(data)
    names: dict[str, None] = {}
    stack: list[Any] = []  # (start, length) of short strings; None for any other value
    marks: list[int] = []
    memo: dict[int, Any] = {}
    follow_memo = n > pos + 1 and data[pos] == pickle.PROTO[0] and data[pos + 1] >= 4
    table, unpack_from = _SCAN if follow_memo else _SCAN_NO_MEMO, struct.unpack_from
    # opcode bytes as locals: as fast as literals in the loop (module globals cost a quarter more)
    FIXED, SIZED, TRACKED = _FIXED, _SIZED, _TRACKED
    MARK, STOP, BINPUT, LONG_BINPUT, BINGET, LONG_BINGET, MEMOIZE, DUP = _SCAN_OPS
    GLOBAL, INST, STACK_GLOBAL, UNICODE, STRING, GET, PUT, OBJ = _NAME_OPS
    string_ops = _STRING_OPS

    def err(what: str, at: int, kind: type[CorruptCheckpointError] = CorruptCheckpointError) -> CorruptCheckpointError:
        return kind(f"{source}: malformed pickle at byte {at}: {what}")

    def text(v: Any) -> str | None:
        if isinstance(v, tuple):
            return bytes(data[v[0] : v[0] + v[1]]).decode("utf-8", "surrogatepass")
        return v if isinstance(v, str) else None

    def line(at: int) -> tuple[bytes, int]:
        end = _line_end(data, at)
        if end < 0:
            raise err("a text opcode's line has no end (truncated)", at, TruncatedCheckpointError)
        return bytes(data[at:end]), end + 1

    at = op = pos
    try:
        while True:
            at = pos
            op = data[pos]
            pos += 1
            spec = table[op]
            if spec is None:
                if op == STOP:
                    return list(names), pos
                if op == MARK:
                    marks.append(len(stack))
                    continue
                raise err(f"unknown opcode {op:#04x}", at)
            kind, arg, pops, pushes = spec
            if kind == FIXED:  # the most frequent kind, and one that pops nothing (checked below)
                pos += arg
                if pos > n:
                    raise err("truncated argument", at, TruncatedCheckpointError)
                if pushes:
                    stack.append(None)
                continue
            value: Any = None
            if kind:
                if kind == TRACKED:
                    if pos + arg > n:
                        raise err("truncated argument", at, TruncatedCheckpointError)
                    if op == LONG_BINPUT or op == BINPUT:  # noqa: SIM109 (a tuple of locals is built per test)
                        memo[data[pos] if op == BINPUT else unpack_from("<I", data, pos)[0]] = (
                            stack[-1] if stack else None
                        )
                    elif op == BINGET or op == LONG_BINGET:  # noqa: SIM109 (a tuple of locals is built per test)
                        value = memo.get(data[pos] if op == BINGET else unpack_from("<I", data, pos)[0])
                    elif op == MEMOIZE:
                        memo[len(memo)] = stack[-1] if stack else None
                    elif op == DUP:
                        value = stack[-1] if stack else None
                    elif op == STACK_GLOBAL:
                        module, name = (text(stack[-2]), text(stack[-1])) if len(stack) >= 2 else (None, None)
                        label = (
                            _full_name(module, name)
                            if module is not None and name is not None
                            else f"<STACK_GLOBAL at byte {at} with computed operands>"
                        )
                        names[label] = None
                    elif op == OBJ:
                        names.setdefault("<OBJ opcode>", None)
                    elif arg:  # EXT1/2/4
                        code = int.from_bytes(bytes(data[pos : pos + arg]), "little")
                        names[f"<{_REFUSED[op]} extension code {code}>"] = None
                    else:  # the out-of-band buffer opcodes
                        names.setdefault(f"<{_REFUSED[op]} opcode>", None)
                    pos += arg
                elif kind == SIZED:
                    fmt, size = arg
                    if pos + size > n:
                        raise err("truncated length", at, TruncatedCheckpointError)
                    (k,) = unpack_from(fmt, data, pos)
                    pos += size
                    if k < 0 or k > n - pos:
                        raise err(f"needs {k} bytes, only {n - pos} remain (truncated, or a bogus length)", pos, TruncatedCheckpointError)
                    if op in string_ops and k <= _NAME_LIMIT:
                        value = (pos, k)
                    pos += k
                else:  # text lines
                    first, pos = line(pos)
                    if op == GLOBAL or op == INST:  # noqa: SIM109 (a tuple of locals is built per test)
                        second, pos = line(pos)
                        names[_full_name(first.decode("utf-8"), second.decode("utf-8"))] = None
                    elif op == UNICODE:
                        value = first.decode("raw_unicode_escape")
                    elif op == STRING:
                        value = first.decode("raw_unicode_escape")[1:-1]
                    elif op == GET or op == PUT:  # noqa: SIM109 (a tuple of locals is built per test)
                        # an index the VM refuses (too large to hash cheaply) is not recorded here
                        if len(first) > 10 or not first.strip().isdigit() or int(first) >= MAX_MEMO_INDEX:
                            pass
                        elif op == GET:
                            value = memo.get(int(first))
                        else:
                            memo[int(first)] = stack[-1] if stack else None
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
    except CorruptCheckpointError:
        raise
    except IndexError:
        raise err("no STOP opcode (truncated)", pos, TruncatedCheckpointError) from None
    except (UnicodeDecodeError, ValueError, struct.error) as e:
        raise err(f"opcode {op:#04x}: {e}", at) from None


def globals_in(data: bytes | bytearray | memoryview) -> list[str]:
    """Every global one pickle refers to, in first-seen order, without building anything.

    ``STACK_GLOBAL`` names are resolved from the strings (or memo entries) that feed it; opcodes
    that name classes another way appear as ``<EXT1 extension code 7>``, ``<OBJ opcode>``...

    Example:
        >>> globals_in(pickle.dumps(collections.OrderedDict(), protocol=4))
        ['collections.OrderedDict']
    """
    return scan(data, 0, "<pickle>")[0]


@dataclass(frozen=True)
class Unpickled:
    """What `load` returns: the ``value``, the offset just past the pickle's STOP (``end``), and the
    ``globals`` it names (scanned once, before anything was built)."""

    value: Any
    end: int
    globals: list[str]


def load(
    data: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    source: str,
    persistent_load: Callable[[Any], Any] | None = None,
    allow: Iterable[str] = (),
    extra: Mapping[str, Handler] | None = None,
    trailing: bool = False,
) -> Unpickled:
    """Rebuild the object the pickle at ``offset`` describes, through the allow-list only.

    Args:
        data: the bytes (any buffer: a legacy file's map holds several pickles in a row).
        source: what to name in error messages (the file, and the record inside it).
        persistent_load: called with each persistent id (``BINPERSID``); without it, persistent
            ids are refused.
        allow: extra global names (``"pkg.mod.Class"`` or ``"pkg.*"``) to admit as `Inert`
            records; names in `DENIED_MODULES`/`DENIED_NAMES` stay refused.
        extra: more `Handler`s by exact global name (they take precedence over `BASE`).
        trailing: accept bytes after STOP (otherwise `CorruptCheckpointError`).

    Raises:
        UnsafeCheckpointError: a global outside the table, or a refused opcode; raised before
            anything is built.
        CorruptCheckpointError: anything malformed: truncation, bad lengths, stack misuse.

    Example:
        >>> load(pickle.dumps([1, {"a": (2, 3)}]), source="x.pkl").value
        [1, {'a': (2, 3)}]
        >>> load(pickle.dumps(collections.OrderedDict(a=1), protocol=4), source="x.pkl")
        Unpickled(value=OrderedDict([('a', 1)]), end=52, globals=['collections.OrderedDict'])
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
    n = len(data)
    if not trailing and end != n:
        raise CorruptCheckpointError(
            f"{source}: {n - end} bytes of trailing data after the pickle's STOP (a second pickle hidden behind the first?)"
        )
    # the VM runs on a copy of just this pickle: bytes are the fastest to index, and a legacy
    # file's storages after it are never copied
    whole = isinstance(data, bytes) and offset == 0 and end == n
    body = data if whole and isinstance(data, bytes) else bytes(memoryview(data)[offset:end])
    vm = _VM(body, 0, source, table, allowed, persistent_load)
    vm.base = offset
    return Unpickled(vm.run(), end, names)
