"""Where a checkpoint's bytes come from: a local file, a Hugging Face cache entry fetched on first
read, or an fsspec URL read by byte ranges.

Format readers work on local paths: they sniff, parse headers and list directories there. A
remote checkpoint is therefore presented as a *view*, a local directory whose small files are
real and whose tensor files are *placeholders* (sparse files of the real size holding only the
real header). The code that builds a view (``hub.py`` for ``hf://``, ``_remote.py`` for fsspec
URLs) hands an `Opener` for it to `serve`; a reader asks `file` for the bytes of a path, and gets a
`MappedFile` for an ordinary file or the opener's source for a placeholder:

- `HubFile`: the whole file is downloaded into the Hub cache on first read and linked over the
  placeholder, then mapped like any file;
- `UrlFile`: one tensor is one ranged read of exactly its bytes. A whole load streams: `fill`
  fetches the ranges of the tensors that go straight into their targets (a module's parameters)
  in parts of `STREAM_PART` bytes, several at once, each part copied into the targets it holds as
  soon as it arrives, then dropped (memory: a few parts, never the file); what is left of a
  file read whole (``map``, after `prefetch`: an optimizer's state, a plain load) is fetched with
  large parallel ranged reads, skipping the ranges already filled.

Every source has the `MappedFile` interface: ``path``, ``open()``, ``map``, ``tensor(offset,
nbytes, dtype, shape)`` and ``local`` (False where ``open()`` is not a real file).

Example:
    >>> f = file(Path("run.safeckpt"))          # a local file: mapped as before
    >>> f.tensor(128, 16, torch.float32, (4,))
"""

from __future__ import annotations

import bisect
import io
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ._fs import MappedFile
from .errors import CorruptCheckpointError

if TYPE_CHECKING:  # a tensor is made only when one is read: opening a file needs no torch
    import torch

__all__ = ["HubFile", "Opener", "UrlFile", "file", "fill", "opener_of", "prefetch", "probe_header", "run", "serve"]

# Uploads go in parts of PART bytes (S3's minimum is 5 MiB); a whole file is fetched in ranges of
# at least FETCH_PART bytes, up to WORKERS at once.
PART = 16 << 20
FETCH_PART = 64 << 20  # the smallest range of a whole-file fetch
STREAM_PART = 64 << 20  # a streamed fill's ranged reads: memory is WORKERS of these at most
GAP = 64 << 10  # targets this close share a ranged read (the bytes between are read and dropped)
WORKERS = 8
MAX_HEADER = 100_000_000  # the safetensors library's own limit


def probe_header(head: bytes, size: int, get: Callable[[int, int], bytes]) -> bytes | None:
    """The header (length prefix + JSON) of a remote safetensors-family file of ``size`` bytes,
    given its first bytes ``head`` and ``get(start, end)`` for more (one more request where the
    header is longer than ``head``); None if the file does not start with a safetensors header.

    Example:
        >>> probe_header(first_64k, size, lambda a, b: fetch_range(url, a, b))[:8]
        b'x\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
    """
    if len(head) < 8:
        return None
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER or 8 + n > size:
        return None
    if len(head) < 8 + n:
        head += get(len(head), 8 + n)
    head = head[: 8 + n]
    return head if len(head) == 8 + n and head[8:].lstrip(b" \t\r\n")[:1] == b"{" else None


class Opener:
    """The sources of one view's placeholders: ``add(path, make)`` records how to open the
    placeholder at ``path``; `file` calls ``make(path, expect_size)`` the first time a reader asks.

    Example:
        >>> op = Opener(view_root, "s3://bucket/run")
        >>> op.add(view_root / "model.safetensors", lambda p, n: UrlFile(p, n, get_range, url))
        >>> serve(op)
    """

    def __init__(self, root: Path, where: str) -> None:
        self.root = Path(os.path.realpath(root))
        self.where = where  # what messages name: the URL, not the view's local path
        self.shown: tuple[str, str] | None = None  # (the view's local path, the URL errors name instead)
        self._makers: dict[str, Callable[[Path, int | None], MappedFile]] = {}
        self._open: dict[str, MappedFile] = {}
        self._lock = threading.Lock()

    def add(self, path: Path, make: Callable[[Path, int | None], MappedFile]) -> None:
        self._makers[os.path.realpath(path)] = make

    def discard(self, path: Path) -> None:
        """Stop serving ``path`` (a placeholder that has become a real file)."""
        self._makers.pop(os.path.realpath(path), None)
        self._open.pop(os.path.realpath(path), None)

    def source(self, path: Path, expect_size: int | None) -> MappedFile | None:
        key = os.path.realpath(path)
        with self._lock:
            if key in self._open:
                return self._open[key]
            make = self._makers.get(key)
            if make is None:
                return None
            src = self._open[key] = make(path, expect_size)
            return src

    def sources(self) -> list[MappedFile]:
        """A source for every placeholder of the view (opened now where not yet)."""
        return [s for p in list(self._makers) if (s := self.source(Path(p), None)) is not None]


