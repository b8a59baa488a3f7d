"""``hf-sharded``: a Hugging Face model directory (spec: ``formats/hf-sharded.md``).

Reads ``*.safetensors.index.json`` and ``*.bin.index.json`` directories (the ``.bin`` shards through
the ``torch`` format's restricted unpickler), a directory holding a single weights file (a lone
``model.safetensors`` or other non-shard ``.safetensors``; else one of ``pytorch_model.bin``,
``adapter_model.bin``, ``diffusion_pytorch_model.bin``), and an index file given directly. The index is validated before any shard is touched: shard names must
be bare file names in the directory; every tensor it maps must be in that shard and in no other.
Opening reads each shard's header only; a shard's data is mapped when one of its tensors is loaded.

Writes the layout ``huggingface_hub.save_torch_state_dict`` writes (greedy split, ``model.safetensors``
or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``), atomically at the
directory level: new shards first, the index last, the old set's files removed only after that.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from .. import _shapes, _sources
from .._fs import member_problem
from .._storage import Template, replace_set, write_bytes
from .._units import parse_size
from ..errors import CorruptCheckpointError, UnknownFormatError
from ..tree import Checkpoint
from . import Format
from . import _safetensors as st
from . import safetensors_file as stf

NAME = "hf-sharded"
EXTENSIONS = (".json",)
# An index lists names, never data: the largest public ones (~150k tensors) are about 15 MB.
MAX_INDEX = 64 << 20
KINDS = {".safetensors.index.json": ".safetensors", ".bin.index.json": ".bin"}
PREFERRED = {
    ".safetensors.index.json": "model.safetensors.index.json",
    ".bin.index.json": "pytorch_model.bin.index.json",
}
# the `{suffix}` of a shard's name in ``filename_pattern`` ("model{suffix}.safetensors")
SUFFIX = Template("-{part:05d}-of-{parts:05d}", part=r"\d{5}", parts=r"\d{5}")
SHARD = re.compile(".*" + SUFFIX.pattern.pattern + r"\.safetensors")
# The single pickled weights files transformers (< 5), peft and diffusers write; read only when the
# directory has no safetensors file, the order their loaders prefer.
PICKLED_SINGLES = ("pytorch_model.bin", "adapter_model.bin", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class Layout:
    """Where a model directory keeps its weights: an ``index`` and the shard extension it maps to,
    or one ``single`` safetensors file."""

    directory: Path
    index: Path | None = None
    ext: str = ".safetensors"
    single: Path | None = None


def _find(path: Path) -> Layout | str | None:
    """The layout of ``path`` (a directory or an index file), a message if it is ambiguous, or None."""
    if path.is_file():
        kind = next((s for s in KINDS if path.name.endswith(s)), None)
        return Layout(path.parent, path, KINDS[kind]) if kind else None
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return None
    for suffix, ext in KINDS.items():
        indexes = [n for n in names if n.endswith(suffix)]
        if PREFERRED[suffix] in indexes:
            return Layout(path, path / PREFERRED[suffix], ext)
        if len(indexes) == 1:
            return Layout(path, path / indexes[0], ext)
        if indexes:
            return f"{path}: several index files {indexes}; open the one you mean directly, e.g. {path / indexes[0]}"
    singles = [n for n in names if n.endswith(".safetensors") and not SHARD.fullmatch(n)]
    if not singles:
        singles = [n for n in PICKLED_SINGLES if n in names]
    if len(singles) == 1:
        return Layout(path, single=path / singles[0])
    if singles:
        return f"{path}: several weights files {singles[:5]} and no index; open the file you mean directly"
    return None


def sniff(head: bytes, path: Path) -> bool:
    """A directory with an HF index or a single safetensors file, or an ``*.index.json`` file itself."""
    if path.is_file():
        return head.lstrip()[:1] == b"{" and any(path.name.endswith(s) for s in KINDS)
    return path.is_dir() and _find(path) is not None


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a model directory (or its index file): validate the index and every shard's header.

    Tensors stay on disk; loading one maps only the shard that holds it. ``.bin`` shards are read
    by the ``torch`` format (restricted unpickler; ``allow`` is passed on).

    Example:
        >>> ckpt = read(Path("llama-tiny"))          # model.safetensors.index.json + 2 shards
        >>> ckpt.info["shards"], ckpt["lm_head.weight"].shape
        (['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], (32, 16))
    """
    layout = _find(path)
    if layout is None:
        raise UnknownFormatError(f"{path}: no model.safetensors, *.safetensors.index.json or *.bin.index.json found")
    if isinstance(layout, str):
        raise UnknownFormatError(layout)
    if layout.single is not None:
        one = _read_single(layout, allow)
        return Checkpoint(
            one.tree,
            format=NAME,
            path=layout.directory,
            metadata=one.metadata,
            info={**one.info, "shards": [layout.single.name]},
        )
    assert layout.index is not None
    if path.is_dir():
        _checked_file(layout.directory, layout.index.name, f"{layout.index}")
    weight_map, metadata = read_index(layout.index)
    shards = sorted(set(weight_map.values()))
    contents: dict[str, dict[str, Any]] = {}
    shard_meta: dict[str, str] = {}
    for shard in shards:
        file = _shard_file(layout, shard)
        if layout.ext == ".safetensors":
            header = st.read_header(file)
            mapped = _sources.file(file, header.size)  # maps on first tensor load, never before
            contents[shard] = st.entry_refs(st.EntryFile(str(file), mapped, {}), header.entries)
            stf.undecodable(header)
            shard_meta.update(header.metadata)
        else:
            from . import get

            sub = get("torch").read(file, allow=allow)
            if not isinstance(sub.tree, Mapping):
                raise CorruptCheckpointError(
                    f"{file}: a shard must hold a state dict, found a {type(sub.tree).__name__}"
                )
            contents[shard] = dict(sub.tree)
    owner: dict[str, str] = {}
    for shard in shards:
        for n in contents[shard]:
            if n in owner:
                raise CorruptCheckpointError(
                    f"{layout.index}: tensor {n!r} is in two shards, {owner[n]} and {shard}; the checkpoint is inconsistent"
                )
            owner[n] = shard
    for n, shard in weight_map.items():
        if owner.get(n) != shard:
            where = f" (it is in {owner[n]})" if n in owner else ""
            raise CorruptCheckpointError(
                f"{layout.index}: the index maps tensor {n!r} to {shard}, which does not hold it{where}"
            )
    extra = sorted(set(owner) - set(weight_map))
    if extra:
        warnings.warn(
            f"{layout.index}: shards hold tensors the index does not list; they are read too: {extra[:5]}", stacklevel=2
        )
    _warn_unindexed(layout, set(shards))
    leaves = {n: contents[owner[n]][n] for n in owner}
    aliases = stf.tied_aliases({**shard_meta, **metadata}, leaves)
    tree = {n: leaves[aliases.get(n, n)] for n in sorted([*leaves, *aliases])}
    info: dict[str, Any] = {"index": layout.index.name, "shards": shards}
    if aliases:
        info["aliases"] = aliases
    metadata = {k: v for k, v in metadata.items() if k not in aliases}
    return Checkpoint(tree, format=NAME, path=layout.directory, metadata=metadata, info=info)


