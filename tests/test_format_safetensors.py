"""The ``safetensors`` format: real producer files, differential against ``safe_open``, our writer
loaded by the stock loaders, tied-weight metadata, refusals and integrity."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import safeckpt
from conformance import FormatConformance, Net, assert_bits_equal, sample_state_dict, sorted_dict
from safeckpt import formats
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _safetensors as st
from safeckpt.formats import safetensors_file as stf

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
_spec = importlib.util.spec_from_file_location("hf_fixtures", FIXTURES / "make_fixtures.py")
assert _spec and _spec.loader
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

SAFETENSORS_FIXTURES = sorted(p for p in FIXTURES.rglob("*.safetensors"))


def stock(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What safetensors' own reader gives: every tensor by name, and the metadata."""
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 - safe_open is no dict


class TestSafetensorsConformance(FormatConformance):
    """Files written by safetensors itself."""

    NAME = "safetensors"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        path = directory / "m.safetensors"
        safetensors.torch.save_file(state_dict, path)
        return path

    def boundaries(self, path: Path) -> list[int]:
        header = st.read_header(path)
        return [0, 8, header.data_start, *(e.begin for e in header.entries.values()), header.size - 1]

    def expected(self, state_dict: dict[str, torch.Tensor]) -> Any:
        return sorted_dict(state_dict)  # safetensors keeps no order; we read names sorted, as safe_open lists them


class TestOurWriterConformance(TestSafetensorsConformance):
    """Files written by our writer (``safeckpt.save`` to a ``.safetensors`` path)."""

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        return safeckpt.save(directory / "m.safetensors", state_dict)


# -- reading real producers' files ------------------------------------------------------------------


@pytest.mark.parametrize("path", SAFETENSORS_FIXTURES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_differential_against_safe_open(path: Path) -> None:
    """Key for key, bit for bit, and metadata, what safe_open returns (tied aliases aside)."""
    ckpt = stf.read(path)
    tensors, metadata = stock(path)
    aliases = ckpt.info.get("aliases", {})
    assert sorted(set(ckpt.tree) - set(aliases)) == sorted(tensors) == list(f for f in ckpt.tree if f not in aliases)
    mine = {k: ckpt[k].load() for k in tensors}
    assert_bits_equal(tensors, mine)
    assert ckpt.metadata == {k: v for k, v in metadata.items() if k not in aliases}  # tied records became entries
    for dropped, kept in aliases.items():
        assert metadata[dropped] == kept and ckpt[dropped] is ckpt[kept]


def test_every_dtype_fixture_covers_the_format() -> None:
    header = st.read_header(FIXTURES / "dtypes.safetensors")
    codes = {e.code for e in header.entries.values()}
    assert codes == set(st.DTYPES), set(st.DTYPES) - codes
    f4 = header.entries["f4"]
    assert f4.shape == (2, 6) and f4.torch_shape == (2, 3)  # F4 counts 4-bit elements, torch counts pairs
    assert_bits_equal(sorted_dict(fx.every_dtype()), safeckpt.load(FIXTURES / "dtypes.safetensors"))


def test_plain_fixture_values_and_metadata() -> None:
    assert_bits_equal(sorted_dict(fx.plain_state()), safeckpt.load(FIXTURES / "plain.safetensors"))
    ckpt = safeckpt.open(FIXTURES / "plain_meta.safetensors")
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"format": "pt", "producer": "make_fixtures", "note": "ünïcode ok"}
    assert safeckpt.open(FIXTURES / "plain.safetensors").metadata == {}
    assert safeckpt.load(FIXTURES / "empty.safetensors") == {}


def test_tied_model_loads_strict_where_huggingface_hub_does_not() -> None:
    """save_model drops head.weight and records it; we restore it, so a strict load works."""
    path = FIXTURES / "tied_model.safetensors"
    ckpt = safeckpt.open(path)
    assert ckpt.info["aliases"] == {"head.weight": "emb.weight"}
    assert ckpt.tied() == [["emb.weight", "head.weight"]]
    net = fx.TiedNet()
    safeckpt.load_raw(path, net)  # strict
    ref = fx.tied_net()
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    assert net.head.weight is net.emb.weight
    # save_model and the Hub mixin write no "format" key, which huggingface_hub's loader refuses outright
    for refused in (path, FIXTURES / "mixin" / "model.safetensors"):
        with pytest.raises(OSError, match="does not contain the valid metadata"):
            huggingface_hub.load_torch_model(fx.TiedNet(), refused)
        safeckpt.load_raw(refused, fx.TiedNet())
    # and on its own save_torch_state_dict output it reports the tied name missing, failing strict
    hub_file = FIXTURES / "single_st" / "model.safetensors"
    with pytest.raises(RuntimeError, match=r"head\.weight"):
        huggingface_hub.load_torch_model(fx.TiedNet(), hub_file, strict=True)
    net = fx.TiedNet()
    safeckpt.load_raw(hub_file, net)
    assert_bits_equal(ref.state_dict(), net.state_dict())


