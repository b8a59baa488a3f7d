"""Hugging Face Hub: push checkpoints, pull them, and read ``hf://`` paths (extra ``safeckpt[hub]``).

Everything goes through the real ``huggingface_hub`` client and its cache. The endpoint, token,
cache and offline mode are read when a function is called (arguments first, then ``HF_ENDPOINT``,
``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), not when a module is imported.

Reading ``hf://owner/name[@revision]/path`` is lazy where the format allows it. The path is pinned
to a commit and mirrored in a *view* directory inside the repo's cache folder
(``<cache>/models--owner--name/safeckpt-views/<commit>/...``): other files are hard links to the
cached downloads, and each safetensors file not yet downloaded is a *placeholder*, a sparse file of
the real size holding only its real header (fetched with one HTTP range request). The format
readers read headers from it as from any file; the first tensor load maps the file through
`_sources.HubFile`, which downloads the real file into the Hub cache then (the view's `_sources.Opener`) and
hard-links it over the placeholder. So opening a sharded checkpoint downloads its index and shard
headers, and loading some of its tensors downloads only the shards that hold them. A directory's
view holds its files, not its sub-folders, and beside safetensors weights it leaves out large
copies in other formats (``pytorch_model.bin``, ``tf_model.h5``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from torch import nn

from . import _sources, _storage
from .errors import CorruptCheckpointError, HubAuthError, HubError, HubNotFoundError

__all__ = ["HubPath", "parse_uri", "pull_from_hub", "push_to_hub", "resolve"]

HEX40 = re.compile(r"[0-9a-f]{40}")
LAZY_SUFFIXES = (".safetensors", ".safeckpt")  # files probed for a safetensors header
# Beside safetensors weights, a view leaves out the other formats' copies of them (a Hub model
# repo often has pytorch_model.bin, tf_model.h5 and flax_model.msgpack too): large files with these
# extensions are never what a safetensors-based checkpoint needs.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".pkl")
OTHER_WEIGHTS_SIZE = 10 << 20
PROBE = 64 << 10  # first range request; most safetensors headers fit
VIEWS = "safeckpt-views"
MANIFEST = "manifest.json"
HF_WEIGHT_FILES = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
_lock = threading.Lock()


def _hf() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.hf_api
    except ImportError:
        raise ImportError(
            "safeckpt needs huggingface_hub for the Hugging Face Hub: pip install 'safeckpt[hub]'"
        ) from None
    return huggingface_hub


# -- settings, read per call -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Hub:
    endpoint: str
    token: str | None
    cache: Path
    offline: bool

    def api(self) -> Any:
        return _hf().HfApi(endpoint=self.endpoint, token=self.token)


def _settings(endpoint: str | None, token: str | None) -> _Hub:
    hf, env = _hf(), os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return _Hub(
        endpoint=(endpoint or env.get("HF_ENDPOINT") or hf.constants.ENDPOINT).rstrip("/"),
        token=token or env.get("HF_TOKEN") or None,
        cache=Path(os.path.expandvars(os.path.expanduser(cache))),
        offline=_offline(),
    )


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE"))
    if flag is None:
        return bool(_hf().constants.HF_HUB_OFFLINE)
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


# -- hf:// paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubPath:
    """A parsed ``hf://`` URI: ``repo_id``, ``revision`` (None: the default branch), ``path`` in the
    repo ("" for its root) and ``repo_type`` (``model``, ``dataset`` or ``space``).

    Example:
        >>> str(HubPath("me/run1", "v2", "ckpt.safeckpt"))
        'hf://me/run1@v2/ckpt.safeckpt'
    """

    repo_id: str
    revision: str | None
    path: str
    repo_type: str = "model"

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{kind}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


def parse_uri(uri: str) -> HubPath:
    """Split ``hf://[datasets/|spaces/]owner/name[@revision][/path]``. A revision containing ``/``
    is written URL-encoded (``@refs%2Fpr%2F1``), except pull-request refs, which may be written as
    they are (``@refs/pr/1``).

    Example:
        >>> parse_uri("hf://me/run1@v2/ckpt/step-100.safeckpt")
        HubPath(repo_id='me/run1', revision='v2', path='ckpt/step-100.safeckpt', repo_type='model')
    """
    if not uri.startswith("hf://"):
        raise ValueError(f"{uri}: not an hf:// URI; write hf://owner/name[@revision]/path")
    parts = uri[len("hf://") :].split("/")
    repo_type = "model"
    if parts[0] in ("models", "datasets", "spaces") and len(parts) > 2:
        repo_type = parts.pop(0)[:-1]
    if len(parts) < 2 or not parts[0] or not parts[1] or "@" in parts[0]:
        raise ValueError(f"{uri}: an hf:// URI names a repo as owner/name: hf://owner/name[@revision]/path")
    name, _, revision = parts[1].partition("@")
    rest = parts[2:]
    if revision == "refs" and len(rest) >= 2 and rest[0] in ("pr", "convert"):
        revision, rest = "/".join(["refs", *rest[:2]]), rest[2:]
    revision = unquote(revision)
    if revision and not is_revision(revision):
        raise ValueError(
            f"{uri}: {revision!r} is not a branch, tag or commit name (revisions name refs, never paths: "
            "no '..', no leading '/' or '.', no control characters)"
        )
    if any(p in (".", "..") for p in rest) or not name:
        raise ValueError(f"{uri}: '.' and '..' are not allowed in an hf:// path")
    return HubPath(f"{parts[0]}/{name}", revision or None, "/".join(p for p in rest if p), repo_type)


_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|@\{|\.\.|//")


def is_revision(rev: str) -> bool:
    """A git ref or commit name as ``git check-ref-format`` accepts them: it is used as a path
    component of the cache (``refs/<rev>``), so it must never climb out of it.

    Example:
        >>> is_revision("v1.0"), is_revision("refs/pr/3"), is_revision("../../etc")
        (True, True, False)
    """
    return (
        0 < len(rev) <= 255
        and not _REF_BAD.search(rev)
        and not rev.startswith(("/", "-"))
        and not rev.endswith(("/", ".", ".lock"))
        and not any(part.startswith(".") for part in rev.split("/"))
    )


def resolve(uri: str, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """A local path that reads as the file or directory ``uri`` names, pinned to one commit.

    Non-safetensors files are downloaded into the Hub cache; safetensors files not yet in it are
    placeholders fetched when a tensor is first read (see the module docstring). A branch or tag is
    looked up once per call; a commit hash (and ``HF_HUB_OFFLINE=1``) needs no request once cached.

    Example:
        >>> resolve("hf://me/run1/checkpoint.safeckpt")
        PosixPath('/home/me/.cache/huggingface/hub/models--me--run1/safeckpt-views/3f2c.../checkpoint.safeckpt')
    """
    loc = parse_uri(uri)
    hub = _settings(endpoint, token)
    with _errors(uri, hub, loc.repo_id, loc.revision, loc.path or None):
        commit = _commit(loc, hub)
        return _view(loc, commit, hub)


def _repo_dir(loc: HubPath, hub: _Hub) -> Path:
    return hub.cache / f"{loc.repo_type}s--{loc.repo_id.replace('/', '--')}"


def _commit(loc: HubPath, hub: _Hub) -> str:
    rev = loc.revision or "main"
    if HEX40.fullmatch(rev):
        return rev
    ref = _repo_dir(loc, hub) / "refs" / rev
    if hub.offline:
        if not ref.is_file():
            raise HubNotFoundError(
                f"{loc}: revision {rev!r} of {loc.repo_id} is not in the local cache ({hub.cache}) and HF_HUB_OFFLINE=1; "
                "load it once online, or unset HF_HUB_OFFLINE"
            )
        sha = ref.read_text().strip()
        if not HEX40.fullmatch(sha):  # it becomes a path component of the cache
            raise HubNotFoundError(f"{loc}: the cached ref {ref} does not hold a commit hash; delete it")
        return sha
    sha = hub.api().repo_info(loc.repo_id, repo_type=loc.repo_type, revision=rev).sha
    if not isinstance(sha, str) or not HEX40.fullmatch(sha):  # the server's answer becomes a cache path too
        raise HubNotFoundError(f"{loc}: the Hub answered {sha!r:.60} for revision {rev!r}, not a commit hash")
    # record the ref as hf_hub_download does, so the same revision resolves offline later
    if not ref.is_file() or ref.read_text() != sha:
        _storage.write_bytes(ref, sha.encode())  # a reader never sees half a hash
    return sha


def _view(loc: HubPath, commit: str, hub: _Hub) -> Path:
    root = _repo_dir(loc, hub) / VIEWS / commit / hashlib.sha1(loc.path.encode()).hexdigest()[:16]
    name = loc.path.rsplit("/", 1)[-1] or loc.repo_id.split("/")[1]
    with _lock:
        if root.is_dir() and _register(root, loc, commit, hub):
            return root / name
        if hub.offline:
            snapshot = _repo_dir(loc, hub) / "snapshots" / commit / loc.path
            if snapshot.exists():  # pulled whole with pull_from_hub / snapshot_download
                return snapshot
            raise HubNotFoundError(
                f"{loc}: not in the local cache ({hub.cache}) and HF_HUB_OFFLINE=1; load or pull it once online, "
                "or unset HF_HUB_OFFLINE"
            )
        # replaces a view left incomplete by a crash; another process's complete one wins
        with _storage.new_directory(root, lambda built: (built / MANIFEST).is_file()) as tmp:
            _build(tmp, name, loc, commit, hub)
        _register(root, loc, commit, hub)
        return root / name


def _build(tmp: Path, name: str, loc: HubPath, commit: str, hub: _Hub) -> None:
    api = hub.api()
    hf = _hf()
    if loc.path:
        found = api.get_paths_info(loc.repo_id, [loc.path], repo_type=loc.repo_type, revision=commit)
        if not found:
            raise HubNotFoundError(
                f"{loc}: no file or folder {loc.path!r} in {loc.repo_id} at revision {loc.revision or 'main'!r}"
            )
        is_dir = not isinstance(found[0], hf.hf_api.RepoFile)
    else:
        is_dir = True
    if is_dir:  # checkpoint directories are flat: sub-folders are other things (other runs, onnx/, ...)
        entries = api.list_repo_tree(
            loc.repo_id, path_in_repo=loc.path or None, repo_type=loc.repo_type, revision=commit
        )
        files = {e.path: e.size for e in entries if isinstance(e, hf.hf_api.RepoFile)}
        if any(p.endswith(".safetensors") for p in files):  # read from those: leave out other frameworks' copies
            files = {p: n for p, n in files.items() if not _other_weights(p, n)}
    else:
        files = {loc.path: found[0].size}
    lazy: list[str] = []
    (tmp / name if is_dir else tmp).mkdir(parents=True, exist_ok=True)
    prefix = f"{loc.path}/" if loc.path else ""
    for repo_path, size in sorted(files.items()):
        rel = repo_path[len(prefix) :] if is_dir else ""
        if is_dir and (not repo_path.startswith(prefix) or rel in ("", ".", "..") or any(c in rel for c in "/\\\0")):
            raise HubError(f"{loc}: the Hub listed {repo_path!r} as a file of this folder; refusing to write it")
        local = tmp / name / rel if rel else tmp / name
        local.parent.mkdir(parents=True, exist_ok=True)
        cached = _repo_dir(loc, hub) / "snapshots" / commit / repo_path
        header = None
        if repo_path.endswith(LAZY_SUFFIXES) and size and not cached.exists():
            header = _probe(loc, repo_path, commit, size, hub)
        if header is None:
            _storage.link_or_copy(_download(loc, repo_path, commit, hub), local)
            continue
        _storage.placeholder(local, header, size)
        lazy.append(rel)
    _storage.write_bytes(tmp / MANIFEST, json.dumps({"uri": str(loc), "commit": commit, "name": name, "lazy": lazy}).encode())


def _other_weights(path: str, size: int) -> bool:
    """A large weights file of another format (``pytorch_model.bin``, ``tf_model.h5``, ...)."""
    name = path.rsplit("/", 1)[-1]
    return size >= OTHER_WEIGHTS_SIZE and name.endswith(OTHER_WEIGHTS) and "index" not in name


def _register(root: Path, loc: HubPath, commit: str, hub: _Hub) -> bool:
    """Register the placeholders of the view at ``root``; False if it is incomplete or stale."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    base = root / manifest["name"]
    if not base.exists():
        return False
    opener = _sources.Opener(root, str(loc))
    for rel in manifest["lazy"]:
        local = base / rel if rel else base
        if local.stat().st_nlink > 1:
            continue  # fetched already: a hard link to the cached download
        repo_path = f"{loc.path}/{rel}".strip("/") if rel else loc.path
        opener.add(local, functools.partial(_sources.HubFile, fetch=_fetcher(loc, repo_path, commit, hub, local, opener)))
    _sources.serve(opener)
    return True


