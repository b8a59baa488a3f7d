"""The fuzz harness behind ``tests/test_fuzz.py``: seeds, structure-aware mutators, and a sandboxed worker.

Every reader is fed mutations of valid files. A mutation is a short list of operations drawn by
hypothesis: generic ones (bit flips, overwrites with interesting values such as 0, 0xff and
little-endian 2**31 / 2**63 / file-size, truncation, extension, deletion, chunk duplication,
splicing from another seed) and ones that know the container: the safetensors header JSON, the
native msgpack skeleton (re-encoded into the header, plus huge declared lengths and deep nesting),
zip records (sizes, offsets, counts, names), pickle opcodes (found with `pickletools.genops`, never
executed: replaced, deleted, duplicated, moved, their arguments overwritten, snippets inserted) and
index JSON / msgpack files of directory formats.

Each input runs in a long-lived worker subprocess (`Worker`): ``safeckpt.open`` (detection and
all), ``to_python()``, ``load()`` of every tensor with every byte of its storage read, and the
format's ``verify``; when detection picks another format, the reader under test is also called
directly. The oracle: each call returns or raises a `safeckpt.CheckpointError`. Anything else is an
escape: another exception type, a worker that dies (a signal: SIGSEGV, SIGBUS), one that does not
answer within `TIMEOUT` seconds (killed and restarted), or an input whose peak resident memory
grows by more than `MEM_PER_BYTE` times its file size plus `SLACK` bytes. Memory is measured as the growth of the
worker's high-water mark (``VmHWM``, reset before each input through ``/proc/self/clear_refs``); the
file's own pages count too, which is why the bound is file size plus a fixed slack. The worker also
runs under ``RLIMIT_AS`` = its warmed-up address space + 1 GiB, so an allocation sized from a
declared length fails at once (``MemoryError``/``RuntimeError``: an escape) even when its pages are
never touched.

The cost oracle (the resource model, ``formats/resource-model.md``): each input's CPU time must
stay within `CPU_FIXED` seconds plus `CPU_PER_MB` per MB of input, else it is an escape too (a
quadratic check, a hash flood); the harness records the worst CPU time and peak memory per input
byte it met, printed in pytest's terminal summary. Structure-aware generators aim at the costly
classes: colliding dict/set keys, empty-set and memo floods, expanded (stride-0) views, wide and deep
headers and skeletons, and shards replaced by a FIFO or a symlink out of the directory (`SPECIAL`).

The worker is this file run as a script (``python tests/fuzzing.py --worker``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
import pickletools
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT = float(os.environ.get("SAFECKPT_FUZZ_TIMEOUT", "20"))
SLACK = 64 << 20
MEM_PER_BYTE = 64  # the resource model's constant: peak memory <= MEM_PER_BYTE x input + SLACK
RATIO_MIN_SIZE = 64 << 10  # per-byte costs are reported for inputs this large (fixed costs swamp smaller ones)
CPU_FIXED = float(os.environ.get("SAFECKPT_FUZZ_CPU_FIXED", "5"))  # seconds any input may take
_P61 = 2**61 - 1  # CPython's int hash modulus: 1, 1 + _P61, ... all hash alike
CPU_PER_MB = 20.0  # and per MB of input: O(n log n) readers take well under a second per MB
AS_HEADROOM = 1 << 30
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# reader -> counters; the terminal summary (tests/conftest.py) prints it
STATS: dict[str, dict[str, float]] = {}


# -- seeds -----------------------------------------------------------------------------------------


@dataclass
class Seed:
    """A valid checkpoint to mutate: ``root`` (a file or directory) and the file in it to damage."""

    reader: str
    root: Path
    target: str  # path of the mutated file relative to root; "" when root is the file
    data: bytes
    kinds: tuple[str, ...]  # structure-aware mutators that apply
    zip_members: list[tuple[str, bytes]] | None = None
    label: str = field(default="")

    def __post_init__(self) -> None:
        self.label = self.label or f"{self.root.name}/{self.target}".rstrip("/")


def _kinds(name: str, data: bytes) -> tuple[str, ...]:
    kinds: list[str] = []
    if data[:2] == b"PK":
        kinds += ["zip", "pickle"]
    elif data[:1] == b"\x80" or name.endswith(".metadata"):
        kinds.append("pickle")
    elif name.endswith(".json"):
        kinds.append("json")
    elif name.endswith(".msgpack"):
        kinds.append("msgpack")
    elif len(data) >= 10 and data[8:9] == b"{":
        kinds += ["st_header", "st_wide"]
        if b'"safeckpt.skeleton"' in data[: 8 + struct.unpack("<Q", data[:8])[0]]:
            kinds.append("skeleton")
    return tuple(kinds)


def _zip_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """The stored members of a torch zip, read from the local headers (no CRC check: torch may write 0)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            out = []
            for info in z.infolist():
                h = info.header_offset
                n, e = struct.unpack("<HH", data[h + 26 : h + 30])
                start = h + 30 + n + e
                out.append((info.filename, data[start : start + info.file_size]))
            return out
    except (zipfile.BadZipFile, struct.error):
        return None


