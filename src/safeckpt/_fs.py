"""Atomic, streaming file writes and memory-mapped reads shared by every format."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import BinaryIO

import torch

from .errors import CheckpointError, CorruptCheckpointError

try:  # advisory locks mark files a live writer is still writing (POSIX; absent on Windows)
    import fcntl
except ImportError:  # pragma: no cover - depends on the platform
    fcntl = None  # type: ignore[assignment]

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

    On any exception the temporary file is removed and an existing file at ``path`` is untouched;
    an ``OSError`` (a full disk, a file size limit, a read-only directory) is re-raised as the same
    ``OSError`` subclass naming ``path``. The temporary file is locked (``flock``) while it is
    written, so temporaries of killed saves, which nobody holds, are removed by the next save to
    the same path and a concurrent writer's are left alone. The new file's mode follows the
    umask, like any file the user creates.

    Example:
        >>> with atomic_write("out.bin") as f:
        ...     f.write(b"data")
    """
    target = target_file(path)
    # before creating ours: a save killed at any instant then leaves at most one temporary behind
    remove_stale(target.parent, temp_pattern(re.escape(target.name)))
    try:
        tmp, fd = _locked_temp(target)
    except OSError as e:
        raise naming(e, target) from e
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f  # type: ignore[misc]
            os.fsync(f.fileno())
            os.replace(tmp, target)  # while still locked: the temporary is never seen unlocked
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            raise naming(e, target) from e
        raise
    fsync_dir(target.parent)


def temp_name(name: str) -> str:
    """A fresh name for a temporary of the file ``name`` (what `atomic_write` creates beside it).

    Example:
        >>> temp_name("step-7.safeckpt")
        '.step-7.safeckpt.3fa9c2d1.tmp'
    """
    return f".{name}.{secrets.token_hex(4)}.tmp"


def temp_pattern(name_regex: str) -> re.Pattern[str]:
    """The names `temp_name` gives temporaries of files whose names match ``name_regex``: one
    template, so a cleaner finds exactly what a killed save left.

    Example:
        >>> bool(temp_pattern(re.escape("step-7.safeckpt")).fullmatch(temp_name("step-7.safeckpt")))
        True
    """
    return re.compile(rf"\.{name_regex}\.[0-9a-f]{{8}}\.tmp")


def _locked_temp(target: Path) -> tuple[Path, int]:
    """A new temporary file beside ``target``, created and locked. A cleaner that found it
    unlocked in the instant between the two may have removed it: then take another one."""
    while True:
        tmp = target.with_name(temp_name(target.name))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        if lock(fd, wait=True) and os.fstat(fd).st_nlink == 0:
            os.close(fd)
            continue
        return tmp, fd


def lock(fd: int, wait: bool = False) -> bool:
    """Take an exclusive ``flock`` on ``fd``; False where the filesystem has no locks.
    Without ``wait``, ``BlockingIOError`` if another open file holds the lock."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
            raise
        return False
    return True


def is_held(path: Path) -> bool | None:
    """Whether some open file (of any process, this one included) holds a lock on ``path``:
    True, False, or None where it cannot be told (no such file counts as False)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        return None if not lock(fd) else False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale(directory: Path, pattern: re.Pattern[str], keep: str = "") -> list[Path]:
    """Remove the files in ``directory`` whose names match ``pattern`` and that no live writer
    holds locked (what killed saves leave behind). Files whose lock state cannot be told are
    left unless a day old. Never raises: cleaning up is a courtesy, not part of the save."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name == keep or not pattern.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            path = Path(entry.path)
            held = is_held(path)
            if held is None:
                with contextlib.suppress(OSError):
                    held = time.time() - entry.stat(follow_symlinks=False).st_mtime < 86400
            if held is False:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
    return removed


# what to do about each errno a save can meet, said once, after the path
_HINTS = {
    errno.ENOSPC: "the disk is full: free space or save elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or save elsewhere",
    errno.EFBIG: "the file would exceed the file size limit (ulimit -f) or the filesystem's largest file",
    errno.EACCES: "no permission to write there: check the directory's permissions or save elsewhere",
    errno.EPERM: "no permission to write there: check the directory's permissions or save elsewhere",
    errno.EROFS: "the filesystem is read-only: save elsewhere",
    errno.EIO: "the storage reported an I/O error: check the disk",
}


def naming(e: OSError, target: Path, what: str = "file") -> OSError:
    """``e`` as the same kind of ``OSError`` whose message and ``filename`` name ``target``, the
    ``what`` a failed save leaves as it was (an error already naming a file inside it says which)."""
    cause, inner = getattr(e, "safeckpt_cause", None), getattr(e, "filename", None)
    cause = cause or e.strerror or str(e)
    if inner and os.fspath(inner) != str(target):
        cause = f"{cause} (writing {os.path.basename(inner)})"
    hint = _HINTS.get(e.errno or 0, "")
    # the reassurance only where there was something to keep: a first save leaves nothing behind
    left = (
        f"the previous {what} there is untouched"
        if target.exists() or target.is_symlink()
        else f"no {what} was left there"
    )
    err = OSError(e.errno, f"cannot save {target}: {cause}; {hint + '; ' if hint else ''}{left}")
    err.filename = str(target)
    err.safeckpt_cause = cause  # type: ignore[attr-defined]
    return err


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
    if not hasattr(os, "copy_file_range") or not span.file.local:
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
