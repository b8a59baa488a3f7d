"""torch's small value types without torch: ``torch.Size``, ``torch.device`` and ``torch.layout``
as torch-free stand-ins (a ``torch.dtype`` is a `_dtypes.DType`).

The pickle readers build these while torch is not imported (``safeckpt inspect``, ``convert`` of a
``.pt`` to safetensors), and torch's own objects when it is: `real` makes the choice, and
`to_torch` turns a stand-in into torch's object when a tree is materialized (``to_python``).

Example:
    >>> Size((2, 3)), Device("cuda", 0), Layout("sparse_coo")
    (torch.Size([2, 3]), device(type='cuda', index=0), torch.sparse_coo)
    >>> to_torch(Size((2, 3)))
    torch.Size([2, 3])
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

from . import _dtypes
from .errors import CorruptCheckpointError

__all__ = ["STAND_INS", "Device", "Layout", "Size", "checked_device", "real", "to_torch"]


class Size(tuple):  # type: ignore[type-arg]
    """``torch.Size`` without torch: a tuple of non-negative ints."""

    def __repr__(self) -> str:
        return f"torch.Size({list(self)!r})"


@dataclass(frozen=True)
class Device:
    """``torch.device`` without torch: its type and index."""

    type: str
    index: int | None = None

    def __repr__(self) -> str:
        return f"device(type={self.type!r}" + ("" if self.index is None else f", index={self.index}") + ")"

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@dataclass(frozen=True)
class Layout:
    """``torch.layout`` without torch: its name (``strided``, ``sparse_coo``...)."""

    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"


STAND_INS = (Size, Device, Layout, _dtypes.DType)
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]{1,6})?\Z")


def device(kind: Any, index: Any = None) -> Device:
    """A checked device spec (as ``torch.device(kind, index)`` takes it), without torch.

    Example:
        >>> device("cuda", 1)
        device(type='cuda', index=1)
    """
    if (
        not isinstance(kind, str)
        or not _DEVICE.match(kind)
        or not (index is None or (type(index) is int and 0 <= index < 1 << 20))
    ):
        raise CorruptCheckpointError(f"torch.device({kind!r}, {index!r}) is not a device")
    return Device(kind, index)


def checked_device(kind: Any, index: Any = None) -> Any:
    """``torch.device(kind, index)`` for data read from a file: `CorruptCheckpointError`, never
    torch's ``RuntimeError``, for a kind torch does not know.

    Example:
        >>> checked_device("cuda", 1)
        device(type='cuda', index=1)
    """
    d = device(kind, index)
    import torch

    try:
        return torch.device(d.type) if d.index is None else torch.device(d.type, d.index)
    except RuntimeError as e:
        raise CorruptCheckpointError(f"torch.device({kind!r}): {e}") from None


def to_torch(x: Any) -> Any:
    """torch's object for a stand-in (imports torch); any other value as it is.

    Example:
        >>> to_torch(_dtypes.BY_NAME["bfloat16"]), to_torch(Device("cpu"))
        (torch.bfloat16, device(type='cpu'))
    """
    if isinstance(x, _dtypes.DType):
        return _dtypes.to_torch(x)
    if isinstance(x, Size):
        import torch

        return torch.Size(x)
    if isinstance(x, Device):
        return checked_device(x.type, x.index)
    if isinstance(x, Layout):
        import torch

        return getattr(torch, x.name)
    return x


def real(x: Any) -> Any:
    """`to_torch` if torch is already imported (a caller working with torch gets its types), else
    the stand-in itself (the torch-free paths stay torch-free).

    Example:
        >>> real(Size((1,)))  # in a process that imported torch
        torch.Size([1])
    """
    return to_torch(x) if "torch" in sys.modules else x


def is_a(x: Any, kind: str) -> bool:
    """Whether ``x`` is a ``torch.<kind>`` (``dtype``, ``layout``, ``device``, ``Size``) or its
    stand-in, without importing torch.

    Example:
        >>> is_a(Layout("strided"), "layout"), is_a(_dtypes.BY_NAME["int8"], "dtype"), is_a(3, "dtype")
        (True, True, False)
    """
    if isinstance(x, _KINDS[kind]):
        return True
    t = type(x)
    return t.__module__ == "torch" and t.__name__ == kind


_KINDS: dict[str, type] = {"dtype": _dtypes.DType, "layout": Layout, "device": Device, "Size": Size}


def torch_types() -> tuple[type, ...]:
    """torch's classes for the stand-ins, if torch is imported (else ``()``; nothing imports it).

    Example:
        >>> torch_types()  # in a process that imported torch
        (<class 'torch.Size'>, <class 'torch.dtype'>, <class 'torch.device'>, <class 'torch.layout'>)
    """
    torch = sys.modules.get("torch")
    return () if torch is None else (torch.Size, torch.dtype, torch.device, torch.layout)