def seed_files(reader: str, root: Path, weights: dict[str, int] | None = None) -> list[Seed]:
    """Seeds for every file of ``root`` (itself if it is a file); ``weights`` repeats some targets."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = []
    for f in files:
        rel = "" if f == root else f.relative_to(root).as_posix()
        data = f.read_bytes()
        kinds = _kinds(f.name, data)
        if rel and f.name.endswith((".safetensors", ".distcp", ".bin")):  # a file an index names
            kinds += ("special",)
        seed = Seed(reader, root, rel, data, kinds, _zip_members(data) if "zip" in kinds else None)
        out += [seed] * (weights or {}).get(f.name, 1)
    return out


def build_seeds(work: Path) -> dict[str, list[Seed]]:
    """Shipped fixtures plus small files written here by safeckpt, torch and safetensors."""
    import argparse
    import collections

    import numpy as np
    import safetensors.torch
    import torch

    import safeckpt

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    extras = {
        "tuple": (1, 2.5, "x"),
        "set": {1, 2},
        "frozen": frozenset({"a"}),
        "od": collections.OrderedDict(a=1),
        "big": 2**80,
        "np": np.arange(3, dtype=np.int16),
        "npscalar": np.float32(1.5),
        "path": Path("a/b"),
        "cplx": 1 + 2j,
        "ba": bytearray(b"xy"),
        "counter": collections.Counter([1, 1, 2]),
        "ns": argparse.Namespace(lr=0.1),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "c128": torch.randn(2, dtype=torch.complex128),
        "bf16": torch.randn(3).to(torch.bfloat16),
    }
    state = {"model": model, "optimizer": opt, "step": 3, "extras": extras}
    native = safeckpt.save(work / "made.safeckpt", state)
    sharded = safeckpt.save(work / "made_sharded", {"model": model, "step": 1}, max_shard_size=64)
    st_file = work / "made.safetensors"
    safetensors.torch.save_file(
        {"w": torch.randn(2, 3), "b": torch.arange(4, dtype=torch.int64), "h": torch.ones(2, dtype=torch.float16)},
        str(st_file),
        metadata={"format": "pt"},
    )
    pt_zip, pt_legacy = work / "made.pt", work / "made_legacy.pt"
    sd = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 2}
    torch.save(sd, pt_zip)
    torch.save(sd, pt_legacy, _use_new_zipfile_serialization=False)

    hf, torch_dir, dcp = FIXTURES / "hf", FIXTURES / "torch", FIXTURES / "dcp"
    index_weight = {"model.safetensors.index.json": 4, "pytorch_model.bin.index.json": 4}
    return {
        "safeckpt": seed_files("safeckpt", native),
        "safeckpt-sharded": seed_files(
            "safeckpt-sharded", FIXTURES / "sharded" / "fsdp2-2ranks", {"safeckpt-index.msgpack": 3}
        )
        + seed_files("safeckpt-sharded", sharded, {"safeckpt-index.msgpack": 3}),
        "safetensors": [s for p in sorted(hf.glob("*.safetensors")) for s in seed_files("safetensors", p)]
        + seed_files("safetensors", st_file),
        "hf-sharded": seed_files("hf-sharded", hf / "sharded_st", index_weight)
        + seed_files("hf-sharded", hf / "sharded_bin", index_weight),
        "dcp": seed_files("dcp", dcp / "safetensors", {".metadata": 3})
        + seed_files("dcp", dcp / "single", {".metadata": 3})
        + seed_files("dcp", dcp / "fsdp2", {".metadata": 3}),
        "torch": [s for p in sorted(torch_dir.glob("*.pt")) if p.stat().st_size < 20000 for s in seed_files("torch", p)]
        + seed_files("torch", FIXTURES / "lightning" / "fabric.ckpt")
        + seed_files("torch", FIXTURES / "lightning" / "trainer.ckpt")
        + seed_files("torch", pt_zip)
        + seed_files("torch", pt_legacy),
    }


# -- mutators --------------------------------------------------------------------------------------

Draw = Callable[[Any], Any]
INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000]
INTERESTING += [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _st() -> Any:
    from hypothesis import strategies

    return strategies


def _int_bytes(draw: Draw, size: int) -> bytes:
    s = _st()
    width = draw(s.sampled_from([1, 2, 4, 8]))
    v = draw(s.sampled_from([*INTERESTING, size, size - 1, size + 1, size // 2]) | s.integers(0, 2**64 - 1))
    if draw(s.booleans()):
        v = -v
    return (v % (1 << 8 * width)).to_bytes(width, "little" if draw(s.integers(0, 3)) else "big")


def _pos(draw: Draw, data: bytes | list[Any], extra: int = 0) -> int:
    return draw(_st().integers(0, max(0, len(data) - 1 + extra)))


def m_flip(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    if not data:
        return data
    i, bit = _pos(draw, data), draw(_st().integers(0, 7))
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]


def m_overwrite(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    s = _st()
    value = _int_bytes(draw, len(data)) if draw(s.booleans()) else draw(s.binary(min_size=1, max_size=16))
    i = _pos(draw, data)
    return data[:i] + value + data[i + len(value) :]


def m_truncate(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    return data[: _pos(draw, data)]


def m_extend(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    s = _st()
    if draw(s.booleans()) and data:
        i = _pos(draw, data)
        return data + data[i : i + draw(s.integers(1, 4096))]
    return data + draw(s.binary(min_size=1, max_size=64))


def m_delete(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    i = _pos(draw, data)
    return data[:i] + data[i + draw(_st().integers(1, 64)) :]


def m_duplicate(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    s = _st()
    i, j = _pos(draw, data), _pos(draw, data, 1)
    chunk = data[i : i + draw(s.integers(1, 256))]
    return data[:j] + chunk + data[j:]


def m_splice(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """A chunk of another seed of the same reader, inserted or overwriting; or that whole file."""
    s = _st()
    other = draw(s.sampled_from(others)).data
    if draw(s.integers(0, 3)) == 0:
        return other
    i, j = _pos(draw, other), _pos(draw, data, 1)
    chunk = other[i : i + draw(s.integers(1, 512))]
    return data[:j] + chunk + data[j + (len(chunk) if draw(s.booleans()) else 0) :]


INTERESTING_JSON: list[Any] = [None, True, 0, -1, 1, 3, 2**31, 2**53, 2**63 - 1, 2**64, 2**70, -(2**63), 1e308]
INTERESTING_JSON += ["", "x", "F32", "BOOL", "F4", "U8", "C64", "__metadata__", "../escape", "/etc/passwd"]
INTERESTING_JSON += ["model-00001-of-00003.safetensors", "pytorch_model-00002-of-00003.bin", "nope.safetensors"]
INTERESTING_JSON += [[], {}, [0], [0, 0], [1, 0], [0, 2**64], [2**32, 2**32], [-1], [0] * 70, [[0]], {"a": "b"}]
INTERESTING_JSON += [[0, 2**62, 2**62], [0, 2**64 - 1], [2**63 - 1, 0]]  # empty tensors whose strides overflow


def _json_slots(obj: Any, out: list[tuple[Any, Any]]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            _json_slots(v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            _json_slots(v, out)


def mutate_tree(draw: Draw, obj: Any, leaves: list[Any]) -> Any:
    """Change one slot of a JSON-like tree: a new value, a copy of another slot, a deletion or an
    insertion; dict keys may be renamed."""
    s = _st()
    slots: list[tuple[Any, Any]] = []
    _json_slots(obj, slots)
    if not slots:
        return copy.deepcopy(draw(s.sampled_from(leaves)))
    parent, key = draw(s.sampled_from(slots))
    op = draw(s.integers(0, 5))
    if op == 0:
        parent[key] = copy.deepcopy(draw(s.sampled_from(leaves)))
    elif op == 1:
        other_parent, other_key = draw(s.sampled_from(slots))
        parent[key] = copy.deepcopy(other_parent[other_key])  # a copy: the slot may be an ancestor
    elif op == 2:
        del parent[key]
    elif op == 3 and isinstance(parent, dict):
        parent[draw(s.sampled_from([k for k in leaves if isinstance(k, str)]))] = copy.deepcopy(parent[key])
    elif op == 4:
        if isinstance(parent, list):
            parent.insert(key, copy.deepcopy(draw(s.sampled_from(leaves))))
        else:
            parent[f"{key}_"] = copy.deepcopy(draw(s.sampled_from(leaves)))
    else:
        value = parent[key]
        if type(value) is int:
            parent[key] = value + draw(s.sampled_from([-1, 1, 8, -(2**62), 2**62, 2**64]))
        elif isinstance(value, str):
            parent[key] = draw(s.sampled_from(["", value + "x", value[:-1], value * 2, "../" + value, "\ud800"]))
        else:
            parent[key] = copy.deepcopy(draw(s.sampled_from(leaves)))
    return obj


def _header(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    try:
        n = struct.unpack("<Q", data[:8])[0]
        return json.loads(data[8 : 8 + n]), data[8 + n :]
    except (ValueError, struct.error):
        return None


def _with_header(draw: Draw, header: Any, rest: bytes) -> bytes:
    s = _st()
    text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode("utf-8", "surrogatepass")
    if draw(s.integers(0, 4)) == 0:
        text += b" " * draw(s.integers(1, 9))
    n = len(text) if draw(s.integers(0, 6)) else struct.unpack("<Q", _int_bytes(draw, len(text)).ljust(8, b"\0"))[0]
    return struct.pack("<Q", n) + text + rest


def m_st_wide(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """Wide or deep safetensors headers: many zero-size entries, a shape of many dimensions."""
    parsed = _header(data)
    if parsed is None:
        return data
    header, rest = parsed
    s = _st()
    n = draw(s.sampled_from([65, 1000, 20_000, 200_000]))
    if draw(s.booleans()):
        header.update({f"w{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)})
    else:
        header["w"] = {"dtype": "F32", "shape": [1] * (n - 1) + [0], "data_offsets": [0, 0]}
    return _with_header(draw, header, rest)


def m_special(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """A file named by an index replaced by a FIFO or a symlink out of the directory (`materialize`)."""
    return draw(_st().sampled_from(SPECIAL))


SPECIAL = [b"<safeckpt-fuzz:fifo>", b"<safeckpt-fuzz:symlink-out>"]


def m_st_header(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    parsed = _header(data)
    if parsed is None:
        return data
    header, rest = parsed
    for _ in range(draw(_st().integers(1, 3))):
        header = mutate_tree(draw, header, INTERESTING_JSON)
    return _with_header(draw, header, rest)


MSGPACK_BOMBS = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 items
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xdb\x7f\xff\xff\xff",  # str32
    b"\xc9\xff\xff\xff\xff\x02",  # ext32 (tuple)
    b"\xdc\xff\xff",  # array16
    b"\x91" * 3000,  # 3000 nested one-element arrays
    b"\xc7\x00\x02" * 1000,  # empty TUPLE exts
    b"\xd4\x02\x91" * 600,  # nested tuple exts
    b"\xc7\x03\x0b\xa3zzz",  # DEVICE "zzz"
    b"\xc7\x04\x0a\xa3int",  # DTYPE "int"
    b"\xd5\x09\x91\xff",  # SIZE [-1]
    b"\xc7\x0e\x0d\x93\xa3<f8\x92\xcf\x7f\xff\xff\xff\xff\xff\xff\xff\x00\xc4\x00",  # NP_ARRAY huge shape
]


def _nested_exts(levels: int) -> bytes:
    """TUPLE exts nested ``levels`` deep: each level a nested C-level unpack (this crashed once)."""
    payload = b"\x90"
    for _ in range(levels):
        n = len(payload) + 1
        head = (
            b"\xc7" + bytes([n])
            if n < 256
            else b"\xc8" + struct.pack(">H", n)
            if n < 65536
            else b"\xc9" + struct.pack(">I", n)
        )
        payload = head + b"\x02\x91" + payload
    return payload


def _colliding_map(n: int) -> bytes:
    """A map whose keys are BIGINT exts congruent modulo 2**61-1 (hash flooding the skeleton)."""
    import msgpack

    keys = [(1 + i * _P61).to_bytes(9, "big", signed=True) for i in range(1, n + 1)]
    return msgpack.packb({msgpack.ExtType(5, msgpack.packb(k)): None for k in keys}, use_bin_type=True)


MSGPACK_BOMBS += [_nested_exts(65), _nested_exts(400), _colliding_map(300)]
MSGPACK_BOMBS += [
    b"\xc7\x05\x10\xce\x3b\x9a\xca\x00",  # BYTEARRAY ext of the int 10**9 (not bytes)
    b"\xc7\x0e\x08\x81\xab_get_kwargs\x01",  # Namespace attribute shadowing a method
]


def mutate_msgpack(draw: Draw, data: bytes, others: list[bytes]) -> bytes:
    import msgpack

    s = _st()
    op = draw(s.integers(0, 4))
    if op <= 1:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=lambda c, d: [f"ext{c}", d])
            obj = mutate_tree(draw, obj, INTERESTING_JSON + [b"", b"\x00" * 8, "ext1", "ext99", "ext9", "ext13"])

            def ext(x: Any) -> Any:
                if (
                    isinstance(x, list)
                    and len(x) == 2
                    and isinstance(x[0], str)
                    and x[0][:3] == "ext"
                    and x[0][3:].isdigit()
                    and isinstance(x[1], bytes)
                ):
                    return msgpack.ExtType(int(x[0][3:]) % 128, x[1])
                return x

            def walk(x: Any) -> Any:
                x = ext(x)
                if isinstance(x, list):
                    return [walk(v) for v in x]
                if isinstance(x, dict):
                    return {_hashable(walk(k)): walk(v) for k, v in x.items()}
                return x

            return msgpack.packb(walk(obj), use_bin_type=True)
        except (ValueError, TypeError, OverflowError, msgpack.exceptions.ExtraData):
            return data
    if op == 2:
        i = _pos(draw, data, 1)
        bomb = draw(s.sampled_from(MSGPACK_BOMBS))
        return data[:i] + bomb + data[i + (len(bomb) if draw(s.booleans()) else 0) :]
    generic = draw(s.sampled_from([m_flip, m_overwrite, m_delete, m_duplicate, m_truncate]))
    return generic(draw, data, None, [])  # type: ignore[arg-type]


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x if not isinstance(x, dict) else str(x)


def m_skeleton(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    parsed = _header(data)
    if parsed is None:
        return data
    header, rest = parsed
    meta = header.get("__metadata__", {})
    try:
        skeleton = base64.b64decode(meta["safeckpt.skeleton"])
    except (KeyError, ValueError, TypeError):
        return data
    meta["safeckpt.skeleton"] = base64.b64encode(mutate_msgpack(draw, skeleton, [])).decode()
    return _with_header(draw, header, rest)


def m_msgpack(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    return mutate_msgpack(draw, data, [])


def m_json(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    for _ in range(draw(_st().integers(1, 3))):
        obj = mutate_tree(draw, obj, INTERESTING_JSON)
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


# zip record signature -> (field offset, width) of every integer field worth corrupting
ZIP_FIELDS = {
    b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x01\x02": [(6, 2), (8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (34, 2), (42, 4)],
    b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    b"PK\x06\x06": [(4, 8), (12, 2), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8)],
    b"PK\x06\x07": [(4, 4), (8, 8), (16, 4)],
}
ZIP_NAMES = [b"../", b"/", b"\\", b"\x00", b"a/../../", b"data.pkl", b"version", b"byteorder"]


def m_zip(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    s = _st()
    op = draw(s.integers(0, 3))
    if op == 3 and seed.zip_members:
        # rebuild the archive with members dropped, duplicated, renamed or reordered
        members = list(seed.zip_members)
        i = _pos(draw, members)
        name, body = members[i]
        how = draw(s.integers(0, 3))
        if how == 0:
            del members[i]
        elif how == 1:
            members.append((name, body))
        elif how == 2:
            members[i] = (name.rsplit("/", 1)[0] + "/" + draw(s.sampled_from(ZIP_NAMES)).decode("latin-1"), body)
        else:
            members.reverse()
        return _rezip(members, draw(s.booleans()))
    records = [(m.start(), sig) for sig in ZIP_FIELDS for m in re.finditer(re.escape(sig), data)]
    if not records:
        return data
    at, sig = draw(s.sampled_from(sorted(records)))
    if op == 2 and sig in (b"PK\x03\x04", b"PK\x01\x02"):
        name_at = at + (30 if sig == b"PK\x03\x04" else 46)
        piece = draw(s.sampled_from(ZIP_NAMES))
        j = name_at + draw(s.integers(0, 24))
        return data[:j] + piece + data[j + len(piece) :]
    off, width = draw(s.sampled_from(ZIP_FIELDS[sig]))
    value = _int_bytes(draw, len(data))
    value = (int.from_bytes(value, "little") % (1 << 8 * width)).to_bytes(width, "little")
    return data[: at + off] + value + data[at + off + width :]


def _rezip(members: list[tuple[str, bytes]], zip64: bool) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for name, body in members:
            with z.open(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), "w", force_zip64=zip64) as f:
                f.write(body)
    return out.getvalue()


PICKLE_OPS = sorted({op.code.encode("latin-1")[0] for op in pickletools.opcodes})
PICKLE_SNIPPETS = [
    b"(",
    b"]",
    b"}",
    b")",
    b"0",
    b"1",
    b"2",
    b"t",
    b"e",
    b"l",
    b"s",
    b"u",
    b"d",
    b"R",
    b"b",
    b"\x81",
    b"\x93",
    b"\x94",
    b"h\x00",
    b"h\xff",
    b"q\x00",
    b"j\xff\xff\xff\xff",
    b"N",
    b"K\x00",
    b"J\xff\xff\xff\x7f",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x8f",
    b"\x90",
    b"\x91",
    b"Q",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch._utils\n_rebuild_parameter\n",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nSize\n",
    b"c__builtin__\nset\n",
    b"cnumpy.core.multiarray\n_reconstruct\n",
    b"ctorch\nfloat32\n",
    b"(X\x07\x00\x00\x00storage"
    + b"ctorch\nFloatStorage\n"
    + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\xff\xff\xff\x7ftQ",
    b"(" * 50,
    b"]" + b"2a" * 64,  # a list holding itself 64 times
    b"]\x94" + b"h\x00a" * 64,
    b"(" + b"K\x01" * 64 + b"t",
    b"\x8c\x01a\x94" + b"(h\x00h\x00t\x94" * 16,  # tuples of tuples (exponential if expanded)
]


def _long1(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


# costly classes (issue 18): each pushes one value, like the snippets above
COST_SNIPPETS = [
    b"}(" + b"".join(_long1(1 + i * _P61) + b"N" for i in range(1, 400)) + b"u",  # colliding dict keys
    b"\x8f(" + b"".join(_long1(1 + i * _P61) for i in range(1, 400)) + b"\x90",  # colliding set members
    b"(" + b"".join(_long1(1 + i * _P61) for i in range(1, 400)) + b"\x91",  # colliding frozenset
    b"](" + b"\x8f" * 50_000 + b"e",  # empty-set flood
    b"](" + b"(\x91" * 30_000 + b"e",  # empty-frozenset flood
    b"}" + b"\x94" * 50_000,  # memo flood
    b"N" + b"".join(b"p" + str(1 + i * _P61).encode() + b"\n" for i in range(1, 200)),  # memo index flood
    b"(X\x07\x00\x00\x00storage"  # a stride-0 view of 2**31 floats over a one-element storage
    + b"ctorch\nFloatStorage\n"
    + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00(J\x00\x00\x00\x80t(K\x00t\x89"
    + b"ccollections\nOrderedDict\n)R\x87ctorch._utils\n_rebuild_tensor_v2\n",
]
PICKLE_SNIPPETS += COST_SNIPPETS


def pickle_spans(data: bytes, start: int) -> list[tuple[int, int]]:
    """(start, end) of each opcode of the pickles from ``start`` on, as far as they parse (never run)."""
    spans: list[tuple[int, int]] = []
    pos = start
    for _ in range(6):  # a legacy torch file is several pickles in a row
        if pos >= len(data) or data[pos] != 0x80:
            break
        try:
            last = pos
            for op, _arg, at in pickletools.genops(io.BytesIO(data[pos:])):
                if spans and at is not None:
                    spans[-1] = (spans[-1][0], pos + at)
                spans.append((pos + (at or 0), pos + (at or 0) + 1))
                last = pos + (at or 0)
                if op.name == "STOP":
                    break
            pos = last + 1
        except (ValueError, struct.error, UnicodeDecodeError, IndexError):
            break
    return spans


def mutate_pickle(draw: Draw, body: bytes) -> bytes:
    s = _st()
    spans = pickle_spans(body, 0)
    if not spans:
        return body
    a, b = draw(s.sampled_from(spans))
    op = draw(s.integers(0, 6))
    if op == 0:  # another opcode
        return body[:a] + bytes([draw(s.sampled_from(PICKLE_OPS))]) + body[a + 1 :]
    if op == 1:
        return body[:a] + body[b:]
    if op == 2:
        return body[:b] + body[a:b] * draw(s.integers(1, 3)) + body[b:]
    if op == 3:
        c, _ = draw(s.sampled_from(spans))
        piece, rest = body[a:b], body[:a] + body[b:]
        c = min(c, len(rest))
        return rest[:c] + piece + rest[c:]
    if op == 4 and b - a > 1:  # an argument: a length, a memo index, an int
        value = _int_bytes(draw, len(body))
        j = a + 1 + draw(s.integers(0, max(0, b - a - 1 - len(value))))
        return body[:j] + value[: b - j] + body[j + min(len(value), b - j) :]
    snippet = draw(s.sampled_from(PICKLE_SNIPPETS))
    return body[:a] + snippet + body[a:]


def m_pickle(draw: Draw, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    s = _st()
    if seed.zip_members:
        members = list(seed.zip_members)
        pkls = [i for i, (n, _) in enumerate(members) if n.endswith(".pkl")]
        if not pkls:
            return data
        i = draw(s.sampled_from(pkls))
        body = mutate_pickle(draw, members[i][1])
        for _ in range(draw(s.integers(0, 2))):
            body = mutate_pickle(draw, body)
        members[i] = (members[i][0], body)
        return _rezip(members, False)
    out = mutate_pickle(draw, data)
    for _ in range(draw(s.integers(0, 2))):
        out = mutate_pickle(draw, out)
    return out


GENERIC = [m_flip, m_overwrite, m_truncate, m_extend, m_delete, m_duplicate, m_splice]
STRUCTURED = {
    "st_header": m_st_header,
    "skeleton": m_skeleton,
    "msgpack": m_msgpack,
    "json": m_json,
    "zip": m_zip,
    "pickle": m_pickle,
    "st_wide": m_st_wide,
    "special": m_special,
}


def inputs(seeds: list[Seed]) -> Any:
    """A hypothesis strategy of ``(seed, mutated bytes)``: one structure-aware mutation (when the
    seed has structure, in two of three cases) followed by zero to two generic ones, or one to
    three generic ones."""
    s = _st()

    @s.composite
    def strategy(draw: Draw) -> tuple[Seed, bytes]:
        seed = draw(s.sampled_from(seeds))
        others = [o for o in seeds if o.target.rsplit(".", 1)[-1] == seed.target.rsplit(".", 1)[-1]] or seeds
        data = seed.data
        n_generic = draw(s.integers(1, 3))
        if seed.kinds and draw(s.integers(0, 2)):
            data = STRUCTURED[draw(s.sampled_from(seed.kinds))](draw, data, seed, others)
            n_generic -= 1
        for _ in range(n_generic):
            data = draw(s.sampled_from(GENERIC))(draw, data, seed, others)
        return seed, data

    return strategy()


# -- running inputs --------------------------------------------------------------------------------


def materialize(seed: Seed, data: bytes, scratch: Path) -> Path:
    """Write the input where the reader will look: a file with the seed's name, or a copy of the
    seed directory with one file replaced."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    if not seed.target:
        out = scratch / seed.root.name
        out.write_bytes(data)
        return out
    out = scratch / seed.root.name
    shutil.copytree(seed.root, out)
    target = out / seed.target
    if data in SPECIAL:
        target.unlink()
        if data == SPECIAL[0]:
            os.mkfifo(target)
        else:
            outside = scratch / "outside"
            outside.write_bytes((seed.root / seed.target).read_bytes())
            target.symlink_to(outside)
        return out
    target.write_bytes(data)
    return out


