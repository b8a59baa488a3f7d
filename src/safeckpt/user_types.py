"""Registered types: teaching the codec a user class *as data*, so it round-trips by type without pickle.

A registered class is stored as its name and a plain value (``to_data(obj)``: anything the codec
stores, tensors included) and rebuilt on load with ``from_data(value)`` — only when the *loading*
process registered the same name. The file names a type; it never says how to build one, and
nothing it names is imported. Dataclasses, ``enum.Enum`` subclasses (``Flag`` included) and
``NamedTuple`` classes get converters for free; any other class brings its own.

Example:
    >>> @register_type
    ... @dataclasses.dataclass
    ... class Config:
    ...     lr: float = 0.1
    >>> safeckpt.save("run.safeckpt", {"cfg": Config(0.3)})
    >>> safeckpt.load("run.safeckpt")["cfg"]
    Config(lr=0.3)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

from .tree import TensorRef, is_tensor

__all__ = ["Unregistered", "add"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registration: the class, the name files record, and its two converters."""

    cls: type
    name: str
    to_data: Callable[[Any], Any]
    from_data: Callable[[Any], Any]


_BY_CLASS: dict[type, Entry] = {}
_BY_NAME: dict[str, Entry] = {}


def add(
    cls: type,
    *,
    name: str | None = None,
    to_data: Callable[[Any], Any] | None = None,
    from_data: Callable[[Any], Any] | None = None,
) -> None:
    """Register ``cls`` under ``name`` with its converters: the registry behind
    `safeckpt.register_type` (which first refuses the types the codec stores itself).

    Example:
        >>> add(Interval, name="myproj.Interval", to_data=lambda i: [i.lo, i.hi], from_data=lambda d: Interval(*d))
    """
    label = f"{cls.__module__}.{cls.__qualname__}"
    if name is None:
        name = label
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_type({label}): name must be a non-empty str, got {name!r}")
    if (to_data is None) != (from_data is None):
        raise TypeError(f"register_type({label}): give both to_data and from_data, or neither")
    if to_data is None or from_data is None:
        to_data, from_data = _converters(cls, label)
    old = _BY_NAME.get(name)
    if old is not None and old.cls is not cls and not _same_definition(old.cls, cls):
        raise ValueError(
            f"register_type({label}): the name {name!r} is already registered for "
            f"{old.cls.__module__}.{old.cls.__qualname__}; give one of them another name= "
            "(the name is what checkpoint files record)"
        )
    mine = _BY_CLASS.get(cls)
    if mine is not None and mine.name != name:
        raise ValueError(
            f"register_type({label}): already registered as {mine.name!r}; a class is stored under one name "
            f"(unregister it first to rename, and keep name={mine.name!r} to read files written with it)"
        )
    if old is not None:
        _BY_CLASS.pop(old.cls, None)
    _BY_NAME[name] = _BY_CLASS[cls] = Entry(cls, name, to_data, from_data)


