"""Every resource limit a reader enforces, crossed: one step over it is a `CorruptCheckpointError`
naming the file and the limit; at (or under) it the file reads. Limits too large to reach with a
small file are lowered with ``monkeypatch`` to show both sides of the same check.

The limits are tabled in the "Limits" sections of ``formats/safetensors.md``, ``formats/safeckpt.md``, ``formats/safeckpt-sharded.md``,
``formats/torch.md``, ``formats/hf-sharded.md`` and ``formats/dcp.md``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import pickle
import shutil
import struct
import tracemalloc
import types
import zipfile
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import safeckpt
from safeckpt import codec
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _pickle, _safetensors, dcp, hf_sharded, torch_pickle

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _safetensors_file(path: Path, header: dict[str, Any], data: bytes, pad: int = 0) -> Path:
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


# -- safetensors header (safetensors, safeckpt, every shard) ---------------------------------------


def test_header_length_over_the_cap_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge_header.safetensors"
    path.write_bytes(struct.pack("<Q", _safetensors.MAX_HEADER + 1) + b"{}")
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: declared header of 100000001 bytes exceeds the 100 MB"):
        safeckpt.open(path)


def test_header_length_at_the_cap_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _safetensors_file(
        tmp_path / "a.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
    )
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    monkeypatch.setattr(_safetensors, "MAX_HEADER", n)
    assert safeckpt.open(path).tensors()["w"].load().tolist() == [0.0]
    monkeypatch.setattr(_safetensors, "MAX_HEADER", n - 1)
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: declared header of {n} bytes exceeds"):
        safeckpt.open(path)


def test_declared_tensor_bytes_must_match_shape_and_lie_in_the_file(tmp_path: Path) -> None:
    """No size limit is needed for tensors: shape x dtype must equal the byte span, which must lie
    inside the file, so a tensor is never larger than the file it comes from."""
    path = _safetensors_file(
        tmp_path / "big.safetensors",
        {"w": {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*'w': shape \[1073741824, 1073741824\]"):
        safeckpt.open(path)


def test_zero_element_shape_must_still_fit_torch_strides(tmp_path: Path) -> None:
    """A tensor with a 0 dimension holds no bytes, yet torch computes strides from the other dims:
    their product must stay below 2**63 (found by the fuzzer: an OverflowError/TypeError escaped)."""
    ok = _safetensors_file(
        tmp_path / "ok.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]}}, b""
    )
    assert safeckpt.open(ok).tensors()["w"].load().shape == (0, 2**63 - 1)
    path = _safetensors_file(
        tmp_path / "wide.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**62, 2], "data_offsets": [0, 0]}}, b""
    )
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"{path}: .*'w' has shape \[0, 4611686018427387904, 2\], which spans more than 2\*\*63-1",
    ):
        safeckpt.open(path)


# -- the native skeleton (msgpack) -----------------------------------------------------------------


def _native_with_skeleton(tmp_path: Path, skeleton: bytes) -> Path:
    path = safeckpt.save(tmp_path / "run.safeckpt", {"step": 1})
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    meta.pop(_safetensors.KEY_HEADER_CRC, None)
    meta["safeckpt.skeleton"] = base64.b64encode(skeleton).decode()
    return _safetensors_file(path, header, data[8 + n :])


def test_skeleton_nesting_beyond_msgpack_depth_is_refused(tmp_path: Path) -> None:
    assert safeckpt.open(_native_with_skeleton(tmp_path, b"\x81\xa1k" + b"\x91" * 1023 + b"\x00"))["k"]
    path = _native_with_skeleton(tmp_path, b"\x81\xa1k" + b"\x91" * 1024 + b"\x00")
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: the msgpack skeleton is malformed"):
        safeckpt.open(path)


def _nested_tuples(levels: int) -> bytes:
    payload = b"\x90"
    for _ in range(levels):
        head = b"\xc7" + bytes([len(payload)]) if len(payload) < 256 else b"\xc8" + struct.pack(">H", len(payload))
        payload = b"\x91" + head + b"\x02" + payload  # a one-element list holding a TUPLE ext
    return payload


def test_skeleton_ext_nesting(tmp_path: Path) -> None:
    """Tuples inside tuples are ext payloads decoded one inside another, each a C-level msgpack
    call: 200 levels overflowed the C stack (a crash found while writing this test); now 64 is the limit."""
    ok = _native_with_skeleton(tmp_path, b"\x81\xa1k" + _nested_tuples(codec.MAX_EXT_DEPTH))
    assert safeckpt.open(ok)["k"]
    path = _native_with_skeleton(tmp_path, b"\x81\xa1k" + _nested_tuples(codec.MAX_EXT_DEPTH + 1))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: the skeleton nests ext values .* more than 64 deep"):
        safeckpt.open(path)
    path = _native_with_skeleton(tmp_path, b"\x81\xa1k" + _nested_tuples(2000))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: the skeleton nests ext values"):
        safeckpt.open(path)


def test_skeleton_declared_lengths_are_bounded_by_its_size(tmp_path: Path) -> None:
    """msgpack lengths (arrays, maps, strings, bins, exts) may not exceed the skeleton's byte count:
    a 5-byte skeleton cannot announce 2**32-1 items."""
    path = _native_with_skeleton(tmp_path, b"\xdd\xff\xff\xff\xff")
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: the msgpack skeleton is malformed .*max_array_len"):
        safeckpt.open(path)


# -- pickles (torch .pt/.bin/.ckpt, legacy files, DCP .metadata) ----------------------------------


def _pickle_file(tmp_path: Path, data: bytes, name: str = "x.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pickle_mark_depth(tmp_path: Path) -> None:
    ok = b"\x80\x02" + b"(" * _pickle.MAX_MARK_DEPTH + b"t" * _pickle.MAX_MARK_DEPTH + b"0N."
    assert _pickle.load(ok, source="ok.pkl").value is None
    path = _pickle_file(tmp_path, b"\x80\x02" + b"(" * (_pickle.MAX_MARK_DEPTH + 1) + b".")
    with pytest.raises(
        CorruptCheckpointError, match=rf"{path}: malformed pickle at byte \d+: more than 10000 nested MARKs"
    ):
        safeckpt.open(path)


def test_pickle_memo_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pickle, "MAX_MEMO", 10)
    data = pickle.dumps([[i] for i in range(9)], protocol=2)  # 10 memo entries: the outer list and 9 inner
    assert safeckpt.open(_pickle_file(tmp_path, data, "ok.pkl")).tree == [[i] for i in range(9)]
    path = _pickle_file(tmp_path, pickle.dumps([[i] for i in range(10)], protocol=2))
    with pytest.raises(
        CorruptCheckpointError, match=rf"{path}: malformed pickle at byte \d+: more than 10 memo entries"
    ):
        safeckpt.open(path)


def test_pickle_memo_entries_protocol4_memoize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pickle, "MAX_MEMO", 10)
    path = _pickle_file(tmp_path, pickle.dumps([[i] for i in range(10)], protocol=4))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*more than 10 memo entries"):
        safeckpt.open(path)


def test_pickle_integer_size(tmp_path: Path) -> None:
    big = 2 ** (8 * _pickle.MAX_LONG_BYTES - 1) - 1  # exactly MAX_LONG_BYTES bytes in two's complement
    assert safeckpt.open(_pickle_file(tmp_path, pickle.dumps({"n": big}, protocol=2), "ok.pkl"))["n"] == big
    path = _pickle_file(tmp_path, pickle.dumps({"n": big * 256}, protocol=2))
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"{path}: malformed pickle at byte \d+: an integer of {_pickle.MAX_LONG_BYTES + 1} bytes \(limit {_pickle.MAX_LONG_BYTES}\)",
    ):
        safeckpt.open(path)


def test_pickle_dict_key_size(tmp_path: Path) -> None:
    key = tuple(range(_pickle.MAX_KEY_ITEMS))
    assert key in safeckpt.open(_pickle_file(tmp_path, pickle.dumps({key: 1}, protocol=2), "ok.pkl")).tree
    path = _pickle_file(tmp_path, pickle.dumps({(*key, -1): 1}, protocol=2))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*a dict key or set member holds more than 1024 items"):
        safeckpt.open(path)


def test_pickle_text_lines_end_within_the_file(tmp_path: Path) -> None:
    """Text opcodes (INT, GLOBAL, STRING...) read to a newline that must exist: no unbounded scan."""
    path = _pickle_file(tmp_path, b"\x80\x02I" + b"1" * 100_000)
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: malformed pickle"):
        safeckpt.open(path)


def test_tree_depth(tmp_path: Path) -> None:
    def nested(depth: int) -> dict[str, Any]:
        obj: Any = 0
        for _ in range(depth):
            obj = [obj]
        return {"x": obj}

    torch.save(nested(torch_pickle.MAX_DEPTH - 1), tmp_path / "ok.pt")  # the "x" key is one more level
    assert safeckpt.open(tmp_path / "ok.pt")["x"]
    path = tmp_path / "deep.pt"
    torch.save(nested(torch_pickle.MAX_DEPTH), path)
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: x/0/0.*nested more than 256 levels deep"):
        safeckpt.open(path)


def test_shared_references_expansion_budget(tmp_path: Path) -> None:
    """A pickle's memo lets a few bytes describe a DAG with 2**40 paths (a "billion laughs"); the
    tree is built by copying shared containers, at most 20,000 + 4 x pickle-size values."""

    def laughs(levels: int) -> dict[str, Any]:
        obj: Any = [0]
        for _ in range(levels):
            obj = [obj, obj]
        return {"x": obj}

    torch.save(laughs(10), tmp_path / "ok.pt")  # 2047 lists: well within the budget
    assert len(safeckpt.open(tmp_path / "ok.pt")["x"]) == 2
    path = tmp_path / "laughs.pt"
    torch.save(laughs(40), path)
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*expand to too many values \(a memo bomb\?\)"):
        safeckpt.open(path)


class _Storage:
    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Tensor:
    """Reduces the way torch pickles a tensor, with any size/stride (torch itself would refuse some)."""

    def __init__(self, storage: _Storage, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self) -> Any:
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _torch_file(path: Path, size: tuple[int, ...], stride: tuple[int, ...], numel: int = 1) -> Path:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({"t": _Tensor(_Storage(numel), size, stride)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", b"\0" * 4 * numel)
        z.writestr("archive/version", "3\n")
    return path


def test_tensor_dims(tmp_path: Path) -> None:
    ok = _torch_file(tmp_path / "ok.pt", (1,) * torch_pickle.MAX_DIMS, (1,) * torch_pickle.MAX_DIMS)
    assert safeckpt.open(ok).tensors()["t"].load().dim() == 64
    path = _torch_file(tmp_path / "dims.pt", (1,) * 65, (1,) * 65)
    with pytest.raises(
        CorruptCheckpointError, match=rf"{path} \(data.pkl\): .*tensor size must be up to 64 non-negative ints"
    ):
        safeckpt.open(path)


def test_tensor_elements(tmp_path: Path) -> None:
    """An expanded (stride-0) view may have more elements than its storage within the resource
    model's bound (formats/resource-model.md: 16x the file + 64 MiB once loaded), never past 2**62."""
    ok = _torch_file(tmp_path / "ok.pt", (1024, 1024), (0, 0))
    assert safeckpt.open(ok).tensors()["t"].load().shape == (1024, 1024)
    big = _torch_file(tmp_path / "big.pt", (2**31, 2**31), (0, 0))
    with pytest.raises(CorruptCheckpointError, match=rf"{big}: t: an expanded view of \[2147483648, 2147483648\]"):
        safeckpt.open(big)
    path = _torch_file(tmp_path / "elements.pt", (2**31, 2**31 + 1), (0, 0))
    with pytest.raises(CorruptCheckpointError, match=rf"{path} \(data.pkl\): .*beyond 4611686018427387904 elements"):
        safeckpt.open(path)


