"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...): read through a view of
placeholders and ranged reads, written by a staged save that is committed all or nothing.

Reading: `view` mirrors the object (or the flat "directory" of objects) in a local temporary
directory. Each safetensors-family file becomes a placeholder holding only its header (one
ranged read of `_sources.PROBE` bytes, a second one for a larger header), served by a
`_sources.UrlFile`: a tensor costs one ranged read of its bytes, a whole load a few large ones.
Other files (an index, a ``.pt``) are downloaded whole.

Writing: `staged` hands the format writer a local path in a temporary directory (so every writer,
whatever system calls it uses, works unchanged), then `commit` uploads it:

- a single file as one streamed multipart upload (fsspec's ``autocommit=False`` file: parts of
  `_sources.PART` bytes, memory bounded by one part) that is completed at the end, or aborted on
  any error. An object store never shows a partial object; a killed save leaves the previous
  object at the URL and an incomplete multipart upload that the store's lifecycle rule
  (``AbortIncompleteMultipartUpload``) removes.
- a directory: every file but the index first, then the index (the commit point) as a
  conditional write on S3 (``If-Match`` the index read before the save, ``If-None-Match: *`` for
  the first one), then the files of older generations are removed. See ``formats/safeckpt-sharded.md``
  §5.1, "Remote commits".
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import posixpath
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import _sources, _storage
from .errors import CheckpointError

