"""Element and byte counts of tensor shapes, and the int64 limit torch puts on a shape.

One place for arithmetic that every reader validates hostile headers with and every writer
sizes shards with.

Example:
    >>> numel((16, 8)), nbytes(torch.float32, (16, 8)), fits_int64((0, 2**62, 2))
    (128, 512, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

__all__ = ["fits_int64", "nbytes", "numel"]


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of ``shape`` (``1`` for a 0-dim tensor).

    Example:
        >>> numel(()), numel((3, 0, 5))
        (1, 0)
    """
    return math.prod(shape)


class _Sized(Protocol):
    """A ``torch.dtype`` or a torch-free `_dtypes.DType`: all a byte count needs."""

    @property
    def itemsize(self) -> int: ...


def nbytes(dtype: _Sized, shape: Iterable[int]) -> int:
    """Bytes of data of a tensor of ``dtype`` and ``shape``.

    Example:
        >>> nbytes(torch.bfloat16, (4, 4))
        32
    """
    return math.prod(shape) * dtype.itemsize


def fits_int64(shape: Iterable[int]) -> bool:
    """True if torch can make a tensor of ``shape``: it computes strides even when a 0 dim means no
    elements, so the product of the non-zero dims must stay below 2**63. Stops at the first
    product past the limit, so a long hostile shape costs no big-int arithmetic.

    Example:
        >>> fits_int64((2**31, 2**31)), fits_int64((0, 2**40, 2**40))
        (True, False)
    """
    span = 1
    for d in shape:
        span *= d or 1
        if span >= 1 << 63:
            return False
    return True
