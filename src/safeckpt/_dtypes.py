"""Tensor element types by name, without importing torch.

The torch-free read path (headers, pickles, ``inspect``, ``verify``, ``convert`` to safetensors)
describes a tensor's element type with a `DType` row of this table; torch is imported only when a
caller asks for the ``torch.dtype`` (`to_torch`), i.e. when a tensor is materialized.

Example:
    >>> BY_CODE["BF16"].name, BY_STORAGE["FloatStorage"].itemsize, by_name("double").name
    ('bfloat16', 4, 'float64')
    >>> to_torch(BY_CODE["F32"])
    torch.float32
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["BY_CODE", "BY_NAME", "BY_STORAGE", "DTYPES", "DType", "by_name", "of", "to_torch"]


@dataclass(frozen=True)
class DType:
    """One element type: torch's attribute name, bytes per element (a packed sub-byte type such
    as ``float4_e2m1fn_x2`` counts its byte), the safetensors code if safetensors has one, and the
    legacy storage class ``torch.save`` pickles it under, if any."""

    name: str
    itemsize: int
    code: str | None = None
    storage: str | None = None

    def __repr__(self) -> str:
        return f"torch.{self.name}"  # as torch prints it, so a torch-free listing reads the same


DTYPES: tuple[DType, ...] = (
    DType("bool", 1, "BOOL", "BoolStorage"),
    DType("uint8", 1, "U8", "ByteStorage"),
    DType("int8", 1, "I8", "CharStorage"),
    DType("float8_e5m2", 1, "F8_E5M2"),
    DType("float8_e4m3fn", 1, "F8_E4M3"),
    DType("float8_e8m0fnu", 1, "F8_E8M0"),
    DType("float8_e4m3fnuz", 1, "F8_E4M3FNUZ"),
    DType("float8_e5m2fnuz", 1, "F8_E5M2FNUZ"),
    DType("int16", 2, "I16", "ShortStorage"),
    DType("uint16", 2, "U16"),
    DType("float16", 2, "F16", "HalfStorage"),
    DType("bfloat16", 2, "BF16", "BFloat16Storage"),
    DType("int32", 4, "I32", "IntStorage"),
    DType("uint32", 4, "U32"),
    DType("float32", 4, "F32", "FloatStorage"),
    DType("complex64", 8, "C64", "ComplexFloatStorage"),
    DType("float64", 8, "F64", "DoubleStorage"),
    DType("int64", 8, "I64", "LongStorage"),
    DType("uint64", 8, "U64"),
    DType("float4_e2m1fn_x2", 1, "F4"),
    DType("complex128", 16, None, "ComplexDoubleStorage"),
    DType("complex32", 4),
    DType("qint8", 1, None, "QInt8Storage"),
    DType("quint8", 1, None, "QUInt8Storage"),
    DType("qint32", 4, None, "QInt32Storage"),
    DType("quint4x2", 1, None, "QUInt4x2Storage"),
    DType("quint2x4", 1, None, "QUInt2x4Storage"),
    DType("bits1x8", 1),
    DType("bits2x4", 1),
    DType("bits4x2", 1),
    DType("bits8", 1),
    DType("bits16", 2),
)

BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
BY_CODE: dict[str, DType] = {d.code: d for d in DTYPES if d.code}
BY_STORAGE: dict[str, DType] = {d.storage: d for d in DTYPES if d.storage}
# torch's other spellings of the same types (``torch.double is torch.float64``)
_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
}


def by_name(name: str) -> DType:
    """The row for torch's name of a dtype (aliases included); ``KeyError`` if torch has none.

    Example:
        >>> by_name("half") is BY_NAME["float16"]
        True
    """
    return BY_NAME[_ALIASES.get(name, name)]


def of(dtype: Any) -> DType:
    """The row for a ``torch.dtype`` (or a `DType`, returned as is).

    Example:
        >>> of(torch.bfloat16).code
        'BF16'
    """
    return dtype if isinstance(dtype, DType) else BY_NAME[str(dtype).removeprefix("torch.")]


def to_torch(dtype: DType | str) -> Any:
    """The ``torch.dtype`` for a row or a name -- the one place the read path imports torch.

    Example:
        >>> to_torch("float16")
        torch.float16
    """
    import torch

    return getattr(torch, (dtype.name if isinstance(dtype, DType) else by_name(dtype).name))


def torch_loaded() -> bool:
    """Whether torch has been imported in this process (the torch-free paths must keep it False).

    Example:
        >>> torch_loaded()
        True
    """
    return "torch" in sys.modules


def names() -> list[str]:
    """Every name torch has for a dtype (``torch.<name>``): the rows' and torch's other spellings.

    Example:
        >>> "float32" in names() and "double" in names()
        True
    """
    return [*BY_NAME, *_ALIASES]
