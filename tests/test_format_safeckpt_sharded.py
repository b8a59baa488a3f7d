"""The native sharded directory, written in one process: conformance, stock readers, splitting,
commit protocol (a failed re-save leaves the previous checkpoint), index validation, and
consolidation in bounded memory. Multi-rank saves and loads are in ``test_distributed.py``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import safeckpt
from conformance import FormatConformance, Net, assert_bits_equal, sample_state_dict
from safeckpt import formats
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _safetensors as st
from safeckpt.formats import safeckpt_sharded as fmt

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sharded"
_spec = importlib.util.spec_from_file_location("sharded_fixtures", FIXTURES / "make_fixtures.py")
assert _spec and _spec.loader
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


def shards(root: Path) -> list[Path]:
    return sorted(root.glob("shard-*.safetensors"))


def index_of(root: Path) -> dict[str, Any]:
    return msgpack.unpackb((root / fmt.INDEX).read_bytes(), raw=False)


def rewrite_index(root: Path, change: Any) -> None:
    index = index_of(root)
    change(index)
    (root / fmt.INDEX).write_bytes(msgpack.packb(index, use_bin_type=True))


class TestSafeckptShardedConformance(FormatConformance):
    NAME = "safeckpt-sharded"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        # 40 bytes per shard: several files, and the 80-byte embedding split across two of them
        return safeckpt.save(directory / "ckpt", state_dict, max_shard_size=40)

    def boundaries(self, path: Path) -> list[int]:
        header = st.read_header(shards(path)[0])
        return [0, 8, header.data_start, *(e.begin for e in header.entries.values()), header.size - 1]


def full_state(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    return model, opt, {"model": model, "optimizer": opt, "step": 7, "hparams": {"lr": 0.01, "betas": (0.9, 0.99)}}


def test_layout_stock_readers_and_round_trip(tmp_path: Path) -> None:
    model, opt, state = full_state()
    root = safeckpt.save(tmp_path / "run", state, max_shard_size=48)
    files = sorted(os.listdir(root))
    assert files[0] == fmt.INDEX and len(files) > 3 and all(f.startswith("shard-") for f in files[1:])
    # every shard is a plain safetensors file the stock reader opens; every chunk is under its name
    names = set()
    for shard in shards(root):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    assert "model/l1.weight" in names and "optimizer/state/0/exp_avg[0:3,0:4]" in names  # 80 bytes, by rows
    # the index is plain msgpack
    index = index_of(root)
    assert index["format"] == "safeckpt-sharded" and index["version"] == 1
    assert len(index["tensors"]["optimizer/state/0/exp_avg"]["chunks"]) == 2
    expected = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "hparams": state["hparams"]}
    assert_bits_equal(expected, safeckpt.load(root))
    model2, opt2, state2 = full_state(seed=1)
    assert safeckpt.load(root, state2) == {}
    assert_bits_equal(model.state_dict(), model2.state_dict())
    assert_bits_equal(opt.state_dict(), opt2.state_dict())
    assert state2["step"] == 7
    assert fmt.verify(root) == []


def test_every_dtype_and_shape_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd = {
        "bf16": torch.randn(7, 3).to(torch.bfloat16),
        "f16": torch.randn(5).half(),
        "f64": torch.randn(4, 4, dtype=torch.float64),
        "c128": torch.randn(9, 2, dtype=torch.complex128),
        "c64": torch.randn(3, dtype=torch.complex64),
        "f8": torch.randn(6, 2).to(torch.float8_e4m3fn),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(30, dtype=torch.uint8).reshape(10, 3),
        "i64": torch.tensor(-(2**62)),
        "empty": torch.empty(0, 3),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "strided": torch.arange(24.0).reshape(4, 6).t(),
    }
    root = safeckpt.save(tmp_path / "d", sd, max_shard_size=96)
    assert len(index_of(root)["tensors"]["c128"]["chunks"]) == 3  # 288 bytes, split by rows of 32
    assert_bits_equal(sd, safeckpt.load(root))


def test_tied_weights_written_once_and_loaded_shared(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    root = safeckpt.save(tmp_path / "t", {"a": w, "b": w, "c": w.clone()}, format="safeckpt-sharded")
    assert len(index_of(root)["tensors"]) == 2
    out = safeckpt.load(root)
    assert out["a"] is out["b"] and out["c"] is not out["a"]
    assert safeckpt.open(root).tied() == [["a", "b"]]


def test_failed_resave_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = {"w": torch.arange(100.0), "step": 1}
    root = safeckpt.save(tmp_path / "run", first, max_shard_size=100)
    (root / "notes.txt").write_text("mine")
    old_files = set(os.listdir(root))
    calls = []
    real_write = st.write

    def dying_write(*args: Any, **kwargs: Any) -> Path:
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")  # the second shard of the new save fails
        return real_write(*args, **kwargs)

    monkeypatch.setattr(st, "write", dying_write)
    with pytest.raises(OSError, match="disk full"):
        safeckpt.save(root, {"w": -torch.arange(100.0), "step": 2}, max_shard_size=100)
    monkeypatch.undo()
    assert_bits_equal(first, safeckpt.load(root))  # the previous checkpoint, whole
    leftovers = set(os.listdir(root)) - old_files
    assert leftovers == set() and len(calls) == 2  # the failed save removed the shard it had finished
    second = {"w": torch.ones(3), "step": 3}
    safeckpt.save(root, second, format="safeckpt-sharded")
    assert_bits_equal(second, safeckpt.load(root))
    left = set(os.listdir(root))
    assert "notes.txt" in left and not (left & (old_files | leftovers)) - {
        "notes.txt",
        fmt.INDEX,
    }  # old shards collected


def test_save_to_a_file_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="is a file"):
        safeckpt.save(tmp_path / "f", {"w": torch.ones(1)}, max_shard_size="1MB")


def test_opening_the_index_file_opens_the_directory(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "d", sample_state_dict(), format="safeckpt-sharded")
    assert len(shards(root)) == 1
    assert formats.detect(root / fmt.INDEX).NAME == "safeckpt-sharded"
    assert_bits_equal(sample_state_dict(), safeckpt.load(root / fmt.INDEX))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ix: ix.update(format="other"), "not a safeckpt-sharded index"),
        (lambda ix: ix.update(version=2), "version 2"),
        (lambda ix: ix["files"][0].update(name="../escape.safetensors"), "plain file 'name'"),
        (lambda ix: ix["tensors"]["l1.weight"].update(dtype="object"), "known 'dtype'"),
        (lambda ix: ix["tensors"]["l1.weight"].update(shape=[4, 3]), "outside"),
        (lambda ix: ix["tensors"]["l1.weight"]["chunks"][0].update(bytes=[0, 4]), "spans"),
        (lambda ix: ix["tensors"]["emb.weight"]["chunks"][1].update(offsets=[1, 0]), "overlap"),
        (lambda ix: ix["tensors"]["emb.weight"]["chunks"].pop(), "do not cover"),
        (lambda ix: ix["tensors"].pop("head.weight"), "does not list"),
        (lambda ix: ix.update(skeleton=b"\xc1"), "malformed"),
    ],
)
def test_damaged_index_is_refused(tmp_path: Path, change: Any, message: str) -> None:
    root = safeckpt.save(tmp_path / "d", sample_state_dict(), max_shard_size=40)
    rewrite_index(root, change)
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        safeckpt.load(root)
    assert str(root) in str(info.value)


def test_shard_from_another_save_is_refused(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "d", sample_state_dict(), max_shard_size=40)
    victim = shards(root)[0]
    header = st.read_header(victim)
    forged = {name: torch.zeros(e.torch_shape, dtype=e.dtype) for name, e in header.entries.items()}
    forged = {f"x{i}": t for i, t in enumerate(forged.values())}  # same sizes, other names
    safetensors.torch.save_file(forged, victim)
    rewrite_index(
        root, lambda ix: [f.update(size=victim.stat().st_size) for f in ix["files"] if f["name"] == victim.name]
    )
    with pytest.raises(CorruptCheckpointError, match="mixes files of different saves"):
        safeckpt.load(root)
    victim.unlink()
    with pytest.raises(CorruptCheckpointError, match="shard missing"):
        safeckpt.load(root)


def test_verify_detects_flipped_bit(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "d", sample_state_dict(), max_shard_size=40)
    victim = shards(root)[-1]
    entry = next(iter(st.read_header(victim).entries.values()))
    data = bytearray(victim.read_bytes())
    data[entry.begin] ^= 0x40
    victim.write_bytes(bytes(data))
    problems = fmt.verify(root)
    assert len(problems) == 1 and entry.name in problems[0]
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        safeckpt.load(root, verify=True)


def test_convert_round_trips_between_single_file_and_directory(tmp_path: Path) -> None:
    _, _, state = full_state()
    single = safeckpt.save(tmp_path / "one.safeckpt", state)
    root = safeckpt.convert(single, tmp_path / "dir", max_shard_size=64)
    assert len(shards(root)) > 5
    back = safeckpt.convert(root, tmp_path / "back.safeckpt")
    assert_bits_equal(safeckpt.load(single), safeckpt.load(back))
    weights = safeckpt.convert(root, tmp_path / "w.safetensors", key="model")
    expected, written = dict(safeckpt.load(single)["model"]), safetensors.torch.load_file(weights)
    assert_bits_equal(expected, {k: written[k] for k in expected})


CONSOLIDATE = textwrap.dedent(
    """
    import sys
    import torch  # opening reads headers without torch: the write imports it, which must not count
    import safeckpt
    from safeckpt.formats import safeckpt_sharded as fmt

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    samples = []
    assemble = fmt._assemble

    def probe(*args):
        t = assemble(*args)  # a full tensor, just built from its chunks: the high-water point
        samples.append(anon())
        return t

    fmt._assemble = probe
    safeckpt.open(sys.argv[1])  # import and warm up every module first, so the baseline holds them
    base = anon()
    safeckpt.convert(sys.argv[1], sys.argv[2], verify=False)  # the write pass alone (a read-back assembles again)
    print(base, max(samples), len(samples))
    """
)


def test_consolidation_holds_one_full_tensor_at_a_time(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(1024, 1024) for i in range(6)}  # 4 MiB each, 24 MiB in all
    root = safeckpt.save(tmp_path / "d", state, max_shard_size="1MiB")
    assert all(len(t["chunks"]) == 4 for t in index_of(root)["tensors"].values())
    out = tmp_path / "all.safetensors"
    # glibc would keep freed blocks mapped and hide what is alive; a low mmap threshold hands them back
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(
        [sys.executable, "-c", CONSOLIDATE, str(root), str(out)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    base, peak, assembled = map(int, run.stdout.split())
    assert assembled == 6
    tensor = 4 << 20
    assert peak - base < 1.5 * tensor, f"consolidation grew anonymous memory by {(peak - base) / tensor:.2f} tensors"
    assert_bits_equal(state, safetensors.torch.load_file(out))


def test_no_pickle_anywhere(tmp_path: Path) -> None:
    _, _, state = full_state()
    root = safeckpt.save(tmp_path / "d", state, max_shard_size=100)
    for f in root.iterdir():
        head = f.read_bytes()[:4]
        assert not head.startswith((b"\x80", b"PK\x03\x04")), f
        if f.name == fmt.INDEX:
            msgpack.unpackb(f.read_bytes(), raw=False)
        else:
            st.read_header(f)


def test_fixture_written_by_two_fsdp2_ranks() -> None:
    root = FIXTURES / "fsdp2-2ranks"
    expected = safetensors.torch.load_file(FIXTURES / "fsdp2-2ranks.expected.safetensors")
    ckpt = safeckpt.open(root)
    assert ckpt.format == "safeckpt-sharded" and ckpt.info["world_size"] == 2
    refs = ckpt.tensors()
    assert sorted(refs) == sorted(expected)
    assert len(refs["model/0.weight"].chunks) == 2  # uneven: rows 0-2 on rank 0, 3-4 on rank 1
    for name, t in expected.items():
        assert_bits_equal(t, refs[name].load(), name)
    assert ckpt["step"] == fx.STEP and ckpt["meta"] == fx.META
    model = fx.model()
    opt = torch.optim.Adam(model.parameters())
    safeckpt.load(root, {"model": model, "optimizer": opt})
    assert_bits_equal({k: expected[f"model/{k}"] for k in model.state_dict()}, dict(model.state_dict()))
    assert opt.param_groups[0]["lr"] == fx.META["lr"]
    assert_bits_equal(expected["optimizer/state/2.weight/exp_avg"], opt.state_dict()["state"][2]["exp_avg"])
    assert fmt.verify(root) == []


def test_huge_declared_tensor_is_refused_before_allocating(tmp_path: Path) -> None:
    root = safeckpt.save(tmp_path / "d", {"w": torch.ones(4, 4)}, max_shard_size=32)  # two chunks of 2 rows

    def inflate(ix: dict[str, Any]) -> None:
        rows = 2**40  # 16 TiB if anyone allocated it
        t = ix["tensors"]["w"]
        t["shape"] = [2 * rows, 4]
        for i, c in enumerate(t["chunks"]):
            c["offsets"], c["sizes"] = [i * rows, 0], [rows, 4]
            c["bytes"] = [c["bytes"][0], c["bytes"][0] + rows * 16]

    rewrite_index(root, inflate)
    ckpt = safeckpt.open(root)  # the index alone is consistent
    with pytest.raises(CorruptCheckpointError, match="mixes files of different saves"):
        ckpt.tensors()["w"].load()
