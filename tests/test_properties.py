"""Property-based round trips: random state trees of every codec type and tensors of every dtype
and layout come back equal by type and by bits."""

from __future__ import annotations

import argparse
import math
import pathlib
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

import safeckpt
from safeckpt import AttributeDict
from test_native_fidelity import DTYPES, random_bits

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = s.one_of(
    s.none(),
    s.booleans(),
    s.integers(min_value=-(2**80), max_value=2**80),
    s.floats(allow_nan=True, allow_infinity=True),
    s.text(max_size=8),
    s.binary(max_size=8),
    s.complex_numbers(allow_nan=False, max_magnitude=1e6),
    s.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
    s.sampled_from([torch.device("cpu"), torch.device("cuda", 0)]),
    s.builds(torch.Size, s.lists(s.integers(0, 5), max_size=3)),
    s.builds(pathlib.PurePosixPath, s.text("ab/", max_size=6)),
    s.builds(np.float32, s.floats(width=32, allow_nan=False)),
    s.builds(np.int64, s.integers(-(2**63), 2**63 - 1)),
)
hashables = s.one_of(s.integers(-1000, 1000), s.text(max_size=6), s.tuples(s.integers(0, 3), s.text(max_size=2)))


@s.composite
def tensors(draw: Any) -> torch.Tensor:
    dtype = draw(s.sampled_from(DTYPES))
    shape = tuple(draw(s.lists(s.integers(0, 4), max_size=3)))
    if dtype == torch.float4_e2m1fn_x2 and not shape:
        shape = (1,)
    t = random_bits(dtype, shape, seed=draw(s.integers(0, 2**16)))
    layout = draw(s.sampled_from(["plain", "transposed", "sliced"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif layout == "sliced" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    return t


def trees(leaves: s.SearchStrategy[Any]) -> s.SearchStrategy[Any]:
    def extend(children: s.SearchStrategy[Any]) -> s.SearchStrategy[Any]:
        return s.one_of(
            s.lists(children, max_size=4),
            s.lists(children, max_size=3).map(tuple),
            s.dictionaries(hashables, children, max_size=4),
            s.dictionaries(s.text(max_size=5), children, max_size=3).map(OrderedDict),
            s.dictionaries(s.text(min_size=1, max_size=5), children, max_size=3).map(AttributeDict),
            s.dictionaries(s.text("abc", min_size=1, max_size=3), scalars, max_size=3).map(
                lambda d: argparse.Namespace(**d)
            ),
            s.sets(hashables, max_size=3),
        )

    return s.recursive(leaves, extend, max_leaves=12)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        a2 = a.contiguous()
        return (
            type(b) is torch.Tensor
            and a.dtype == b.dtype
            and a.shape == b.shape
            and (a.numel() == 0 or torch.equal(a2.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, argparse.Namespace):
        return same(vars(a), vars(b))
    return bool(a == b)


@SETTINGS
@given(tree=s.dictionaries(s.text(min_size=1, max_size=6), trees(s.one_of(scalars, tensors())), max_size=5))
def test_random_state_round_trips(tree: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = safeckpt.save(Path(d) / "p.safeckpt", tree)
        back = safeckpt.load(path)
    assert same(tree, back), (tree, back)
