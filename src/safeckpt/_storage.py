"""Every operation that creates, renames or deletes a checkpoint file, and the names it uses.

Formats say what the bytes mean; this module says how they reach the disk without ever leaving a
reader a half-written checkpoint:

- one file: `atomic_write` (a locked temporary sibling, fsync, ``os.replace``) and `remove_stale`
  for what killed saves left;
- a directory of files committed as one (`Layout`, `Generation`): every file of a save carries
  the save's *generation*, the files go first, the index last (the commit), and the files of dead
  generations are swept; a lock held on a per-generation file tells a live save from a dead one;
- `link_or_copy`, `remove`, `new_directory` for the few other moves;
- `Template`: one per file name, from which both the name and the pattern matching it come.

``tests/test_architecture.py`` checks that no other module in ``src/`` creates, renames or
deletes files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import string
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ._fs import CHUNK, write_all
from .errors import CheckpointError, CorruptCheckpointError

try:  # advisory locks mark files a live writer is still writing (POSIX; absent on Windows)
    import fcntl
except ImportError:  # pragma: no cover - depends on the platform
    fcntl = None  # type: ignore[assignment]


# -- names ------------------------------------------------------------------------------------------


class Template:
    """One file name with fields: ``format(**fields)`` gives a name, ``pattern`` matches every name
    it can give (each field a named group), so a writer and the cleaner that finds its files can
    never disagree.

    Example:
        >>> SHARD = Template("shard-{gen}-{rank:05d}.safetensors", gen="[0-9a-f]+", rank=r"\\d{5}")
        >>> SHARD.format(gen="ab12", rank=3)
        'shard-ab12-00003.safetensors'
        >>> SHARD.match("shard-ab12-00003.safetensors")["rank"]
        '00003'
    """

    def __init__(self, text: str, **fields: str) -> None:
        self.text, self.fields = text, fields
        regex = []
        for literal, name, _spec, _conv in string.Formatter().parse(text):
            regex.append(re.escape(literal))
            if name is not None:
                regex.append(f"(?P<{name}>{fields[name]})")
        self.pattern = re.compile("".join(regex))

    def format(self, **values: Any) -> str:
        return self.text.format(**values)

    def match(self, name: str) -> re.Match[str] | None:
        """The fields of ``name`` if this template gives it (a whole-name match), else None."""
        return self.pattern.fullmatch(name)

    def where(self, **fields: str) -> Template:
        """This template with some fields' patterns narrowed (the names it gives are the same).

        Example:
            >>> TEMPORARY.where(name=re.escape("a.bin")).match(".a.bin.0badcafe.tmp") is not None
            True
        """
        return Template(self.text, **{**self.fields, **fields})

    def temporary(self) -> Template:
        """The names `temp_name` gives the temporaries of this template's files."""
        text = TEMPORARY.text.replace("{name}", self.text, 1)
        return Template(text, **self.fields, token=TEMPORARY.fields["token"])

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def literal(name: str) -> Template:
    """A template without fields: one fixed name (``{`` and ``}`` taken literally)."""
    return Template(name.replace("{", "{{").replace("}", "}}"))


# a file being written (`atomic_write`), and a hard link about to be renamed over a file (`link_or_copy`)
TEMPORARY = Template(".{name}.{token}.tmp", name=".+", token="[0-9a-f]{8}")
LINK = Template(".{name}.{token}.link", name=".+", token="[0-9a-f]{8}")


def temp_name(name: str) -> str:
    """A fresh name for a temporary of the file ``name`` (what `atomic_write` creates beside it).

    Example:
        >>> temp_name("step-7.safeckpt")
        '.step-7.safeckpt.3fa9c2d1.tmp'
    """
    return TEMPORARY.format(name=name, token=secrets.token_hex(4))


def temp_pattern(name_regex: str) -> re.Pattern[str]:
    """The names `temp_name` gives temporaries of files whose names match ``name_regex``: one
    template, so a cleaner finds exactly what a killed save left.

    Example:
        >>> bool(temp_pattern(re.escape("step-7.safeckpt")).fullmatch(temp_name("step-7.safeckpt")))
        True
    """
    return TEMPORARY.where(name=name_regex).pattern