@dataclass
class Result:
    status: str  # "value", "error" (a CheckpointError) or "escape"
    detail: str = ""
    peak: int = 0
    cpu: float = 0.0  # CPU seconds the worker spent on the input
    size: int = 0  # bytes of input (all files of a directory)


class Worker:
    """One long-lived reader process; killed and restarted when an input hangs or crashes it."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        ready = self._answer(120.0)
        if ready is None or ready.get("ready") is not True:
            raise RuntimeError(f"the fuzz worker did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _answer(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"dead": True}

    def run(self, path: Path, reader: str, *, timeout: float = TIMEOUT, selftest: str = "") -> Result:
        """Run one input; ``selftest`` makes the worker misbehave on purpose instead (see `SELFTESTS`)."""
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"path": str(path), "reader": reader, "selftest": selftest}).encode() + b"\n")
        self.proc.stdin.flush()
        answer = self._answer(timeout)
        if answer is None:
            self.stop()
            self.restarts += 1
            return Result("escape", f"hang: no answer within {timeout:.0f} s")
        if answer.get("dead"):
            assert self.proc is not None
            code = self.proc.wait()
            self.proc = None
            self.restarts += 1
            name = signal.Signals(-code).name if code < 0 else f"exit {code}"
            return Result("escape", f"crash: the worker died ({name})")
        return Result(
            answer["status"],
            answer.get("detail", ""),
            answer.get("peak", 0),
            answer.get("cpu", 0.0),
            answer.get("size", 0),
        )


def record_cost(stats: dict[str, Any], result: Result) -> None:
    """Keep the worst CPU seconds per MB and peak bytes per byte of input (the summary prints them)."""
    size = max(result.size, 1)
    for key, value in (("cpu_per_mb", result.cpu * 1e6 / size), ("peak_per_byte", result.peak / size)):
        stats.setdefault(key, 0.0)
        stats.setdefault(key + "_size", 0)
        if result.size >= RATIO_MIN_SIZE and value > stats[key]:
            stats[key], stats[key + "_size"] = value, result.size
    stats["cpu_max"] = max(stats.get("cpu_max", 0.0), result.cpu)
    stats["peak_max"] = max(stats.get("peak_max", 0), result.peak)


# -- the worker side -------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) << 10 for k in ("VmRSS", "VmHWM", "VmSize")}  # type: ignore[union-attr]


def _touch(t: Any) -> None:
    """Read every byte of a tensor's storage (a view past the end of a mapped file would SIGBUS)."""
    import torch

    s = t.untyped_storage()
    if s.nbytes():
        torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,)).sum()


