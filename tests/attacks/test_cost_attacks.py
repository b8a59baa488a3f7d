"""Hostile inputs, round 2 (issue 18): files whose cost is the attack. Each class is refused with a
`CheckpointError` naming the file (not run slowly to the end, not a crash in another exception
type), and the legitimate neighbours of each class (big-int keys, tuple keys, ...) still read.
The limits are the resource model's: ``formats/resource-model.md``."""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from make_cost_attacks import (
    COST,
    NATIVE_VALUES,
    SMALL,
    native_value,
    pickle_empty_frozenset_flood,
    pickle_empty_set_flood,
    safetensors_many_dims,
    tiled_chunks,
)

import safeckpt
from safeckpt import _budget, hub
from safeckpt.errors import CheckpointError, CorruptCheckpointError
from safeckpt.formats import safeckpt_sharded

FLOODS = [n for n in SMALL if "flood" in n and not n.startswith("n_")]


def test_cost_corpus_is_what_the_generator_writes() -> None:
    for name, make in SMALL.items():
        assert (COST / name).read_bytes() == make(), f"{name} is stale: run tests/attacks/make_cost_attacks.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", FLOODS)
def test_hash_flood_is_refused(name: str) -> None:
    path = COST / name
    with pytest.raises(CorruptCheckpointError) as info:
        safeckpt.open(path).to_python()
    msg = str(info.value)
    assert str(path) in msg
    assert "hash" in msg or "memo index" in msg, msg