# -- one file ---------------------------------------------------------------------------------------


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


def target_dir(path: str | os.PathLike[str], what: str = "a sharded checkpoint") -> Path:
    """The directory a save to ``path`` writes (created, parents too); a file there is refused."""
    root = Path(os.path.realpath(os.fspath(path)))
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{path} is a file; {what} is a directory: pick another path, or remove the file")
    root.mkdir(parents=True, exist_ok=True)
    return root


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


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """`atomic_write` of ``data``.

    Example:
        >>> write_bytes("run/model.safetensors.index.json", b"{}")
    """
    with atomic_write(path) as f:
        write_all(f, data)


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
            if held is False and remove(path):
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


# -- other moves ------------------------------------------------------------------------------------


def remove(path: str | os.PathLike[str]) -> bool:
    """Delete the file (or symlink itself) ``path``; False if it was not there.

    Example:
        >>> remove("run/step-000000100.safeckpt")
        True
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def placeholder(path: str | os.PathLike[str], head: bytes, size: int) -> None:
    """Create ``path`` as a file of ``size`` bytes that holds only ``head``, the rest a hole (sparse):
    what a remote or Hub view puts where a file's bytes are fetched on first read, or filled in.

    Example:
        >>> placeholder("view/model.safetensors", header_bytes, 3_000_000_000)
    """
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def write_at(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    """Write all of ``data`` at ``offset`` into the existing file ``path`` (filling a `placeholder`);
    a short write is continued, never left as a hole that reads as zeros.

    Example:
        >>> write_at("view/model.bin", 1 << 20, part)
    """
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        view, at = memoryview(data), offset
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
    finally:
        os.close(fd)


def remove_tree(path: str | os.PathLike[str], *, missing_ok: bool = True) -> None:
    """Delete ``path``: a directory with everything in it, or a file or a symlink (itself).

    Example:
        >>> remove_tree("ckpts/epoch=0-step=4.ckpt")
    """
    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` hold ``src``'s bytes atomically while ``src`` stays: a hard link to the real
    file (symlinks followed) under a temporary name renamed over ``dst``, else (across devices,
    or where links are refused) an atomic copy.

    Example:
        >>> link_or_copy("cache/blobs/3f2a", "view/model.safetensors")
    """
    dst = Path(dst)
    tmp = dst.with_name(LINK.format(name=dst.name, token=secrets.token_hex(4)))
    try:
        os.link(os.path.realpath(src), tmp)
    except OSError:
        with open(src, "rb") as s, atomic_write(dst) as f:
            while piece := s.read(CHUNK):
                write_all(f, piece)
        return
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