# View roots and their openers. Keyed by root, not by file: a reader that opens a shard lazily
# (long after `open` returned) finds the opener of the view the shard lies in.
_served: dict[str, Opener] = {}
_served_lock = threading.Lock()


def serve(opener: Opener) -> None:
    """Make `file` read the placeholders under ``opener.root`` through ``opener``.

    Example:
        >>> serve(Opener(view_root, "s3://bucket/run"))
    """
    with _served_lock:
        _served[str(opener.root)] = opener


def opener_of(path: str | os.PathLike[str]) -> Opener | None:
    """The opener serving the view ``path`` lies in, or None for an ordinary path.

    Example:
        >>> opener_of(Path("run.safeckpt")) is None   # an ordinary file
        True
    """
    if not _served:
        return None
    real = Path(os.path.realpath(path))
    for p in (real, *real.parents):
        op = _served.get(str(p))
        if op is not None:
            return op
    return None


def file(path: Path, expect_size: int | None = None, f: BinaryIO | None = None) -> MappedFile:
    """The bytes of ``path`` for a reader: its opener's source for a placeholder of a view, else
    the file itself, mapped (from ``f`` where given, the open file its header was read from).

    Example:
        >>> file(Path("model.safetensors"), 1024).tensor(8 + 88, 16, torch.float32, (4,))
    """
    op = opener_of(path)
    src = op.source(path, expect_size) if op is not None else None
    return src if src is not None else MappedFile(path, expect_size, f)


class Whole:
    """What `prefetch` returns: while the caller keeps it, the files of its view are read whole
    (on their first tensor read, in a few large ranged reads) and their buffers kept here."""

    __slots__ = ("__weakref__", "buffers")

    def __init__(self) -> None:
        self.buffers: dict[int, mmap.mmap] = {}  # id(UrlFile): its bytes


def prefetch(path: str | os.PathLike[str]) -> Whole:
    """Mark every placeholder of the view ``path`` is in as read whole (before a load of the whole
    checkpoint: a few large ranged reads rather than one per tensor) while the caller keeps the
    returned object; nothing is fetched yet: tensors that `fill` streams into their targets first
    are not fetched again.

    Example:
        >>> whole = prefetch(view)        # keep it while loading
        >>> safeckpt.load(view)
    """
    whole = Whole()
    op = opener_of(path)
    for src in op.sources() if op is not None else []:
        if isinstance(src, UrlFile):
            src.whole = weakref.ref(whole)
    return whole


def fill(pairs: list[tuple[UrlFile, int, memoryview]]) -> None:
    """Stream the bytes at ``(file, offset)`` into each ``memoryview`` (a target's memory): per
    file, the ranges are read in parts of `STREAM_PART` bytes, `WORKERS` at once, and each part is
    copied into the targets it overlaps as soon as it arrives, then dropped.

    Example:
        >>> fill([(url_file, 128, memoryview(param_bytes))])
    """
    by_file: dict[int, tuple[UrlFile, list[tuple[int, memoryview]]]] = {}
    for f, offset, view in pairs:
        by_file.setdefault(id(f), (f, []))[1].append((offset, view))
    for f, jobs in by_file.values():
        f.fill(jobs)