def _same_definition(a: type, b: type) -> bool:
    """Two class objects of one definition: a module reloaded or a notebook cell run again."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _unregister(cls_or_name: type | str) -> None:
    """Forget a registration (for tests); unknown classes and names are ignored."""
    entry = _BY_NAME.get(cls_or_name) if isinstance(cls_or_name, str) else _BY_CLASS.get(cls_or_name)
    if entry is not None:
        _BY_NAME.pop(entry.name, None)
        _BY_CLASS.pop(entry.cls, None)


def entry_for_class(cls: type) -> Entry | None:
    """The registration the codec uses to store a value of exactly ``cls`` (subclasses register themselves).

    Example:
        >>> entry_for_class(Config).name
        'myproj.Config'
    """
    return _BY_CLASS.get(cls)


def entry_for_name(name: str) -> Entry | None:
    """The registration that rebuilds values a file stored under ``name``, in this process.

    Example:
        >>> entry_for_name("myproj.Config").cls
        <class 'myproj.Config'>
    """
    return _BY_NAME.get(name)


def registrable(cls: type) -> bool:
    """True for the classes `register_type` can store without converters.

    Example:
        >>> registrable(Config), registrable(torch.nn.Linear)
        (True, False)
    """
    return isinstance(cls, enum.EnumMeta) or dataclasses.is_dataclass(cls) or _is_namedtuple(cls)


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


def _converters(cls: type, label: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    if isinstance(cls, enum.EnumMeta):
        return (_flag_converters if issubclass(cls, enum.Flag) else _enum_converters)(cls)
    if dataclasses.is_dataclass(cls):
        return _dataclass_converters(cls, label)
    if _is_namedtuple(cls):
        return (lambda obj: obj._asdict()), (lambda data: cls(**_map(data, cls)))
    raise TypeError(
        f"register_type({label}): not a dataclass, Enum or NamedTuple; pass to_data=(obj -> plain value) "
        "and from_data=(value -> obj)"
    )


def _enum_converters(cls: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def from_data(data: Any) -> Any:
        if type(data) is not str or data not in cls.__members__:
            raise ValueError(f"{data!r} is not a member name of {cls.__qualname__} ({', '.join(cls.__members__)})")
        return cls[data]

    return (lambda member: member.name), from_data


def _flag_converters(cls: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def to_data(value: Any) -> list[str]:
        names = [m.name for m in value]  # the canonical members it combines ([] for no flags)
        if _combine(cls, names) != value:
            raise ValueError(
                f"{value!r} has bits no member of {cls.__qualname__} names; register it with to_data/from_data"
            )
        return names

    def from_data(data: Any) -> Any:
        if type(data) is not list or any(type(n) is not str or n not in cls.__members__ for n in data):
            raise ValueError(f"{data!r} is not a list of member names of {cls.__qualname__}")
        return _combine(cls, data)

    return to_data, from_data


def _combine(cls: Any, names: list[str]) -> Any:
    return functools.reduce(operator.or_, (cls[n] for n in names), cls(0))


def _dataclass_converters(cls: Any, label: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    fields = dataclasses.fields(cls)
    late = {f.name for f in fields if not f.init}
    params = inspect.signature(cls).parameters.values()
    needed = {p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = needed - {f.name for f in fields}
    if unknown:  # an InitVar: not a field, so not stored, yet __init__ needs it
        raise TypeError(
            f"register_type({label}): __init__ needs {sorted(unknown)}, which are not fields; "
            "pass to_data and from_data"
        )

    def from_data(data: Any) -> Any:
        data = _map(data, cls)
        # cls(...) runs the class's own __init__/__post_init__ checks; a field added since the file was
        # written takes its default, one removed is an error (the data would be lost otherwise).
        obj = cls(**{k: v for k, v in data.items() if k not in late})
        for k in late & data.keys():
            object.__setattr__(obj, k, data[k])  # frozen dataclasses too
        return obj

    return (lambda obj: {f.name: getattr(obj, f.name) for f in fields}), from_data


def _map(data: Any, cls: type) -> dict[str, Any]:
    if type(data) is not dict or not all(type(k) is str for k in data):
        raise ValueError(f"{cls.__qualname__} is stored as a map of field names, got {type(data).__name__}")
    return data


class Unregistered:
    """A stored value of a registered type that this process cannot rebuild, kept as the file has it:
    an inert record (its name and data; nothing imported, nothing constructed).

    Every other key, tensor and module of the file loads; `safeckpt.open` and `safeckpt.load`
    without a state show the record, loading it into a state raises naming its path and the fix,
    and using it (any attribute of the class it stands for) raises naming the fix. Saving one
    writes it back unchanged, so converting a file needs no class.

    Example:
        >>> with codec.keep_unregistered():
        ...     safeckpt.open("run.safeckpt")["cfg"]
        myproj.Config(lr=0.3, depth=4)
    """

    __slots__ = ("data", "error", "name")

    def __init__(self, name: str, data: Any, error: BaseException | None = None) -> None:
        self.name, self.data, self.error = name, data, error

    def __getattr__(self, attr: str) -> Any:
        # only names that are not .name/.data/.error get here: the use of the value the class would have built
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"{self!r:.120} has no attribute {attr!r}: {self.why()}")

    def why(self) -> str:
        """Why this value is a record, and the fix.

        Example:
            >>> safeckpt.load("run.safeckpt")["cfg"].why()
            "a stored value of registered type 'myproj.Config', which this process has not registered ..."
        """
        if self.error is None and entry_for_name(self.name) is not None:
            inner = _first_record(self.data)  # registered, but holding a value that could not be built
            if inner is not None:
                return f"it holds {inner.why()}"
        if self.error is None:
            return (
                f"a stored value of registered type {self.name!r}, which this process has not registered, kept as "
                f"an inert record (.name, .data); nothing was imported or run. Call "
                f"safeckpt.register_type({self.name}) before loading (import the module that registers it)"
            )
        return (
            f"a stored {self.name!r} that the registered class could not rebuild ({type(self.error).__name__}: "
            f"{self.error}), kept as an inert record (.name, .data); register the class with a from_data that "
            "accepts the stored data"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unregistered) and self.name == other.name and _same_data(self.data, other.data)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        data = self.data
        if type(data) is dict and all(type(k) is str and k.isidentifier() for k in data):
            return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in data.items())})"
        return f"{self.name}({data!r})"


def _first_record(data: Any) -> Unregistered | None:
    """The first `Unregistered` inside stored data (dicts, lists, tuples), if any."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, Unregistered):
            return node
        if isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed(node))
    return None


def _same_data(a: Any, b: Any) -> bool:
    """Equal stored data, tensors (lazy or not) by dtype, shape and bytes: so ``safeckpt diff`` and
    ``convert``'s check compare two files' values of a type neither process registered."""
    a = a.load() if isinstance(a, TensorRef) else a
    b = b.load() if isinstance(b, TensorRef) else b
    if is_tensor(a) or is_tensor(b):
        if not (is_tensor(a) and is_tensor(b)):
            return False
        import torch

        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # a value whose == does not give a bool
        return repr(a) == repr(b)