def _fetcher(
    loc: HubPath, repo_path: str, commit: str, hub: _Hub, local: Path, opener: _sources.Opener
) -> Callable[[], Path]:
    lock = threading.Lock()

    def fetch() -> Path:
        with lock:
            if local.stat().st_nlink == 1:
                now = dataclasses.replace(hub, offline=_offline())  # offline may have been set since
                where = f"hf://{loc.repo_id}@{commit}/{repo_path}"
                with _errors(where, now, loc.repo_id, commit, repo_path):
                    real = Path(_download(loc, repo_path, commit, now))
                with open(local, "rb") as f, open(real, "rb") as g:
                    (n,) = struct.unpack("<Q", f.read(8))
                    if g.read(8 + n) != struct.pack("<Q", n) + f.read(n):  # the reader trusted this header
                        raise CorruptCheckpointError(
                            f"{where}: the downloaded file's header differs from the one read before ({real}); "
                            "delete it from the cache and load again"
                        )
                _storage.link_or_copy(real, local)
            opener.discard(local)
            return local

    return fetch


def _download(loc: HubPath, repo_path: str, commit: str, hub: _Hub) -> str:
    return _hf().hf_hub_download(
        loc.repo_id,
        repo_path,
        repo_type=loc.repo_type,
        revision=commit,
        cache_dir=hub.cache,
        endpoint=hub.endpoint,
        token=hub.token,
        local_files_only=hub.offline,
    )


