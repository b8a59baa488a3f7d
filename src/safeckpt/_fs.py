"""Atomic, streaming file writes and memory-mapped reads shared by every format."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CorruptCheckpointError

try:  # ISA-L computes zlib's CRC-32 about 4x faster; optional (pip install 'safeckpt[fast]')
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32

# Writes go out in 1 MiB pieces: measured faster than larger writes into the page cache here
# (benchmarks/), and far below the 2 GiB - 4 KiB Linux accepts in one write() call.
CHUNK = 1 << 20


def target_file(path: str | os.PathLike[str]) -> Path:
    """The file a save to ``path`` writes: symlinks followed, a directory refused, parents created."""
    p = Path(os.path.realpath(os.fspath(path)))
    if p.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; give a file path (e.g. {Path(path) / 'checkpoint.safeckpt'}), "
            "or pass max_shard_size= to write a sharded checkpoint directory"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: a temporary sibling, fsync, then ``os.replace``.

    On any exception the temporary file is removed and an existing file at ``path`` is untouched.
    The new file's mode follows the umask, like any file the user creates.

    Example:
        >>> with atomic_write("out.bin") as f:
        ...     f.write(b"data")
    """
    target = target_file(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f  # type: ignore[misc]
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checksum(data: memoryview | bytes) -> int:
    """The CRC-32 (zlib's) of ``data``, in pieces that release the GIL."""
    view = memoryview(data).cast("B")
    crc = 0
    for i in range(0, len(view), 64 << 20):
        crc = crc32(view[i : i + (64 << 20)], crc)
    return crc


def write_all(f: BinaryIO, data: memoryview | bytes) -> None:
    """Write every byte of ``data``, in pieces no larger than `CHUNK`."""
    view = memoryview(data).cast("B")
    fd = f.fileno()
    pos, n = 0, len(view)
    while pos < n:
        pos += os.write(fd, view[pos : pos + CHUNK])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor's logical value, C-ordered, without a copy when it is already
    contiguous on the CPU (non-contiguous, lazily conjugated or non-CPU tensors are copied once)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


# Placeholders for files whose bytes are fetched on first read (the shards of a Hub checkpoint,
# see hub.py): a sparse file of the real size holding only the real header. REMOTE maps its real
# path to a function that fetches the real file and returns its local path; `MappedFile` maps that.
REMOTE: dict[str, Callable[[], Path]] = {}


def remote(path: str | os.PathLike[str]) -> Callable[[], Path] | None:
    """The fetch function if ``path`` is a placeholder registered in `REMOTE`, else None."""
    return REMOTE.get(os.path.realpath(path)) if REMOTE else None


class MappedFile:
    """A file mapped once (copy-on-write) and cut into tensors on demand.

    Tensors share the map, so opening many costs nothing until their pages are touched; writing
    to a tensor never changes the file. The file must still be the one that was opened (same
    size and modification time), else `CorruptCheckpointError`.
    """

    def __init__(self, path: Path, expect_size: int | None = None) -> None:
        self.path = path
        st = os.stat(path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._fetch = remote(path)
        if expect_size is not None and st.st_size != expect_size:
            raise CorruptCheckpointError(f"{path}: expected {expect_size} bytes, the file has {st.st_size}")
        self._map: mmap.mmap | None = None

    @property
    def map(self) -> mmap.mmap:
        if self._map is None:
            with self.open() as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self._stamp[0] else None
        assert self._map is not None
        return self._map

    def open(self) -> BinaryIO:
        """The file, opened for reading, checked to be the one that was opened (a Hub placeholder
        is fetched first)."""
        f = open(self._fetch() if self._fetch else self.path, "rb")  # noqa: SIM115 - the caller closes it
        st = os.fstat(f.fileno())
        # a fetched placeholder is another file: only its size must match
        if (st.st_size, self._stamp[1] if self._fetch else st.st_mtime_ns) != self._stamp:
            f.close()
            raise CorruptCheckpointError(f"{self.path}: the file changed after it was opened; open it again")
        return f

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor stored at ``offset`` (``nbytes`` long) as ``dtype`` and ``shape``, backed by the map."""
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if offset < 0 or offset + nbytes > self._stamp[0]:
            raise CorruptCheckpointError(
                f"{self.path}: tensor bytes [{offset}, {offset + nbytes}) lie past the end of the file"
            )
        raw = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset)
        if offset % dtype.itemsize:
            raw = raw.clone()  # unaligned data from another writer: copy rather than hand out a misaligned view
        return raw.view(dtype).reshape(shape)


@dataclass(frozen=True)
class Span:
    """Where a tensor's exact bytes (C order, little-endian) lie in a file, so a writer can copy
    them file to file without reading them into the process; ``crc32`` if the source recorded it."""

    file: MappedFile
    offset: int
    crc32: int | None = None


def copy_span(out: BinaryIO, span: Span, nbytes: int) -> bool:
    """Append ``nbytes`` at ``span`` to ``out`` with ``copy_file_range`` (no pass through user
    space). False, with nothing written, where the kernel cannot do it (the caller writes instead)."""
    if not hasattr(os, "copy_file_range"):
        return False
    start = os.lseek(out.fileno(), 0, os.SEEK_CUR)
    with span.file.open() as src:
        pos, left = span.offset, nbytes
        try:
            while left:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30), pos)
                if n == 0:
                    raise CorruptCheckpointError(f"{span.file.path}: ends before byte {pos + left}")
                pos, left = pos + n, left - n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            os.lseek(out.fileno(), start, os.SEEK_SET)
            os.ftruncate(out.fileno(), start)
            return False
    return True
