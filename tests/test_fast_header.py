"""The safetensors header's fast pass (`_safetensors._parse_fast`, whole columns in C) accepts only
what the entry-by-entry parse accepts, with the same result: on valid headers from real writers,
and on headers mutated the ways an attacker would (duplicate keys hidden by JSON's last-wins, keys
out of order or extra, escapes, wrong types, holes and overlaps)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _safetensors as st

P = Path("x.safetensors")


def _both(raw: bytes, size: int) -> tuple[Any, Any]:
    fast = st._parse_fast(P, raw, size)
    try:
        checked: Any = st._parse_checked(P, raw, size)
    except CorruptCheckpointError as e:
        checked = e
    return fast, checked


def _agree(raw: bytes, size: int) -> None:
    fast, checked = _both(raw, size)
    if fast is not None:  # accepted: the checked parse accepts it too, identically
        assert not isinstance(checked, Exception), (raw[:300], checked)
        assert fast == checked


def _valid(n: int) -> tuple[dict[str, Any], int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "k": "v"}}
    pos = 0
    for i in range(n):
        nbytes = 4 * (i % 3 + 1)
        header[f"t.{i}"] = {"dtype": "F32", "shape": [i % 3 + 1], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    return header, pos


def test_escaped_strings_take_the_fast_pass() -> None:
    raw = b'{"__metadata__":{"k":"x\\"y\\\\"},"a\\"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    fast, checked = _both(raw, 8 + len(raw) + 4)
    assert fast is not None and fast == checked and list(fast.entries) == ['a"'] and fast.metadata == {"k": 'x"y\\'}


def test_real_files_take_the_fast_pass(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.ones(i, 3, dtype=torch.bfloat16 if i % 2 else torch.float32) for i in range(40)}
    tensors["empty"] = torch.ones(0, 5)
    safetensors.torch.save_file(tensors, tmp_path / "m.safetensors", {"format": "pt"})
    raw, size = st.read_raw_header(tmp_path / "m.safetensors")
    fast, checked = _both(raw[8:], size)
    assert fast is not None and fast == checked


DUPLICATES = [  # json would resolve each silently (last wins), at every level
    '{"a\\"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a\\"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"a\\\\":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a\\\\":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"__metadata__":{"k":"x\\"y"},"a":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[0,4]}}',
    '{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"x__metadata__":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\\u0061":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"\\u0064ata_offsets":[0,4]}}',
]

def _spans(*spans: tuple[int, int]) -> str:
    """A header of F32 tensors a, b, c... at ``spans`` (data offsets), in that order."""
    entries = {chr(97 + i): {"dtype": "F32", "shape": [(e - b) // 4], "data_offsets": [b, e]} for i, (b, e) in enumerate(spans)}
    return json.dumps(entries, separators=(",", ":"))


LAYOUTS = {  # spans in and out of the names' order; the last four overlap, repeat or leave a hole
    "swapped": _spans((4, 8), (0, 4)),
    "shuffled": _spans((0, 4), (8, 12), (4, 8)),
    "empty at the end": _spans((0, 8), (8, 8)),
    "empty inside another": _spans((0, 8), (4, 4), (8, 12)),
    "overlap": _spans((0, 4), (4, 8), (2, 6)),
    "twice": _spans((0, 4), (0, 4), (4, 12)),
    "hole": _spans((0, 4), (8, 12)),
}
OTHERS = [  # types, sizes and layout
    '{"a":null}',
    '{"a":5,"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":null,"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":7}}',
    '{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":{},"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}',
    '{"a":{"dtype":"F6_E2M3","shape":[3],"data_offsets":[0,2]}}',
    '{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}',
    '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}',
    *LAYOUTS.values(),
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"data_offsets":"x"}}',
    '{"__metadata__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"shape":[1],"dtype":"F32","data_offsets":[0,4]}}',
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}',
]


@pytest.mark.parametrize("text", DUPLICATES)
def test_a_key_given_twice_is_never_accepted(text: str) -> None:
    raw = text.encode()
    fast, checked = _both(raw, 8 + len(raw) + 4)
    assert fast is None and isinstance(checked, CorruptCheckpointError) and "duplicate key" in str(checked)


@pytest.mark.parametrize("text", OTHERS)
def test_hostile_headers_get_the_checked_verdict(text: str) -> None:
    raw = text.encode()
    for size in (8 + len(raw) + 4, 8 + len(raw) + 8, 8 + len(raw) + 12, 8 + len(raw) + 2):
        _agree(raw, size)


def test_layouts_in_any_order_take_the_fast_pass() -> None:
    """Spans in another order than the names' are checked as a tiling: accepted when they tile the
    data, and left to the checked parse (which names the problem) when they do not."""
    for name, text in LAYOUTS.items():
        raw = text.encode()
        end = max(e["data_offsets"][1] for e in json.loads(text).values())
        fast, checked = _both(raw, 8 + len(raw) + end)
        if name in ("overlap", "twice", "hole", "empty inside another"):
            assert fast is None and isinstance(checked, CorruptCheckpointError), name
        else:
            assert fast is not None and fast == checked, name


_leaf = s.one_of(s.integers(-2, 8), s.booleans(), s.none(), s.just(1.0), s.text('ab"\\', max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=s.integers(0, 6),
    edits=s.lists(s.tuples(s.integers(0, 7), s.integers(0, 10), _leaf), max_size=4),
    dup=s.integers(0, 4),
)
def test_mutated_headers_agree(n: int, edits: list[tuple[int, int, Any]], dup: int) -> None:
    header, total = _valid(n)
    names = [k for k in header if k != "__metadata__"]
    for kind, i, value in edits:
        if not names:
            break
        entry = header[names[i % len(names)]]
        if kind == 0:
            entry["dtype"] = value if isinstance(value, str) else "I8"
        elif kind == 1:
            entry["shape"] = [value]
        elif kind == 2:
            entry["data_offsets"][i % 2] = value
        elif kind == 3:
            entry["extra"] = value
        elif kind == 4:
            header["__metadata__"][str(value)] = value
        elif kind == 5:
            header[names[i % len(names)]] = {
                "data_offsets": entry["data_offsets"],
                "shape": entry["shape"],
                "dtype": entry["dtype"],
            }
        elif kind == 6:
            entry["shape"] = [value, value]
        else:
            del header[names.pop(i % len(names))]
    text = json.dumps(header, separators=(",", ":"))
    if dup and names:  # repeat one key by hand: json.dumps cannot
        key = ['"dtype":', '"shape":', '"data_offsets":', '"format":', f'"{names[0]}":'][dup % 5]
        at = text.find(key)
        if at >= 0:
            end = text.find(",", at)
            text = text[:at] + text[at:end] + "," + text[at:]
    raw = text.encode()
    for size in (8 + len(raw) + total, 8 + len(raw) + total + 1):
        _agree(raw, size)


def test_prefix_helper_matches_the_reader(tmp_path: Path) -> None:
    header, total = _valid(3)
    blob = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * total)
    assert st.read_header(path).entries == st._parse_checked(path, blob, path.stat().st_size).entries