__all__ = ["DirectoryCommit", "RankUpload", "commit", "filesystem", "is_url", "named", "staged", "view"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# handled elsewhere: hf:// by hub.py, file:// is a local path
_NOT_FSSPEC = ("hf", "file")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
PROBE = 64 << 10  # the first ranged read of a file: most safetensors headers fit
UPLOAD_CONCURRENCY = 4  # parts of one upload in flight at once
# The names of the files a directory save replaces: the shards of every generation of a sharded
# checkpoint (safeckpt_sharded.shard_name) and of a Hugging Face layout (hf_sharded's pattern).
_SHARDS = re.compile(r"shard-[0-9a-f]{8,64}-\d{5}-\d{5}\.safetensors|.*-\d{5}-of-\d{5}\.safetensors")
_INDEXES = re.compile(r"safeckpt-index\.msgpack|.*\.safetensors\.index\.json")
_TEMP = re.compile(r"\..*\.tmp")


def is_url(path: object) -> bool:
    """Whether ``path`` is an fsspec URL safeckpt reads and writes through fsspec (not ``hf://``,
    which the Hub code handles, nor ``file://``, a local path).

    Example:
        >>> is_url("s3://bucket/run/step-7.safeckpt"), is_url("hf://me/run"), is_url("run/x.safeckpt")
        (True, False, False)
    """
    if not isinstance(path, (str, os.PathLike)):
        return False
    m = _URL.match(os.fspath(path))
    return bool(m) and m.group(1).lower() not in _NOT_FSSPEC  # type: ignore[union-attr]


def local_path(path: str | os.PathLike[str]) -> str:
    """``path`` without a ``file://`` prefix.

    Example:
        >>> local_path("file:///data/run.safeckpt")
        '/data/run.safeckpt'
    """
    text = os.fspath(path)
    return text[len("file://") :] if text.startswith("file://") else text


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path on it; ``storage_options`` go to the
    filesystem (without them its defaults and environment apply: ``AWS_ENDPOINT_URL``, ...).
    On S3, connection timeouts and retries are bounded unless given, so an unreachable endpoint
    is an error within seconds, never a hang.

    Example:
        >>> fs, path = filesystem("s3://bucket/run/step-7.safeckpt", {"anon": False})
        >>> path
        'bucket/run/step-7.safeckpt'
    """
    import fsspec

    protocol = _URL.match(url).group(1).lower()  # type: ignore[union-attr]
    opts = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 120)
        config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        opts["config_kwargs"] = config
    try:
        return fsspec.core.url_to_fs(url, **opts)  # type: ignore[no-any-return]
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        fix = f"pip install 'safeckpt[{extra}]'" if extra else f"install the fsspec implementation of {protocol}://"
        raise ImportError(
            f"{url}: reading or writing {protocol}:// needs {e.name or 'its fsspec package'}: {fix}"
        ) from e
    except ValueError as e:
        raise ValueError(f"{url}: fsspec cannot open this URL ({e})") from e


@contextlib.contextmanager
def named(url: str) -> Iterator[None]:
    """Re-raise what fsspec and its stores raise as the same kind of error naming ``url`` and the fix.

    Example:
        >>> with named("s3://bucket/run.safeckpt"):
        ...     fs.info("bucket/run.safeckpt")   # FileNotFoundError naming the URL and the fix
    """
    try:
        yield
    except (CheckpointError, FileExistsError):  # ours name the URL already; the store's 412 is below
        raise
    except FileNotFoundError as e:
        err = FileNotFoundError(
            errno.ENOENT, f"{url}: no such object, or its bucket does not exist ({_brief(e)}); check the URL"
        )
        err.filename = url
        raise err from e
    except PermissionError as e:
        err2 = PermissionError(
            errno.EACCES,
            f"{url}: access denied ({_brief(e)}); check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, or storage_options=) and the bucket's permissions",
        )
        err2.filename = url
        raise err2 from e
    except (OSError, TimeoutError) as e:
        err3 = OSError(getattr(e, "errno", None), f"{url}: {_brief(e)}")
        err3.filename = url
        raise err3 from e
    except Exception as e:  # a client library's own error (botocore's connection errors, aiohttp's)
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "google", "gcsfs", "s3fs"):
            raise OSError(f"{url}: {type(e).__name__}: {_brief(e)}; check the endpoint and the network") from e
        raise


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# -- reading ---------------------------------------------------------------------------------------

_views: list[Path] = []
_views_lock = threading.Lock()


def view(url: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """A local path that reads as the object (or directory of objects) at ``url``: small files
    downloaded, tensor files as placeholders whose bytes are read by range on demand.

    Example:
        >>> ckpt = safeckpt.open(view("s3://bucket/run/step-7.safeckpt"))   # the header only
    """
    fs, rpath = filesystem(url, storage_options)
    rpath = rpath.rstrip("/")
    with named(url):
        fs.invalidate_cache(rpath)  # another process may have written it since this one listed it
        info = fs.info(rpath)
    root = Path(tempfile.mkdtemp(prefix="safeckpt-view-"))
    with _views_lock:
        if not _views:
            atexit.register(_remove_views)
        _views.append(root)
    opener = _sources.Opener(root, url)
    name = posixpath.basename(rpath) or "checkpoint"
    if info["type"] == "directory":
        with named(url):
            entries = fs.ls(rpath, detail=True)
        files = [
            (e["name"], int(e["size"]))
            for e in entries
            if e["type"] == "file" and not _TEMP.fullmatch(posixpath.basename(e["name"]))
        ]
        (root / name).mkdir()
        url = url.rstrip("/")
        jobs = [
            (fs, p, n, root / name / posixpath.basename(p), f"{url}/{posixpath.basename(p)}", opener) for p, n in files
        ]
        _sources.run(lambda job: _place(*job), jobs)
    else:
        _place(fs, rpath, int(info["size"]), root / name, url, opener)
    opener.shown = (str(root / name), url)
    _sources.serve(opener)
    return root / name


@contextlib.contextmanager
def urls_in_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """An error raised inside names the URL a view of ``path`` stands for, not the view's local path.

    Example:
        >>> with urls_in_errors(view):
        ...     formats.detect(view)   # UnknownFormatError naming s3://..., not /tmp/safeckpt-view-...
    """
    try:
        yield
    except Exception as e:
        op = _sources.opener_of(path)
        if op is not None and op.shown is not None:
            local, url = op.shown
            e.args = tuple(a.replace(local, url) if isinstance(a, str) else a for a in e.args)
            if isinstance(e, OSError) and isinstance(e.filename, str):
                e.filename = e.filename.replace(local, url)
            if isinstance(e, CheckpointError):  # the fields callers decide on, not only the text
                e.path = e.path and e.path.replace(local, url)
                e.hint = e.hint and e.hint.replace(local, url)
        raise


def _place(fs: Any, rpath: str, size: int, local: Path, url: str, opener: _sources.Opener) -> None:
    """Put the file ``rpath`` in the view at ``local``: a placeholder if it has a safetensors
    header, else its bytes."""

    def get(start: int, end: int) -> bytes:
        with named(url):
            return bytes(fs.cat_file(rpath, start=start, end=end))

    head = get(0, min(size, PROBE)) if size else b""
    header = _sources.probe_header(head, size, get)
    _storage.placeholder(local, head if header is None else header, size)
    if header is not None:  # the tensors' bytes are read where they lie, range by range
        opener.add(local, lambda p, n: _sources.UrlFile(p, n, get, url))
        return
    spans = [(a, min(a + _sources.PART, size)) for a in range(len(head), size, _sources.PART)]

    def fill(span: tuple[int, int]) -> None:
        _storage.write_at(local, span[0], get(*span))

    _sources.run(fill, spans)


def _remove_views() -> None:
    for root in _views:
        with contextlib.suppress(OSError):  # at exit: a view left behind is only scratch space
            _storage.remove_tree(root)


# -- writing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A local path (in a new temporary directory) to write the checkpoint for ``url`` to; on a
    clean exit it is committed to ``url`` (`commit`), on an error nothing reaches the store.

    Example:
        >>> with staged("s3://bucket/run/step-7.safeckpt") as local:
        ...     formats.get("safeckpt").write(ckpt, local)
    """
    fs, rpath = filesystem(url, storage_options)
    tmp = Path(tempfile.mkdtemp(prefix="safeckpt-upload-"))
    try:
        local = tmp / (posixpath.basename(rpath.rstrip("/")) or "checkpoint")
        yield local
        commit(fs, local, rpath.rstrip("/"), url)
    finally:
        with contextlib.suppress(OSError):
            _storage.remove_tree(tmp)


def commit(fs: Any, local: Path, rpath: str, url: str) -> None:
    """Upload the file or flat directory ``local`` to ``rpath`` all or nothing (see the module
    docstring); errors name ``url``.

    Example:
        >>> commit(fs, Path("/tmp/x/step-7"), "bucket/run/step-7", "s3://bucket/run/step-7")
    """
    with named(url):
        if local.is_dir():
            _commit_dir(fs, local, rpath, url)
        else:
            put_file(fs, local, rpath)
        fs.invalidate_cache(rpath)


def put_file(fs: Any, local: Path, rpath: str) -> None:
    """One streamed upload of ``local`` to ``rpath``, completed at the end or aborted on an error.
    On S3, s3fs's multipart upload (`UPLOAD_CONCURRENCY` parts of `_sources.PART` bytes in flight:
    memory is bounded by those, aborted on any error); elsewhere an fsspec file opened with
    ``autocommit=False`` (committed at the end, discarded on an error), else fsspec's ``put_file``,
    as atomic as the store's own writes.

    Example:
        >>> put_file(fs, Path("/tmp/x/step-7.safeckpt"), "bucket/run/step-7.safeckpt")
    """
    if hasattr(fs, "_upload_file_part_concurrent"):  # s3fs
        fs.put_file(os.fspath(local), rpath, chunksize=_sources.PART, max_concurrency=UPLOAD_CONCURRENCY)
        return
    try:
        out = fs.open(rpath, "wb", autocommit=False, block_size=_sources.PART)
    except (TypeError, NotImplementedError):
        out = None
    if out is None or not hasattr(out, "commit"):
        if out is not None:
            out.close()
        fs.put_file(os.fspath(local), rpath)
        return
    try:
        with open(local, "rb") as src:
            while chunk := src.read(_sources.PART):
                out.write(chunk)
        out.close()
        out.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            out.discard()
        raise


def _commit_dir(fs: Any, local: Path, rpath: str, url: str) -> None:
    names = sorted(os.listdir(local))
    index = [n for n in names if _INDEXES.fullmatch(n)]
    commit = DirectoryCommit(fs, rpath, url, index[0] if index else None)
    commit.start()
    written = [n for n in names if n not in index]
    commit.upload(local, written)
    try:
        for n in index:  # the commit point
            commit.commit_index((local / n).read_bytes(), written)
    except BaseException:
        commit.abandon()
        raise
    if not index:
        commit.remove_stale(written)


class DirectoryCommit:
    """The remote half of a directory save (formats/safeckpt-sharded.md §5.1), split so several
    processes can share it: the committing one reads the store's state first (`__init__`: the
    listing, the index's ETag), every process `upload`s its own files, the committing one
    `commit_index`es last and removes older generations; a failed save's processes `abandon`
    (remove what they uploaded: never committed, nobody reads it).

    Example:
        >>> c = DirectoryCommit(fs, "bucket/run/step-7", "s3://bucket/run/step-7", "safeckpt-index.msgpack")
        >>> c.start()
        >>> c.upload(Path("/tmp/stage"), ["shard-1a2b3c4d5e6f-00000-00000.safetensors"])
        >>> c.commit_index(index_bytes, all_shard_names)
    """

    def __init__(self, fs: Any, rpath: str, url: str, index: str | None) -> None:
        self.fs, self.rpath, self.url, self.index = fs, rpath, url, index
        self.before: list[str] = []
        self.etag: str | None = None
        self.uploaded: list[str] = []

    def start(self) -> None:
        """Read what the save replaces (the committing process, before any upload): the listing,
        and the index's ETag, the condition of `commit_index`."""
        with named(self.url):
            self.before = _listing(self.fs, self.rpath)
            if self.index is not None:
                self.etag = _etag(self.fs, f"{self.rpath}/{self.index}")

    def upload(self, local: Path, names: list[str]) -> None:
        """Upload the files ``names`` of the directory ``local`` (several at once), each all or
        nothing; on an error, those already uploaded are removed."""
        done: list[str] = []

        def put(n: str) -> None:
            put_file(self.fs, local / n, f"{self.rpath}/{n}")
            done.append(n)

        try:
            with named(self.url):
                _sources.run(put, names)
        except BaseException:
            self._remove(done)
            raise
        finally:
            self.uploaded += done

    def commit_index(self, data: bytes, files: list[str]) -> None:
        """Write the index ``data`` (the commit point; conditional on S3), then remove the files of
        other generations listed before the save (``files`` are this save's, every process's).
        Where the index is refused, ``files`` are removed: this save never happened."""
        assert self.index is not None
        try:
            with named(self.url):
                _put_index(self.fs, data, f"{self.rpath}/{self.index}", self.etag, self.url)
        except BaseException:
            self._remove(files)
            raise
        self.remove_stale(files)

    def remove_stale(self, files: list[str]) -> None:
        """Remove the shards and temporaries listed before the save that are not ``files`` (this
        save's): a leftover old shard is garbage, never a broken checkpoint."""
        keep = {*files, self.index}
        self._remove([n for n in self.before if n not in keep and (_SHARDS.fullmatch(n) or _TEMP.fullmatch(n))], True)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.rpath)

    def abandon(self) -> None:
        """After a failed save: remove what this process uploaded."""
        self._remove(self.uploaded)
        self.uploaded = []

    def _remove(self, names: list[str], old: bool = False) -> None:
        ours = [f"{self.rpath}/{n}" for n in names if old or n not in self.before]
        with contextlib.suppress(Exception):  # never committed: only space is at stake
            if ours:
                self.fs.rm(ours)