def test_tensor_dims_each_bounded_even_with_a_zero_dim(tmp_path: Path) -> None:
    """Found by the fuzzer: size (0, 2**64) has no elements, and as_strided raised TypeError."""
    path = _torch_file(tmp_path / "zero.pt", (0, 2**64), (1, 1))
    with pytest.raises(CorruptCheckpointError, match=rf"{path} \(data.pkl\): .*beyond 4611686018427387904 elements"):
        safeckpt.open(path)


def test_tensor_view_must_fit_its_storage(tmp_path: Path) -> None:
    path = _torch_file(tmp_path / "past.pt", (2,), (1,), numel=1)
    with pytest.raises(
        CorruptCheckpointError, match=rf"{path} \(data.pkl\): .*tensor view \[0, 2\) exceeds its storage of 1 elements"
    ):
        safeckpt.open(path).tensors()["t"].load()


# -- directory formats -----------------------------------------------------------------------------


def test_hf_index_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shutil.copytree(FIXTURES / "hf" / "sharded_st", tmp_path / "m")
    index = root / "model.safetensors.index.json"
    monkeypatch.setattr(hf_sharded, "MAX_INDEX", index.stat().st_size)
    assert safeckpt.open(root).tensors()
    monkeypatch.setattr(hf_sharded, "MAX_INDEX", index.stat().st_size - 1)
    with pytest.raises(CorruptCheckpointError, match=rf"{index}: not an index: an index is a JSON file of at most"):
        safeckpt.open(root)


