"""Hostile inputs, round 2: files whose *cost* is the attack (issue 18), assembled byte by byte.

Each builder returns the bytes of one file (or fills a directory) and never imports safeckpt, so
the files stay what an attacker would write. ``SMALL`` are committed to ``cost/`` (a few KB
each); the large members of a class are built at test time from the same builders at any size.
The classes and the limits that refuse them are in ``formats/resource-model.md``.

Run: ``python tests/attacks/make_cost_attacks.py`` (deterministic: the same bytes every time).
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent
COST = HERE / "cost"
sys.path.insert(0, str(HERE))
from make_attacks import P2, P4, STOP, benign_zip, glob, num, state_dict, storage_pid, tensor_v2, torch_zip  # noqa: E402

P61 = 2**61 - 1  # CPython's int hash is x mod P61: 1, 1 + P61, 1 + 2*P61... all hash alike


def colliding_ints(n: int) -> list[int]:
    return [1 + i * P61 for i in range(1, n + 1)]


# -- pickles ----------------------------------------------------------------------------------------


def pickle_dict_flood(n: int) -> bytes:
    """{k: None for k in colliding ints}: SETITEMS into one dict."""
    body = b"".join(num(k) + b"N" for k in colliding_ints(n))
    return P2 + b"}(" + body + b"u" + STOP


def pickle_set_flood(n: int, op: bytes = b"\x90") -> bytes:
    """A set (EMPTY_SET + ADDITEMS) or, with ``op=b"\\x91"``, a FROZENSET of colliding ints."""
    items = b"".join(num(k) for k in colliding_ints(n))
    return P4 + (b"\x8f(" + items + b"\x90" if op == b"\x90" else b"(" + items + b"\x91") + STOP


def pickle_counter_flood(n: int) -> bytes:
    """collections.Counter({colliding ints: 1})."""
    body = b"".join(num(k) + b"K\x01" for k in colliding_ints(n))
    return P2 + glob("collections", "Counter") + b"(}(" + body + b"utR" + STOP


def pickle_memo_key_flood(n: int) -> bytes:
    """Text PUT indices congruent modulo 2**61-1: the VM's memo dict itself floods."""
    puts = b"".join(b"p" + str(k).encode() + b"\n" for k in colliding_ints(n))
    return P2 + b"(N" + puts + b"l" + STOP


def pickle_empty_set_flood(n: int) -> bytes:
    """One byte per empty set (EMPTY_SET, ~200 bytes of object each) appended to one list."""
    return P4 + b"](" + b"\x8f" * n + b"e" + STOP


def pickle_empty_frozenset_flood(n: int) -> bytes:
    """Two bytes (MARK, FROZENSET) per empty frozenset."""
    return P4 + b"](" + b"(\x91" * n + b"e" + STOP


def pickle_memo_flood(n: int) -> bytes:
    """One empty dict memoized n times (MEMOIZE), then fetched n times: the memo grows per byte."""
    return P4 + b"](}" + b"\x94" * n + b"e" + STOP


# -- the native format ------------------------------------------------------------------------------


def ext(code: int, payload: object) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def bigint(v: int) -> msgpack.ExtType:
    return ext(5, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))