class RankUpload:
    """One process's part of a sharded save to ``url`` from several processes (a save across
    ranks): it writes its files to ``local`` (a fresh temporary directory), `upload`s them; the
    ``committer`` (rank 0) read the store's state when this was made and `commit_index`es once
    every process's files are up. `abandon` after a failure anywhere; `close` at the end.

    Example:
        >>> up = RankUpload("s3://bucket/run/step-7", None, rank == 0, "safeckpt-index.msgpack")
        >>> up.upload(["shard-1a2b3c4d5e6f-00001-00000.safetensors"])   # written under up.local
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, committer: bool, index: str) -> None:
        fs, rpath = filesystem(url, storage_options)
        self.commit = DirectoryCommit(fs, rpath.rstrip("/"), url.rstrip("/"), index)
        if committer:
            self.commit.start()
        self.local = Path(tempfile.mkdtemp(prefix="safeckpt-upload-"))

    def upload(self, names: list[str]) -> None:
        """Upload the files ``names`` written under ``local``, then free their local space."""
        self.commit.upload(self.local, names)
        for n in names:
            _storage.remove(self.local / n)

    def commit_index(self, data: bytes, files: list[str]) -> None:
        """Commit the index ``data`` naming ``files`` (every process's; see `DirectoryCommit`)."""
        self.commit.commit_index(data, files)

    def abandon(self) -> None:
        self.commit.abandon()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            _storage.remove_tree(self.local)


def _listing(fs: Any, rpath: str) -> list[str]:
    fs.invalidate_cache(rpath)
    try:
        return [posixpath.basename(p) for p in fs.ls(rpath, detail=False)]
    except FileNotFoundError:
        return []


def _etag(fs: Any, rpath: str) -> str | None:
    try:
        info = fs.info(rpath)
    except FileNotFoundError:
        return ""  # none yet: the first save must create it
    return info.get("ETag") or info.get("etag")  # type: ignore[no-any-return]


def _put_index(fs: Any, data: bytes, rpath: str, etag: str | None, url: str) -> None:
    """Write the index with a condition on S3: the index this save started from (``etag``), or
    none (``""``). Elsewhere it is a plain write: the last writer wins."""
    if not hasattr(fs, "call_s3") or etag is None:
        fs.pipe_file(rpath, data)
        return
    bucket, key, _ = fs.split_path(rpath)
    cond = {"IfNoneMatch": "*"} if etag == "" else {"IfMatch": etag}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
    except OSError as e:
        # s3fs turns 412 Precondition Failed into FileExistsError (If-None-Match) or EINVAL (If-Match)
        if isinstance(e, FileExistsError) or "pre-condition" in str(e) or "PreconditionFailed" in str(e):
            raise FileExistsError(
                errno.EEXIST,
                f"{url}: another save committed this checkpoint while this one was writing; this save's shards "
                "were written but not committed (the other save's checkpoint is intact): save again",
            ) from e
        raise


def convert_to(convert: Any, src: Any, dst: str, overwrite: bool, storage_options: Any, args: dict[str, Any]) -> str:
    """`safeckpt.convert` to the URL ``dst``: converted (and verified) into a local temporary,
    then committed; an existing object is refused unless ``overwrite``.

    Example:
        >>> convert_to(safeckpt.convert, "friend.pt", "s3://bucket/friend.safeckpt", False, None, options)
        's3://bucket/friend.safeckpt'
    """
    fs, rpath = filesystem(dst, storage_options)
    with named(dst):
        fs.invalidate_cache(rpath)
        exists = fs.exists(rpath)
    if exists and not overwrite:
        raise FileExistsError(
            errno.EEXIST, f"{dst} already exists; pass overwrite=True to replace it, or choose another destination"
        )
    keep = ("format", "filter", "max_shard_size", "key", "allow", "verify", "progress", "storage_options")
    with staged(dst, storage_options) as local:
        convert(src, local, overwrite=True, **{k: args[k] for k in keep})
    return dst


# -- a directory of checkpoints on a store (CheckpointManager) ---------------------------------------


class UrlPath(str):
    """A URL (a ``str``) with the few `pathlib.Path` methods `CheckpointManager` uses, answered by
    its store: ``/``, ``name``, ``is_file``, ``is_dir``, ``exists``, ``stat``, ``unlink``,
    ``rmdir``, ``scandir``. Listings are never cached: another process may have written since.

    Example:
        >>> run = UrlPath("s3://bucket/run")
        >>> [e.name for e in run.scandir()]
        ['step-000000100.safeckpt', 'step-000000200.safeckpt']
    """

    storage_options: Mapping[str, Any] | None
    fs: Any
    rpath: str

    def __new__(
        cls, url: str, storage_options: Mapping[str, Any] | None = None, where: tuple[Any, str] | None = None
    ) -> UrlPath:
        self = super().__new__(cls, url.rstrip("/"))
        self.storage_options = storage_options
        self.fs, self.rpath = where if where is not None else filesystem(self, storage_options)
        self.rpath = self.rpath.rstrip("/")
        return self

    def __truediv__(self, name: str) -> UrlPath:
        return UrlPath(f"{self}/{name}", self.storage_options, (self.fs, f"{self.rpath}/{name}"))

    @property
    def name(self) -> str:
        return posixpath.basename(self)

    def _info(self) -> dict[str, Any] | None:
        with named(self):
            self.fs.invalidate_cache(self.rpath)
            try:
                return self.fs.info(self.rpath)  # type: ignore[no-any-return]
            except FileNotFoundError:
                return None

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info["type"] == "file"

    def is_dir(self) -> bool:
        info = self._info()
        return info is not None and info["type"] == "directory"

    def exists(self) -> bool:
        return self._info() is not None

    def is_symlink(self) -> bool:
        return False

    def stat(self) -> os.stat_result:
        info = self._info()
        if info is None:
            raise FileNotFoundError(errno.ENOENT, f"{self}: no such object", str(self))
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
        seconds = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
        return os.stat_result((0, 0, 0, 0, 0, 0, int(info.get("size") or 0), 0, int(seconds), 0))

    def unlink(self) -> None:
        with named(self):
            self.fs.rm_file(self.rpath)

    def rmdir(self) -> None:
        """Remove what is left of a sharded checkpoint: the shards and temporaries its format names
        (a store has no empty directories; other files stay)."""
        with named(self):
            ours = [e.path for e in self.scandir() if _SHARDS.fullmatch(e.name) or _TEMP.fullmatch(e.name)]
            if ours:
                self.fs.rm([p.rpath for p in ours])

    def scandir(self) -> list[_Entry]:
        with named(self):
            self.fs.invalidate_cache(self.rpath)
            try:
                found = self.fs.ls(self.rpath, detail=True)
            except FileNotFoundError:
                return []
        return [_Entry(self / posixpath.basename(e["name"].rstrip("/")), e["type"]) for e in found]


class _Entry:
    """What `os.scandir` yields, for a `UrlPath` listing."""

    def __init__(self, path: UrlPath, kind: str) -> None:
        self.path, self.name, self._kind = path, path.name, kind

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return self._kind == "file"

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return self._kind == "directory"

    def stat(self, follow_symlinks: bool = True) -> os.stat_result:
        return self.path.stat()


def scandir(directory: Any) -> Any:
    """`os.scandir`, or a `UrlPath`'s listing.

    Example:
        >>> [e.name for e in scandir(UrlPath("s3://bucket/run"))]
        ['step-000000100.safeckpt']
    """
    return directory.scandir() if isinstance(directory, UrlPath) else os.scandir(directory)


def remove_url(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the checkpoint at ``url``: the object, or every object under a sharded checkpoint's
    prefix (its index first, so it stops being a checkpoint before its shards go); missing is fine.

    Example:
        >>> remove_url("s3://bucket/run/step-000000100")
    """
    fs, rpath = filesystem(url, storage_options)
    with named(url):
        fs.invalidate_cache(rpath)
        try:
            info = fs.info(rpath)
        except FileNotFoundError:
            return
        if info["type"] != "directory":
            fs.rm_file(rpath)
            return
        names = [posixpath.basename(p) for p in fs.ls(rpath, detail=False)]
        for n in names:
            if _INDEXES.fullmatch(n):
                fs.rm_file(f"{rpath}/{n}")
        fs.rm(rpath, recursive=True)