def exercise(path: Path, reader: str) -> tuple[list[str], bool]:
    """Everything a user can do with the input: the escapes (CheckpointErrors are fine) and
    whether ``safeckpt.open`` and reading everything succeeded."""
    import traceback

    import safeckpt
    from safeckpt import formats
    from safeckpt.tree import TensorRef, iter_leaves

    escapes: list[str] = []

    def attempt(fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except safeckpt.CheckpointError:
            pass
        except BaseException as e:
            escapes.append("".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:]))
        return False

    def consume(ck: safeckpt.Checkpoint) -> None:
        for _, leaf in iter_leaves(ck.to_python()):
            if isinstance(leaf, torch.Tensor):
                _touch(leaf)
        for ref in ck.tensors().values():
            assert isinstance(ref, TensorRef)
            _touch(ref.load())
        fmt = formats.get(ck.format)
        if hasattr(fmt, "verify"):
            fmt.verify(ck.path)

    import torch

    opened = attempt(lambda: consume(safeckpt.open(path)))
    detected = None
    with contextlib.suppress(safeckpt.CheckpointError):
        detected = formats.detect(path).NAME
    if detected != reader:
        attempt(lambda: consume(formats.get(reader).read(path)))
    return escapes, opened


def _selftest(what: str, path: Path) -> tuple[list[str], bool]:
    """Misbehave the way a buggy reader could, so tests can prove each oracle catches it."""
    import signal as sig

    import torch

    def misbehave() -> None:
        if what == "raise":
            raise KeyError("a reader bug")
        if what == "touch":  # 512 MiB of pages really touched
            bytearray(512 << 20)
        elif what == "lazy":  # 1 TiB reserved, never touched: only the address-space limit sees it
            torch.empty(1 << 40, dtype=torch.uint8)
        elif what == "hang":
            time.sleep(3600)
        elif what == "crash":
            os.kill(os.getpid(), sig.SIGSEGV)
        elif what == "spin":  # a quadratic check: CPU time past the model's bound for a small input
            end = time.process_time() + CPU_FIXED + 1
            while time.process_time() < end:
                pass

    escapes: list[str] = []
    try:
        misbehave()
    except BaseException as e:
        escapes.append(f"{type(e).__name__}: {e}"[:300])
    return escapes, not escapes


