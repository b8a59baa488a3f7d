"""The kernel's floor for `convert`: how long ``copy_file_range`` takes to copy a file's tensor
bytes when the copy is, or is not, what ``cp`` does (the whole file, offset 0 to its end).

A conversion copies a source's data region (after its header; for a ``.pt``, each storage of the
zip on its own) behind a new header, so it can never be cp's copy. This measures the same bytes
both ways, each followed by ``fsync``, after ``os.sync()``, alternating, median of ``--repeat``:

    python benchmarks/copy_floor.py /tmp/safeckpt-bench/state-100000000/full.safetensors

Rows: ``whole file`` (cp's copy), ``data region -> after a header`` (a safetensors-based convert),
``each .pt storage -> packed`` (a .pt convert; only for a torch zip, whose storages it lists with
safeckpt.open). Nothing is timed but the copy and its fsync.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def _copy(src: int, dst: int, offset: int, nbytes: int) -> None:
    while nbytes:
        n = os.copy_file_range(src, dst, nbytes, offset)
        if n <= 0:
            raise OSError(f"copy_file_range copied nothing at {offset}")
        offset, nbytes = offset + n, nbytes - n


def timed(source: Path, out: Path, prefix: int, ranges: list[tuple[int, int]]) -> float:
    """Seconds to write ``prefix`` header bytes, then copy ``ranges`` of ``source`` back to back, and fsync."""
    out.unlink(missing_ok=True)
    os.sync()
    src = os.open(source, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        if prefix:
            os.write(dst, b" " * prefix)
        for offset, nbytes in ranges:
            _copy(src, dst, offset, nbytes)
        os.fsync(dst)
        return time.perf_counter() - t0
    finally:
        os.close(src)
        os.close(dst)
        out.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a .safetensors, .safeckpt or .pt file (in the page cache: run twice)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, help="where the copies go (default: beside the source)")
    args = p.parse_args()
    out = args.out or args.source.with_name("copy_floor.tmp")
    size = args.source.stat().st_size
    import safeckpt

    ckpt = safeckpt.open(args.source)
    spans = sorted({(r.span.offset, r.nbytes) for r in ckpt.tensors().values() if r.span is not None})
    data = sum(n for _, n in spans)
    cases: dict[str, Callable[[], float]] = {"whole file (cp)": lambda: timed(args.source, out, 0, [(0, size)])}
    if ckpt.format == "torch":
        cases["each .pt storage -> packed"] = lambda: timed(args.source, out, size - data, spans)
    else:
        start = size - data
        cases["data region -> after a header"] = lambda: timed(args.source, out, start, [(start, data)])
        cases["data region -> after a header 1000 B longer"] = lambda: timed(args.source, out, start + 1000, [(start, data)])
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, run in cases.items():
            times[name].append(run())
    base = statistics.median(times["whole file (cp)"])
    print(f"{args.source} ({size / 1e9:.3f} GB; {len(spans)} tensor ranges, {data / 1e9:.3f} GB of tensor data)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:45s} {med * 1e3:8.1f} ms  {med / base:5.2f}x  [{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}]")


if __name__ == "__main__":
    main()