@contextlib.contextmanager
def new_directory(root: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Build a directory in a temporary sibling of ``root`` (yielded), then rename it to ``root``
    in one step. Whatever stood at ``root`` (a directory a crash left incomplete) is removed
    first; if another process renamed its own complete one there meanwhile, theirs is kept.
    The temporary never outlives the build.

    Example:
        >>> with new_directory(Path("views/abc"), lambda d: (d / "manifest.json").is_file()) as tmp:
        ...     (tmp / "x").mkdir()
    """
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.with_name(temp_name(root.name))
    try:
        yield tmp
        try:
            os.replace(tmp, root)
        except OSError:
            if not complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- a directory committed as one ---------------------------------------------------------------------


GENERATION = "[0-9a-f]{8,64}"


def new_generation() -> str:
    """A fresh generation id (48 random bits, hex) naming one save's files."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Layout:
    """How a directory committed by generations names its files.

    Attributes:
        index: the index's name; writing it (atomically, last) commits a save.
        files: the data files, with a ``{gen}`` field: every save writes new ones.
        lock: the per-generation file a save in progress holds locked (``{gen}`` field).
        committed: the generation the index in a directory names (raises
            `CorruptCheckpointError` if the index is missing or unreadable).
    """

    index: Template
    files: Template
    lock: Template
    committed: Callable[[Path], str]

    def generation_of(self, name: str) -> tuple[bool, str | None]:
        """Whether ``name`` is one of this layout's files (data files, their temporaries, index
        temporaries), and the generation it belongs to (None for an index temporary)."""
        for t in (self.files, self.files.temporary(), self.index.temporary()):
            m = t.match(name)
            if m:
                return True, m.groupdict().get("gen")
        return False, None

    def _lock_generation(self, name: str) -> str | None:
        m = self.lock.match(name)
        return m["gen"] if m else None

    @contextlib.contextmanager
    def committing(self, root: Path) -> Iterator[None]:
        """Hold the directory's lock: one save at a time writes the index and collects garbage, so a
        cleanup never deletes the generation another save has just committed."""
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            lock(fd, wait=True)  # where directories cannot be locked (some network filesystems): go on unlocked
            yield
        finally:
            os.close(fd)

    def current(self, root: Path) -> str | None:
        """The committed generation, or None if there is no readable index."""
        with contextlib.suppress(CorruptCheckpointError, OSError):
            return self.committed(root)
        return None

    def sweep(self, root: Path) -> list[Path]:
        """Remove the files of dead generations other than the committed one (none if the index is
        unreadable: a damaged checkpoint's files are not ours to judge)."""
        with self.committing(root):
            try:
                keep = self.committed(root)
            except CorruptCheckpointError:
                if os.path.lexists(root / self.index.format()):
                    return []
                keep = ""
            return self.collect_garbage(root, keep)

    def collect_garbage(self, root: Path, keep: str) -> list[Path]:
        """Delete the files (and leftover temporaries) of every generation but ``keep`` and those a
        save in progress holds (`Generation`); other files stay."""
        removed = []
        live: dict[str, bool] = {}
        for entry in os.scandir(root):
            ours, gen = self.generation_of(entry.name)
            if not ours:
                gen = self._lock_generation(entry.name)
                ours = gen is not None
            if ours and gen is None and is_held(Path(entry.path)):
                continue  # an index temporary a concurrent save is writing (only without directory locks)
            if gen is not None and gen != keep and gen not in live:
                live[gen] = is_held(root / self.lock.format(gen=gen)) is True
            ours = ours and gen != keep and not live.get(gen or "") and entry.is_file(follow_symlinks=False)
            if ours and remove(entry.path):
                removed.append(Path(entry.path))
        if removed:
            fsync_dir(root)
        return removed

    def discard(self, root: Path, generation: str) -> None:
        """After a failed save: remove its own files (their space is often what it lacked), unless
        its index made it in before the failure."""
        if self.current(root) == generation:
            return
        with contextlib.suppress(OSError):
            for entry in os.scandir(root):
                if self.generation_of(entry.name)[1] == generation:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def commit(self, root: Path, generation: str, index: bytes, files: dict[str, int]) -> Path:
        """Write ``index`` (last, atomically) once every file of ``files`` (name: size) is there,
        then delete the files of other generations. Until then the previous checkpoint stays whole."""
        with self.committing(root):
            for name, expected in files.items():  # a concurrent save's cleanup must not have taken them
                size = os.stat(root / name).st_size if (root / name).is_file() else None
                if size != expected:
                    raise CorruptCheckpointError(
                        f"{root / name}: this save's shard is gone or changed before the commit (another "
                        "process cleaning the directory?); nothing was committed, the previous checkpoint is untouched"
                    )
            write_bytes(root / self.index.format(), index)
            self.collect_garbage(root, keep=generation)
        return root

    def delete(self, root: Path) -> None:
        """Delete the checkpoint in directory ``root``: its index first (so it is no longer a
        checkpoint), then its files of every generation, then the directory if that left it empty
        (files the layout does not name stay, and so does the directory then).

        Example:
            >>> LAYOUT.delete(Path("run/step-000000100"))
        """
        remove(root / self.index.format())
        self.collect_garbage(root, keep="")
        with contextlib.suppress(OSError):
            os.rmdir(root)


class Generation:
    """A fresh generation for a save into ``root``, marked in progress until `release` (or the
    process's death) by a lock held on its `Layout.lock` file: another save's cleanup never
    deletes the files of a generation still being written. What killed saves left (dead
    generations other than the committed one) is swept first, so their space is free again.

    Example:
        >>> with Generation(root, LAYOUT) as generation:
        ...     LAYOUT.commit(root, generation, index_bytes, {name: size})
    """

    def __init__(self, root: Path, layout: Layout) -> None:
        layout.sweep(root)
        while True:
            self.generation = new_generation()
            self._path = root / layout.lock.format(gen=self.generation)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            self._file = os.fdopen(fd, "rb+", buffering=0)  # closed (so unlocked) when collected, at the latest
            # a cleanup that found the file unlocked just before the lock was taken may have removed it
            if not (lock(fd, wait=True) and os.fstat(fd).st_nlink == 0):
                return
            self._file.close()

    def release(self) -> None:
        """The save is over (committed or failed): its generation is an ordinary one from now on."""
        if not self._file.closed:
            remove(self._path)
            self._file.close()

    def __enter__(self) -> str:
        return self.generation

    def __exit__(self, *_: object) -> None:
        self.release()


def remove_names(directory: Path, names: Iterable[str]) -> None:
    """Delete the files ``names`` in ``directory`` (missing ones are fine), then make it durable."""
    for name in names:
        remove(directory / name)
    fsync_dir(directory)


# -- a directory whose file names cannot carry a generation --------------------------------------------


def replace_set(
    directory: Path,
    names: list[str],
    write: Callable[[Path, int], None],
    write_index: Callable[[list[str]], None],
    *,
    index: Path,
    live: set[str],
    stage: Callable[[str], str],
    leftovers: re.Pattern[str],
    also_old: Iterable[str] = (),
    index_is_new: bool = False,
) -> None:
    """Replace the set of files ``index`` names in ``directory`` by ``names``, for layouts whose
    names are fixed (Hugging Face's ``model-00001-of-00003.safetensors``): a reader sees the old
    set or the new one, never a mix.

    ``write(path, i)`` writes file ``i`` atomically at ``path``: its own name, or ``stage(name)``
    where the committed set (``live``) still uses that name. ``write_index(names)`` writes the
    index (atomically) naming them: under the staged names first, which commits; then each staged
    file is put in place (`link_or_copy`) and the index rewritten with the final names. A set of
    one file with no index standing is committed by its own rename (no index is written, and one
    left from a sharded set is removed at the end). Only after the commit are the old set's files
    (``live``, ``also_old``, and names matching ``leftovers`` that killed saves staged) removed.
    A failure before the commit removes this save's files, and the index if ``index_is_new``
    (written by the caller just before, naming the old files).

    Example:
        >>> replace_set(d, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
        ...             write_shard, write_index, index=d / "model.safetensors.index.json",
        ...             live=set(), stage=staged_name, leftovers=STAGING.pattern)
    """
    n = len(names)
    on_disk: list[str] = []
    committed = False
    try:
        for i, name in enumerate(names):
            target = name if name not in live else stage(name)
            write(directory / target, i)
            on_disk.append(target)
            committed = n == 1 and target == name and not index.exists()  # replacing the lone file is the commit
        if on_disk != names:  # the old set still uses some of these names: commit under the staged names first
            write_index(on_disk)
            committed = True
            for tmp, name in zip(on_disk, names, strict=True):
                if tmp != name:
                    link_or_copy(directory / tmp, directory / name)
        if n > 1 or index.exists():  # one file replacing a sharded set: an index names it until the old set is gone
            write_index(names)
        committed = True
    except BaseException:
        if not committed:
            remove_names(directory, [name for name in on_disk if name not in live])
            if index_is_new:
                remove(index)
        raise
    old = (
        live | set(also_old) | set(on_disk) | {m.group(0) for m in map(leftovers.fullmatch, os.listdir(directory)) if m}
    )
    remove_names(directory, sorted(old - set(names)) + ([index.name] if n == 1 and index.exists() else []))
