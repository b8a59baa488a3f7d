"""Human sizes: "5GB", "500MB", "2GiB" or a number of bytes."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a number with a decimal (KB, MB, GB, TB) or binary (KiB, MiB,
    GiB, TiB) unit, as the Hugging Face tools write them.

    Example:
        >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1024)
        (5000000000, 2147483648, 1024)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {size!r} as a size; write it like '5GB', '500MB', '2GiB' or a number of bytes"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive, got {size!r}")
    return value


def format_size(n: int) -> str:
    """``n`` bytes the way `parse_size` reads them back, to three significant digits.

    Example:
        >>> format_size(512), format_size(1_234_567), format_size(5 * 10**9)
        ('512 B', '1.23 MB', '5 GB')
    """
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale * 0.9995:  # 999_999 B is "1 MB", not "1e+03 KB"
            value = n / scale
            return f"{value:.3g} {unit}" if value < 999.5 else f"{value:.0f} {unit}"
    return f"{n} B"
