"""Integrity: a flipped bit anywhere in a native file is detected by `verify`, and a damaged
tensor is named by its tree path; checksums are what the spec says, readable by stock safetensors.

The flip tests print their counts (``bit flips: ...``) in the test output.
"""

from __future__ import annotations

import copy
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import evidence
import safeckpt
from safeckpt import cli
from safeckpt.errors import CheckpointError, CorruptCheckpointError
from safeckpt.formats import _safetensors as st
from safeckpt.formats import safeckpt as native
from safeckpt.formats import safeckpt_sharded as sharded
from safeckpt.formats import safetensors_file as stf


def training_state(seed: int = 0) -> dict[str, Any]:
    """A small whole training state: model, stepped Adam, counters, hparams, several dtypes, a
    zero-size tensor and one tensor under two paths."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ids = torch.arange(5, dtype=torch.int16)
    return {
        "model": model,
        "optimizer": opt,
        "step": 7,
        "epoch": 2,
        "hparams": {"lr": 1e-3, "name": "run", "betas": (0.9, 0.99)},
        "extra": {
            "ids": ids,
            "same_ids": ids,  # one tensor, two paths
            "mask": torch.tensor([True, False, True]),
            "half": torch.ones(2, dtype=torch.bfloat16),
            "f64": torch.tensor([1.5], dtype=torch.float64),
            "empty": torch.zeros(0, 3),
        },
    }


def load_target() -> dict[str, Any]:
    """Objects to load into, different from `training_state`'s, and a snapshot of them."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=0.5), "step": 0, "epoch": 0}


def snapshot(state: dict[str, Any]) -> Any:
    return (
        {k: v.clone() for k, v in state["model"].state_dict().items()},
        copy.deepcopy(state["optimizer"].state_dict()),
        state["step"],
        state["epoch"],
    )


def assert_untouched(state: dict[str, Any], before: Any) -> None:
    model, opt, step, epoch = before
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, model[k]), k
    assert state["optimizer"].state_dict() == opt and (state["step"], state["epoch"]) == (step, epoch)


@contextmanager
def flipped(path: Path, pos: int, bit: int) -> Iterator[None]:
    """The file with bit ``bit`` of byte ``pos`` flipped, restored afterwards."""
    fd = os.open(path, os.O_RDWR)
    try:
        (byte,) = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([byte ^ (1 << bit)]), pos)
        try:
            yield
        finally:
            os.pwrite(fd, bytes([byte]), pos)
    finally:
        os.close(fd)


def cli_verifier(path: Path) -> Callable[[], int]:
    """`safeckpt verify PATH --quiet` in this process, exceptions not turned into exit codes."""
    args = cli.build_parser().parse_args(["verify", str(path), "--quiet"])
    return lambda: int(cli.VERBS["verify"].run(args))


def detected(check: Callable[[], Any]) -> bool:
    """Run a check of a damaged file: True if it reported a problem (a non-empty list, exit code 1,
    or a `CheckpointError`); any other exception fails the test."""
    try:
        result = check()
    except CheckpointError:
        return True
    return bool(result) if isinstance(result, list) else result != 0


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        evidence.record(text)


# -- the proof: every bit of a native file ----------------------------------------------------


def test_every_flipped_bit_in_a_native_file_is_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", training_state())
    size = path.stat().st_size
    cli_verify = cli_verifier(path)
    assert 1000 < size < 8000 and native.verify(path) == [] and cli_verify() == 0
    header = st.read_header(path)
    assert {e.code for e in header.entries.values()} >= {"F32", "I16", "BOOL", "BF16", "F64"}
    assert any(e.begin == e.end for e in header.entries.values())  # the zero-size tensor
    target = load_target()
    before = snapshot(target)
    start, deep = time.perf_counter(), 0
    missed: list[tuple[Any, ...]] = []
    for pos in range(size):
        for bit in range(8):
            with flipped(path, pos, bit):
                if not detected(lambda: native.verify(path)):
                    missed.append((pos, bit))
                if bit == pos % 8:  # every byte, one bit of it (rotating): the command and verify=True loads
                    deep += 1
                    if not detected(cli_verify):
                        missed.append((pos, bit, "cli"))
                    with pytest.raises(CheckpointError):
                        safeckpt.load(path, target, verify=True)
    assert_untouched(target, before)
    rest = safeckpt.load(path, target, verify=True)  # restored, the file verifies and loads
    assert target["step"] == 7 and rest["hparams"]["name"] == "run" and native.verify(path) == []
    report(
        capsys,
        f"bit flips: native file of {size} bytes: {8 * size} flips (every bit) checked by verify, "
        f"{8 * size - len([m for m in missed if len(m) == 2])} detected; {deep} flips (every byte, rotating bit) "
        f"also by `safeckpt verify` and load(verify=True), all detected, objects untouched "
        f"({time.perf_counter() - start:.1f} s)",
    )
    assert not missed, f"undetected flips (byte, bit): {missed[:20]}"


