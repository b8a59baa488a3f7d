"""The common in-memory representation: a `Checkpoint` tree whose tensor leaves are lazy `TensorRef`s.

Every format reads into a `Checkpoint` and writes from one. Walking it, printing it and summing
its sizes read no tensor data; a tensor's bytes are read (memory-mapped where the file allows)
only when `TensorRef.load()` is called.
"""

from __future__ import annotations

import operator
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _dtypes, _shapes, _torch_values
from ._fs import Span

if TYPE_CHECKING:
    import torch

__all__ = [
    "AttributeDict",
    "Checkpoint",
    "TensorRef",
    "alias_key",
    "describe",
    "inline",
    "iter_leaves",
    "map_leaves",
    "path_name",
]


class AttributeDict(dict):  # type: ignore[type-arg]
    """A dict whose keys are also attributes; saved and loaded back as an `AttributeDict`.

    It behaves like Lightning's ``AttributeDict``, and Lightning's own loads back as this class.

    Example:
        >>> hp = AttributeDict(lr=0.1, batch_size=32)
        >>> hp.lr
        0.1
        >>> hp.epochs = 3
        >>> hp["epochs"]
        3
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'") from e

    def __setattr__(self, key: str, val: Any) -> None:
        self[key] = val

    def __delattr__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        del self[key]

    def __repr__(self) -> str:
        if not len(self):
            return ""
        width = max(len(str(k)) for k in self) + 3
        return "\n".join(f"{chr(34) + str(k) + chr(34) + ':':{width}s} {self[k]}" for k in sorted(self, key=str))


class _Dtype:
    """`TensorRef.dtype`: kept as the reader gave it (a torch-free `_dtypes.DType` row or a
    ``torch.dtype``) and handed out as a ``torch.dtype``, so reading a header needs no torch and
    a caller who asks for the dtype still gets torch's object."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> torch.dtype:
        if obj is None:  # no class-level default: dataclass then makes it a required field
            raise AttributeError(self.slot)
        d = getattr(obj, self.slot)  # the instance's, or a subclass's property (formats/_safetensors.EntryRef)
        return d if not isinstance(d, _dtypes.DType) else _dtypes.to_torch(d)

    def __set__(self, obj: Any, value: torch.dtype | _dtypes.DType) -> None:
        obj.__dict__[self.slot] = value


