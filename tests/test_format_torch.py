"""The torch format: conformance, differential against torch.load on every real fixture, zero copy,
bounds, byte order, zip64, CRC-0, the allow= opt-in, export, and the restricted VM itself."""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import itertools
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import safeckpt
from conformance import MLP, FormatConformance, Net, sample_state_dict, tensor_bytes
from safeckpt import _dtypes, formats
from safeckpt.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from safeckpt.formats import _pickle, _zip
from safeckpt.formats import torch_pickle as tp
from safeckpt.tree import TensorRef, iter_leaves

sys.path.insert(0, str(Path(__file__).parent / "attacks"))
from make_attacks import Entry, Zip  # the corpus generator's zip writer

ROOT = Path(__file__).resolve().parents[1]
TORCH_FIXTURES = ROOT / "fixtures" / "torch"
LIGHTNING_FIXTURES = ROOT / "fixtures" / "lightning"
BENIGN = sorted(p for p in TORCH_FIXTURES.glob("*.pt") if p.name != "module.pt") + sorted(
    LIGHTNING_FIXTURES.glob("*.ckpt")
)


# -- conformance: zip (protocol 2 and 4) and legacy, made by the real torch.save -------------------


class TestTorchZipConformance(FormatConformance):
    NAME = "torch"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        path = directory / "m.pt"
        torch.save(state_dict, path)
        return path

    def boundaries(self, path: Path) -> list[int]:
        data = path.read_bytes()
        archive = _zip.parse(data, source=str(path))
        cd = data.rfind(_zip.CENTRAL, 0, data.rfind(_zip.EOCD))
        first_cd = data.find(_zip.CENTRAL)
        return [0, 4, 30, first_cd, cd, len(data) - 22, *(r.offset for r in archive.records.values())]


class TestTorchProtocol4Conformance(TestTorchZipConformance):
    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        path = directory / "m.pt"
        torch.save(state_dict, path, pickle_protocol=4)
        return path


class TestTorchLegacyConformance(FormatConformance):
    NAME = "torch"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        path = directory / "m.pt"
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
        return path

    def boundaries(self, path: Path) -> list[int]:
        data = path.read_bytes()
        cuts, pos = [0, 2, 3], 0
        for _ in range(5):
            _, pos = _pickle.scan(data, pos, "")
            cuts.append(pos)
        return [*cuts, pos + 8, len(data) - 1]


# -- the differential oracle -----------------------------------------------------------------------


def _lightning_attribute_dict(x: Any) -> bool:
    return type(x).__name__ == "AttributeDict" and "lightning" in type(x).__module__