SELFTESTS = ("raise", "touch", "lazy", "hang", "crash", "spin")


def worker() -> None:
    import resource
    import warnings

    warnings.simplefilter("ignore")
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    import torch

    import safeckpt  # noqa: F401

    torch.set_num_threads(1)
    # warm up: first use of torch ops and every format module
    for reader in ("safeckpt", "safeckpt-sharded", "safetensors", "hf-sharded", "dcp", "torch"):
        from safeckpt import formats

        formats.get(reader)
    exercise(FIXTURES / "torch" / "friend.pt", "torch")
    exercise(FIXTURES / "hf" / "plain.safetensors", "safetensors")
    limit = _status()["VmSize"] + AS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        path = Path(req["path"])
        Path("/proc/self/clear_refs").write_text("5")
        before = _status()["VmRSS"]
        cpu = time.process_time()
        if req.get("selftest"):
            escapes, opened = _selftest(req["selftest"], path)
        else:
            escapes, opened = exercise(path, req["reader"])
        cpu = time.process_time() - cpu
        peak = _status()["VmHWM"] - before
        size = _input_size(path)
        if not escapes and peak > MEM_PER_BYTE * size + SLACK:
            escapes.append(f"peak memory grew by {peak} bytes for an input of {size} bytes")
        if not escapes and cpu > CPU_FIXED + CPU_PER_MB * size / 1e6:
            escapes.append(f"cost: {cpu:.1f} CPU seconds for an input of {size} bytes (resource model)")
        status = "escape" if escapes else "value" if opened else "error"
        answer = {"status": status, "detail": "\n".join(escapes), "peak": peak, "cpu": cpu, "size": size}
        out.write(json.dumps(answer) + "\n")


def _input_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size if path.is_file() else 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