def test_alias_rule_needs_a_missing_key_and_an_existing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    safetensors.torch.save_file(
        {"a": torch.ones(2), "pt": torch.zeros(1)},
        path,
        metadata={"format": "pt", "b": "a", "a": "pt", "c": "nope", "author": "someone"},
    )
    ckpt = safeckpt.open(path)
    assert ckpt.info["aliases"] == {"b": "a"}  # "a" is a tensor itself, "c" names none, "format" is reserved
    assert list(ckpt.tree) == ["a", "b", "pt"]


def test_f6_tensors_are_read_as_raw_bytes(tmp_path: Path) -> None:
    """F6 has no torch dtype (safe_open cannot read it either): we expose its bytes and warn."""
    path = tmp_path / "f6.safetensors"
    header = json.dumps(
        {
            "x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]},
            "y": {"dtype": "U8", "shape": [1], "data_offsets": [3, 4]},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x01\x02\x03\x04")
    with pytest.warns(UserWarning, match="F6_E2M3"):
        ckpt = safeckpt.open(path)
    assert ckpt.info["raw_bytes"] == {"x": "F6_E2M3 [4]"}
    assert ckpt["x"].load().tolist() == [1, 2, 3] and ckpt["y"].load().tolist() == [4]


def test_unaligned_unpadded_and_whitespace_headers_from_other_writers(tmp_path: Path) -> None:
    """The format does not require padding or alignment; safetensors accepts leading whitespace."""
    data = struct.pack("<f", 1.5) + struct.pack("<d", -2.0)
    for pad in (b"", b"  \n"):
        header = (
            pad
            + json.dumps(
                {
                    "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]},
                    "c": {"dtype": "F64", "shape": [1], "data_offsets": [5, 13]},
                }
            ).encode()
        )
        path = tmp_path / "u.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + data)
        tensors, _ = stock(path)
        assert_bits_equal(tensors, safeckpt.load(path))
        assert safeckpt.load(path)["c"].item() == -2.0


# -- writing ----------------------------------------------------------------------------------------


def tied_state() -> dict[str, torch.Tensor]:
    return fx.tied_net().state_dict()


def test_written_file_loads_in_every_stock_loader(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "m.safetensors", fx.tied_net())
    assert formats.detect(path).NAME == "safetensors"
    tensors, metadata = stock(path)
    assert metadata["format"] == "pt" and metadata["head.weight"] == "emb.weight"
    assert "head.weight" not in tensors  # written once
    sd = tied_state()
    for k, v in tensors.items():
        assert_bits_equal(sd[k], v, k)
    net = fx.TiedNet()
    assert safetensors.torch.load_model(net, path) == (set(), [])  # strict, tie-aware
    assert net.head.weight is net.emb.weight and torch.equal(net.emb.weight, sd["emb.weight"])
    net = fx.TiedNet()
    result = huggingface_hub.load_torch_model(net, path)  # strict=False by default: the tie carries the value
    assert result.missing_keys == ["head.weight"] and not result.unexpected_keys
    assert torch.equal(net.head.weight, sd["emb.weight"]) and torch.equal(
        net.norm.running_mean, sd["norm.running_mean"]
    )
    net = fx.TiedNet()
    safeckpt.load_raw(path, net)
    assert_bits_equal(sd, net.state_dict())


def test_writer_flattens_nested_trees_and_keeps_logical_values(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tree = {
        "enc": {"w": base.t(), "rows": [base[0], base[1:3]]},  # non-contiguous view, views of one storage
        "b": torch.arange(3, dtype=torch.int16)[::2],
        "c": torch.tensor([1 + 2j], dtype=torch.complex64).conj(),
    }
    path = safeckpt.save(tmp_path / "n.safetensors", tree)
    tensors, _ = stock(path)
    assert sorted(tensors) == ["b", "c", "enc.rows.0", "enc.rows.1", "enc.w"]
    assert_bits_equal(base.t().contiguous(), tensors["enc.w"])
    assert_bits_equal(base[1:3].clone(), tensors["enc.rows.1"])
    assert_bits_equal(torch.tensor([0, 2], dtype=torch.int16), tensors["b"])
    assert tensors["c"].tolist() == [1 - 2j]


def test_writer_refusals_name_the_key(tmp_path: Path) -> None:
    target = tmp_path / "r.safetensors"
    cases: list[tuple[Any, type[Exception], str]] = [
        ({"model": {"w": torch.ones(1)}, "step": 3}, TypeError, r"'step' is a int.*'safeckpt'.*--key"),
        ({"__metadata__": torch.ones(1)}, ValueError, "reserved"),
        ({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, ValueError, "'a.b'"),
        ({"z": torch.ones(2, dtype=torch.complex128)}, TypeError, "'z'.*complex128.*safeckpt"),
        ({"m": torch.empty(2, device="meta")}, TypeError, "'m' is a meta tensor"),
        ({"s": torch.eye(2).to_sparse()}, TypeError, "'s' is a torch.sparse_coo tensor"),
        ({("t", 1): torch.ones(1)}, TypeError, "safetensors names are strings"),
    ]
    for tree, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            formats.get("safetensors").write(safeckpt.tree.Checkpoint(tree, format="memory", path="-"), target)
        assert not target.exists()


def test_file_mode_follows_umask(tmp_path: Path) -> None:
    """safetensors 0.8.0 leaves 0600 files (its tempfile); ours follow the umask like any new file."""
    old = os.umask(0o022)
    try:
        path = safeckpt.save(tmp_path / "m.safetensors", {"a": torch.ones(1)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_convert_keeps_user_metadata_and_recomputes_tied_records(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    safetensors.torch.save_model(fx.tied_net(), src, metadata={"format": "pt", "producer": "me"})
    out = safeckpt.convert(src, tmp_path / "out.safetensors")
    _, metadata = stock(out)
    assert {k: v for k, v in metadata.items() if k not in ("safeckpt.crc32", "safeckpt.header_crc32")} == {
        "format": "pt",
        "producer": "me",
        "head.weight": "emb.weight",
    }
    # filtering out the kept tensor must not leave a record pointing at a tensor that is gone
    out = safeckpt.convert(
        src, tmp_path / "f.safetensors", filter=lambda name, ref: not name.startswith(("emb", "head"))
    )
    tensors, metadata = stock(out)
    assert "emb.weight" not in tensors and "head.weight" not in metadata and metadata["producer"] == "me"


def test_verify_detects_a_flipped_bit(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "v.safetensors", sample_state_dict())
    assert stf.verify(path) == []
    assert stf.verify(FIXTURES / "plain.safetensors") == []  # no checksums recorded: structure only
    entry = st.read_header(path).entries["l1.weight"]
    data = bytearray(path.read_bytes())
    data[entry.begin + 1] ^= 0x10
    path.write_bytes(bytes(data))
    problems = stf.verify(path)
    assert len(problems) == 1 and "l1.weight" in problems[0] and str(path) in problems[0]
    with pytest.raises(CorruptCheckpointError, match=r"l1\.weight"):
        safeckpt.load(path, verify=True)
    path.write_bytes(bytes(data[:-1]))
    assert "truncated" in stf.verify(path)[0]


@pytest.mark.parametrize("path", SAFETENSORS_FIXTURES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_convert_fixture_to_native_and_back(path: Path, tmp_path: Path) -> None:
    """convert to safeckpt, then to safetensors again: identical tensors, key for key."""
    tensors, _ = stock(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native = safeckpt.convert(path, tmp_path / "x.safeckpt")
        back = safeckpt.convert(native, tmp_path / "back.safetensors")
    assert safeckpt.open(native).format == "safeckpt"
    expected = safeckpt.open(path).to_python()
    assert_bits_equal(expected, safeckpt.load(native))
    assert_bits_equal(tensors, stock(back)[0])
    if {"emb.weight", "hidden.weight"} <= set(tensors):  # a whole TiedNet state: loads strictly into the module
        net = fx.TiedNet()
        safeckpt.load_raw(native, net)
        assert_bits_equal(fx.tied_net().state_dict(), net.state_dict())


def test_plain_state_dict_of_the_conformance_net(tmp_path: Path) -> None:
    net = Net()
    path = safeckpt.save(tmp_path / "net.safetensors", net)
    other = Net()
    safeckpt.load_raw(path, other)
    assert_bits_equal(net.state_dict(), other.state_dict())


def test_header_references_behave_as_tensor_refs(tmp_path: Path) -> None:
    """The references `open` builds in bulk (`_safetensors.EntryRef`) answer every field as a
    `TensorRef` does, make their loader and span on first use, and `dataclasses.replace` gives a
    plain `TensorRef` with the same fields."""
    import dataclasses

    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, path)
    refs = safeckpt.open(path).tensors()
    assert list(refs) == ["a", "b"]
    ref = refs["b"]
    assert "loader" not in vars(ref) and "span" not in vars(ref)
    assert (ref.name, ref.shape, ref.dtype, ref.source, ref.nbytes) == ("b", (2, 3), torch.bfloat16, str(path), 12)
    assert ref.dtype_info.code == "BF16" and not ref.requires_grad and not ref.parameter
    assert torch.equal(ref.load(), tensors["b"])
    assert path.read_bytes()[ref.span.offset :][:12] == tensors["b"].view(torch.uint8).numpy().tobytes()
    plain = dataclasses.replace(ref, requires_grad=True)
    assert type(plain) is safeckpt.TensorRef and plain.requires_grad
    assert [getattr(plain, f.name) for f in dataclasses.fields(plain) if f.name != "requires_grad"] == [
        getattr(ref, f.name) for f in dataclasses.fields(ref) if f.name != "requires_grad"
    ]
    assert torch.equal(plain.load(), tensors["b"])
    import copy

    assert copy.copy(ref) is ref
    assert refs["a"].alias_key != ref.alias_key and safeckpt.open(path).tensors()["b"].alias_key == ref.alias_key