def _read_single(layout: Layout, allow: Iterable[str]) -> Checkpoint:
    """The one weights file of a single-file directory: safetensors, or a ``.bin`` read by the
    ``torch`` format's restricted unpickler (which must hold a state dict, like a ``.bin`` shard)."""
    assert layout.single is not None
    file = _checked_file(layout.directory, layout.single.name, f"{layout.directory}: {layout.single.name}")
    if file.name.endswith(".safetensors"):
        return stf.read(file)
    from . import get

    one: Checkpoint = get("torch").read(file, allow=allow)
    if not isinstance(one.tree, Mapping):
        raise CorruptCheckpointError(
            f"{file}: a model's weights file must hold a state dict, found a {type(one.tree).__name__}"
        )
    return one


def read_index(index: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(weight_map, metadata)`` of an index file, validated: at most `MAX_INDEX` bytes of UTF-8
    JSON without duplicate keys, ``weight_map`` mapping strings to strings. Metadata values that are
    not strings (``total_size``) come back JSON-encoded.
    """
    info = _stat(index, f"{index}: the index")
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX:
        raise CorruptCheckpointError(
            f"{index}: not an index: an index is a JSON file of at most {MAX_INDEX >> 20} MiB, this is {info.st_size} bytes"
        )
    with open(index, "rb") as f:
        raw = f.read(info.st_size + 1)  # not MAX_INDEX + 1: read(n) allocates n bytes up front
    if len(raw) > info.st_size:
        raise CorruptCheckpointError(f"{index}: the index changed while being read; open it again")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=st.no_duplicates)
    except st.DuplicateKey as e:
        raise CorruptCheckpointError(
            f"{index}: the index has the key {st.short(e.args[0])} twice; the checkpoint is inconsistent"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{index}: the index is not valid JSON ({st.short(str(e), 200)}); re-download or rewrite it"
        ) from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(
            f"{index}: an index must be a JSON object whose 'weight_map' maps tensor names to shard file names"
        )
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(
            f"{index}: the index's 'metadata' must be a JSON object, found {type(metadata).__name__}"
        )
    for s in (*weight_map, *weight_map.values(), *metadata):
        if not st.is_unicode(s):
            raise CorruptCheckpointError(
                f"{index}: {st.short(s)} holds an unpaired surrogate escape, which is not Unicode"
            )
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return weight_map, meta


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} does not exist (incomplete download or copy?)") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{what} cannot be read: {e.strerror}") from None


def _shard_file(layout: Layout, name: str) -> Path:
    where = f"{layout.index}: shard {st.short(name)}"
    if (
        not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
        or PureWindowsPath(name).drive
        or os.path.isabs(name)
    ):
        raise CorruptCheckpointError(
            f"{where} is not a bare file name; shards must sit in {layout.directory} itself, refusing to look elsewhere"
        )
    if not name.endswith(layout.ext):
        raise CorruptCheckpointError(
            f"{where} does not end in {layout.ext}, as every shard of a {layout.index.name if layout.index else ''} index must"
        )
    return _checked_file(layout.directory, name, where)


def _checked_file(directory: Path, name: str, where: str) -> Path:
    """``directory / name`` if it is a regular file that stays in ``directory`` (or in the same
    Hugging Face cache repo, whose snapshots are symlinks into ``blobs/``): `_fs.member_problem`."""
    _stat(directory / name, where)  # a missing shard keeps its own message
    problem = member_problem(directory, name, cache_blobs=True)
    if problem is not None:
        raise CorruptCheckpointError(f"{where} {problem}; refusing to follow it")
    return directory / name


def _warn_unindexed(layout: Layout, used: set[str]) -> None:
    stray = [
        n
        for n in sorted(os.listdir(layout.directory))
        if n.endswith(layout.ext) and n not in used and not n.startswith(".")
    ]
    if stray:
        warnings.warn(f"{layout.index}: ignoring files the index does not reference: {stray[:5]}", stacklevel=3)


def verify(path: Path) -> list[str]:
    """Validate the directory and every shard, and check the CRC-32s safeckpt recorded; return the problems.

    Example:
        >>> verify(Path("llama-tiny"))
        []
    """
    try:
        ckpt = read(path)
    except CorruptCheckpointError as e:
        return [str(e)]
    problems: list[str] = []
    for shard in ckpt.info["shards"]:
        file = ckpt.path / shard
        if file.suffix == ".safetensors":
            problems += stf.verify(file)
    return problems


# -- writing --------------------------------------------------------------------------------------


def write(
    ckpt: Checkpoint,
    path: Path,
    *,
    max_shard_size: int | str = "5GB",
    filename_pattern: str = "model{suffix}.safetensors",
) -> Path:
    """Write a tree of tensors as a Hugging Face model directory, atomically.

    Tensors go to shards of at most ``max_shard_size`` bytes ("5GB", "500MB", "2GiB" or bytes) in
    tree order, greedily, as ``huggingface_hub.split_torch_state_dict_into_shards`` does (a larger
    tensor gets a shard of its own). One shard is written as ``model.safetensors`` without an index;
    more as ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``. Tied tensors
    are written once and recorded as ``{dropped: kept}`` in the index (and shard) metadata.

    A reader sees the old set or the new one, never a mix: new shards are written first (under a
    temporary name where the old set still uses theirs), the index last, and the old set's files
    are removed only after that.

    Example:
        >>> write(Checkpoint(model.state_dict(), format="memory", path="-"), Path("out"), max_shard_size="2GB")
        PosixPath('out')
    """
    base = filename_pattern.format(suffix="") if "{suffix}" in filename_pattern else ""
    if not base.endswith(".safetensors") or base.startswith(".") or any(c in filename_pattern for c in "/\\"):
        raise ValueError(
            f"filename_pattern must be a file name with '{{suffix}}' ending in .safetensors, got {filename_pattern!r}"
        )
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{path} is a file; an hf-sharded checkpoint is a directory: give a directory path")
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    plan = stf.plan(ckpt, directory)
    groups = split(plan.items, limit)
    n = len(groups)
    final = (
        [base] if n == 1 else [filename_pattern.format(suffix=SUFFIX.format(part=i, parts=n)) for i in range(1, n + 1)]
    )
    index = directory / (base + ".index.json")
    live = _live_files(index)
    extra = stf.carried_metadata(ckpt.metadata, plan)
    token = secrets.token_hex(4)
    pre_index = False
    if n > 1 and not index.exists() and (directory / base).is_file():
        # Hugging Face loaders read a lone *.safetensors only while it is alone: index the old file first
        pre_index = _index_old_single(index, directory / base)
        live = {base} if pre_index else live
    total = sum(_shapes.nbytes(it.dtype, it.shape) for it in plan.items)
    index_meta = {"total_size": total, **extra, **plan.aliases}

    def write_shard(target: Path, i: int) -> None:
        kept = {it.name for it in groups[i]}
        meta = {"format": "pt", **(extra if n == 1 else {}), **{d: k for d, k in plan.aliases.items() if k in kept}}
        st.write(target, groups[i], meta, checksum_key=st.KEY_CRC)

    replace_set(
        directory,
        final,
        write_shard,
        lambda names: _write_index(index, index_meta, _weight_map(groups, names)),
        index=index,
        live=live,
        stage=lambda name: STAGING.format(stem=name.removesuffix(".safetensors"), token=token),
        leftovers=_staging(base),
        also_old={base},
        index_is_new=pre_index,
    )
    return directory


def split(items: list[st.Item], limit: int) -> list[list[st.Item]]:
    """Greedy shards in order, as ``huggingface_hub.split_torch_state_dict_into_shards``: a tensor
    that would push the open shard past ``limit`` starts a new one; a tensor larger than ``limit``
    gets a shard of its own while the open shard stays open.

    Example:
        >>> items = [st.Item(f"t{i}", torch.uint8, (n,), None) for i, n in enumerate([6, 6, 2, 6, 2, 2])]
        >>> [[it.name for it in shard] for shard in split(items, 10)]
        [['t0'], ['t1', 't2'], ['t3', 't4', 't5']]
    """
    shards: list[list[st.Item]] = []
    current: list[st.Item] = []
    size = 0
    for it in items:
        nbytes = _shapes.nbytes(it.dtype, it.shape)
        if nbytes > limit:
            shards.append([it])
            continue
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(it)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _live_files(index: Path) -> set[str]:
    """The shard names the current index references (bare names only; an unreadable index has none)."""
    try:
        weight_map, _ = read_index(index)
    except CorruptCheckpointError:
        return set()
    return {s for s in weight_map.values() if s and "/" not in s and "\\" not in s and s not in (".", "..")}


# a new shard written beside an old one of the same name until the new index names it
STAGING = Template(".{stem}.{token}.safetensors", stem=".+", token="[0-9a-f]{8}")


def _staging(base: str) -> re.Pattern[str]:
    """The staging names of every shard ``base`` (the pattern's ``{suffix}`` empty) can have."""
    stem = re.escape(base.removesuffix(".safetensors")) + f"(?:{SUFFIX.pattern.pattern})?"
    return STAGING.where(stem=stem).pattern


def _weight_map(groups: list[list[st.Item]], names: list[str]) -> dict[str, str]:
    return dict(sorted((it.name, name) for name, items in zip(names, groups, strict=True) for it in items))


def _write_index(index: Path, metadata: dict[str, Any], weight_map: dict[str, str]) -> None:
    write_bytes(
        index, json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, ensure_ascii=False).encode()
    )


def _index_old_single(index: Path, single: Path) -> bool:
    """Write an index naming ``single`` for all its tensors (False if it is not a readable file)."""
    try:
        header = st.read_header(single)
    except (CorruptCheckpointError, OSError):
        return False
    total = sum(e.end - e.begin for e in header.entries.values())
    _write_index(index, {"total_size": total}, {name: single.name for name in sorted(header.entries)})
    return True


FORMAT = Format(
    NAME,
    EXTENSIONS,
    "any",
    sniff=sniff,
    read=read,
    write=write,
    write_options=frozenset({"max_shard_size", "filename_pattern"}),
    verify=verify,
)
