"""The msgpack codec: every supported value round-trips by type and value; anything else is
refused with its path before a byte is written."""

from __future__ import annotations

import argparse
import math
import pathlib
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import safeckpt
from conformance import assert_bits_equal
from safeckpt import AttributeDict, codec
from safeckpt.errors import CorruptCheckpointError

VALUES = {
    "none": None,
    "bools": [True, False],
    "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
    "bigints": [2**64, -(2**63) - 1, 3**200, -(7**90)],
    "floats": [0.0, -0.0, 1.5, float("inf"), float("-inf"), 1e-310],
    "str": "héllo ✓",
    "bytes": b"\x00\xffraw",
    "bytearray": bytearray(b"xy"),
    "tuple": (1, (2, 3), ()),
    "set": {1, "a", (2, 3)},
    "frozenset": frozenset({1.5}),
    "int_keys": {0: "a", 1: "b", -5: "c"},
    "mixed_keys": {1: 1, "1": 2, (1, 2): 3, None: 4, 2.5: 5, False: 6},
    "ordered": OrderedDict([("b", 1), ("a", 2)]),
    "counter": Counter({30: 1, 80: 2, "x": -1}),  # MultiStepLR milestones
    "attr": AttributeDict(lr=0.1, nested=AttributeDict(x=1)),
    "namespace": argparse.Namespace(lr=0.1, name="x"),
    "size": torch.Size([2, 3]),
    "dtypes": [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint64],
    "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
    "np_scalars": [np.float64(1.5), np.int32(-3), np.bool_(True), np.float16(0.5), np.uint64(2**64 - 1)],
    "np_array": np.arange(12, dtype=np.float32).reshape(3, 4),
    "np_fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
    "np_strings": np.array(["a", "bc"]),
    "paths": [pathlib.PurePosixPath("/a/b"), pathlib.PureWindowsPath("C:\\x"), pathlib.Path("rel/p")],
    "complex": 1 - 2j,
    "empty": [{}, [], ()],
}


def equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if type(a) is float and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is float:
        return type(b) is float and a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, argparse.Namespace):
        return type(b) is argparse.Namespace and vars(a) == vars(b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(VALUES))
def test_value_round_trips_by_type(name: str, tmp_path: Path) -> None:
    value = VALUES[name]
    path = safeckpt.save(tmp_path / "v.safeckpt", {name: value})
    back = safeckpt.load(path)[name]
    assert equal(value, back), (value, back)


def test_nan_stays_nan(tmp_path: Path) -> None:
    back = safeckpt.load(safeckpt.save(tmp_path / "n", {"x": float("nan")}))["x"]
    assert isinstance(back, float) and math.isnan(back)


def test_state_dict_metadata_survives(tmp_path: Path) -> None:
    sd = torch.nn.BatchNorm1d(3).state_dict()
    back = safeckpt.load(safeckpt.save(tmp_path / "m", {"m": sd}))["m"]
    assert type(back) is OrderedDict and back._metadata == sd._metadata  # type: ignore[attr-defined]


def test_lightning_attribute_dict_loads_back_as_ours(tmp_path: Path) -> None:
    lightning_data = pytest.importorskip("lightning.fabric.utilities.data")
    theirs = lightning_data.AttributeDict(lr=0.1, name="x")
    back = safeckpt.load(safeckpt.save(tmp_path / "h", {"hparams": theirs}))["hparams"]
    assert type(back) is AttributeDict and back == {"lr": 0.1, "name": "x"} and back.lr == 0.1


class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"hparams": {"callback": Opaque()}}, "state['hparams']['callback']"),
        ({"a": [1, 2, lambda: 0]}, "state['a'][2]"),
        ({"cfg": {"x": (1, {"y": object()})}}, "state['cfg']['x'][1]['y']"),
        ({"arr": np.array([object()], dtype=object)}, "state['arr']"),
        ({"d": __import__("collections").defaultdict(list)}, "state['d']"),
        ({"gen": (i for i in range(3))}, "state['gen']"),
    ],
)
def test_unsupported_value_is_refused_with_its_path_before_writing(state: dict, where: str, tmp_path: Path) -> None:
    target = tmp_path / "ckpt.safeckpt"
    with pytest.raises(TypeError) as info:
        safeckpt.save(target, state)
    assert where in str(info.value)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_tensor_as_dict_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="state\\['d'\\]"):
        safeckpt.save(tmp_path / "x", {"d": {torch.ones(1): 1}})


def test_decode_rejects_garbage() -> None:
    for junk in (b"\xc1", b"\x92\x01", b"\xd4\x63\x00", codec.encode({"a": 1}, None) + b"\x00"):
        with pytest.raises(CorruptCheckpointError, match="skel"):
            codec.decode(junk, None, source="skel")


def test_decode_bounds_deep_nesting() -> None:
    data = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(CorruptCheckpointError):
        codec.decode(data, None, source="deep")


def test_tensors_inside_containers(tmp_path: Path) -> None:
    state = {"opt": {"state": {0: {"exp_avg": torch.ones(2)}}, "groups": [({"t": torch.zeros(1)},)]}}
    back = safeckpt.load(safeckpt.save(tmp_path / "t", state))
    assert_bits_equal(state, back)


def test_the_type_table_has_one_row_per_ext_code_and_keeps_the_format():
    """The codec's ext types are one table: every code of `Ext` (a file-format constant) has exactly
    one row, and what is derived from the rows is what the format has always had."""
    codes = {v for k, v in vars(codec.Ext).items() if not k.startswith("_")}
    rows = [row.code for row in codec.EXT_TYPES]
    assert sorted(rows) == sorted(codes) == list(range(1, 20))
    hashable = {row.code for row in codec.EXT_TYPES if row.hashable}
    E = codec.Ext
    assert hashable == {E.TUPLE, E.FROZENSET, E.BIGINT, E.SIZE, E.COMPLEX, E.NP_SCALAR}
    # the codes decode builds from its table; TENSOR and USER are bound by decode itself
    assert {row.code for row in codec.EXT_TYPES if row.decode is None} == {E.TENSOR, E.USER}


@pytest.mark.parametrize(
    "cls",
    [type(None), bool, int, float, complex, str, bytes, bytearray, list, dict, tuple, set, frozenset, OrderedDict,
     Counter, argparse.Namespace, torch.Size, torch.dtype, torch.device, np.ndarray, pathlib.Path, pathlib.PurePath,
     pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath, AttributeDict,
     torch.Tensor, torch.nn.Parameter, np.float32],
)  # fmt: skip
def test_register_type_refuses_every_type_the_table_stores(cls: type):
    with pytest.raises(TypeError, match="stores .* values itself"):
        safeckpt.register_type(cls)