def test_dcp_metadata_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shutil.copytree(FIXTURES / "dcp" / "safetensors", tmp_path / "d")
    size = (root / ".metadata").stat().st_size
    monkeypatch.setattr(dcp, "MAX_METADATA", size)
    assert safeckpt.open(root).tensors()
    monkeypatch.setattr(dcp, "MAX_METADATA", size - 1)
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"{root / '.metadata'}: {size} bytes is more than any DCP .metadata \(limit {size - 1}\)",
    ):
        safeckpt.open(root)


def test_dcp_chunk_overlap_check_is_exact_without_a_pair_budget() -> None:
    """DCP and safeckpt-sharded share one O(n log n) tiling check (formats/_tiling.py): a grid
    tiling passes however interleaved, an overlap with the same total volume is named."""
    where = types.SimpleNamespace(bad=lambda what: CorruptCheckpointError(f"ckpt/.metadata: {what}"))
    grid = [dcp.Chunk((i, j), (1, 1)) for i in range(30) for j in range(30)]
    dcp._no_overlaps(where, "w", grid, (30, 30))
    grid[-1] = dcp.Chunk((0, 0), (1, 1))
    with pytest.raises(
        CorruptCheckpointError, match=r"ckpt/.metadata: tensor 'w': chunks at \[0, 0\] and \[0, 0\] overlap"
    ):
        dcp._no_overlaps(where, "w", grid, (30, 30))