def _pickle_file(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize(
    "obj",
    [
        {2**70 + i: i for i in range(500)},  # big int keys that do not collide
        {(i, -1, -2, float(i)): i for i in range(500)},  # tuple keys, -1/-2 share a hash
        {i: {(-1,) * 3: 1, (-2,) * 3: 2} for i in range(100)},
        {frozenset({2**64 + i}) for i in range(200)},
        {0: {"step": 3, "exp_avg": [1.0]}, "param_groups": [{"params": [0], "betas": (0.9, 0.999)}]},
    ],
    ids=["bigint-keys", "tuple-keys", "minus-one-two", "frozensets", "optimizer"],
)
def test_keys_that_round_trip_today_still_do(tmp_path: Path, obj: object) -> None:
    assert safeckpt.open(_pickle_file(tmp_path, obj)).to_python() == obj
    native_path = safeckpt.save(tmp_path / "ok.safeckpt", {"v": obj})
    assert safeckpt.open(native_path).to_python() == {"v": obj}


def test_colliding_keys_up_to_the_limit_read(tmp_path: Path) -> None:
    keys = [1 + i * (2**61 - 1) for i in range(_budget.MAX_SHARED_HASH)]
    obj = {k: None for k in keys}
    assert safeckpt.open(_pickle_file(tmp_path, obj)).to_python() == obj
    assert safeckpt.open(safeckpt.save(tmp_path / "ok.safeckpt", {"v": obj})).to_python() == {"v": obj}


@pytest.mark.parametrize("name", sorted(NATIVE_VALUES))
def test_native_ext_values_are_validated(name: str) -> None:
    path = COST / f"n_{name}.safeckpt"
    with pytest.raises(CheckpointError) as info:
        tree = safeckpt.open(path).to_python()
        repr(tree)  # what we return must print
    msg = str(info.value)
    assert str(path) in msg and "()" not in msg, msg


def test_native_values_the_pickle_side_accepts_still_read(tmp_path: Path) -> None:
    ok = {
        "ns": argparse.Namespace(lr=0.1, name="x"),
        "big": -(2**5000),
        "cx": complex(1, 2),
        "ba": bytearray(b"xy"),
    }
    out = safeckpt.open(safeckpt.save(tmp_path / "ok.safeckpt", ok)).to_python()
    assert out == ok and repr(out)


def test_windows_path_reads_as_its_pure_flavour(tmp_path: Path) -> None:
    """A WindowsPath cannot exist on Linux (constructing one raised NotImplementedError from open())."""
    path = tmp_path / "w.safeckpt"
    path.write_bytes(native_value(msgpack.ExtType(14, msgpack.packb(["WindowsPath", "C:\\x"]))))
    value = safeckpt.open(path)["v"]
    assert isinstance(value, pathlib.PurePath) and str(value) == "C:\\x"


@pytest.mark.timeout(30)
def test_sharded_tiling_check_is_not_quadratic(tmp_path: Path) -> None:
    """20 000 chunks sharing their first offset: the old pairwise check compared 2e8 pairs (minutes)."""
    n = 20_000
    root = safeckpt.save(tmp_path / "d", {"w": torch.zeros(1, n)}, format="safeckpt-sharded")
    path = root / safeckpt_sharded.INDEX
    index = msgpack.unpackb(path.read_bytes())
    chunks = tiled_chunks(n, index["tensors"]["w"]["chunks"][0]["bytes"][0])
    index["tensors"]["w"]["chunks"] = chunks
    path.write_bytes(msgpack.packb(index, use_bin_type=True))
    assert len(safeckpt_sharded.read_index(root)["tensors"]["w"]["chunks"]) == n
    chunks[-1]["offsets"] = [0, 0]  # same volume, one overlap and one gap
    path.write_bytes(msgpack.packb(index, use_bin_type=True))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w': chunks at \[0, 0\] and \[0, 0\] overlap"):
        safeckpt_sharded.read_index(root)


@pytest.mark.timeout(60)
def test_stride0_view_past_the_budget_is_refused(tmp_path: Path) -> None:
    """2**31 floats over a 4-byte storage: convert used to write 8 GiB from a 960-byte file."""
    path = COST / "c07_stride0_view.pt"
    for entry in (lambda: safeckpt.open(path), lambda: safeckpt.convert(path, tmp_path / "out.safeckpt")):
        with pytest.raises(
            CorruptCheckpointError, match=r"w: an expanded view of \[2147483648\] .* more than the limit"
        ):
            entry()
    assert not (tmp_path / "out.safeckpt").exists()


def test_small_expanded_views_still_read(tmp_path: Path) -> None:
    """torch.expand views within the allowance read as torch.load reads them."""
    state = {"mask": torch.ones(1).expand(1024, 1024), "w": torch.arange(4.0)}
    path = tmp_path / "ok.pt"
    torch.save(state, path)
    out = safeckpt.load(path)
    assert torch.equal(out["mask"], state["mask"]) and torch.equal(out["w"], state["w"])


def _shard(root: Path) -> Path:
    return next(p for p in root.iterdir() if p.name.endswith(".safetensors"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["symlink-out", "fifo"])
def test_sharded_shard_named_by_the_index_is_a_plain_file_inside(tmp_path: Path, how: str) -> None:
    """One rule for every directory format (_fs.member_problem): the safeckpt-sharded reader used to
    follow a shard symlink out of its directory and to hang opening a FIFO."""
    root = safeckpt.save(tmp_path / "d", {"w": torch.arange(4.0)}, format="safeckpt-sharded")
    shard = _shard(root)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    if how == "fifo":
        os.mkfifo(shard)
    else:
        shard.symlink_to(outside)
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint directory|not a regular file") as info:
        safeckpt.load(root)
    assert str(shard) in str(info.value)


def test_sharded_shard_symlink_inside_the_directory_still_reads(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "d", {"w": torch.arange(4.0)}, format="safeckpt-sharded")
    shard = _shard(root)
    (root / "real.bin").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to("real.bin")
    assert torch.equal(safeckpt.load(root)["w"], torch.arange(4.0))


@pytest.mark.parametrize(
    "uri",
    ["hf://me/run@..%2F..%2F..%2Fetc/passwd", "hf://me/run@%2Fetc/x", "hf://me/run@.hidden/x", "hf://me/run@a%00b/x"],
)
def test_hf_revision_is_a_ref_name_not_a_path(uri: str) -> None:
    with pytest.raises(ValueError, match="is not a branch, tag or commit name"):
        hub.parse_uri(uri)
    with pytest.raises((ValueError, CheckpointError)):
        safeckpt.open(uri)


@pytest.mark.parametrize(
    "rev", ["main", "v1.0", "refs%2Fpr%2F3", "0123456789abcdef0123456789abcdef01234567", "my-branch/sub"]
)
def test_hf_revisions_that_name_refs_still_parse(rev: str) -> None:
    assert hub.parse_uri(f"hf://me/run@{rev}/x.safeckpt").revision


@pytest.mark.parametrize(
    "name, cause",
    [
        ("z01_two_eocd.pt", "more than one end-of-central-directory record"),
        ("z02_central_directory_slack.pt", r"the central directory holds 46 bytes after its \d+ entries"),
        ("z03_central_directory_gap.pt", "does not end at its end record"),
    ],
)
def test_zip_structures_readers_could_resolve_differently_are_refused(name: str, cause: str) -> None:
    path = COST / name
    with pytest.raises(CorruptCheckpointError, match=cause) as info:
        safeckpt.open(path)
    assert str(path) in str(info.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make", [pickle_empty_set_flood, pickle_empty_frozenset_flood], ids=["EMPTY_SET", "FROZENSET"])
def test_set_flood_is_refused_by_a_byte_budget(tmp_path: Path, make: Any) -> None:
    """One opcode byte per 216-byte set: 1 MB of pickle was 450 MB and 19 s; now the VM charges bytes built."""
    path = tmp_path / "flood.pkl"
    path.write_bytes(make(2_000_000))
    with pytest.raises(CorruptCheckpointError, match="bytes of objects per byte of input"):
        safeckpt.open(path).to_python()


def test_safetensors_shape_of_many_dims_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dims.safetensors"
    path.write_bytes(safetensors_many_dims(500_000))
    with pytest.raises(CorruptCheckpointError, match=r"has 500000 dimensions \(limit 64"):
        safeckpt.open(path)
    path.write_bytes(safetensors_many_dims(64))
    assert safeckpt.open(path).tensors()["t"].shape == (1,) * 63 + (0,)


@pytest.mark.parametrize(
    "pkl", [b"\x80\x02cmy-mod\nThi ng\n)R.", b"\x80\x02\x8c\x03a.b\x8c\x00\x93)R."], ids=["dash-space", "empty-name"]
)
def test_verify_reports_odd_global_names_without_crashing(
    tmp_path: Path, pkl: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify fed refused names back as allow= patterns; names allow= cannot take crashed it (exit 2)."""
    from safeckpt import cli

    path = tmp_path / "odd.pkl"
    path.write_bytes(pkl)
    assert cli.main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "refers to globals safeckpt does not allow" in out
    with pytest.raises(CheckpointError, match="cannot name a real class"):
        safeckpt.open(path)


def test_int_size_is_refused_at_save_as_at_load(tmp_path: Path) -> None:
    ok = {"n": -(2 ** (8 * _budget.MAX_INT_BYTES - 9))}
    assert safeckpt.load(safeckpt.save(tmp_path / "ok.safeckpt", ok)) == ok
    with pytest.raises(TypeError, match=r"state\['n'\] is an int of 1781 bytes"):
        safeckpt.save(tmp_path / "big.safeckpt", {"n": 2 ** (8 * _budget.MAX_INT_BYTES)})
