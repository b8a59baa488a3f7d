"""The resource model's shared limits (``formats/resource-model.md``): what any reader may spend on an input.

Every reader runs in O(n log n) time in the size of its input and allocates at most a small constant
times the bytes it reads plus a fixed allowance. This module holds the limits more than one reader
needs: how many distinct keys may share one hash value (hash flooding), how large an integer may be
(it must print), and how far a tensor's logical size may exceed the bytes that store it.

Example:
    >>> guard = KeyGuard()
    >>> for k in (1, 2, (3, 4)):
    ...     guard.add(k)
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = [
    "MAX_INT_BYTES",
    "MAX_SHARED_HASH",
    "MAX_VIEW_EXPANSION",
    "VIEW_ALLOWANCE",
    "HashFloodError",
    "KeyGuard",
    "collidable",
]

# distinct keys of one container that may share one full hash value. Python's str/bytes hashes are
# keyed per process; small ints hash to themselves; only crafted values (ints congruent modulo
# 2**61-1, tuples solved for a hash) collide, and then each insertion compares against all of them
MAX_SHARED_HASH = 64
# an int must print: Python refuses str() of ints over 4300 decimal digits (about 1785 bytes)
MAX_INT_BYTES = 1780
# a file's expanded views (more elements than stored bytes) may together take at most this many
# times the file's size once loaded, plus VIEW_ALLOWANCE
# (a stride-0 view of 2**31 elements over 4 bytes would otherwise become 8 GiB on convert)
MAX_VIEW_EXPANSION = 16
VIEW_ALLOWANCE = 64 << 20
_P = sys.hash_info.modulus  # 2**61 - 1 on 64-bit builds


class HashFloodError(ValueError):
    """More than `MAX_SHARED_HASH` distinct keys of one container share a hash value."""


def collidable(key: Any) -> bool:
    """False for keys whose hashes an attacker cannot make collide in bulk (they need no guard).

    Example:
        >>> collidable("lr"), collidable(3), collidable(2**61 + 5), collidable((1, 2))
        (False, False, True, True)
    """
    t = type(key)
    if t is str or t is bytes or t is bool or key is None:
        return False
    # ints in (-P, P) hash to themselves (only -1 and -2 share one)
    return not (t is int and -_P < key < _P)


class KeyGuard:
    """Counts the distinct keys of one container per hash value; refuses a flood.

    Only `collidable` keys are recorded, so a checkpoint of string and small-int keys costs one
    type check per key.

    Example:
        >>> g = KeyGuard()
        >>> for i in range(100):
        ...     g.add(1 + i * (2**61 - 1))
        Traceback (most recent call last):
        safeckpt._budget.HashFloodError: more than 64 distinct keys share one hash value (a hash-flooding attack)
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[int, list[Any]] = {}

    def add(self, key: Any) -> None:
        if not collidable(key):
            return
        try:
            h = hash(key)
        except TypeError:
            return  # unhashable: the container refuses it itself
        same = self.seen.setdefault(h, [])
        for k in same:
            if k is key or k == key:
                return
        if len(same) >= MAX_SHARED_HASH:
            raise HashFloodError(
                f"more than {MAX_SHARED_HASH} distinct keys share one hash value (a hash-flooding attack)"
            )
        same.append(key)

    def add_all(self, keys: Any) -> None:
        for k in keys:
            self.add(k)