class HubFile(MappedFile):
    """A Hub placeholder: ``fetch()`` downloads the real file into the Hub cache, links it over the
    placeholder and returns its path; every read but the header's happens after that."""

    def __init__(self, path: Path, expect_size: int | None, fetch: Callable[[], Path]) -> None:
        super().__init__(path, expect_size)
        self._fetch = fetch

    def open(self) -> BinaryIO:
        f = open(self._fetch(), "rb")  # noqa: SIM115 - the caller closes it
        if os.fstat(f.fileno()).st_size != self._stamp[0]:  # a fetched file is another inode: size must match
            f.close()
            raise CorruptCheckpointError(f"{self.path}: the file changed after it was opened; open it again")
        return f


class _Buffer(mmap.mmap):
    """Anonymous memory holding a fetched file. ``madvise`` is a no-op: advice meant for a file's
    pages (``MADV_DONTNEED`` drops them to be re-read) would zero fetched bytes here."""

    def madvise(self, *args: Any) -> None:
        return None


class UrlFile(MappedFile):
    """A file at an fsspec URL: a tensor is one ranged read of its bytes; ``map`` fetches it whole;
    `fill` streams byte ranges into targets.

    ``path`` is the view's placeholder (what readers see); ``get(start, end)`` reads a byte range
    of the object at ``url``. A whole fetch is kept while a tensor cut from it lives (or the `Whole`
    `prefetch` returned), so reads after it cost no request.
    """

    local = False

    def __init__(self, path: Path, expect_size: int | None, get: Callable[[int, int], bytes], url: str) -> None:
        super().__init__(path, expect_size)
        self.get, self.url = get, url
        self._weak: weakref.ref[_Buffer] | None = None
        self._fetching = threading.Lock()
        self.whole: weakref.ref[Whole] | None = None  # set by `prefetch`: read the file whole
        self._filled: list[tuple[int, int]] = []  # ranges `fill` streamed into targets: not in the buffer

    def fill(self, jobs: list[tuple[int, memoryview]]) -> None:
        """Stream the bytes at each ``offset`` into its ``memoryview`` (see the module `fill`)."""
        jobs = sorted((o, v) for o, v in jobs if len(v))
        for offset, view in jobs:
            self.check_range(offset, len(view), self.url)
        buf = self._fetched()
        if buf is not None and not any(a < o + len(v) and o < b for o, v in jobs for a, b in self._filled):
            for offset, view in jobs:  # already here (an optimizer's state was read first): no second transfer
                view[:] = memoryview(buf)[offset : offset + len(view)]
            return
        whole = self.whole() if self.whole is not None else None
        # read whole, the bytes between targets are wanted too (they go to the whole read's buffer)
        gap = self._stamp[0] if whole is not None and id(self) not in whole.buffers else GAP
        spans: list[tuple[int, int]] = [(0, 0)] if gap > GAP else []
        for offset, view in jobs:  # neighbouring targets (a file's tensors, in order) merge into one range
            end = offset + len(view)
            if spans and offset <= spans[-1][1] + gap:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((offset, end))
        parts = [(a, min(a + STREAM_PART, b)) for a, b in spans for a in range(a, b, STREAM_PART)]
        starts = [o for o, _ in jobs]
        with self._fetching:
            # a file read whole (an optimizer's state follows): its rest is fetched alongside, not
            # after, in a few large ranges (what lies between targets comes with their parts)
            rest: tuple[_Buffer, list[tuple[int, int]]] | None = None
            if whole is not None and id(self) not in whole.buffers:
                rest = self._whole_ranges(self._filled + spans)
                whole.buffers[id(self)] = rest[0]
            self._filled += [(o, o + len(v)) for o, v in jobs]

        def fetch(part: tuple[int, int]) -> None:
            lo, hi = part
            data = memoryview(self._range(lo, hi))
            # the targets overlapping [lo, hi): those starting before hi, from the last starting at or before lo
            i, at = max(bisect.bisect_right(starts, lo) - 1, 0), lo
            while i < len(jobs) and jobs[i][0] < hi:
                offset, view = jobs[i]
                a, b = max(lo, offset), min(hi, offset + len(view))
                if a < b:
                    view[a - offset : b - offset] = data[a - lo : b - lo]
                    if rest is not None and a > at:  # bytes between targets: for the file's whole read
                        rest[0][at:a] = data[at - lo : a - lo]
                    at = max(at, b)
                i += 1
            if rest is not None and at < hi:
                rest[0][at:hi] = data[at - lo :]

        def fetch_rest(span: tuple[int, int]) -> None:
            assert rest is not None
            rest[0][span[0] : span[1]] = self._range(*span)

        run(
            lambda job: job[0](job[1]),
            [(fetch, p) for p in parts] + [(fetch_rest, r) for r in (rest[1] if rest else [])],
        )

    def _range(self, start: int, end: int) -> bytes:
        data = self.get(start, end)
        if len(data) != end - start:
            raise CorruptCheckpointError(
                f"{self.url}: bytes [{start}, {end}) came back as {len(data)} bytes; the object changed "
                "after it was opened (open it again)"
            )
        return data

    @property
    def map(self) -> mmap.mmap:  # type: ignore[override]
        with self._fetching:
            buf = self._weak() if self._weak else None
            if buf is None:
                buf = self._fetch_all([])
                self._weak = weakref.ref(buf)
            return buf

    def _fetched(self) -> mmap.mmap | None:
        """The file's bytes if already fetched (whole, or all but the ranges `fill` streamed)."""
        buf: mmap.mmap | None = self._weak() if self._weak else None
        whole = self.whole() if self.whole is not None else None
        return buf if buf is not None or whole is None else whole.buffers.get(id(self))

    def _unfilled(self, whole: Whole) -> mmap.mmap:
        """The file's bytes but the ranges `fill` streamed into targets (zeros there), fetched once
        and kept by ``whole``."""
        with self._fetching:
            buf = whole.buffers.get(id(self))
            if buf is None:
                buf = whole.buffers[id(self)] = self._fetch_all(list(self._filled))
            return buf

    def _fetch_all(self, skip: list[tuple[int, int]]) -> _Buffer:
        buf, spans = self._whole_ranges(skip)

        def get(span: tuple[int, int]) -> None:
            buf[span[0] : span[1]] = self._range(*span)

        run(get, spans)
        return buf

    def _whole_ranges(self, skip: list[tuple[int, int]]) -> tuple[_Buffer, list[tuple[int, int]]]:
        """A buffer for the whole file, and the ranges to fetch into it (all but ``skip``)."""
        size = self._stamp[0]
        buf = _Buffer(-1, max(size, 1))  # anonymous memory: pages of ranges never fetched cost nothing
        # a few large ranges at once: each request costs little beside its bytes, and several in
        # flight fill a link that one connection does not (a store's per-connection limit)
        part = max(FETCH_PART, -(-size // WORKERS))
        return buf, [(a, min(a + part, b)) for a0, b in _complement(skip, size) for a in range(a0, b, part)]

    def open(self) -> BinaryIO:
        return io.BytesIO(self.map[:])

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        self.check_range(offset, nbytes, self.url)
        buf: mmap.mmap | None = self._weak() if self._weak else None
        whole = self.whole() if self.whole is not None else None
        if buf is None and whole is not None and not any(a < offset + nbytes and offset < b for a, b in self._filled):
            buf = self._unfilled(whole)
        if buf is not None:
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
            if offset % dtype.itemsize:
                raw = raw.clone()
        else:
            raw = torch.frombuffer(bytearray(self._range(offset, offset + nbytes)), dtype=torch.uint8)
        return raw.view(dtype).reshape(shape)


def _complement(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of ``[0, size)`` no range of ``ranges`` covers."""
    out, at = [], 0
    for a, b in sorted(ranges):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < size:
        out.append((at, size))
    return out


def run(fn: Callable[[Any], None], items: Iterable[Any]) -> None:
    """``fn`` on every item, several at once (network requests that wait, not compute).

    Example:
        >>> run(lambda span: fetch(*span), [(0, 1 << 20), (1 << 20, 2 << 20)])
    """
    items = list(items)
    if len(items) <= 1:
        for i in items:
            fn(i)
        return
    pool = ThreadPoolExecutor(min(WORKERS, len(items)))
    try:
        for _ in pool.map(fn, items):
            pass
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # the first failure stops the ranges not yet begun
        raise
    pool.shutdown(wait=True)
