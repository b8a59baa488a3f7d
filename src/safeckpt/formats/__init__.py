"""The format registry: one table, read by content, write by name.

Every format is a module exposing the same names:

- ``NAME``: its registry name; ``EXTENSIONS``: the file extensions it usually carries;
- ``sniff(head: bytes, path: Path) -> bool``: does this content look like mine? (``head`` is the
  file's first `HEAD_BYTES` bytes, ``b""`` for a directory; a sniffer never parses beyond headers);
- ``read(path: Path, *, allow=()) -> Checkpoint``;
- ``write(ckpt: Checkpoint, path: Path, **opts) -> Path``, if the format is writable.

Formats are tried in table order and imported only when needed. The extension is a tie-breaker,
never the security boundary: a ``.safetensors`` file holding a pickle is read as the pickle it is,
by the restricted unpickler.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from ..errors import UnknownFormatError

__all__ = ["HEAD_BYTES", "detect", "get", "names", "writable"]

HEAD_BYTES = 4096

# name -> (module, what it can be: a "file", a "dir" or "any"), in sniff order: more specific first.
# The kind spares detection importing and asking modules that cannot apply.
_FORMATS: dict[str, tuple[str, str]] = {
    "safeckpt": ("safeckpt.formats.safeckpt", "file"),
    "safeckpt-sharded": ("safeckpt.formats.safeckpt_sharded", "any"),
    "safetensors": ("safeckpt.formats.safetensors_file", "file"),
    "accelerate": ("safeckpt.formats.accelerate", "dir"),  # before hf-sharded: it holds a model.safetensors too
    "hf-sharded": ("safeckpt.formats.hf_sharded", "any"),
    "dcp": ("safeckpt.formats.dcp", "dir"),
    "torch": ("safeckpt.formats.torch_pickle", "file"),
}


def names() -> list[str]:
    """Every registered format name, in sniff order."""
    return list(_FORMATS)


def get(name: str) -> ModuleType:
    """The module implementing format ``name``.

    Example:
        >>> get("safeckpt").EXTENSIONS
        ('.safeckpt',)
    """
    try:
        return importlib.import_module(_FORMATS[name][0])
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(_FORMATS)}") from None


def writable() -> list[str]:
    """Names of the formats that can be written."""
    return [n for n in _FORMATS if hasattr(get(n), "write")]


def detect(path: str | os.PathLike[str]) -> ModuleType:
    """The format module that reads ``path``, chosen by content (the extension breaks ties).

    Raises ``FileNotFoundError`` for a missing path and `UnknownFormatError`, listing the
    formats tried, when none recognises it.

    Example:
        >>> detect("model.safetensors").NAME
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
    hits = []
    for name, (_, can_be) in _FORMATS.items():
        if can_be not in (kind, "any"):
            continue
        module = get(name)
        if module.sniff(head, p):
            if suffix in module.EXTENSIONS:
                return module  # the first hit the extension agrees with: later ones cannot win the tie
            hits.append(module)
    if not hits:
        what = "directory" if p.is_dir() else f"file ({p.stat().st_size} bytes)"
        raise UnknownFormatError(
            f"{path}: not a checkpoint safeckpt can read; this {what} matched none of the formats tried: "
            f"{', '.join(n for n, (_, k) in _FORMATS.items() if k in (kind, 'any'))}"
        )
    return hits[0]