@dataclass(frozen=True, eq=False, init=False)
class TensorRef:
    """A tensor in a checkpoint, described without reading its bytes.

    Attributes:
        name: the tensor's name in its file (``model/l1.weight``, ``optimizer/state/0/exp_avg``).
        dtype: the torch dtype it loads as (a reader may give a torch-free `_dtypes.DType`;
            torch is imported when ``dtype`` is first read). `dtype_info` reads it without torch.
        shape: its shape.
        source: the file its bytes live in.
        storage: identity of the bytes it views: references with equal ``storage`` and ``view``
            are the same tensor (tied weights); equal ``storage`` alone means shared memory.
        view: where in ``storage`` this tensor sits (format-specific, hashable).
        requires_grad / parameter: what the producer recorded about the tensor.
        span: where its exact bytes lie in ``source``, when they do (C order, little-endian), so
            a conversion can copy them file to file.

    Example:
        >>> ref = safeckpt.open("ckpt.safeckpt").tensors()["model/l1.weight"]
        >>> ref.shape, ref.dtype, ref.nbytes
        ((2, 2), torch.float32, 16)
        >>> ref.load()  # reads (maps) the bytes now
    """

    name: str
    if TYPE_CHECKING:
        dtype: torch.dtype
    else:
        dtype: _Dtype = _Dtype()
    shape: tuple[int, ...]
    source: str
    loader: Callable[[], torch.Tensor] = field(repr=False)
    storage: Hashable | None = None
    view: Hashable | None = None
    requires_grad: bool = False
    parameter: bool = False
    span: Span | None = field(default=None, repr=False)

    def __init__(
        self,
        name: str,
        dtype: torch.dtype | _dtypes.DType,
        shape: tuple[int, ...],
        source: str,
        loader: Callable[[], torch.Tensor],
        storage: Hashable | None = None,
        view: Hashable | None = None,
        requires_grad: bool = False,
        parameter: bool = False,
        span: Span | None = None,
    ) -> None:
        # the fields in one dict update: a frozen dataclass's generated __init__ sets them one by one
        # through object.__setattr__, which made building the references of a header its main cost
        self.__dict__.update(
            name=name,
            _dtype=dtype,
            shape=shape,
            source=source,
            loader=loader,
            storage=storage,
            view=view,
            requires_grad=requires_grad,
            parameter=parameter,
            span=span,
        )

    @property
    def dtype_info(self) -> _dtypes.DType:
        """The dtype as a torch-free row of `_dtypes` (name, itemsize, safetensors code).

        Example:
            >>> ref.dtype_info.name, ref.dtype_info.code
            ('float32', 'F32')
        """
        return _dtypes.of(self._dtype)  # type: ignore[attr-defined]

    @property
    def numel(self) -> int:
        """Number of elements (``1`` for a 0-dim tensor).

        Example:
            >>> ref.shape, ref.numel
            ((16, 8), 128)
        """
        return _shapes.numel(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data.

        Example:
            >>> ref.dtype, ref.nbytes
            (torch.float32, 512)
        """
        return _shapes.nbytes(self.dtype_info, self.shape)

    @property
    def alias_key(self) -> Hashable:
        """Equal for two references to the same tensor (tied weights); unique otherwise.

        Example:
            >>> refs = safeckpt.open("tied.pt").tensors()
            >>> refs["emb.weight"].alias_key == refs["head.weight"].alias_key
            True
        """
        if self.storage is None:
            return id(self)
        return (self.storage, self.view, self.dtype_info.name, self.shape)

    def load(self, device: str | torch.device | None = None) -> torch.Tensor:
        """Read the tensor and check it is what was declared.

        Args:
            device: where it goes (``"cuda:0"``, ``"meta"``: no bytes read). None: the CPU,
                memory-mapped copy-on-write where the source allows (writing to it never changes
                the file). A CUDA tensor is read into pinned buffers and copied as it is read.

        Example:
            >>> w = safeckpt.open("friend.pt").tensors()["l1.weight"].load()   # only this tensor is read
            >>> w = safeckpt.open("model.safetensors").tensors()["lm_head.weight"].load(device="cuda")
        """
        from ._device import as_device, data, wrap

        return wrap(self, data(self, as_device(device)))

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, {self.dtype_info.name}, {list(self.shape)})"


_ALIAS_KEY = operator.attrgetter("alias_key")


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.Tensor``, without importing torch: while torch is not imported,
    no value can be one (the torch-free read path asks this of every leaf).

    Example:
        >>> is_tensor(torch.ones(1)), is_tensor([1.0])
        (True, False)
    """
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    """``(key, value)`` of a dict, ``(index, value)`` of a list or tuple; nothing for a leaf."""
    if isinstance(node, dict):
        return iter(node.items())
    return enumerate(node) if type(node) in (list, tuple) else iter(())


def _refs(tree: Any) -> list[TensorRef]:
    """Every `TensorRef` leaf, in tree order: `iter_leaves` without the paths (which `tensors()`
    would merge where two paths give one name)."""
    out: list[TensorRef] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, TensorRef):
            out.append(node)
        elif isinstance(node, dict):
            stack.extend(reversed(node.values()))
        elif type(node) in (list, tuple):
            stack.extend(reversed(node))
    return out


def is_container(obj: Any) -> bool:
    return isinstance(obj, dict) or type(obj) in (list, tuple)