def test_a_flipped_bit_in_each_file_of_a_sharded_directory_is_detected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = safeckpt.save(tmp_path / "run", training_state(), max_shard_size=96)
    files = sorted(root.iterdir())
    assert len(files) >= 3 and sharded.verify(root) == []  # the index and at least 2 shards
    cli_verify = cli_verifier(root)
    target = load_target()
    before = snapshot(target)
    tried = deep = 0
    missed: list[tuple[Any, ...]] = []
    for f in files:
        index = f.name == sharded.INDEX
        # every byte of the index (a damaged index is caught before anything else is read: cheap);
        # every 4th byte of each shard; every 16th byte also by the command and a verify=True load
        step = 1 if index else 4
        for pos in range(0, f.stat().st_size, step):
            bit = (pos // step) % 8  # rotating
            tried += 1
            with flipped(f, pos, bit):
                if not detected(lambda: sharded.verify(root)):
                    missed.append((f.name, pos, bit))
                if pos % 16 == 0:
                    deep += 1
                    if not detected(cli_verify):
                        missed.append((f.name, pos, bit, "cli"))
                    with pytest.raises(CheckpointError):
                        safeckpt.load(root, target, verify=True)
    assert_untouched(target, before)
    assert sharded.verify(root) == []
    report(
        capsys,
        f"bit flips: sharded directory ({len(files)} files, {sum(f.stat().st_size for f in files)} bytes): {tried} flips "
        f"(every byte of the index, every 4th byte of each shard, rotating bit) checked by verify, "
        f"{tried - len([m for m in missed if len(m) == 3])} detected; {deep} of them also by `safeckpt verify` and "
        f"load(verify=True), all detected, objects untouched",
    )
    assert not missed, f"undetected flips: {missed[:20]}"


# -- naming the damage ------------------------------------------------------------------------


def damage_tensor(path: Path, name: str, data_start: int | None = None) -> None:
    header = st.read_header(path)
    entry = header.entries[name]
    assert entry.end > entry.begin
    with open(path, "r+b") as f:
        f.seek(entry.begin)
        byte = f.read(1)
        f.seek(entry.begin)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_damaged_tensor_is_named_by_its_path_in_the_tree(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", training_state())
    damage_tensor(path, "optimizer/state/0/exp_avg")
    damage_tensor(path, "extra/ids")  # stored once, at two paths
    problems = native.verify(path)
    assert len(problems) == 2, problems
    exp_avg = next(p for p in problems if "exp_avg" in p)
    assert "tensor 'optimizer/state/0/exp_avg' fails its checksum" in exp_avg
    assert "the data of state['optimizer']['state'][0]['exp_avg'] is damaged" in exp_avg
    ids = next(p for p in problems if "ids" in p)
    assert "state['extra']['ids'], state['extra']['same_ids']" in ids
    assert all(str(path) in p for p in problems)

    target = load_target()
    before = snapshot(target)
    with pytest.raises(CorruptCheckpointError) as e:
        safeckpt.load(path, target, verify=True)
    assert "state['optimizer']['state'][0]['exp_avg']" in str(e.value) and "state['extra']['ids']" in str(e.value)
    assert_untouched(target, before)

    run = subprocess.run(
        [sys.executable, "-m", "safeckpt", "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stderr
    assert "tensor 'optimizer/state/0/exp_avg' fails its checksum" in run.stdout
    assert "state['optimizer']['state'][0]['exp_avg']" in run.stdout


def test_a_damaged_chunk_of_a_sharded_checkpoint_is_named(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 4)
    root = safeckpt.save(tmp_path / "run", {"model": model, "step": 1}, max_shard_size=64)
    shard = next(f for f in sorted(root.glob("shard-*")) if "model/weight[2:4,0:8]" in st.read_header(f).entries)
    damage_tensor(shard, "model/weight[2:4,0:8]")
    (problem,) = sharded.verify(root)
    assert str(shard) in problem
    assert "tensor 'model/weight[2:4,0:8]' fails its checksum" in problem
    assert "box [2:4,0:8] of state['model']['weight'] (tensor 'model/weight') is damaged" in problem
    with pytest.raises(CorruptCheckpointError, match=r"box \[2:4,0:8\] of state\['model'\]\['weight'\]"):
        safeckpt.load(root, {"model": torch.nn.Linear(8, 4)}, verify=True)


def test_a_damaged_header_is_reported_as_such_not_as_what_it_now_says(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", training_state())
    at = path.read_bytes().index(b'"shape":[0,3]') + len(b'"shape":[0,')
    with flipped(path, at, 0):  # [0, 3] -> [0, 2]: a valid header, a silently wrong shape without its checksum
        assert safeckpt.open(path)["extra"]["empty"].shape == (0, 2)
        (problem,) = native.verify(path)
        assert "the header fails its checksum" in problem
        with pytest.raises(CorruptCheckpointError, match="the header fails its checksum"):
            safeckpt.load(path, verify=True)


# -- the checksums are what the specs say ------------------------------------------------------


def spec_header_crc(path: Path) -> tuple[int, int]:
    """formats/safeckpt.md §2, implemented from the text: (stored, computed)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = data[: 8 + n]
    marker = b'"safeckpt.header_crc32":"'
    assert head.count(marker) == 1
    at = head.index(marker) + len(marker)
    return int(head[at : at + 8], 16), zlib.crc32(head[:at] + b"0" * 8 + head[at + 8 :])


def test_checksums_follow_the_spec(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", training_state())
    stored, computed = spec_header_crc(path)
    assert stored == computed
    data = path.read_bytes()
    header = st.read_header(path)
    crcs = header.metadata["safeckpt.crc32"]
    order = sorted(header.entries.values(), key=lambda e: (e.begin, e.end))
    assert crcs == "".join(f"{zlib.crc32(data[e.begin : e.end]):08x}" for e in order)

    root = safeckpt.save(tmp_path / "run", training_state(), max_shard_size=64)
    index = (root / "safeckpt-index.msgpack").read_bytes()
    assert list(msgpack.unpackb(index))[-1] == "crc32" and index[-15:-8] == b"\xa5crc32\xa8"
    assert int(index[-8:], 16) == zlib.crc32(index[:-8] + b"0" * 8)
    for shard in root.glob("shard-*"):
        stored, computed = spec_header_crc(shard)
        assert stored == computed


def test_stock_safetensors_still_reads_every_file(tmp_path: Path) -> None:
    state = training_state()
    path = safeckpt.save(tmp_path / "run.safeckpt", state)
    with safe_open(path, "pt") as f:
        assert {"safeckpt.version", "safeckpt.crc32", "safeckpt.header_crc32"} <= set(f.metadata())
        assert torch.equal(f.get_tensor("model/0.weight"), state["model"][0].weight)
    root = safeckpt.save(tmp_path / "run", state, max_shard_size=64)
    for shard in root.glob("shard-*"):
        assert safetensors.torch.load_file(shard)


def test_plain_safetensors_we_write_carry_both_checksums(tmp_path: Path) -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    path = safeckpt.save(tmp_path / "m.safetensors", sd)
    assert safeckpt.open(path).format == "safetensors"
    with safe_open(path, "pt") as f:
        assert {"safeckpt.crc32", "safeckpt.header_crc32"} <= set(f.metadata())
        assert torch.equal(f.get_tensor("w"), sd["w"])
    assert safeckpt.open(path).metadata == {"format": "pt"}  # our keys are not the user's metadata
    assert stf.verify(path) == []
    with flipped(path, 30, 0):
        assert stf.verify(path)
    damage_tensor(path, "w")
    assert any("tensor 'w' fails its checksum" in p for p in stf.verify(path))
    # a file from another writer records neither checksum: only its structure is checked
    stock = tmp_path / "stock.safetensors"
    safetensors.torch.save_file(sd, stock)
    assert stf.verify(stock) == []
    # one checksum without the other is a damaged key name, not a foreign file
    raw = bytearray(safeckpt.save(tmp_path / "n.safetensors", sd).read_bytes())
    at = raw.index(b"safeckpt.header_crc32")
    raw[at] = ord("S")
    (tmp_path / "n.safetensors").write_bytes(raw)
    (problem,) = stf.verify(tmp_path / "n.safetensors")
    assert "'safeckpt.header_crc32' missing" in problem
