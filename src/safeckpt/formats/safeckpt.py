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
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _dtypes, _sources, codec
from ..errors import CorruptCheckpointError
from ..tree import Checkpoint, TensorRef, alias_key, iter_leaves, path_name, unique_name
from . import Format
from . import _safetensors as st

if TYPE_CHECKING:
    import torch

NAME = "safeckpt"
EXTENSIONS = (".safeckpt",)
VERSION = "1"
KEY_VERSION, KEY_SKELETON = "safeckpt.version", "safeckpt.skeleton"
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
        mapped = _sources.file(path, header.size, f)
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
    crcs = st.checksums(header, st.KEY_CRC) or {}
    source = str(path)
    file, entries = st.EntryFile(source, mapped, crcs), header.entries

    def bad(name: str, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {what}", path=path, key=name, hint=_DAMAGED)

    def bind(name: str, flags: int, real_of: str | None) -> TensorRef:  # once per tensor: nothing built it does not need
        e = entries.get(name)
        if e is None:
            raise bad(name, f"the skeleton refers to tensor {name!r}, which the file does not hold")
        if e.code not in st.ROWS:
            raise bad(name, f"tensor {name!r} has dtype {e.code}, which torch cannot represent")
        if real_of is None:
            ref = st.entry_ref(file, e)
        elif real_of in st.REAL_OF and st.REAL_OF[real_of] == st.ROWS[e.code].name and e.shape[-1:] == (2,):
            ref = st.entry_ref(file, e, st.ComplexEntryRef)
        else:
            raise bad(name, f"tensor {name!r} cannot be read as {real_of!r}")
        if flags:  # instance values over the class's False (a dict made only for these references)
            ref.__dict__.update(requires_grad=bool(flags & FLAG_REQUIRES_GRAD), parameter=bool(flags & FLAG_PARAMETER))
        return ref

    tensor, refs = tensor_leaf_decoder(source, bind, complex_dtype=True)
    tree = codec.decode(skeleton, tensor, source=str(path))
    stray = set(header.entries) - set(refs)
    if stray:
        raise CorruptCheckpointError(f"{path}: tensors {sorted(stray)[:5]} are in the file but not in its skeleton")
    plain = {k: v for k, v in meta.items() if not k.startswith("safeckpt.")}
    return Checkpoint(tree, format=NAME, path=path, metadata=plain, info={"format_version": version})


_DAMAGED = "the file is damaged or was not written by safeckpt: restore it from a copy or re-save it"


def write(ckpt: Checkpoint, path: Path) -> Path:
    """Write ``ckpt`` (tensor leaves live or lazy) as one native file, atomically and streaming.

    Tied tensors are written once; non-tensor values go to the skeleton, and a value the codec
    cannot store raises ``TypeError`` naming its path before anything is written.
    """
    items: list[st.Item] = []

    def add(name: str, x: torch.Tensor | TensorRef) -> None:
        span = x.span if isinstance(x, TensorRef) else None
        dtype = x.dtype_info if isinstance(x, TensorRef) else x.dtype
        items.append(st.Item(name, dtype, tuple(x.shape), _getter(x), span))

    skeleton = codec.encode(ckpt.tree, tensor_leaf_encoder(add, complex_dtype=True))
    meta = {KEY_VERSION: VERSION, "format": "pt", KEY_SKELETON: base64.b64encode(skeleton).decode("ascii")}
    meta.update({k: v for k, v in ckpt.metadata.items() if not k.startswith("safeckpt.") and k != "format"})
    return st.write(path, items, meta, checksum_key=st.KEY_CRC)


def _getter(x: torch.Tensor | TensorRef) -> Any:
    return x.load if isinstance(x, TensorRef) else (lambda: x)


def tensor_flags(x: torch.Tensor | TensorRef) -> int:
    """The flags the skeleton records with a tensor reference."""
    if isinstance(x, TensorRef):
        parameter = x.parameter
    else:
        import torch  # x is a torch tensor: torch is imported

        parameter = isinstance(x, torch.nn.Parameter)
    return (FLAG_PARAMETER if parameter else 0) | (FLAG_REQUIRES_GRAD if x.requires_grad else 0)


def tensor_leaf_encoder(
    add: Callable[[str, torch.Tensor | TensorRef], None], *, complex_dtype: bool = False, tied: bool = True
) -> Callable[[tuple[Any, ...], torch.Tensor | TensorRef], list[Any]]:
    """The ``tensor_name`` callback `codec.encode` takes, shared by the native writers: it checks
    each tensor (`_safetensors.check_storable`), names it after its tree path (unique in the file)
    and hands it to ``add(name, tensor)`` once; the skeleton records ``[name, flags]`` (plus the
    complex dtype a tensor stored as its real view had, with ``complex_dtype``). ``tied``: tensors
    sharing storage (`alias_key`) get one name and one ``add``; otherwise every leaf is its own.

    Example:
        >>> items = []
        >>> codec.encode({"w": w, "tied": w}, tensor_leaf_encoder(lambda n, x: items.append(n)))
        >>> items
        ['w']
    """
    names: dict[Hashable, str] = {}
    used: set[str] = set()

    def payload(p: tuple[Any, ...], x: torch.Tensor | TensorRef) -> list[Any]:
        key = alias_key(x) if tied else object()
        if key not in names:
            st.check_storable(x, codec.where(p))
            names[key] = unique_name(path_name(p) or "tensor", used)
            add(names[key], x)
        out: list[Any] = [names[key], tensor_flags(x)]
        dtype = x.dtype_info if isinstance(x, TensorRef) else x.dtype
        if complex_dtype and st.real_view(dtype) is not None:
            out.append(_dtypes.of(dtype).name)
        return out

    return payload


def tensor_leaf_decoder(
    source: str, bind: Callable[[str, int, str | None], TensorRef], *, complex_dtype: bool = False
) -> tuple[Callable[[Any], TensorRef], dict[str, TensorRef]]:
    """The ``tensor`` callback `codec.decode` takes, shared by the native readers, and the dict of
    the references it made (by name, to find tensors no skeleton refers to). Each ``[name, flags]``
    payload (``[name, flags, complex dtype]`` too, with ``complex_dtype``) is checked and bound once
    with ``bind(name, flags, complex dtype or None)``; a name met again is the same reference.

    Example:
        >>> tensor, refs = tensor_leaf_decoder("run.safeckpt", lambda n, f, c: make_ref(n, f))
        >>> tree = codec.decode(skeleton, tensor, source="run.safeckpt")
    """
    refs: dict[str, TensorRef] = {}
    longest = 3 if complex_dtype else 2

    def tensor(payload: Any) -> TensorRef:
        if not (
            type(payload) is list
            and 2 <= len(payload) <= longest
            and type(payload[0]) is str
            and type(payload[1]) is int
            and (len(payload) == 2 or type(payload[2]) is str)
        ):
            raise CorruptCheckpointError(f"{source}: malformed tensor reference {payload!r:.80} in the skeleton")
        name = payload[0]
        if name not in refs:
            refs[name] = bind(name, payload[1], payload[2] if len(payload) == 3 else None)
        return refs[name]

    return tensor, refs


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

    problems = st.verify_file(path, st.KEY_CRC, required=True, describe=describe)
    if not problems:
        try:
            read(path)  # the skeleton decodes and binds every tensor
        except CorruptCheckpointError as e:
            problems.append(str(e))
    return problems


FORMAT = Format(NAME, EXTENSIONS, "file", sniff=sniff, read=read, write=write, verify=verify)
