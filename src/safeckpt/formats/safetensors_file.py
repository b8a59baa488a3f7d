"""``safetensors``: a plain safetensors file of named tensors (spec: ``formats/safetensors.md``).

Reads any safetensors file (Hugging Face's ``{"format": "pt"}`` ones and every other producer's)
into a flat ``{name: TensorRef}`` tree, mapped lazily, with the header validated beyond what the
safetensors library checks (see `_safetensors.read_header`). Tied weights that Hugging Face's
writers dropped and recorded as ``__metadata__[dropped] = kept`` come back as the kept tensor
under both names, so a strict ``load_raw`` into the tied model works.

Writes a tree whose leaves are all tensors: nested containers are flattened with ``.`` as state
dicts are, tied tensors are written once with the same dropped-name record, and the file carries
``{"format": "pt"}`` so ``safetensors.torch.load_model`` and ``huggingface_hub.load_torch_model``
load it.
"""

from __future__ import annotations

import warnings
from collections.abc import Container, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _dtypes, _sources
from ..tree import Checkpoint, TensorRef, alias_key, is_tensor, iter_leaves
from . import Format
from . import _safetensors as st
from .safeckpt import KEY_VERSION

if TYPE_CHECKING:
    import torch

NAME = "safetensors"
EXTENSIONS = (".safetensors",)
# metadata keys that are never a tied-name record: the format marker, the HF index's total
RESERVED_META = ("format", "total_size")


def sniff(head: bytes, path: Path) -> bool:
    """A safetensors header that is not one of safeckpt's own native files."""
    return st.looks_like(head) and f'"{KEY_VERSION}"'.encode() not in head


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a safetensors file: validate its header; tensors stay on disk until loaded.

    ``Checkpoint.metadata`` is the file's ``__metadata__`` but for safeckpt's checksum entry and the
    tied-name records, which become tree entries instead (``info["aliases"]`` lists them).

    Example:
        >>> ckpt = read(Path("model.safetensors"))
        >>> ckpt.metadata, ckpt.info["aliases"], ckpt["emb.weight"].shape
        ({'format': 'pt'}, {'head.weight': 'emb.weight'}, (10, 4))
        >>> ckpt["head.weight"] is ckpt["emb.weight"]   # tied, restored from the metadata
        True
    """
    with open(path, "rb") as f:  # header and map from one open file: a concurrent save cannot mix in its bytes
        header = st.read_header(path, f)
        mapped = _sources.file(path, header.size, f)
    refs = st.entry_refs(st.EntryFile(str(path), mapped, st.checksums(header, st.KEY_CRC) or {}), header.entries)
    aliases = tied_aliases(header.metadata, refs)
    tree = {name: refs[aliases.get(name, name)] for name in sorted([*refs, *aliases])} if aliases else _sorted(refs)
    info: dict[str, Any] = {"aliases": aliases} if aliases else {}
    raw = undecodable(header)
    if raw:
        info["raw_bytes"] = raw
    meta = {k: v for k, v in header.metadata.items() if k not in (st.KEY_CRC, st.KEY_HEADER_CRC) and k not in aliases}
    return Checkpoint(tree, format=NAME, path=path, metadata=meta, info=info)


def _sorted(refs: Mapping[str, TensorRef]) -> dict[str, TensorRef]:
    names = list(refs)
    if names != sorted(names):
        names.sort()
    return {name: refs[name] for name in names}


def undecodable(header: st.Header) -> dict[str, str]:
    """``{name: "F6_E2M3 [4, 8]"}`` for tensors read as raw bytes; warns once per file."""
    raw = {e.name: f"{e.code} {list(e.shape)}" for e in header.entries.values() if e.code not in st.ROWS}
    if raw:
        warnings.warn(
            f"{header.path}: tensors {sorted(raw)[:5]} have dtypes torch cannot represent ({', '.join(sorted(set(raw.values())))}); "
            "they are read as raw uint8 bytes",
            stacklevel=3,
        )
    return raw


def tied_aliases(metadata: Mapping[str, str], names: Container[str]) -> dict[str, str]:
    """Hugging Face's record of tied names dropped on save: the ``{dropped: kept}`` metadata entries
    whose key is not a tensor of the file and whose value is.

    Example:
        >>> tied_aliases({"format": "pt", "head.weight": "emb.weight"}, {"emb.weight"})
        {'head.weight': 'emb.weight'}
    """
    return {
        k: v
        for k, v in metadata.items()
        if k
        and k not in names
        and v in names
        and k not in RESERVED_META
        and k != "__metadata__"
        and not k.startswith("safeckpt.")
    }


# -- writing --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What writing a tree as safetensors means: unique tensors under their kept names (tree order)
    and the ``{dropped: kept}`` names of tied duplicates."""

    items: list[st.Item] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)