def same(ours: Any, theirs: Any, where: str = "root") -> None:
    """Key for key, bit for bit: what safeckpt read equals what torch.load returned."""
    if isinstance(theirs, torch.Tensor):
        assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset()) == (
            theirs.dtype,
            theirs.shape,
            theirs.stride(),
            theirs.storage_offset(),
        ), where
        assert (ours.requires_grad, ours.is_conj(), ours.is_neg()) == (
            theirs.requires_grad,
            theirs.is_conj(),
            theirs.is_neg(),
        ), where
        assert tensor_bytes(ours) == tensor_bytes(theirs), f"{where}: tensor bytes differ"
        return
    if _lightning_attribute_dict(theirs):
        assert type(ours) is safeckpt.AttributeDict, where
        theirs = dict(theirs)
        ours = dict(ours)
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{where}: keys {list(ours)} != {list(theirs)}"
        for k in theirs:
            same(ours[k], theirs[k], f"{where}[{k!r}]")
        assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None), f"{where}: _metadata"
    elif isinstance(theirs, (list, tuple)) and type(theirs) in (list, tuple):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, argparse.Namespace):
        same(vars(ours), vars(theirs), where)
    elif isinstance(theirs, np.ndarray):
        assert (ours.dtype, ours.shape, ours.flags.f_contiguous) == (
            theirs.dtype,
            theirs.shape,
            theirs.flags.f_contiguous,
        ), where
        assert ours.tobytes() == theirs.tobytes(), where
    elif isinstance(theirs, np.generic):
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), where
    elif isinstance(theirs, float) and theirs != theirs:
        assert ours != ours, where
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def tensors_of(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += tensors_of(v, f"{prefix}/{k}")
    elif type(tree) in (list, tuple):
        for i, v in enumerate(tree):
            out += tensors_of(v, f"{prefix}/{i}")
    return out


def oracle(path: Path) -> Any:
    if path.name == "dtypes_legacy.pt":
        # torch 2.13 cannot load new dtypes from a legacy file (its own bug); the zip twin holds the same data
        with pytest.raises(AttributeError, match="UntypedStorage"):
            torch.load(path, weights_only=False)
        return torch.load(path.with_name("dtypes.pt"), weights_only=False)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("path", BENIGN, ids=lambda p: p.name)
def test_differential_against_torch_load(path: Path) -> None:
    theirs = oracle(path)
    ckpt = safeckpt.open(path)
    assert ckpt.format == "torch"
    ours = ckpt.to_python()
    same(ours, theirs)
    # storage sharing and identity are the same too (tied weights, views of one storage)
    a, b = tensors_of(ours), tensors_of(theirs)
    assert [n for n, _ in a] == [n for n, _ in b]
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            x, y = a[i][1], a[j][1]
            u, v = b[i][1], b[j][1]
            assert (x is y) == (u is v), (a[i][0], a[j][0])
            if x.numel() and y.numel():
                shared = x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                assert shared == (u.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()), (a[i][0], a[j][0])


def test_structures_fixture_sharing() -> None:
    ckpt = safeckpt.open(TORCH_FIXTURES / "structures.pt")
    assert ["tied/embedding", "tied/lm_head"] in ckpt.tied()
    refs = ckpt.tensors()
    assert refs["views/row"].storage == refs["views/whole"].storage == refs["transposed"].storage
    assert refs["views/row"].alias_key != refs["views/whole"].alias_key
    assert refs["param"].parameter and refs["param"].requires_grad
    assert refs["frozen_param"].parameter and not refs["frozen_param"].requires_grad
    assert refs["requires_grad"].requires_grad and not refs["requires_grad"].parameter


def test_info_reports_what_was_found() -> None:
    info = safeckpt.open(LIGHTNING_FIXTURES / "trainer.ckpt").info
    assert info["lightning_version"] == "2.6.6" and info["producer"] == "lightning-trainer"
    assert info["container"] == "zip" and info["archive_prefix"] == "archive" and info["storage_alignment"] == "64"
    assert "torch._utils._rebuild_tensor_v2" in info["globals"]
    fabric = safeckpt.open(LIGHTNING_FIXTURES / "fabric.ckpt").info
    assert "lightning.fabric.utilities.data.AttributeDict" in fabric["globals"]
    assert safeckpt.open(TORCH_FIXTURES / "friend_legacy.pt").info["container"] == "legacy"
    assert safeckpt.open(TORCH_FIXTURES / "protocol4.pt").info["pickle_protocol"] == 4


@pytest.mark.parametrize("name", ["friend.pt", "friend_legacy.pt", "align4096.pt", "crc0.pt"])
def test_load_raw_friend(name: str) -> None:
    expected = torch.load(TORCH_FIXTURES / "friend.pt", weights_only=True)
    model = MLP()
    safeckpt.load_raw(TORCH_FIXTURES / name, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_whole_module_is_refused() -> None:
    path = TORCH_FIXTURES / "module.pt"
    with pytest.raises(UnsafeCheckpointError, match=r"'__main__\.MLP'.*whole pickled model") as info:
        safeckpt.open(path)
    assert str(path) in str(info.value) and "state_dict()" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        safeckpt.load_raw(path, MLP())
    report = dict(tp.globals_report(path))
    assert report["__main__.MLP"] is False and report["torch.nn.modules.linear.Linear"] is False
    assert report["torch._utils._rebuild_parameter"] is True
    assert any("__main__.MLP" in p for p in tp.verify(path))


def test_reading_never_imports_lightning() -> None:
    code = (
        "import sys, safeckpt\n"
        f"safeckpt.open({str(LIGHTNING_FIXTURES / 'fabric.ckpt')!r}).to_python()\n"
        f"safeckpt.open({str(LIGHTNING_FIXTURES / 'trainer.ckpt')!r}).to_python()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'lightning_fabric', 'pytorch_lightning', 'argparse_x')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- storages in place -----------------------------------------------------------------------------


def _file_mappings(path: Path) -> list[tuple[int, int, int]]:
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, int(parts[2], 16)))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("name", ["friend.pt", "align4096.pt", "crc0.pt"])
def test_tensors_are_zero_copy_views_of_the_file(name: str) -> None:
    path = TORCH_FIXTURES / name
    records = _zip.parse(path.read_bytes(), source=name).records
    ckpt = safeckpt.open(path)
    loaded = {k: r.load() for k, r in ckpt.tensors().items()}
    maps = _file_mappings(path)
    assert maps, "the file is not mapped"
    offsets = {r.offset for k, r in records.items() if k.startswith("data/")}
    for key, t in loaded.items():
        ptr = t.untyped_storage().data_ptr()
        hit = [(s, e, off) for s, e, off in maps if s <= ptr < e]
        assert hit, f"{key}: its data at {ptr:#x} is not inside the file's map"
        s, _, off = hit[0]
        assert off + (ptr - s) in offsets, f"{key}: not at one of the file's storage records"
    if name == "align4096.pt":
        assert all(o % 4096 == 0 for o in offsets)


def test_view_bounds_are_checked_before_any_tensor_exists() -> None:
    storage = tp.Storage("0", _dtypes.of(torch.float32), 4, "cpu", 0)
    ok = tp._rebuild_v2(storage, 1, (3,), (1,))
    assert ok.size == (3,)
    assert tp._rebuild_v2(storage, 0, (1000, 4), (0, 1)).size == (1000, 4)  # stride 0: an expanded view
    assert tp._rebuild_v2(storage, 4, (0, 7), (7, 1)).size == (0, 7)  # empty at the very end
    for args, match in [
        ((1, (4,), (1,)), r"view \[1, 5\) exceeds"),
        ((0, (2, 3), (3, 1)), r"view \[0, 6\) exceeds"),
        ((5, (0,), (1,)), "past its storage"),
        ((0, (2,), (1, 1)), "differ in length"),
        ((-1, (2,), (1,)), "bad storage offset"),
        ((0, (2,), (-1,)), "stride must be"),
        ((0, (2.0,), (1,)), "size must be"),
    ]:
        with pytest.raises(CorruptCheckpointError, match=match):
            tp._rebuild_v2(storage, *args)
    with pytest.raises(CorruptCheckpointError, match="plain dtype"):
        tp._rebuild_v3(tp.Storage("2", _dtypes.of(torch.uint8), 4, "cpu", 0), 0, (4,), (1,), False, None, torch.qint8)
    ints = tp.Storage("1", _dtypes.of(torch.int64), 4, "cpu", 0)
    with pytest.raises(CorruptCheckpointError, match="cannot require gradients"):
        tp._rebuild_v2(ints, 0, (4,), (1,), True)
    with pytest.raises(CorruptCheckpointError, match="cannot require gradients"):
        tp._rebuild_parameter(tp._rebuild_v2(ints, 0, (4,), (1,)), True, None)
    with pytest.raises(CorruptCheckpointError, match=r"over a torch\.float32 storage"):
        tp._rebuild_v3(storage, 0, (2,), (1,), False, None, torch.float64)


# -- byte order, zip64, alignment, CRC-0 ------------------------------------------------------------


def _rewrite(path: Path, dest: Path, *, zip64: bool = False, big_endian: bool = False) -> Path:
    """The same archive rebuilt by the test's zip writer: zip64 records, or storages byteswapped."""
    data = path.read_bytes()
    archive = _zip.parse(data, source=str(path))
    # what a big-endian machine writes: every element swapped, by the dtype of the tensors over it
    dtypes = {ref.storage[1]: ref.dtype for ref in safeckpt.open(path).tensors().values()}  # type: ignore[index]
    entries = []
    for name, r in archive.records.items():
        body = data[r.offset : r.offset + r.size]
        if big_endian and name == "byteorder":
            body = b"big"
        elif big_endian and r.offset in dtypes:
            dt = dtypes[r.offset]
            unit = dt.itemsize // 2 if dt.is_complex else dt.itemsize
            if unit > 1:
                body = np.frombuffer(body, dtype=np.uint8).reshape(-1, unit)[:, ::-1].tobytes()
        entries.append(Entry(f"{archive.prefix}/{name}", body))
    dest.write_bytes(Zip(entries, zip64=zip64).build())
    return dest


def test_big_endian_files_are_byteswapped(tmp_path: Path) -> None:
    src = TORCH_FIXTURES / "dtypes.pt"
    big = _rewrite(src, tmp_path / "big.pt", big_endian=True)
    ckpt = safeckpt.open(big)
    assert ckpt.info["byteorder"] == "big"
    ours = ckpt.to_python()
    same(ours, torch.load(src, weights_only=False))
    # torch swaps typed storages too, but leaves the new dtypes' untyped storages as they are
    theirs = torch.load(big, weights_only=False)
    old = {k for k, v in ours.items() if _dtypes.of(v.dtype) in _dtypes.BY_STORAGE.values()}
    assert {"float32", "complex128", "int64", "bfloat16"} <= old
    same({k: ours[k] for k in old}, {k: theirs[k] for k in old})


def test_big_endian_legacy_file(tmp_path: Path) -> None:
    """What a big-endian machine writes in the legacy format (torch 2.13 cannot read it on a
    little-endian one: it takes the element counts as native); safeckpt swaps counts and data."""
    src = TORCH_FIXTURES / "friend_legacy.pt"
    data = src.read_bytes()
    ends = [0]
    for _ in range(5):
        ends.append(_pickle.scan(data, ends[-1], "")[1])
    parts = [data[a:b] for a, b in itertools.pairwise(ends)]
    sys_info = pickle.loads(parts[2])  # our own trusted fixture
    sys_info["little_endian"] = False
    reader, _, _ = tp._open(src, ())
    out = parts[0] + parts[1] + pickle.dumps(sys_info, protocol=2) + parts[3] + parts[4]
    for key in pickle.loads(parts[4]):
        s = reader.storages[key]
        raw = np.frombuffer(data[s.offset : s.offset + s.nbytes], np.uint8)
        out += struct.pack(">q", s.numel) + raw.reshape(-1, s.dtype.itemsize)[:, ::-1].tobytes()
    big = tmp_path / "big_legacy.pt"
    big.write_bytes(out)
    ckpt = safeckpt.open(big)
    assert ckpt.info == {**ckpt.info, "container": "legacy", "byteorder": "big"}
    same(ckpt.to_python(), torch.load(src, weights_only=True))


def test_zip64_archive(tmp_path: Path) -> None:
    z64 = _rewrite(TORCH_FIXTURES / "structures.pt", tmp_path / "z64.pt", zip64=True)
    ckpt = safeckpt.open(z64)
    assert ckpt.info["zip64"] is True
    same(ckpt.to_python(), torch.load(z64, weights_only=False))
    same(ckpt.to_python(), torch.load(TORCH_FIXTURES / "structures.pt", weights_only=False))


def test_any_archive_prefix(tmp_path: Path) -> None:
    sd = sample_state_dict()
    weird = tmp_path / "my.model-v2.final.pt"
    torch.save(sd, weird)
    assert safeckpt.open(weird).info["archive_prefix"] == "my.model-v2.final"
    buf = io.BytesIO()
    torch.save(sd, buf)
    (tmp_path / "from_buffer.bin").write_bytes(buf.getvalue())
    ckpt = safeckpt.open(tmp_path / "from_buffer.bin")
    assert ckpt.info["archive_prefix"] == "archive"
    same(ckpt.to_python(), sd)


def test_crc0_file_reads_where_zipfile_refuses() -> None:
    path = TORCH_FIXTURES / "crc0.pt"
    with zipfile.ZipFile(path) as z:
        assert all(i.CRC == 0 for i in z.infolist())
        with pytest.raises(zipfile.BadZipFile, match="CRC"):
            z.read(next(n for n in z.namelist() if "/data/" in n))
    same(safeckpt.open(path).to_python(), torch.load(path, weights_only=False))
    assert tp.verify(path) == []


def test_verify_finds_a_flipped_bit(tmp_path: Path) -> None:
    data = bytearray((TORCH_FIXTURES / "friend.pt").read_bytes())
    record = _zip.parse(bytes(data), source="friend.pt").records["data/0"]
    data[record.offset + 3] ^= 0x40
    bad = tmp_path / "friend.pt"
    bad.write_bytes(bytes(data))
    problems = tp.verify(bad)
    assert len(problems) == 1 and "'data/0'" in problems[0] and "CRC-32" in problems[0]
    with pytest.raises(CorruptCheckpointError, match="CRC-32"):
        safeckpt.load(bad, verify=True)
    assert tp.verify(TORCH_FIXTURES / "friend.pt") == []


def test_sniff_does_not_claim_safetensors_with_a_pickle_like_length(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    header += b" " * (0x0280 - len(header))
    head = struct.pack("<Q", len(header)) + header
    assert head[:2] == b"\x80\x02"
    assert not tp.sniff(head, tmp_path / "model.bin")
    assert tp.sniff((TORCH_FIXTURES / "friend_legacy.pt").read_bytes()[:4096], tmp_path / "x")
    assert tp.sniff(pickle.dumps({"a": 1}, protocol=4), tmp_path / "x")


# -- the allow= opt-in -------------------------------------------------------------------------------


@pytest.fixture
def old_callback_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Trainer-style checkpoint holding an old callback object (a class of a library we lack)."""
    pkg, mod = types.ModuleType("oldlib"), types.ModuleType("oldlib.callbacks")

    class CallbackState:
        def __init__(self) -> None:
            self.best_score = torch.tensor(0.25)
            self.dirpath = "ckpts"

    CallbackState.__module__, CallbackState.__qualname__ = "oldlib.callbacks", "CallbackState"
    mod.CallbackState = CallbackState  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "oldlib", pkg)
    monkeypatch.setitem(sys.modules, "oldlib.callbacks", mod)
    path = tmp_path / "old.ckpt"
    torch.manual_seed(0)
    torch.save(
        {
            "state_dict": MLP().state_dict(),
            "callbacks": {"ModelCheckpoint": CallbackState()},
            "epoch": 3,
            "global_step": 30,
        },
        path,
    )
    return path


def test_unknown_data_class_is_refused_with_the_fix(old_callback_checkpoint: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as info:
        safeckpt.open(old_callback_checkpoint)
    msg = str(info.value)
    assert "'oldlib.callbacks.CallbackState'" in msg and str(old_callback_checkpoint) in msg
    assert "allow=['oldlib.callbacks.CallbackState']" in msg


@pytest.mark.parametrize("allow", [["oldlib.callbacks.CallbackState"], ["oldlib.*"]])
def test_allow_admits_named_globals_as_inert_data(old_callback_checkpoint: Path, allow: list[str]) -> None:
    ckpt = safeckpt.open(old_callback_checkpoint, allow=allow)
    cb = ckpt["callbacks"]["ModelCheckpoint"]
    assert cb["__global__"] == "oldlib.callbacks.CallbackState" and cb["args"] == ()
    assert "callbacks/ModelCheckpoint/state/best_score" in ckpt.tensors()
    value = ckpt.to_python()["callbacks"]["ModelCheckpoint"]["state"]
    assert value["dirpath"] == "ckpts" and torch.equal(value["best_score"], torch.tensor(0.25))
    model = MLP()
    model.load_state_dict(ckpt.to_python(ckpt["state_dict"]))
    loaded = MLP()
    safeckpt.load_raw(old_callback_checkpoint, loaded, allow=allow)  # a Trainer-style file: its state_dict
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert safeckpt.load(old_callback_checkpoint, allow=allow)["epoch"] == 3
    assert tp.verify(old_callback_checkpoint) == [
        f"{old_callback_checkpoint}: refers to globals safeckpt does not allow: oldlib.callbacks.CallbackState"
    ]


def test_allow_never_admits_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary"
    monkeypatch.setenv("SAFECKPT_CANARY", str(canary))
    evil = ROOT / "tests" / "attacks" / "corpus" / "m02_system_in_zip.pt"
    for allow in (["posix.system"], ["posix.*"], ["os.system", "posix.system"]):
        with pytest.raises(UnsafeCheckpointError, match="can execute code"):
            safeckpt.open(evil, allow=allow)
    with pytest.raises(ValueError, match="allow= takes global names"):
        safeckpt.open(TORCH_FIXTURES / "friend.pt", allow=["not a name"])
    assert not canary.exists()


# -- export (format="torch") ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", BENIGN, ids=lambda p: p.name)
def test_export_round_trips_through_torch_load(path: Path, tmp_path: Path) -> None:
    dst = safeckpt.convert(path, tmp_path / "out.pt", format="torch")
    ours = safeckpt.open(path).to_python()
    same(torch.load(dst, weights_only=False), ours)
    same(safeckpt.open(dst).to_python(), ours)
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]  # atomic: no temporary left behind


def test_save_format_torch_exports_training_state(tmp_path: Path) -> None:
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    path = safeckpt.save(
        tmp_path / "run.pt", {"model": model, "optimizer": opt, "hp": safeckpt.AttributeDict(lr=0.1)}, format="torch"
    )
    back = torch.load(path, weights_only=False)
    same(back["model"], model.state_dict())
    assert back["hp"] == {"lr": 0.1}
    assert safeckpt.open(path)["hp"] == safeckpt.AttributeDict(lr=0.1)


# -- the restricted VM --------------------------------------------------------------------------------

_values = hs.recursive(
    hs.none()
    | hs.booleans()
    | hs.integers()
    | hs.floats(allow_nan=False)
    | hs.text(max_size=20)
    | hs.binary(max_size=20),
    lambda inner: (
        hs.lists(inner, max_size=5)
        | hs.tuples(inner, inner)
        | hs.dictionaries(hs.text(max_size=8) | hs.integers(), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_values, protocol=hs.integers(0, 5))
def test_vm_agrees_with_pickle_on_plain_values(value: Any, protocol: int) -> None:
    data = pickle.dumps(value, protocol=protocol)
    assert _pickle.load(data, source="x").value == pickle.loads(data)


def test_vm_builds_the_allowed_value_types() -> None:
    od = collections.OrderedDict(b=1, a=2)
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    values = [
        od,
        collections.Counter(a=2),
        {1, 2},
        frozenset({"x"}),
        complex(1, -2),
        bytearray(b"\x00\xff"),
        argparse.Namespace(lr=0.1),
        pathlib.PurePosixPath("a/b"),
        pathlib.PosixPath("/data"),
        np.float16(1.5),
        np.array([[1, 2], [3, 4]], dtype=">i2"),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.array(["ab", "c"]),
        torch.Size([2, 3]),
        torch.bfloat16,
        torch.device("cuda", 3),
        torch.sparse_coo,
    ]
    for protocol in (2, 4, 5):
        for v in values:
            data = pickle.dumps(v, protocol=protocol)
            got, ref = _pickle.load(data, source="x").value, pickle.loads(data)  # our own benign bytes
            assert type(got) is type(ref), (protocol, v)
            if isinstance(v, np.ndarray):
                assert got.dtype == ref.dtype and got.tobytes(order="A") == ref.tobytes(order="A")
                assert got.flags.f_contiguous == ref.flags.f_contiguous
            else:
                assert got == ref == v, (protocol, v)
        got_od = _pickle.load(pickle.dumps(od, protocol=protocol), source="x").value
        assert got_od._metadata == od._metadata  # type: ignore[attr-defined]


def test_globals_in_resolves_stack_global_from_the_memo() -> None:
    data = pickle.dumps([collections.OrderedDict(), argparse.Namespace(), collections.OrderedDict()], protocol=4)
    assert _pickle.globals_in(data) == ["collections.OrderedDict", "argparse.Namespace"]
    assert _pickle.globals_in(b"\x80\x02cposix\nsystem\n(S'x'\ntR.") == ["posix.system"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=hs.lists(hs.tuples(hs.integers(0, 10**6), hs.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_files_fail_cleanly(edits: list[tuple[int, int]], tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in ("protocol4.pt", "friend_legacy.pt"):
        data = bytearray((TORCH_FIXTURES / name).read_bytes())
        for at, value in edits:
            data[at % len(data)] = value
        path = tmp_path_factory.mktemp("fuzz") / name
        path.write_bytes(bytes(data))
        with contextlib.suppress(CheckpointError):
            safeckpt.open(path).to_python()


def test_registry_sniffs_torch_last() -> None:
    assert formats.names()[-1] == "torch" or "torch" in formats.names()
    assert formats.detect(TORCH_FIXTURES / "friend.pt").NAME == "torch"
    assert formats.detect(LIGHTNING_FIXTURES / "trainer.ckpt").NAME == "torch"


def test_file_changed_after_open_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "friend.pt"
    path.write_bytes((TORCH_FIXTURES / "friend.pt").read_bytes())
    ckpt = safeckpt.open(path)
    with open(path, "r+b") as f:
        f.truncate(1024)  # the storages' pages are gone: reading them through the map would SIGBUS
    with pytest.raises(CorruptCheckpointError, match="changed after it was opened"):
        ckpt.tensors()["l2.bias"].load()


def test_values_that_would_confuse_their_readers_are_refused(tmp_path: Path) -> None:
    shadow = b"\x80\x02cargparse\nNamespace\n)\x81}X\x0b\x00\x00\x00_get_kwargsK\x01sb."
    with pytest.raises(CorruptCheckpointError, match="Namespace's own"):
        _pickle.load(shadow, source="ns.pkl")
    key = b"\x80\x02}cmylib\nThing\nK\x01s."  # an admitted class used as a dict key
    tree = _pickle.load(key, source="k.pkl", allow=["mylib.Thing"]).value
    assert [type(k).__name__ for k in tree] == ["Global"]
    path = tmp_path / "k.pkl"
    path.write_bytes(key)
    with pytest.raises(CorruptCheckpointError, match="not plain data"):
        safeckpt.open(path, allow=["mylib.Thing"])


_FRIEND = (TORCH_FIXTURES / "friend.pt").read_bytes()
_HEADERS = sorted(
    {i for i in range(len(_FRIEND)) if _FRIEND.startswith((b"PK\x01\x02", b"PK\x03\x04", b"PK\x05\x06"), i)}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=hs.lists(
        hs.tuples(hs.sampled_from(_HEADERS), hs.integers(0, 45), hs.integers(0, 255)), min_size=1, max_size=4
    )
)
def test_damaged_zip_headers_fail_cleanly(
    edits: list[tuple[int, int, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = bytearray(_FRIEND)
    for header, field, value in edits:
        data[min(header + field, len(data) - 1)] = value
    path = tmp_path_factory.mktemp("zipfuzz") / "friend.pt"
    path.write_bytes(bytes(data))
    with contextlib.suppress(CheckpointError):
        safeckpt.open(path).to_python()
    with contextlib.suppress(CheckpointError):
        tp.verify(path)


# -- the torch-free read path (issue 19) -------------------------------------------------------------

_NO_TORCH_FILES = [
    TORCH_FIXTURES / "friend.pt",
    TORCH_FIXTURES / "friend_legacy.pt",
    TORCH_FIXTURES / "dtypes.pt",
    TORCH_FIXTURES / "dtypes_legacy.pt",
    TORCH_FIXTURES / "protocol4.pt",
    TORCH_FIXTURES / "structures.pt",
    TORCH_FIXTURES / "optimizer.pt",
    LIGHTNING_FIXTURES / "trainer.ckpt",
    LIGHTNING_FIXTURES / "fabric.ckpt",
    ROOT / "fixtures" / "realworld" / "sparse.pt",
    ROOT / "fixtures" / "realworld" / "legacy_shared.pt",
    ROOT / "fixtures" / "realworld" / "scripted.pt",
]
_LIST_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
from safeckpt import tree
from safeckpt._dtypes import DType
from safeckpt.formats import torch_pickle
out = {}
for name in sys.argv[1:]:
    ckpt = torch_pickle.read(Path(name))
    out[name] = {
        "tensors": {k: [r.dtype_info.name, list(r.shape), r.span is not None] for k, r in ckpt.tensors().items()},
        "values": [
            f"torch.{v.name}" if isinstance(v, DType) else repr(v)  # a dtype's stand-in is a _dtypes row
            for _, v in tree.iter_leaves(ckpt.tree)
            if not isinstance(v, tree.TensorRef)
        ],
    }
assert "torch" not in sys.modules
print(json.dumps(out))
"""


def test_torch_files_are_parsed_without_importing_torch() -> None:
    """Listing a torch.save / Lightning / legacy / TorchScript file's tensors (names, dtypes, shapes,
    file spans for a byte copy) and its other values needs no torch; torch is imported only to
    materialize, and then agrees with the torch-free listing and bit for bit with torch.load."""
    from conformance import run_without_torch

    probe = run_without_torch("import safeckpt.tree, safeckpt._fs")
    if probe.returncode:  # this branch's tree/_fs still import torch (the torch-free data layer is i19a's)
        pytest.skip(f"safeckpt.tree/_fs import torch here: {probe.stderr.strip().splitlines()[-1]}")
    p = run_without_torch(_LIST_WITHOUT_TORCH, *map(str, _NO_TORCH_FILES))
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    for path in _NO_TORCH_FILES:
        ckpt = safeckpt.open(path)
        refs = ckpt.tensors()
        assert listed[str(path)]["tensors"] == {
            k: [str(r.dtype).removeprefix("torch."), list(r.shape), r.span is not None] for k, r in refs.items()
        }
        # non-tensor torch values print as torch prints them, with torch or without
        assert listed[str(path)]["values"] == [
            repr(v) for _, v in iter_leaves(ckpt.tree) if not isinstance(v, TensorRef)
        ]
    friend = safeckpt.open(TORCH_FIXTURES / "friend.pt").to_python()
    same(friend, torch.load(TORCH_FIXTURES / "friend.pt", weights_only=True))


def test_stand_ins_become_torch_values_when_materialized() -> None:
    from safeckpt import _torch_values
    from safeckpt.tree import Checkpoint

    tree = {
        "size": _torch_values.Size((2, 3)),
        "dtype": _dtypes.BY_NAME["bfloat16"],
        "device": _torch_values.Device("cuda", 1),
        "layout": _torch_values.Layout("sparse_csr"),
    }
    # torch-free, and printed as torch prints them
    assert repr([tree["size"], tree["device"], tree["layout"]]) == repr(
        [torch.Size([2, 3]), torch.device("cuda", 1), torch.sparse_csr]
    )
    out = Checkpoint(tree, format="torch", path="x.pt").to_python()
    assert out == {
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "layout": torch.sparse_csr,
    }
    assert type(out["size"]) is torch.Size
    with pytest.raises(CorruptCheckpointError, match="is not a device"):
        _torch_values.to_torch(_torch_values.Device("Nope"))


@pytest.mark.parametrize("protocol", [2, 4])
def test_stack_global_names_from_the_memo_are_followed_from_protocol_4(protocol: int) -> None:
    """pickle writes STACK_GLOBAL from protocol 4 on: there the scan resolves operands from the memo;
    an older pickle is scanned without following its memo, so such a global is refused, not admitted."""
    body = b"X\x0b\x00\x00\x00collectionsq\x000X\x0b\x00\x00\x00OrderedDictq\x010h\x00h\x01\x93)R."
    data = bytes([0x80, protocol]) + body
    if protocol >= 4:
        assert _pickle.globals_in(data) == ["collections.OrderedDict"]
        assert _pickle.load(data, source="m.pkl").value == collections.OrderedDict()
    else:
        with pytest.raises(UnsafeCheckpointError, match="STACK_GLOBAL at byte 44 with computed operands"):
            _pickle.load(data, source="m.pkl")
