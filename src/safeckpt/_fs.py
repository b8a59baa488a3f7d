"""Memory-mapped reads, checksums and the byte-level helpers every format shares (files are
created, renamed and deleted in `_storage`)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from .errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

try:  # ISA-L computes zlib's CRC-32 about 4x faster; optional (pip install 'safeckpt[fast]')
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32

# Writes go out in 1 MiB pieces: measured faster than larger writes into the page cache here
# (benchmarks/), and far below the 2 GiB - 4 KiB Linux accepts in one write() call.
CHUNK = 1 << 20


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
    import torch

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


class MappedFile:
    """A file mapped once (copy-on-write) and cut into tensors on demand.

    Tensors share the map, so opening many costs nothing until their pages are touched; writing
    to a tensor never changes the file. The file must still be the one that was opened (same
    size and modification time), else `CorruptCheckpointError`. The sources of remote bytes
    (`_sources`) derive from it; ``local`` says whether ``open()`` is a real file.
    """

    local = True

    def __init__(self, path: Path, expect_size: int | None = None, f: BinaryIO | None = None) -> None:
        self.path = path
        st = os.fstat(f.fileno()) if f is not None else os.stat(path)
        # the inode too: a file replaced by a rename within the mtime granularity has the same size and mtime
        self._stamp = (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
        if expect_size is not None and st.st_size != expect_size:
            raise CorruptCheckpointError(f"{path}: expected {expect_size} bytes, the file has {st.st_size}")
        self._map: mmap.mmap | None = None
        if f is not None and st.st_size:
            # mapped from the file its header was read from: a save replacing the path meanwhile
            # or later cannot mix another file's bytes into this one (the map keeps the old file)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    @property
    def map(self) -> mmap.mmap:
        if self._map is None:
            with self.open() as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self._stamp[0] else None
        assert self._map is not None
        return self._map

    def open(self) -> BinaryIO:
        """The file, opened for reading, checked to be the one that was opened."""
        f = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino) != self._stamp:
            f.close()
            raise CorruptCheckpointError(f"{self.path}: the file changed after it was opened; open it again")
        return f

    def check_range(self, offset: int, nbytes: int, shown: str, key: str | None = None) -> None:
        """`CorruptCheckpointError` naming ``shown`` (the file, or the URL it stands for) and the
        tensor ``key`` unless ``[offset, offset + nbytes)`` lies within the file as it was opened;
        reads none of it (and imports no torch). An empty range is anywhere.

        Example:
            >>> MappedFile(Path("model.safetensors")).check_range(96, 16, "model.safetensors", "w")
        """
        size = self._stamp[0]
        if nbytes and (offset < 0 or offset + nbytes > size):
            what = f"tensor {key!r} bytes" if key is not None else "tensor bytes"
            raise CorruptCheckpointError(
                f"{shown}: {what} [{offset}, {offset + nbytes}) lie past the end of the file ({size} bytes)",
                path=shown,
                key=key,
                hint="the file is damaged",
            )

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor stored at ``offset`` (``nbytes`` long) as ``dtype`` and ``shape``, backed by the map."""
        import torch

        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        self.check_range(offset, nbytes, str(self.path))
        raw = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset)
        if offset % dtype.itemsize:
            raw = raw.clone()  # unaligned data from another writer: copy rather than hand out a misaligned view
        return raw.view(dtype).reshape(shape)


class Span(NamedTuple):
    """Where a tensor's exact bytes (C order, little-endian) lie in a file, so a writer can copy
    them file to file without reading them into the process; ``crc32`` if the source recorded it.
    (A tuple: a reader makes one per tensor, and a frozen dataclass cost 4x as much to build.)"""

    file: MappedFile
    offset: int
    crc32: int | None = None


def copy_span(out: BinaryIO, span: Span, nbytes: int, source: BinaryIO | None = None) -> bool:
    """Append ``nbytes`` at ``span`` to ``out`` with ``copy_file_range`` (no pass through user
    space). False, with nothing written, where the kernel cannot do it (the caller writes instead).
    ``source``: ``span.file`` already opened (`MappedFile.open`), for a caller copying many spans."""
    if not hasattr(os, "copy_file_range") or not span.file.local:
        return False
    start = os.lseek(out.fileno(), 0, os.SEEK_CUR)
    with contextlib.nullcontext(source) if source is not None else span.file.open() as src:
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


# -- files named by an index or a URI --------------------------------------------------------------


def bad_member_name(name: object) -> bool:
    """True unless ``name`` is a bare file name: no separator, no drive, not ``.``/``..``, no NUL.

    Example:
        >>> bad_member_name("shard-1.safetensors"), bad_member_name("../x"), bad_member_name("C:x")
        (False, True, True)
    """
    return (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or bool(PureWindowsPath(name).drive)
        or os.path.isabs(name)
    )


def member_problem(directory: Path, name: str, *, cache_blobs: bool = False) -> str | None:
    """Why ``directory / name`` is not a file a checkpoint's index may name, or None if it is.

    The one rule every directory format and the Hub cache follow: a bare name (no ``..`` once
    decoded), a regular file (a FIFO would hang the reader, a device would never end), and no
    symlink out of ``directory`` -- except, with ``cache_blobs``, into the ``blobs/`` of the
    Hugging Face cache repo whose snapshot ``directory`` is.

    Example:
        >>> member_problem(Path("ckpt"), "../secret")
        'is not a bare file name'
    """
    if bad_member_name(name):
        return "is not a bare file name"
    path = directory / name
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(directory)) and not (cache_blobs and _cache_blob(directory, real)):
        return f"is a symlink to {real}, outside the checkpoint directory"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    return None


def _cache_blob(directory: Path, real: Path) -> bool:
    """Is ``real`` a blob of the HF cache repo whose snapshot ``directory`` is (or is inside)?"""
    root = Path(os.path.realpath(directory))
    for snap in (root, *root.parents):
        repo = snap.parent.parent
        if snap.parent.name == "snapshots" and repo.name.split("--")[0] in ("models", "datasets", "spaces"):
            return real.parent == repo / "blobs"
    return False