def test_save_refuses_ext_nesting_reading_would_refuse(tmp_path: Path) -> None:
    def nest(levels: int) -> tuple[Any, ...]:
        x: tuple[Any, ...] = ()
        for _ in range(levels - 1):
            x = (x,)
        return x

    ok = safeckpt.save(tmp_path / "ok.safeckpt", {"k": nest(codec.MAX_EXT_DEPTH)})
    assert safeckpt.load(ok)["k"] == nest(codec.MAX_EXT_DEPTH)
    with pytest.raises(TypeError, match="more than 64 deep inside each other, which safeckpt cannot read back"):
        safeckpt.save(tmp_path / "deep.safeckpt", {"k": nest(codec.MAX_EXT_DEPTH + 1)})
    assert not (tmp_path / "deep.safeckpt").exists()


def _sharded_with_shape(tmp_path: Path, shape: list[int]) -> Path:
    root = shutil.copytree(FIXTURES / "sharded" / "fsdp2-2ranks", tmp_path / "sharded")
    index = msgpack.unpackb((root / "safeckpt-index.msgpack").read_bytes(), raw=False, strict_map_key=False)
    index.pop("crc32", None)  # an index without its checksum still reads (verify reports it)
    name = next(iter(index["tensors"]))
    index["tensors"][name].update(shape=shape, chunks=[])
    (root / "safeckpt-index.msgpack").write_bytes(msgpack.packb(index))
    return root


