"""The format registry: one table, read by content, write by name.

A format is a `Format` record (name, extensions, sniff, read, and where it has them write,
verify and the write options it takes). The built-in formats are modules that each define one
``FORMAT`` record and are imported only when needed; a third-party format is one module plus one
`register_format` call. ``registry`` is the read-only view of the table.

Formats are sniffed in table order (more specific first; registered formats go before ``torch``,
the catch-all for pickles). The extension is a tie-breaker, never the security boundary: a
``.safetensors`` file holding a pickle is read as the pickle it is, by the restricted unpickler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UnknownFormatError

if TYPE_CHECKING:
    from ..tree import Checkpoint

__all__ = [
    "BUILTIN",
    "HEAD_BYTES",
    "Format",
    "detect",
    "get",
    "names",
    "register_format",
    "registry",
    "unregister_format",
    "writable",
]

HEAD_BYTES = 4096

Kind = Literal["file", "dir", "any"]


@dataclasses.dataclass(frozen=True)
class Format:
    """One on-disk format: how to recognise it, read it and (optionally) write and verify it.

    Attributes:
        name: the registry name (``format="..."``, ``Checkpoint.format``).
        extensions: the file extensions it usually carries (lower case, with the dot); they break
            ties between sniffers and choose the format of a save without ``format=``.
        kind: what it can be: a ``"file"``, a ``"dir"``ectory or ``"any"``.
        sniff: ``sniff(head, path) -> bool``, a pure function of the first `HEAD_BYTES` bytes
            (``b""`` for a directory) and the path; it never parses beyond headers.
        read: ``read(path, *, allow=()) -> Checkpoint``; ``allow`` names extra pickle globals to
            admit as inert data (formats without pickles ignore it).
        write: ``write(ckpt, path, **options) -> Path``, or ``None`` if read-only.
        write_options: the keyword options ``write`` takes; any other is a ``TypeError``.
        verify: ``verify(path) -> list[str]``, the format's own integrity checks (problems found).
        checksummed: the regions (``"header"``, ``"data"``) ``verify`` checks against stored checksums
            in every file of this format; ``safeckpt verify`` reports the others as not verified.
        globals_report: for pickle-based formats, ``globals_report(path, allow=()) -> [(name, allowed)]``.

    Example:
        >>> fmt = Format("npz", (".npz",), "file", sniff=lambda head, path: head[:2] == b"PK", read=read_npz)
        >>> register_format(fmt)
    """

    name: str
    extensions: tuple[str, ...]
    kind: Kind
    sniff: Callable[[bytes, Path], bool]
    read: Callable[..., Checkpoint]
    write: Callable[..., Path] | None = None
    write_options: frozenset[str] = frozenset()
    verify: Callable[[Path], list[str]] | None = None
    checksummed: frozenset[str] = frozenset()
    globals_report: Callable[..., list[tuple[str, bool]]] | None = None

    @property
    def NAME(self) -> str:
        return self.name

    @property
    def EXTENSIONS(self) -> tuple[str, ...]:
        return self.extensions

    def writer(self, options: Mapping[str, Any]) -> Callable[..., Path]:
        """This format's ``write``, after checking it takes every option in ``options``.

        Raises ``ValueError`` for a read-only format and ``TypeError`` naming the format and each
        option it does not take (nothing is silently dropped).

        Example:
            >>> get("safetensors").writer({"max_shard_size": 100})
            Traceback (most recent call last):
            TypeError: format 'safetensors' does not take the option max_shard_size (it takes no options); ...
        """
        if self.write is None:
            raise ValueError(
                f"format {self.name!r} can be read but not written; writable formats: {', '.join(writable())}"
            )
        unknown = sorted(set(options) - self.write_options)
        if unknown:
            takes = ", ".join(sorted(self.write_options)) or "no options"
            hint = (
                "; for a sharded directory use format='safeckpt-sharded' or 'hf-sharded', or leave format unset"
                if "max_shard_size" in unknown
                else ""
            )
            raise TypeError(f"format {self.name!r} does not take the option {', '.join(unknown)} (it takes {takes}){hint}")
        return self.write


# name -> a Format, or (dotted module defining FORMAT, kind, writable, extensions) not imported yet;
# in sniff order. The kind spares detection importing and asking modules that cannot apply, and so
# do the extensions once a format has matched (only one whose extension agrees could still win, so
# a safetensors file never imports the pickle reader and torch); "writable" lets the CLI list the
# formats it writes without importing them (both checked against the record on import).
_table: dict[str, Format | tuple[str, Kind, bool, tuple[str, ...]]] = {
    "safeckpt": ("safeckpt.formats.safeckpt", "file", True, (".safeckpt",)),
    "safeckpt-sharded": ("safeckpt.formats.safeckpt_sharded", "any", True, ()),
    "safetensors": ("safeckpt.formats.safetensors_file", "file", True, (".safetensors",)),
    # before hf-sharded: it holds a model.safetensors too
    "accelerate": ("safeckpt.formats.accelerate", "dir", False, ()),
    "hf-sharded": ("safeckpt.formats.hf_sharded", "any", True, (".json",)),
    "dcp": ("safeckpt.formats.dcp", "dir", False, ()),
    "torch": ("safeckpt.formats.torch_pickle", "file", True, (".pt", ".pth", ".bin", ".ckpt")),
}
# the formats safeckpt ships (they cannot be unregistered)
BUILTIN: frozenset[str] = frozenset(_table)


def _load(name: str) -> Format:
    entry = _table[name]
    if isinstance(entry, Format):
        return entry
    fmt = importlib.import_module(entry[0]).FORMAT
    if not isinstance(fmt, Format) or fmt.name != name or (fmt.write is not None) != entry[2]:
        raise TypeError(f"{entry[0]}.FORMAT must be the Format named {name!r}, {'' if entry[2] else 'not '}writable")
    if fmt.extensions != entry[3]:
        raise TypeError(f"{entry[0]}.FORMAT's extensions are {fmt.extensions}, the registry's row says {entry[3]}")
    _table[name] = fmt
    return fmt


def _kind(name: str) -> Kind:
    entry = _table[name]
    return entry.kind if isinstance(entry, Format) else entry[1]


def _extensions(name: str) -> tuple[str, ...]:
    entry = _table[name]
    return entry.extensions if isinstance(entry, Format) else entry[3]


class _Registry(Mapping[str, Format]):
    """A read-only view of the table (formats are imported on first access)."""

    def __getitem__(self, name: str) -> Format:
        return _load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_table))

    def __len__(self) -> int:
        return len(_table)

    def __repr__(self) -> str:
        return f"<safeckpt format registry: {', '.join(_table)}>"


registry: Mapping[str, Format] = _Registry()


def register_format(fmt: Format, *, clobber: bool = False) -> Format:
    """Add a format to the registry (fsspec's ``register_implementation``, Pillow's ``register_open``).

    It is sniffed before the ``torch`` pickle catch-all, after the built-in safetensors-based and
    directory formats; `open`, `load`, `convert` and the CLI then read it, and ``format=`` writes it
    if it has a writer. Re-registering a name raises ``ValueError`` unless ``clobber=True``.

    Example:
        >>> import safeckpt
        >>> safeckpt.register_format(Format("npz", (".npz",), "file", sniff=sniff_npz, read=read_npz, write=write_npz))
        >>> safeckpt.convert("model.safetensors", "model.npz")
    """
    if not isinstance(fmt, Format):
        raise TypeError(f"register_format takes a safeckpt.formats.Format, got {type(fmt).__name__}")
    if fmt.name in _table and not clobber:
        raise ValueError(f"a format named {fmt.name!r} is already registered; pass clobber=True to replace it")
    if fmt.kind not in ("file", "dir", "any"):
        raise ValueError(f"Format.kind must be 'file', 'dir' or 'any', got {fmt.kind!r}")
    if fmt.name in _table:
        _table[fmt.name] = fmt
    else:  # before the pickle catch-all, keeping the rest in order
        items = list(_table.items())
        at = next((i for i, (n, _) in enumerate(items) if n == "torch"), len(items))
        items.insert(at, (fmt.name, fmt))
        _table.clear()
        _table.update(items)
    return fmt


def unregister_format(name: str) -> None:
    """Remove a format added with `register_format` (the built-in formats stay).

    Example:
        >>> unregister_format("npz")
    """
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in format and cannot be removed")
    if name not in _table:
        raise KeyError(f"no format named {name!r} is registered")
    del _table[name]


def names() -> list[str]:
    """Every registered format name, in sniff order.

    Example:
        >>> names()[0]
        'safeckpt'
    """
    return list(_table)


def get(name: str) -> Format:
    """The `Format` named ``name``.

    Example:
        >>> get("safeckpt").extensions
        ('.safeckpt',)
    """
    if name not in _table:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(_table)}")
    return _load(name)


def writable() -> list[str]:
    """Names of the formats that can be written (built-in formats are not imported to tell).

    Example:
        >>> "dcp" in writable()
        False
    """
    return [n for n, e in _table.items() if (e.write is not None if isinstance(e, Format) else e[2])]


def detect(path: str | os.PathLike[str]) -> Format:
    """The format that reads ``path``, chosen by content (the extension breaks ties).

    Raises ``FileNotFoundError`` for a missing path and `UnknownFormatError`, listing the
    formats tried, when none recognises it. A sniffer that cannot look (an unreadable file inside a
    directory) counts as not recognising it.

    Example:
        >>> detect("model.safetensors").name
        'safetensors'
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    head = b""
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    suffix, kind = p.suffix.lower(), "file" if p.is_file() else "dir"
    tried = [n for n in list(_table) if _kind(n) in (kind, "any")]
    hits: list[Format] = []
    for name in tried:
        if hits and suffix not in _extensions(name):
            continue  # it could not win the tie against the format already found
        fmt = _load(name)
        hit = False
        with contextlib.suppress(OSError):
            hit = fmt.sniff(head, p)
        if hit:
            if suffix in fmt.extensions:
                return fmt  # the first hit the extension agrees with: later ones cannot win the tie
            hits.append(fmt)
    if not hits:
        what = "directory" if p.is_dir() else f"file ({p.stat().st_size} bytes)"
        raise UnknownFormatError(
            f"{path}: not a checkpoint safeckpt can read; this {what} matched none of the formats tried: "
            f"{', '.join(tried)}"
        )
    return hits[0]
