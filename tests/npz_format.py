"""A third-party format, as an outside package would write one: numpy's ``.npz`` (a zip of ``.npy``
arrays), read with ``allow_pickle=False``. One module plus one `safeckpt.register_format` call."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

import safeckpt
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import Format
from safeckpt.tree import Checkpoint, TensorRef, iter_leaves, path_name


def sniff(head: bytes, path: Path) -> bool:
    """A zip whose first entry is an ``.npy`` array (``np.savez`` writes nothing else)."""
    if head[:4] != b"PK\x03\x04" or len(head) < 30:
        return False
    name_len = int.from_bytes(head[26:28], "little")
    return head[30 : 30 + name_len].endswith(b".npy")


def read(path: Path, *, allow: Iterable[str] = ()) -> Checkpoint:
    try:
        return _read(path)
    except zipfile.BadZipFile as e:  # a plugin reports damage the way the built-in formats do
        raise CorruptCheckpointError(f"{path}: damaged ({e}); re-download the file") from e


def _read(path: Path) -> Checkpoint:
    with np.load(path, allow_pickle=False) as z:
        names = list(z.files)
        headers = {}
        for name in names:  # dtype and shape from each .npy header, without reading the data
            with z.zip.open(f"{name}.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                headers[name] = (torch.from_numpy(np.empty(0, dtype)).dtype, tuple(shape))

    def loader(name: str) -> torch.Tensor:
        try:
            with np.load(path, allow_pickle=False) as z:
                return torch.from_numpy(np.ascontiguousarray(z[name]))
        except zipfile.BadZipFile as e:  # a plugin reports damage the way the built-in formats do
            raise CorruptCheckpointError(f"{path}: array {name!r} is damaged ({e}); re-download the file") from e

    tree = {
        name: TensorRef(name=name, dtype=dt, shape=shape, source=str(path), loader=lambda n=name: loader(n))
        for name, (dt, shape) in headers.items()
    }
    return Checkpoint(tree, format="npz", path=path)


def write(ckpt: Checkpoint, path: Path) -> Path:
    arrays = {}
    for p, leaf in iter_leaves(ckpt.tree):
        if isinstance(leaf, (torch.Tensor, TensorRef)):
            t = leaf.load() if isinstance(leaf, TensorRef) else leaf
            arrays[path_name(p)] = t.detach().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def verify(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    return [] if bad is None else [f"{path}: entry {bad} fails its CRC"]


# zip stores a CRC-32 of each array (its .npy header and data): verify checks both regions
FORMAT = Format(
    "npz", (".npz",), "file", sniff=sniff, read=read, write=write, verify=verify, checksummed=frozenset({"header", "data"})
)


def register() -> None:
    safeckpt.register_format(FORMAT)