def _probe(loc: HubPath, repo_path: str, commit: str, size: int, hub: _Hub) -> bytes | None:
    """The header (length prefix + JSON) of a remote safetensors file, by range requests; None if
    the file is not safetensors."""
    hf = _hf()
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf.hf_hub_url(loc.repo_id, repo_path, repo_type=loc.repo_type, revision=commit, endpoint=hub.endpoint)
    headers = build_hf_headers(token=hub.token, library_name="safeckpt")

    def get(start: int, end: int) -> bytes:
        r = get_session().get(url, headers={**headers, "Range": f"bytes={start}-{end - 1}"})
        hf_raise_for_status(r)
        return bytes(r.content)[: end - start]

    return _sources.probe_header(get(0, min(size, PROBE)), size, get)


# -- errors ----------------------------------------------------------------------------------------


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _errors(
    what: str, hub: _Hub, repo_id: str, revision: str | None, filename: str | None, *, push: bool = False
) -> Iterator[None]:
    """Turn the Hub client's exceptions into one line naming ``what``, the repo, and the fix."""
    errors = _hf().errors
    rev = revision or "main"
    who = (
        "the token cannot read it" if hub.token else "no token was given (pass token=, set HF_TOKEN or `hf auth login`)"
    )
    try:
        yield
    except HubError:
        raise
    except errors.GatedRepoError:
        raise HubAuthError(
            f"{what}: {repo_id} is gated on {hub.endpoint}; accept its conditions on the Hub and use a token with access"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubNotFoundError(
            f"{what}: repository {repo_id!r} not found on {hub.endpoint}, or it is private and {who}; "
            "check the name and the token"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubNotFoundError(
            f"{what}: revision {rev!r} not found in {repo_id} on {hub.endpoint}; give a branch, tag or commit that exists"
        ) from None
    except errors.LocalEntryNotFoundError:
        if hub.offline:
            why, fix = "HF_HUB_OFFLINE=1", "load or pull it once online, or unset HF_HUB_OFFLINE"
        else:
            why, fix = f"{hub.endpoint} cannot be reached", "check HF_ENDPOINT and the network"
        raise HubNotFoundError(
            f"{what}: {filename or repo_id} is not in the local cache ({hub.cache}) and {why}; {fix}"
        ) from None
    except errors.EntryNotFoundError:
        raise HubNotFoundError(f"{what}: no file {filename!r} in {repo_id} at revision {rev!r}", key=filename) from None
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        said = _one_line(getattr(e, "server_message", None) or str(e).splitlines()[0])
        if status in (401, 403):
            need = "write" if push else "read"
            raise HubAuthError(
                f"{what}: {hub.endpoint} refused access ({status}: {said}); use a token with {need} access to {repo_id} "
                "(token= or HF_TOKEN)"
            ) from None
        raise HubError(f"{what}: {hub.endpoint} answered {status}: {said}") from None
    except Exception as e:
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in (
            "httpx",
            "httpx2",
            "requests",
            "urllib3",
        ):
            raise HubError(
                f"{what}: cannot reach {hub.endpoint} ({type(e).__name__}: {_one_line(e)}); check HF_ENDPOINT and the "
                "network, or set HF_HUB_OFFLINE=1 to use the cache"
            ) from None
        raise


# -- pull ------------------------------------------------------------------------------------------


def pull_from_hub(
    repo_id: str,
    *,
    filename: str | None = None,
    revision: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    allow_patterns: str | list[str] | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    ignore_patterns: str | list[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download a repo (or one file of it) at a revision into the Hub cache, or into ``local_dir``.

    ``allow_patterns``/``ignore_patterns`` select files of a whole-repo download (globs, as
    ``huggingface_hub.snapshot_download``); ``cache_dir`` replaces the Hub cache for this call.

    A revision already in the cache is not downloaded again; with ``HF_HUB_OFFLINE=1`` the cached
    copy is returned without any request. Pulled files are ordinary checkpoints: open or load them
    with safeckpt (pickle-based ones go through its restricted unpickler like any other file).

    Returns:
        The local path of the file, or of the snapshot directory.

    Example:
        >>> path = safeckpt.pull_from_hub("me/run1", filename="fabric.safeckpt", revision="v1")
        >>> safeckpt.load(path, {"model": model, "optimizer": optimizer})
    """
    hub = _settings(endpoint, token)
    hf = _hf()
    what = f"pull {repo_id}" + (f"@{revision}" if revision else "") + (f"/{filename}" if filename else "")
    common = {
        "revision": revision,
        "cache_dir": hub.cache if cache_dir is None else cache_dir,
        "local_dir": local_dir,
        "endpoint": hub.endpoint,
        "token": hub.token,
        "local_files_only": hub.offline,
    }
    with _errors(what, hub, repo_id, revision, filename):
        if filename is not None:
            return Path(hf.hf_hub_download(repo_id, filename, **common))
        return Path(
            hf.snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, **common)
        )


# -- push ------------------------------------------------------------------------------------------


def push_to_hub(
    src: Any,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a module, a state dict, a training state or any checkpoint safeckpt reads, in one commit.

    Model weights (a module, or a flat dict of tensors, or a file holding one) go up in the layout
    the Hub's loaders read: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + an
    index above ``max_shard_size``, with ``{"format": "pt"}`` metadata and tied weights stored once,
    in the folder ``path_in_repo`` (default: the repo root), replacing the weights there before.
    Anything else (optimizer, counters, hyper-parameters) is a training checkpoint and goes up in
    safeckpt's native format as ``path_in_repo`` (default ``<source name>.safeckpt``, or
    ``checkpoint.safeckpt``; a sharded directory with ``max_shard_size``). A ``path_in_repo`` ending
    in ``.safeckpt`` forces the native format.

    The checkpoint is written to a temporary directory first (as much disk as it takes), then uploaded.

    Args:
        revision: the branch to commit to (created from the default branch if missing).
        private: visibility of a repo this call creates (an existing repo keeps its own).
        create_pr: open a pull request against the default branch instead of committing to it.
        token / endpoint: default to ``HF_TOKEN`` / ``HF_ENDPOINT`` at call time.

    Returns:
        An ``hf://`` URI of what was pushed, pinned to the new commit; `safeckpt.load` reads it.

    Example:
        >>> safeckpt.push_to_hub({"model": model, "optimizer": opt, "step": 100}, "me/run1")
        'hf://me/run1@5e2c.../checkpoint.safeckpt'
        >>> safeckpt.push_to_hub(model, "me/tiny-model", max_shard_size="2GB")
        'hf://me/tiny-model@a41b...'
    """
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr opens a pull request against main; drop revision={revision!r} or create_pr")
    if revision is not None and HEX40.fullmatch(revision):
        raise ValueError(f"revision={revision!r} is a commit; push to a branch name")
    hub = _settings(endpoint, token)
    with tempfile.TemporaryDirectory(prefix="safeckpt-push-") as tmp:
        staged = _stage(src, Path(tmp), path_in_repo, max_shard_size)
        api = hub.api()
        with _errors(f"push to {repo_id}", hub, repo_id, revision, None, push=True):
            if not api.repo_exists(repo_id):  # (create_repo(exist_ok=True) fails on a custom endpoint in hf 2.4)
                api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=staged.folder,
                path_in_repo=staged.folder_in_repo,
                commit_message=commit_message or f"Upload {staged.what} with safeckpt",
                revision=revision,
                create_pr=create_pr or None,
                delete_patterns=staged.delete,
            )
    return f"hf://{repo_id}@{info.oid}" + (f"/{staged.target}" if staged.target else "")


@dataclass(frozen=True)
class _Staged:
    folder: Path  # what to upload
    folder_in_repo: str  # where it goes
    delete: list[str] | None  # remote files (relative to folder_in_repo) this upload replaces
    target: str  # the pushed checkpoint's path in the repo ("" for the root)
    what: str  # for the commit message


def _stage(src: Any, tmp: Path, path_in_repo: str | None, max_shard_size: int | str | None) -> _Staged:
    from . import formats, state
    from .tree import Checkpoint, TensorRef

    stem = "checkpoint"
    if isinstance(src, nn.Module):
        tree: Any = state.module_state_dict(state.unwrap(src))
    elif isinstance(src, Mapping):
        tree = state.to_saveable(src, None)
    elif isinstance(src, (str, os.PathLike)):
        text = os.fspath(src)
        local = resolve(text) if text.startswith("hf://") else Path(text)
        tree = formats.detect(local).read(local).tree
        stem = (parse_uri(text).path if text.startswith("hf://") else text).rstrip("/").rsplit("/", 1)[-1].split(".")[
            0
        ] or stem
    else:
        raise TypeError(f"push_to_hub pushes a module, a state dict or a checkpoint path, not a {type(src).__name__}")
    target = (path_in_repo or "").strip("/")
    weights = (
        isinstance(tree, dict)
        and bool(tree)
        and all(isinstance(k, str) and isinstance(v, (torch.Tensor, TensorRef)) for k, v in tree.items())
        and not target.endswith(".safeckpt")
    )
    ckpt = Checkpoint(tree, format="memory", path="<memory>")
    opts = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if weights:
        formats.get("hf-sharded").writer(opts)(ckpt, tmp / "up", **opts)
        return _Staged(tmp / "up", target, list(HF_WEIGHT_FILES), target, "model weights")
    target = target or (stem if max_shard_size is not None else f"{stem}.safeckpt")
    folder_in_repo, _, name = target.rpartition("/")
    fmt = "safeckpt-sharded" if max_shard_size is not None else "safeckpt"
    formats.get(fmt).writer(opts)(ckpt, tmp / "up" / name, **opts)
    delete = [f"{name}/*"] if max_shard_size is not None else None  # the previous shards of this checkpoint
    return _Staged(tmp / "up", folder_in_repo, delete, target, f"checkpoint {name}")