def test_sharded_zero_element_shape_must_fit_torch_strides(tmp_path: Path) -> None:
    """Found by reading the code after the safetensors case: a chunkless 0-element tensor of
    shape [0, 2**62, 2**62] made torch.empty raise RuntimeError (stride overflow) on load."""
    root = _sharded_with_shape(tmp_path, [0, 2**62, 2**62])
    with pytest.raises(
        CorruptCheckpointError, match=r"safeckpt-index.msgpack: invalid index: tensor .* spans more than 2\*\*63-1"
    ):
        safeckpt.open(root)


def test_dcp_zero_element_size_must_fit_torch_strides(tmp_path: Path) -> None:
    root = shutil.copytree(FIXTURES / "dcp" / "safetensors", tmp_path / "d")
    meta = pickle.loads((root / ".metadata").read_bytes())  # our own fixture: trusted
    item = meta.state_dict_metadata["model.weight"]
    item.size, item.chunks = torch.Size([0, 2**62, 2**62]), []
    (root / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"{root / '.metadata'}: tensor size \[0, 4611686018427387904, 4611686018427387904\] spans more than 2\*\*63-1",
    ):
        safeckpt.open(root)


_N = 30_000
_PICKLE_BOMBS = {
    "empty sets": b"\x80\x04("
    + b"\x8f" * _N
    + b"l.",  # the worst case: 216 bytes of set per byte, then copied into the tree
    "empty dicts": b"\x80\x02(" + b"}" * _N + b"l.",
    "frozensets": b"\x80\x04(" + b"(\x91" * (_N // 2) + b"l.",
    "memoized lists": b"\x80\x04(" + b"]\x94" * (_N // 2) + b"l.",
}


@pytest.mark.parametrize("kind", list(_PICKLE_BOMBS))
def test_pickle_memory_is_at_most_512_bytes_per_byte(kind: str, tmp_path: Path) -> None:
    """No allocation is sized from a declared length, but every opcode byte may create an object:
    reading a pickle (the VM's graph plus the tree copied from it) holds at most 512 bytes of Python
    objects per pickle byte. Measured with tracemalloc on pickles of one opcode repeated."""
    path = _pickle_file(tmp_path, _PICKLE_BOMBS[kind])
    safeckpt.open(_pickle_file(tmp_path, pickle.dumps([set()]), "warm.pkl"))  # imports are not the input's cost
    tracemalloc.start()
    try:
        safeckpt.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 512 * path.stat().st_size


@pytest.mark.parametrize("inner", [b"[]", b"{}", b"0", b'""'])
def test_header_json_memory_is_at_most_32_bytes_per_byte(inner: bytes, tmp_path: Path) -> None:
    """A safetensors header is parsed into Python objects before it is validated: at most 32 bytes
    of them per header byte (empty dicts, the worst case, cost about 27)."""
    junk = b",".join([inner] * (_N // 3))
    text = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":[' + junk + b"]}}"
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    safeckpt.open(FIXTURES / "hf" / "plain.safetensors")  # imports are not the input's cost
    tracemalloc.start()
    try:
        with contextlib.suppress(CorruptCheckpointError):
            safeckpt.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 32 * path.stat().st_size
