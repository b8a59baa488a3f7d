"""The ``dcp`` format: conformance on fresh ``dcp.save`` directories, and on the real fixtures
(one process, FSDP2 on 2 gloo ranks, Fabric's FSDP layout, the safetensors variant) differential
against torch's own reassembly, bit for bit and key for key."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

import safeckpt
from conformance import FormatConformance, Net, assert_bits_equal
from safeckpt import formats
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _zip
from safeckpt.formats import dcp as dcp_format

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dcp"
TORCH_READABLE = ("single", "fsdp2", "fabric_fsdp")


def save_dcp(state: dict[str, Any], directory: Path, **kw: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=directory, **kw)
    return directory


def torch_reassembly(directory: Path) -> dict[str, Any]:
    """What torch itself rebuilds from a DCP directory (the oracle: trusted fixtures only)."""
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_state_dict(
            out, storage_reader=FileSystemReader(directory), planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
    return out


def fabric_reassembly(directory: Path) -> dict[str, Any]:
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_distributed_checkpoint(directory)


def key_sorted(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: key_sorted(tree[k]) for k in sorted(tree, key=str)}
    if type(tree) in (list, tuple):
        return type(tree)(key_sorted(v) for v in tree)
    return tree


class TestDcpConformance(FormatConformance):
    NAME = "dcp"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        return save_dcp(state_dict, directory / "ckpt")

    def boundaries(self, path: Path) -> list[int]:
        meta = dcp_format.read_metadata(path / ".metadata")
        return [
            0,
            1,
            4,
            30,
            *(s.offset for s in meta.storage.values()),
            *(s.offset + s.length for s in meta.storage.values()),
        ]


# -- the fixtures, against torch's own reader --------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_READABLE)
def test_fixture_equals_torch_reassembly(name: str) -> None:
    path = FIXTURES / name
    ours = safeckpt.open(path)
    assert ours.format == "dcp"
    expected = fabric_reassembly(path) if name == "fabric_fsdp" else torch_reassembly(path)
    assert_bits_equal(expected, ours.to_python())


def test_safetensors_variant_equals_what_was_saved() -> None:
    # torch 2.13 writes this variant but its FileSystemReader cannot read it back: the reference is
    # the state the fixture script saved, next to it
    ours = safeckpt.open(FIXTURES / "safetensors")
    assert ours.info["serialization"] == ["safetensors", "zip"]
    expected = torch.load(FIXTURES / "safetensors.expected.pt", weights_only=True)
    expected["model"] = dict(expected["model"])  # DCP keeps no container types: a state_dict comes back a dict
    assert_bits_equal(expected, ours.to_python())


def test_fsdp2_chunks_assemble_into_the_unsharded_state() -> None:
    ckpt = safeckpt.open(FIXTURES / "fsdp2")
    refs = ckpt.tensors()
    # really sharded: the weights were saved as chunks on both ranks, one of them empty
    meta = dcp_format.read_metadata(FIXTURES / "fsdp2" / ".metadata")
    assert [(c.offsets, c.sizes) for c in meta.items["model.0.weight"].chunks] == [((0, 0), (3, 4)), ((3, 0), (3, 4))]
    assert [(c.offsets, c.sizes) for c in meta.items["model.3.weight"].chunks] == [((0, 0), (1, 3)), ((1, 0), (0, 3))]
    assert {s.relative_path for s in meta.storage.values()} == {"__0_0.distcp", "__1_0.distcp"}
    assert refs["model/0.weight"].shape == (6, 4)
    # the full state dict lists replicated entries (optimizer 'step') first, DCP lists them last:
    # key order is checked against torch's own reassembly above, here the values
    full = torch.load(FIXTURES / "fsdp2.full.pt", weights_only=True)
    assert_bits_equal(key_sorted(full), key_sorted(ckpt.to_python()))


def test_fabric_layout_merges_meta_pt() -> None:
    ckpt = safeckpt.open(FIXTURES / "fabric_fsdp")
    assert ckpt.info["producer"] == "lightning-fabric"
    assert ckpt["step"] == 5 and ckpt["hparams"] == {"lr": 0.01, "name": "fabric"}
    assert list(ckpt.keys()) == ["model", "optimizer", "step", "hparams"]


def test_meta_pt_keys_win(tmp_path: Path) -> None:
    path = save_dcp({"model": {"w": torch.ones(2)}, "step": 1}, tmp_path / "ckpt")
    torch.save({"step": 9, "epoch": 2}, path / "meta.pt")
    out = safeckpt.load(path)
    assert out["step"] == 9 and out["epoch"] == 2 and torch.equal(out["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("name", [*TORCH_READABLE, "safetensors"])
def test_verify_clean_fixture(name: str) -> None:
    assert dcp_format.verify(FIXTURES / name) == []


def test_verify_reports_flipped_tensor_byte(tmp_path: Path) -> None:
    path = shutil.copytree(FIXTURES / "fsdp2", tmp_path / "ckpt")
    meta = dcp_format.read_metadata(path / ".metadata")
    s = meta.storage[dcp_format.Index("model.0.weight", (3, 0))]
    data = bytearray((path / s.relative_path).read_bytes())
    record = _zip.parse(bytes(data), source="x", start=s.offset, length=s.length).records["data/0"]
    data[record.offset] ^= 0x10
    (path / s.relative_path).write_bytes(bytes(data))
    problems = dcp_format.verify(path)
    assert len(problems) == 1 and "fails its CRC-32" in problems[0] and s.relative_path in problems[0]


# -- loading into objects, and converting ------------------------------------------------------------


def fsdp2_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3), torch.nn.Linear(3, 1))


@pytest.mark.parametrize("name", ["fsdp2", "fabric_fsdp"])
def test_load_into_an_unsharded_model(name: str) -> None:
    model = (
        fsdp2_model()
        if name == "fsdp2"
        else torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    )
    state = {"model": model, "step": 0}
    rest = safeckpt.load(FIXTURES / name, state)
    expected = torch_reassembly(FIXTURES / name)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected["model"][k]), k
    assert state["step"] == (3 if name == "fsdp2" else 5)
    assert set(rest) == ({"optimizer"} if name == "fsdp2" else {"optimizer", "hparams"})


def test_load_raw_bare_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = Net()
    path = save_dcp(src.state_dict(), tmp_path / "ckpt")
    dst = Net()
    safeckpt.load_raw(path, dst)
    assert_bits_equal(src.state_dict(), dst.state_dict())


def test_load_raw_wrapped_checkpoint_says_so() -> None:
    with pytest.raises(RuntimeError, match="wrapped checkpoint"):
        safeckpt.load_raw(FIXTURES / "single", Net())


@pytest.mark.parametrize("name", [*TORCH_READABLE, "safetensors"])
def test_convert_to_native_and_back(name: str, tmp_path: Path) -> None:
    src = FIXTURES / name
    out = safeckpt.convert(src, tmp_path / "x.safeckpt")
    back = safeckpt.load(out)
    assert_bits_equal(safeckpt.open(src).to_python(), back)
    if name in ("fsdp2", "fabric_fsdp"):
        model = (
            fsdp2_model()
            if name == "fsdp2"
            else torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        )
        safeckpt.load(out, {"model": model}, strict=False)
        expected = torch_reassembly(src)["model"]
        assert_bits_equal(expected, dict(model.state_dict()))


# -- laziness ------------------------------------------------------------------------------------


def test_a_tensor_reads_only_its_own_segments(tmp_path: Path) -> None:
    path = shutil.copytree(FIXTURES / "fsdp2", tmp_path / "ckpt")
    meta = dcp_format.read_metadata(path / ".metadata")
    ckpt = safeckpt.open(path)
    # wreck every byte of model.2.bias's chunks (both ranks): only that tensor may fail
    for idx, s in meta.storage.items():
        if idx.fqn == "model.2.bias":
            with open(path / s.relative_path, "r+b") as f:
                f.seek(s.offset)
                f.write(b"\x00" * s.length)
    refs = ckpt.tensors()
    expected = torch_reassembly(FIXTURES / "fsdp2")["model"]["0.weight"]
    assert torch.equal(refs["model/0.weight"].load(), expected)
    with pytest.raises(CorruptCheckpointError, match=r"__[01]_0\.distcp"):
        refs["model/2.bias"].load()


def test_open_reads_no_tensor_data(tmp_path: Path) -> None:
    ckpt = safeckpt.open(FIXTURES / "single")
    refs = ckpt.tensors()
    assert refs["model/l1.weight"].shape == (6, 4) and ckpt.nbytes > 0
    assert str(ckpt).startswith(str(FIXTURES / "single"))


def test_sniff_needs_metadata(tmp_path: Path) -> None:
    path = shutil.copytree(FIXTURES / "single", tmp_path / "ckpt")
    assert formats.detect(path).NAME == "dcp"
    (path / ".metadata").unlink()
    assert not dcp_format.sniff(b"", path)


def test_multi_file_per_rank(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    state = {"a": torch.arange(10.0), "b": {"c": torch.ones(3, 3, dtype=torch.float16)}, "n": "x"}
    path = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(path, thread_count=2))
    assert len(list(path.glob("*.distcp"))) == 2
    assert_bits_equal(torch_reassembly(path), safeckpt.load(path))