def iter_leaves(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Yield ``(path, leaf)`` for every leaf of a tree of dicts, lists and tuples, in order.

    Example:
        >>> list(iter_leaves({"a": [1, 2], "b": {"c": 3}}))
        [(('a', 0), 1), (('a', 1), 2), (('b', 'c'), 3)]
    """
    stack: list[tuple[tuple[Any, ...], Any]] = [(prefix, tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((path + (k,), v) for k, v in reversed(list(node.items())))
        elif type(node) in (list, tuple):
            stack.extend((path + (i,), v) for i, v in reversed(list(enumerate(node))))
        else:
            yield path, node


def map_leaves(tree: Any, fn: Callable[[tuple[Any, ...], Any], Any], prefix: tuple[Any, ...] = ()) -> Any:
    """Rebuild a tree with ``fn(path, leaf)`` at every leaf, keeping container types (and a
    state dict's ``_metadata``).

    Example:
        >>> map_leaves({"a": (1, 2)}, lambda path, x: x * 10)
        {'a': (10, 20)}
    """
    if isinstance(tree, dict):
        out = type(tree)() if type(tree) in (dict, OrderedDict, AttributeDict, Counter) else {}
        for k, v in tree.items():
            out[k] = map_leaves(v, fn, prefix + (k,))
        meta = getattr(tree, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
        return out
    if type(tree) is list:
        return [map_leaves(v, fn, prefix + (i,)) for i, v in enumerate(tree)]
    if type(tree) is tuple:
        return tuple(map_leaves(v, fn, prefix + (i,)) for i, v in enumerate(tree))
    return fn(prefix, tree)


def path_name(path: tuple[Any, ...]) -> str:
    """The readable name of a tree path: its keys joined by ``/``.

    Example:
        >>> path_name(("optimizer", "state", 0, "exp_avg"))
        'optimizer/state/0/exp_avg'
    """
    return "/".join(map(str, path))


def unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name~1``, ``name~2``... if already in ``used`` (the result is added to it);
    never ``__metadata__``, which safetensors reserves.

    Example:
        >>> used = {"w"}; unique_name("w", used), unique_name("w", used)
        ('w~1', 'w~2')
    """
    candidate, i = name, 1
    while candidate in used or candidate == "__metadata__":
        candidate, i = f"{name}~{i}", i + 1
    used.add(candidate)
    return candidate


class Checkpoint:
    """A checkpoint as a lazy tree: dicts, lists and tuples whose leaves are plain values or
    `TensorRef`s. What `safeckpt.open` returns and what every format reads into and writes from.

    Attributes:
        tree: the root (usually a dict).
        format: the registry name of the format it was read from.
        path: the file or directory it was read from.
        metadata: string metadata the format carries (safetensors ``__metadata__``, HF index metadata).
        info: facts the reader found worth reporting (producer, Lightning version, globals seen).

    Example:
        >>> ckpt = safeckpt.open("friend.pt")   # reads headers only
        >>> ckpt.format, len(ckpt.tensors()), ckpt.nbytes
        ('torch', 4, 848)
        >>> weights = ckpt.to_python()          # plain dict of tensors
    """

    def __init__(
        self,
        tree: Any,
        *,
        format: str,
        path: str | Path,
        metadata: dict[str, str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.tree = tree
        self.format = format
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.info = dict(info or {})

    # -- mapping-like access to the root -------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        return self.tree[key]

    def __contains__(self, key: Any) -> bool:
        return isinstance(self.tree, dict) and key in self.tree

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tree) if isinstance(self.tree, dict) else iter(())

    def __len__(self) -> int:
        return len(self.tree) if isinstance(self.tree, dict) else 0

    def keys(self) -> list[Any]:
        """The root's keys (``[]`` if the root is not a dict).

        Example:
            >>> safeckpt.open("fabric.ckpt").keys()
            ['model', 'optimizer', 'hparams', 'args', 'data_dir', 'step']
        """
        return list(self.tree) if isinstance(self.tree, dict) else []

    # -- tensors ------------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorRef]:
        """Every tensor leaf by its path name (``model/l1.weight``), in tree order.

        Example:
            >>> list(safeckpt.open("fabric.ckpt").tensors())[:2]
            ['model/0.weight', 'model/0.bias']
        """
        if isinstance(self.tree, TensorRef):
            return {"": self.tree}
        # `iter_leaves` + `path_name`, with each name built once per level instead of per leaf
        # from a tuple: listing is most of what `open` costs past the header
        out: dict[str, TensorRef] = {}
        stack = [("", _children(self.tree))]
        while stack:
            prefix, items = stack[-1]
            for k, v in items:
                if isinstance(v, TensorRef):
                    out[prefix + str(k)] = v
                elif isinstance(v, dict) or type(v) in (list, tuple):
                    stack.append((f"{prefix}{k!s}/", _children(v)))
                    break
            else:
                stack.pop()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, each tied tensor counted once.

        Example:
            >>> safeckpt.open("friend.pt").nbytes
            848
        """
        return sum(r.nbytes for r in self._unique())

    @property
    def numel(self) -> int:
        """Number of tensor elements, each tied tensor counted once.

        Example:
            >>> safeckpt.open("friend.pt").numel
            212
        """
        return sum(r.numel for r in self._unique())

    def _unique(self) -> list[TensorRef]:
        """Each distinct tensor's first reference (tied ones counted once)."""
        refs = _refs(self.tree)
        refs.reverse()  # the first of equal keys is the one a dict built in reverse order keeps
        return list(dict(zip(map(_ALIAS_KEY, refs), refs, strict=True)).values())

    def tied(self) -> list[list[str]]:
        """Groups of tensor names that are the same tensor (tied weights), written once on save.

        Example:
            >>> safeckpt.open("tied.safeckpt").tied()
            [['model/emb.weight', 'model/head.weight']]
        """
        groups: dict[Hashable, list[str]] = {}
        for name, ref in self.tensors().items():
            groups.setdefault(ref.alias_key, []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    def to_python(self, subtree: Any = None, device: str | torch.device | None = None) -> Any:
        """Materialize the tree (or ``subtree``, a part of it) as plain Python with tensors on
        ``device`` (None: the CPU, memory-mapped where the format allows).

        Tied tensors come back as one tensor object, as ``torch.load`` gives them.

        Example:
            >>> ckpt = safeckpt.open("fabric.ckpt")
            >>> weights = ckpt.to_python(ckpt["model"])   # just the model's entry
            >>> on_gpu = ckpt.to_python(device="cuda")
        """
        from ._device import as_device, load_many, wrap

        root = self.tree if subtree is None else subtree
        dev = as_device(device)
        cache: dict[Hashable, torch.Tensor] = {}
        if dev is not None and dev.type == "cuda":  # every distinct tensor staged in one pipeline
            refs: dict[Hashable, TensorRef] = {}
            for _, x in iter_leaves(root):
                if isinstance(x, TensorRef):
                    refs.setdefault(x.alias_key, x)
            loaded = load_many(list(refs.values()), dev)
            cache = {k: wrap(r, t) for (k, r), t in zip(refs.items(), loaded, strict=True)}

        def leaf(_: tuple[Any, ...], x: Any) -> Any:
            if isinstance(x, TensorRef):
                key = x.alias_key
                if key not in cache:
                    cache[key] = x.load(dev)
                return cache[key]
            return _torch_values.to_torch(x) if isinstance(x, _torch_values.STAND_INS) else x

        return map_leaves(root, leaf)

    def __repr__(self) -> str:
        refs = self._unique()
        return (
            f"<Checkpoint format={self.format!r} path='{self.path}' tensors={len(refs)} "
            f"bytes={sum(r.nbytes for r in refs)}>"
        )

    def __str__(self) -> str:
        return describe(self.tree, title=f"{self.path} ({self.format})")


def inline(x: Any, width: int = 60) -> str | None:
    """One line for a leaf, an empty container, or a list/tuple of scalars (long ones cut, with
    their length); ``None`` for a container an outline should expand.

    Example:
        >>> inline((0.9, 0.999)), inline(list(range(100)), width=20), inline({"a": 1})
        ('(0.9, 0.999)', '[0, 1, 2, 3, 4, ...] (100 items)', None)
    """
    if isinstance(x, TensorRef):
        return f"{x.dtype_info.name} {list(x.shape)}"
    if is_tensor(x):
        return f"tensor {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    if is_container(x) and len(x):
        if isinstance(x, dict) or any(is_container(v) or isinstance(v, TensorRef) or is_tensor(v) for v in x):
            return None
        text = repr(x)
        if len(text) <= width:
            return text
        parts: list[str] = []
        for v in x:
            if sum(len(p) + 2 for p in parts) + len(repr(v)) > width - 8:
                break
            parts.append(repr(v))
        opening, closing = ("[", "]") if type(x) is list else ("(", ")")
        return f"{opening}{', '.join([*parts, '...'])}{closing} ({len(x)} items)"
    text = repr(dict(x)) if isinstance(x, AttributeDict) else repr(x)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(tree: Any, *, title: str = "", depth: int | None = None, width: int = 60, sizes: bool = True) -> str:
    """An indented outline of a tree: tensors as dtype, shape and size, small values (and short
    lists of scalars) as themselves; containers below ``depth`` levels are summarised.

    Example:
        >>> print(describe({"step": 3, "betas": (0.9, 0.999), "model": {"w": ref}}))
        step:  3
        betas: (0.9, 0.999)
        model:
          w: float32 [2, 2]  16 B
    """
    from ._units import format_size

    lines = [title] if title else []

    def summary(x: Any) -> str:
        refs = {r.alias_key: r for _, r in iter_leaves(x) if isinstance(r, TensorRef)}
        extra = f", {len(refs)} tensors, {format_size(sum(r.nbytes for r in refs.values()))}" if sizes and refs else ""
        return f"<{type(x).__name__} of {len(x)}{extra}>"

    def walk(node: Any, indent: int) -> None:
        pad = "  " * indent
        rows: list[tuple[str, Any, str | None]] = []  # key, value, one-line text (None: expand)
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            text = inline(v, width)
            if text is None and depth is not None and indent + 1 >= depth:
                text = summary(v)
            rows.append((str(k), v, text))
        # align sibling values, and the sizes after sibling tensors, within reason
        key_width = min(max((len(k) for k, _, t in rows if t is not None), default=0), 40) + 1
        tensor_width = min(max((len(t) for _, v, t in rows if t and isinstance(v, TensorRef)), default=0), 40)
        for k, v, text in rows:
            if text is None:
                lines.append(f"{pad}{k}:")
                walk(v, indent + 1)
            elif sizes and isinstance(v, TensorRef):
                lines.append(f"{pad}{k + ':':{key_width}} {text:{tensor_width}}  {format_size(v.nbytes)}")
            else:
                lines.append(f"{pad}{k + ':':{key_width}} {text}")

    if is_container(tree) and inline(tree, width) is None:
        walk(tree, 0)
    else:
        text = inline(tree, width) or ""
        lines.append(f"{text}  {format_size(tree.nbytes)}" if sizes and isinstance(tree, TensorRef) else text)
    return "\n".join(lines)


def alias_key(x: torch.Tensor | TensorRef) -> Hashable:
    """Equal for two tensor leaves that are the same tensor (tied weights), live or lazy.

    Example:
        >>> w = torch.ones(2)
        >>> alias_key(w) == alias_key(w.detach()), alias_key(w) == alias_key(w.clone())
        (True, False)
    """
    if isinstance(x, TensorRef):
        return x.alias_key
    import torch

    if x.layout != torch.strided or x.device.type == "meta" or x.numel() == 0:
        return id(x)
    return ("live", x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.stride(), x.dtype, tuple(x.shape))
