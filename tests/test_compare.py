"""safeckpt.compare: what `diff` and convert's verification rely on, checked on real files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import safeckpt
from safeckpt import compare as cmp


def test_bits_decide_equality_without_a_tolerance(tmp_path: Path) -> None:
    nan = float("nan")
    a = safeckpt.save(tmp_path / "a.safeckpt", {"x": torch.tensor([nan, 0.0, 1.0]), "y": torch.tensor([1.0])})
    b = safeckpt.save(tmp_path / "b.safeckpt", {"x": torch.tensor([nan, -0.0, 1.0]), "y": torch.tensor([1.0])})
    d = cmp.compare(safeckpt.open(a), safeckpt.open(b))
    assert [c.name for c in d.changed] == ["x"] and d.same == 1  # -0.0 is not 0.0 bit for bit
    assert d.changed[0].max_abs == 0.0 and d.changed[0].kind == "tensor"  # ... though no value moved
    assert cmp.compare(safeckpt.open(a), safeckpt.open(a)).equal  # nan equals itself by bytes


def test_max_abs_difference_across_chunks_and_dtypes() -> None:
    n = cmp._CHUNK * 2 + 3  # the difference sits in the last, partial chunk
    a = torch.zeros(n)
    b = a.clone()
    b[-1] = 0.5
    (c,) = cmp.compare({"w": a}, {"w": b}).changed
    assert c.max_abs == 0.5
    assert cmp.compare({"w": a}, {"w": b}, atol=0.5).equal
    assert not cmp.compare({"w": a}, {"w": b}, atol=0.25).equal
    half = cmp.compare({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}, atol=1)
    assert not half.equal and half.changed[0].max_abs == 0.0  # a dtype change is a change at any tolerance
    one_nan = cmp.compare({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, float("nan")])}).changed[0]
    assert math.isnan(one_nan.max_abs)
    inf = torch.tensor([float("inf"), 1.0])
    assert cmp.compare({"w": inf}, {"w": inf.clone()}).equal
    shape = cmp.compare({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)}).changed[0]
    assert shape.max_abs is None


def test_packed_dtypes_compare_by_bytes() -> None:
    a = torch.tensor([[1, 2]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    b = torch.tensor([[1, 3]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    assert cmp.compare({"q": a}, {"q": a.clone()}).equal
    (c,) = cmp.compare({"q": a}, {"q": b}).changed
    assert c.max_abs is None  # no arithmetic on float4: only the bytes say they differ


def test_values_by_type_and_value() -> None:
    a = {"step": 3, "lr": 0.1, "flag": True, "betas": (0.9, 0.999), "arr": np.arange(3), "nan": float("nan"), "e": {}}
    same = {**a, "arr": np.arange(3), "betas": (0.9, 0.999)}
    assert cmp.compare(a, same).equal
    b = {**a, "step": 3.0, "flag": 1, "betas": [0.9, 0.999], "arr": np.arange(3, dtype=np.int8), "e": {"k": 1}}
    d = cmp.compare(a, b)
    assert {c.name for c in d.changed} == {"step", "flag", "betas", "arr"}
    assert d.only_a == ["e"] and d.only_b == ["e/k"]  # an emptied or filled container is a difference
    assert {c.kind for c in d.changed} == {"value"}
    mixed = cmp.compare({"x": torch.ones(1)}, {"x": 1.0}).changed[0]
    assert mixed.kind == "type"


def test_leaves_keep_colliding_names_and_scalar_lists() -> None:
    assert cmp.leaves({0: "a", "0": "b", "p": [1, 2], "q": [{"r": 1}]}) == {
        "0": "a",
        "0~1": "b",
        "p": [1, 2],
        "q/0/r": 1,
    }
    assert not cmp.compare({0: "a", "0": "b"}, {0: "a", "0": "c"}).equal
    assert cmp.leaves({}) == {}


def test_nested_and_flat_files_compare_by_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd = {"l1.weight": torch.randn(3, 4), "l1.bias": torch.randn(3)}
    nested = safeckpt.save(tmp_path / "n.safeckpt", {"model": sd})
    flat = safeckpt.convert(nested, tmp_path / "f.safetensors", key=None, verify=True)
    assert safeckpt.open(flat).format == "safetensors"
    assert cmp.compare(safeckpt.open(nested), safeckpt.open(flat)).equal
    changed = safeckpt.save(
        tmp_path / "c.safetensors", {"model.l1.weight": sd["l1.weight"] + 1, "model.l1.bias": sd["l1.bias"]}
    )
    (c,) = cmp.compare(safeckpt.open(nested), safeckpt.open(changed)).changed
    assert (c.name, c.b_name) == ("model/l1.weight", "model.l1.weight")
    assert c.max_abs == float(((sd["l1.weight"] + 1).double() - sd["l1.weight"].double()).abs().max())
    seen: list[int] = []
    cmp.compare(safeckpt.open(nested), safeckpt.open(flat), progress=seen.append)
    assert sorted(seen) == sorted(t.numel() * 4 for t in sd.values())
