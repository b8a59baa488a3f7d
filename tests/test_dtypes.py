"""The torch-free dtype table agrees with torch and with the tables the readers use."""

from __future__ import annotations

import torch

from conformance import run_without_torch
from safeckpt import _dtypes
from safeckpt.formats import _safetensors


def test_every_row_is_the_torch_dtype_of_that_name_and_size() -> None:
    for row in _dtypes.DTYPES:
        dtype = _dtypes.to_torch(row)
        assert isinstance(dtype, torch.dtype) and dtype.itemsize == row.itemsize, row
        assert _dtypes.of(dtype) is row


def test_codes_match_the_safetensors_table() -> None:
    assert {c: _dtypes.to_torch(r) for c, r in _dtypes.BY_CODE.items()} == _safetensors.DTYPES


def test_aliases_resolve_to_torch_objects() -> None:
    for alias in ("float", "double", "half", "long", "int", "short", "cfloat", "cdouble", "chalf"):
        assert _dtypes.to_torch(_dtypes.by_name(alias)) is getattr(torch, alias)


def test_the_table_needs_no_torch() -> None:
    p = run_without_torch("from safeckpt import _dtypes; print(_dtypes.BY_STORAGE['HalfStorage'].code)")
    assert p.returncode == 0 and p.stdout.strip() == "F16", p.stderr
    p = run_without_torch("import torch")
    assert p.returncode != 0 and "blocked" in p.stderr