def plan(ckpt: Checkpoint, path: Path) -> Plan:
    """Flatten ``ckpt.tree`` into safetensors names and group tied tensors (the lexicographically
    first name of a group is kept, as Hugging Face's ``_remove_duplicate_names`` does).

    Raises ``TypeError`` naming the key for a non-tensor leaf or a tensor safetensors cannot hold,
    and ``ValueError`` for names the format cannot carry.

    Example:
        >>> p = plan(Checkpoint({"emb": {"weight": w}, "head.weight": w}, format="memory", path="-"), Path("m.safetensors"))
        >>> [it.name for it in p.items], p.aliases
        (['emb.weight'], {'head.weight': 'emb.weight'})
    """
    groups: dict[Hashable, list[tuple[str, torch.Tensor | TensorRef]]] = {}
    seen: set[str] = set()
    for keys, leaf in iter_leaves(ckpt.tree):
        name = _flat_name(keys, path)
        if not isinstance(leaf, TensorRef) and not is_tensor(leaf):
            raise TypeError(
                f"{path}: {name!r} is a {type(leaf).__name__}, and plain safetensors holds tensors only. Save to format "
                "'safeckpt' (a .safeckpt file) to keep non-tensor values, or write just the entry that holds the "
                "weights (`safeckpt convert SRC DST.safetensors --key model`)"
            )
        if name in seen:
            raise ValueError(f"{path}: two entries flatten to the tensor name {name!r}; rename one")
        seen.add(name)
        _check_tensor(leaf, name, path)
        groups.setdefault(alias_key(leaf), []).append((name, leaf))
    out = Plan()
    for members in groups.values():
        kept = min(n for n, _ in members)
        leaf = next(x for n, x in members if n == kept)
        if isinstance(leaf, TensorRef):  # copied file to file where the source holds the bytes as stored
            out.items.append(st.Item(kept, leaf.dtype_info, tuple(leaf.shape), leaf.load, leaf.span))
        else:
            out.items.append(st.Item(kept, leaf.dtype, tuple(leaf.shape), lambda x=leaf: x))  # type: ignore[misc]
        out.aliases.update({n: kept for n, _ in members if n != kept})
    return out


def _flat_name(keys: tuple[Any, ...], path: Path) -> str:
    for k in keys:
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise TypeError(f"{path}: key {k!r} in {list(keys)} is a {type(k).__name__}; safetensors names are strings")
    name = ".".join(str(k) for k in keys)
    if not name:
        raise ValueError(f"{path}: a bare tensor has no name; save a dict such as {{'weight': tensor}}")
    if name == "__metadata__":
        raise ValueError(
            f"{path}: '__metadata__' is reserved by the safetensors format for metadata; rename that tensor"
        )
    if not st.is_unicode(name):
        raise ValueError(f"{path}: tensor name {name!r} is not valid Unicode (unpaired surrogate)")
    return name


def _check_tensor(x: torch.Tensor | TensorRef, name: str, path: Path) -> None:
    where = f"{path}: tensor {name!r}"
    from ..sparse import SparseTensorRef

    if isinstance(x, SparseTensorRef):  # read lazily from a .pt file
        raise TypeError(
            f"{where} is a {x.layout} tensor; safetensors holds dense tensors only: convert to a .safeckpt file, "
            "which stores it natively, or save x.to_dense()"
        )
    st.check_storable(x, where)
    dtype = x.dtype_info if isinstance(x, TensorRef) else x.dtype
    if st.real_view(dtype) is not None:  # a plain file has no skeleton to record the complex dtype in
        raise TypeError(
            f"{where} has dtype torch.{_dtypes.of(dtype).name}, which safetensors lacks; save to format 'safeckpt', which stores it "
            "losslessly, or save torch.view_as_real(x) under another name"
        )


def carried_metadata(metadata: Mapping[str, str], p: Plan) -> dict[str, str]:
    """The source's metadata worth keeping: not the format marker, HF's ``total_size``, safeckpt's own
    keys, or old tied-name records (entries naming a tensor), which `plan` recomputes."""
    names = {it.name for it in p.items} | set(p.aliases)
    return {
        k: v
        for k, v in metadata.items()
        if k not in RESERVED_META and not k.startswith("safeckpt.") and k not in names and v not in names
    }


def write(ckpt: Checkpoint, path: Path) -> Path:
    """Write a tree of tensors as one safetensors file, atomically, streaming tensor by tensor.

    The metadata is ``{"format": "pt"}``, the source's own metadata, the tied-name records and a
    CRC-32 per tensor (``safeckpt.crc32``, checked by `verify`).

    Example:
        >>> write(Checkpoint(model.state_dict(), format="memory", path="-"), Path("model.safetensors"))
        PosixPath('model.safetensors')
    """
    p = plan(ckpt, path)
    meta = {"format": "pt", **carried_metadata(ckpt.metadata, p), **p.aliases}
    return st.write(path, p.items, meta, checksum_key=st.KEY_CRC)


def verify(path: Path) -> list[str]:
    """Validate the file and, where safeckpt recorded them, its header's and every tensor's CRC-32;
    return the problems.

    Files from other writers carry no checksums: for them only the structure is checked.

    Example:
        >>> verify(Path("model.safetensors"))
        []
    """
    return st.verify_file(path, st.KEY_CRC, required=False)


FORMAT = Format(NAME, EXTENSIONS, "file", sniff=sniff, read=read, write=write, verify=verify)
