"""``safeckpt``: the native single-file format (spec: ``formats/safeckpt.md``).

A valid safetensors file: every tensor is stored under the name of its path in the tree
(``model/l1.weight``), and the rest of the tree (its shape and every non-tensor value) is a
msgpack *skeleton* kept base64-encoded in the header's ``__metadata__``, so stock safetensors
readers list and read every tensor and safeckpt restores the whole state without pickle.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import torch

from .. import codec
from .._fs import MappedFile, Span
from ..errors import CorruptCheckpointError
from ..tree import Checkpoint, TensorRef, alias_key, iter_leaves, path_name, unique_name
from . import Format
from . import _safetensors as st

NAME = "safeckpt"
EXTENSIONS = (".safeckpt",)
VERSION = "1"
KEY_VERSION, KEY_SKELETON, KEY_CRC = "safeckpt.version", "safeckpt.skeleton", "safeckpt.crc32"
FLAG_PARAMETER, FLAG_REQUIRES_GRAD = 1, 2


def sniff(head: bytes, path: Path) -> bool:
    """A safetensors header whose metadata starts with our version key (we always write it first)."""
    return st.looks_like(head) and f'"{KEY_VERSION}"'.encode() in head[:4096]


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    """Open a native checkpoint: parse the header and the skeleton; tensors stay on disk.

    Example:
        >>> ckpt = read(Path("run.safeckpt"))
        >>> ckpt["step"], ckpt.tensors()["model/weight"].shape
        (7, (2, 2))
    """
    with open(path, "rb") as f:  # header and map from one open file: a concurrent save cannot mix in its bytes
        header = st.read_header(path, f)
        mapped = MappedFile(path, header.size, f)
    meta = header.metadata
    version = meta.get(KEY_VERSION)
    if version is None or KEY_SKELETON not in meta:
        raise CorruptCheckpointError(
            f"{path}: a safetensors file without a safeckpt skeleton; open it as format 'safetensors'"
        )
    if version != VERSION:
        raise CorruptCheckpointError(
            f"{path}: written with safeckpt format version {version}, this safeckpt reads version {VERSION}; upgrade safeckpt"
        )
    try:
        skeleton = base64.b64decode(meta[KEY_SKELETON], validate=True)
    except (binascii.Error, ValueError):
        raise CorruptCheckpointError(f"{path}: the skeleton in the header is not valid base64") from None
    crcs = st.checksums(header, KEY_CRC) or {}
    refs: dict[str, TensorRef] = {}

    def tensor(payload: Any) -> TensorRef:
        if not (
            isinstance(payload, list)
            and 2 <= len(payload) <= 3
            and isinstance(payload[0], str)
            and type(payload[1]) is int
        ):
            raise CorruptCheckpointError(f"{path}: malformed tensor reference {payload!r} in the skeleton")
        name, flags = payload[0], payload[1]
        if name in refs:
            return refs[name]
        entry = header.entries.get(name)
        if entry is None:
            raise CorruptCheckpointError(
                f"{path}: the skeleton refers to tensor {name!r}, which the file does not hold"
            )
        refs[name] = _ref(path, mapped, entry, flags, payload[2] if len(payload) == 3 else None, crcs.get(name))
        return refs[name]

    tree = codec.decode(skeleton, tensor, source=str(path))
    stray = set(header.entries) - set(refs)
    if stray:
        raise CorruptCheckpointError(f"{path}: tensors {sorted(stray)[:5]} are in the file but not in its skeleton")
    plain = {k: v for k, v in meta.items() if not k.startswith("safeckpt.")}
    return Checkpoint(tree, format=NAME, path=path, metadata=plain, info={"format_version": version})


def _ref(path: Path, mapped: MappedFile, entry: st.Entry, flags: int, real_of: Any, crc: int | None) -> TensorRef:
    dtype, shape = entry.dtype, entry.torch_shape
    loader = lambda: st.entry_tensor(mapped, entry)  # noqa: E731
    if real_of is not None:
        complex_dtype = {str(k).removeprefix("torch."): k for k in st.AS_REAL}.get(real_of)
        if complex_dtype is None or st.AS_REAL[complex_dtype] != dtype or not shape or shape[-1] != 2:
            raise CorruptCheckpointError(f"{path}: tensor {entry.name!r} cannot be read as {real_of!r}")
        dtype, shape = complex_dtype, shape[:-1]
        loader = lambda: torch.view_as_complex(st.entry_tensor(mapped, entry))  # noqa: E731
    return TensorRef(
        entry.name,
        dtype,
        shape,
        str(path),
        loader,
        storage=str(path),
        view=entry.name,
        requires_grad=bool(flags & FLAG_REQUIRES_GRAD),
        parameter=bool(flags & FLAG_PARAMETER),
        span=Span(mapped, entry.begin, crc),
    )


def write(ckpt: Checkpoint, path: Path) -> Path:
    """Write ``ckpt`` (tensor leaves live or lazy) as one native file, atomically and streaming.

    Tied tensors are written once; non-tensor values go to the skeleton, and a value the codec
    cannot store raises ``TypeError`` naming its path before anything is written.
    """
    names: dict[Hashable, str] = {}
    items: list[st.Item] = []
    used: set[str] = set()

    def tensor_payload(p: tuple[Any, ...], x: torch.Tensor | TensorRef) -> list[Any]:
        key = alias_key(x)
        if key not in names:
            check_storable(x, p)
            names[key] = unique_name(path_name(p) or "tensor", used)
            span = x.span if isinstance(x, TensorRef) else None
            items.append(st.Item(names[key], x.dtype, tuple(x.shape), _getter(x), span))
        payload: list[Any] = [names[key], tensor_flags(x)]
        if x.dtype in st.AS_REAL:
            payload.append(str(x.dtype).removeprefix("torch."))
        return payload

    skeleton = codec.encode(ckpt.tree, tensor_payload)
    meta = {KEY_VERSION: VERSION, "format": "pt", KEY_SKELETON: base64.b64encode(skeleton).decode("ascii")}
    meta.update({k: v for k, v in ckpt.metadata.items() if not k.startswith("safeckpt.") and k != "format"})
    return st.write(path, items, meta, checksum_key=KEY_CRC)


def _getter(x: torch.Tensor | TensorRef) -> Any:
    return x.load if isinstance(x, TensorRef) else (lambda: x)


def tensor_flags(x: torch.Tensor | TensorRef) -> int:
    """The flags the skeleton records with a tensor reference."""
    parameter = x.parameter if isinstance(x, TensorRef) else isinstance(x, torch.nn.Parameter)
    return (FLAG_PARAMETER if parameter else 0) | (FLAG_REQUIRES_GRAD if x.requires_grad else 0)


def check_storable(x: torch.Tensor | TensorRef, path: tuple[Any, ...]) -> None:
    """Refuse, before anything is written, a tensor this format cannot hold (meta, sparse, a dtype
    with no lossless encoding)."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        raise TypeError(f"{codec.where(path)} is a meta tensor: it has no data to save")
    if isinstance(x, torch.Tensor) and (x.is_sparse or x.layout != torch.strided):
        raise TypeError(f"{codec.where(path)} is a {x.layout} tensor; save x.to_dense() or its components instead")
    st.stored_as(x.dtype, tuple(x.shape), codec.where(path))


def verify(path: Path) -> list[str]:
    """Check the header's CRC-32 (which covers the skeleton), the structure and every tensor's
    CRC-32; return the problems found, a damaged tensor named with every path it has in the tree.

    Example:
        >>> verify(Path("run.safeckpt"))
        []
    """
    paths: dict[str, list[str]] = {}

    def describe(name: str) -> str:
        if not paths:  # read the skeleton only to name a damaged tensor (the header checksum has passed)
            with contextlib.suppress(CorruptCheckpointError):
                for p, x in iter_leaves(read(path).tree):
                    if isinstance(x, TensorRef):
                        paths.setdefault(x.name, []).append(codec.where(p))
        return f"the data of {', '.join(paths[name])}" if name in paths else "its data"

    problems = st.verify_file(path, KEY_CRC, required=True, describe=describe)
    if not problems:
        try:
            read(path)  # the skeleton decodes and binds every tensor
        except CorruptCheckpointError as e:
            problems.append(str(e))
    return problems

FORMAT = Format(NAME, EXTENSIONS, "file", sniff=sniff, read=read, write=write, verify=verify)