def native(skeleton: bytes, tensors: dict[str, tuple[str, list[int], bytes]] | None = None) -> bytes:
    """A .safeckpt around the given msgpack skeleton (and raw tensors), without the optional header CRC."""
    tensors = tensors or {}
    header: dict[str, object] = {}
    offset = 0
    crcs = ""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        crcs += f"{zlib.crc32(raw):08x}"
    header["__metadata__"] = {
        "safeckpt.version": "1",
        "format": "pt",
        "safeckpt.skeleton": base64.b64encode(skeleton).decode(),
        "safeckpt.crc32": crcs,
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    return struct.pack("<Q", len(text)) + text + b"".join(raw for _, _, raw in tensors.values())


def native_key_flood(n: int) -> bytes:
    """A map whose keys are BIGINT ext values congruent modulo 2**61-1."""
    return native(msgpack.packb({"k": {bigint(k): None for k in colliding_ints(n)}}, use_bin_type=True))


def native_value(value: object) -> bytes:
    """A .safeckpt whose state is {"v": value} (value: msgpack data with ext values)."""
    return native(msgpack.packb({"v": value}, use_bin_type=True))


# ext values the pickle handlers would refuse (round 2: the native decoder must refuse them too)
NATIVE_VALUES: dict[str, object] = {
    "device_bad_index": ext(11, "cuda:99999999999"),
    "device_unknown": ext(11, "hyperdrive"),
    "device_not_str": ext(11, [1, 2]),
    "path_bytes": ext(14, ["PurePosixPath", b"/etc"]),
    "namespace_shadow": ext(8, {"_get_kwargs": 1}),
    "namespace_int_key": ext(8, {1: 2}),
    "numpy_bad_codepoint": ext(12, ["<U1", struct.pack("<I", 0x7FFFFFFF)]),
    "numpy_array_bad_codepoint": ext(13, ["<U1", [2], struct.pack("<II", 65, 0x110000)]),
    "numpy_void": ext(12, ["|V4", b"abcd"]),
    "bigint_unprintable": ext(5, b"\x01" + b"\x00" * 2000),
    "bytearray_from_int": ext(16, 10**9),
    "complex_from_str": ext(15, ["1+2j", 0]),
    "counter_from_str": ext(17, "abc"),
    "tuple_from_str": ext(2, "abc"),
    "size_negative": ext(9, [-5]),
    "empty_message_key": ext(10, ""),
}


# -- safetensors ------------------------------------------------------------------------------------


def safetensors_file(header: dict[str, object], data: bytes = b"") -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_many_entries(n: int) -> bytes:
    """n zero-size tensors: each header entry costs ~50 bytes of JSON and a TensorRef."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    return safetensors_file(header)


def safetensors_many_dims(n: int) -> bytes:
    """One empty tensor whose shape has n dimensions (2 bytes of JSON each)."""
    return safetensors_file({"t": {"dtype": "F32", "shape": [1] * (n - 1) + [0], "data_offsets": [0, 0]}})


# -- torch.save zips --------------------------------------------------------------------------------


def stride0_view(numel: int = 2**31) -> bytes:
    """A torch.save zip: one float tensor of ``numel`` elements, stride 0, over a 4-byte storage."""
    pkl = P2 + state_dict(w=tensor_v2(storage_pid("0", 1), 0, (numel,), (0,))) + STOP
    return torch_zip(pkl, {"0": struct.pack("<f", 1.0)}).build()


# -- safeckpt-sharded -------------------------------------------------------------------------------


def tiled_chunks(n: int, start: int) -> list[dict[str, object]]:
    """n one-element chunks tiling a (1, n) float tensor stored from byte ``start`` of shard 0.
    All share their first offset: a check sorted by it compares every pair (O(n**2))."""
    return [
        {"file": 0, "key": "w", "offsets": [0, i], "sizes": [1, 1], "bytes": [start + 4 * i, start + 4 * i + 4]}
        for i in range(n)
    ]


# -- zip differentials: structures torch's reader (miniz) and ours could resolve differently ----------


def zip_two_eocd() -> bytes:
    """A second end-of-central-directory record hidden in the first one's comment."""
    data = benign_zip()
    eocd = data[-22:]
    assert eocd[:4] == b"PK\x05\x06" and eocd[-2:] == b"\x00\x00"
    return data[:-22] + eocd[:-2] + struct.pack("<H", 22) + eocd


def zip_central_directory_slack(gap: int = 46, count_it: bool = True) -> bytes:
    """Bytes between the central directory and its end record (counted in its size, or not)."""
    data = benign_zip()
    eocd = bytearray(data[-22:])
    if count_it:
        (size,) = struct.unpack_from("<I", eocd, 12)
        struct.pack_into("<I", eocd, 12, size + gap)
    return data[:-22] + b"\x00" * gap + bytes(eocd)


SMALL: dict[str, Callable[[], bytes]] = {
    "c01_pickle_dict_flood.pkl": lambda: pickle_dict_flood(500),
    "c02_pickle_set_flood.pkl": lambda: pickle_set_flood(500),
    "c03_pickle_frozenset_flood.pkl": lambda: pickle_set_flood(500, b"\x91"),
    "c04_pickle_counter_flood.pkl": lambda: pickle_counter_flood(500),
    "c05_pickle_memo_key_flood.pkl": lambda: pickle_memo_key_flood(500),
    "c06_native_key_flood.safeckpt": lambda: native_key_flood(500),
    "c07_stride0_view.pt": stride0_view,
    "z01_two_eocd.pt": zip_two_eocd,
    "z02_central_directory_slack.pt": zip_central_directory_slack,
    "z03_central_directory_gap.pt": lambda: zip_central_directory_slack(10, count_it=False),
    **{f"n_{name}.safeckpt": (lambda v=v: native_value(v)) for name, v in NATIVE_VALUES.items()},
}


def main() -> None:
    COST.mkdir(exist_ok=True)
    for name, make in SMALL.items():
        (COST / name).write_bytes(make())
    print(f"wrote {len(SMALL)} files to {COST}")


if __name__ == "__main__":
    main()
