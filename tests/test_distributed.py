"""Real torch.distributed process groups (gloo on CPU, spawned with torch.multiprocessing).

An FSDP2 model and its Adam optimizer are trained and saved at 2 ranks, then loaded at 2 ranks
(the same sharding, and tensor parallelism), at 3 ranks (resharded, with the bytes each rank reads
measured) and in one process (consolidated), each time bit for bit against a single-process
reference that ``torch.save`` recorded. Also: strict/partial semantics on sharded models, a
3-rank save, a single-file checkpoint loaded into a sharded model, a rank killed mid-save, and no
pickle anywhere. Each world size is spawned once; its checks run inside and report to the tests.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import safeckpt
from conformance import assert_bits_equal, leave_process_group
from safeckpt.formats import _safetensors as st
from safeckpt.formats import safeckpt_sharded as fmt
from safeckpt.tree import iter_leaves, map_leaves

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.slow,
]


class MLP(nn.Module):
    """Two 1 MiB weights (so each rank's share is worth measuring), a norm, and a plain buffer."""

    def __init__(self, hidden: int = 1024, extra: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(256, hidden)
        self.down = nn.Linear(hidden, 256)
        self.norm = nn.LayerNorm(256)
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))
        if extra:
            self.extra = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x)))) * self.scale[1]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for step in range(steps):
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(step))  # the same batch on every rank
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def fresh(seed: int, **kw: Any) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kw)


def fsdp(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.up, mesh=mesh)
    fully_shard(model.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tensor_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def full(tree: Any) -> Any:
    """Every DTensor leaf gathered to a full tensor (a collective: every rank calls it alike)."""
    from torch.distributed.tensor import DTensor

    return map_leaves(tree, lambda _, x: x.full_tensor() if isinstance(x, DTensor) else x)


def local_nbytes(tree: Any) -> int:
    """Bytes of this rank's part of every tensor in ``tree`` (a DTensor's local shard, a plain tensor whole)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for _, x in iter_leaves(tree):
        x = x.to_local() if isinstance(x, DTensor) else x
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
    return total


def read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (page faults on our maps included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def evict(root: Path) -> None:
    for f in root.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- what runs on each rank ---------------------------------------------------------------------------


class Rank:
    """One rank of a scenario: its checks, each recorded as "ok" or the error, for the tests to read."""

    def __init__(self, rank: int, world: int, out: Path) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world, self.out = rank, world, out
        self.mesh = init_device_mesh("cpu", (world,))
        self.results: dict[str, Any] = {}
        self.ref: dict[str, Any] = {}

    def check(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
            self.results[name] = "ok" if value is None else value
        except Exception as e:
            self.results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        dist.barrier()

    def load_reference(self) -> None:
        self.ref = torch.load(self.out / "ref.pt", weights_only=True)

    def assert_reference(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        mine = {"model": full(model.state_dict()), "optimizer": full(opt.state_dict())}  # all gathers first
        assert_bits_equal(self.ref["model"], mine["model"], "model")
        assert_bits_equal(self.ref["optimizer"], mine["optimizer"], "optimizer")


def state_of(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "model": model,
        "optimizer": opt,
        "step": step,
        "meta": {"run": "a", "betas": (0.9, 0.999)},
        "ids": torch.arange(4),
    }


def two_ranks(r: Rank) -> None:
    if r.rank == 0:  # the single-process reference, recorded by torch itself
        ref_model = fresh(0)
        ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
        train(ref_model, ref_opt)
        torch.save({"model": ref_model.state_dict(), "optimizer": ref_opt.state_dict()}, r.out / "ref.pt")
        safeckpt.save(r.out / "ref.safeckpt", {"model": ref_model, "optimizer": ref_opt, "step": 3})
    dist.barrier()
    r.load_reference()
    model = fsdp(fresh(0), r.mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt)
    r.check("training_matches_reference", lambda: r.assert_reference(model, opt))

    def save() -> None:
        safeckpt.save(r.out / "ckpt", state_of(model, opt, 3))

    r.check("save", save)

    def same_mesh() -> None:
        m = fsdp(fresh(1), r.mesh)
        o = torch.optim.Adam(m.parameters(), lr=0.5)
        state = {"model": m, "optimizer": o, "step": 0, "meta": None}
        remainder = safeckpt.load(r.out / "ckpt", state)
        r.assert_reference(m, o)
        assert state["step"] == 3 and state["meta"] == {"run": "a", "betas": (0.9, 0.999)}
        assert list(remainder) == ["ids"] and torch.equal(remainder["ids"], torch.arange(4))

    def other_layout() -> None:
        m = tensor_parallel(fresh(2), r.mesh)
        o = torch.optim.Adam(m.parameters(), lr=0.5)
        assert str(m.down.weight.placements) == "(Shard(dim=1),)"  # a layout the save never had
        safeckpt.load(r.out / "ckpt", {"model": m, "optimizer": o})
        r.assert_reference(m, o)

    def strict_missing_module_keys() -> None:
        big = fsdp(fresh(3, extra=True), r.mesh)
        before = full(big.state_dict())
        with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "extra.weight", "extra.bias"'):
            safeckpt.load(r.out / "ckpt", {"model": big})
        assert_bits_equal(before, full(big.state_dict()), "after a failed strict load")
        safeckpt.load(r.out / "ckpt", {"model": big}, strict=False)  # Fabric #20274: honoured here
        after = full(big.state_dict())
        assert_bits_equal(r.ref["model"]["up.weight"], after["up.weight"])
        assert_bits_equal(before["extra.weight"], after["extra.weight"])

    def strict_missing_top_level_key() -> None:
        m = fsdp(fresh(4), r.mesh)
        before = full(m.state_dict())
        with pytest.raises(KeyError, match="'scheduler'"):
            safeckpt.load(r.out / "ckpt", {"model": m, "scheduler": {}})
        assert_bits_equal(before, full(m.state_dict()))
        remainder = safeckpt.load(r.out / "ckpt", {"model": m, "scheduler": {}}, strict=False)
        assert sorted(remainder) == ["ids", "meta", "optimizer", "step"]
        assert_bits_equal(r.ref["model"], full(m.state_dict()))

    def shape_mismatch_always() -> None:
        narrow = fsdp(fresh(5, hidden=512), r.mesh)
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=r"size mismatch for up\.weight"):
                safeckpt.load(r.out / "ckpt", {"model": narrow}, strict=strict)

    def replicated_only() -> None:
        plain = fresh(0)  # DDP-style state: no DTensor, every rank holds the same tensors
        safeckpt.save(r.out / "replicated", {"model": plain, "step": 5}, format="safeckpt-sharded")

    def one_rank_fails() -> None:
        m = fsdp(fresh(13), r.mesh)
        bad_load = {"model": m, "nope": 1} if r.rank == 1 else {"model": m}
        with pytest.raises(KeyError if r.rank == 1 else RuntimeError, match="'nope'" if r.rank else "failed on rank 1"):
            safeckpt.load(r.out / "ckpt", bad_load)
        bad_save = {"model": m, "x": object() if r.rank == 1 else 1}
        with pytest.raises(TypeError if r.rank == 1 else RuntimeError, match=r"\['x'\]|failed on rank 1"):
            safeckpt.save(r.out / "never", bad_save)
        assert not (r.out / "never" / fmt.INDEX).exists()

    r.check("replicated_only", replicated_only)
    r.check("one_rank_fails", one_rank_fails)
    r.check("load_same_mesh", same_mesh)
    r.check("load_tensor_parallel", other_layout)
    r.check("strict_missing_module_keys", strict_missing_module_keys)
    r.check("strict_missing_top_level_key", strict_missing_top_level_key)
    r.check("shape_mismatch_always", shape_mismatch_always)


def three_ranks(r: Rank) -> None:
    r.load_reference()
    ckpt = r.out / "ckpt"

    def reshard() -> dict[str, int]:
        warm = fsdp(fresh(6), r.mesh)  # a first load pays for imports and caches, not measured
        safeckpt.load(ckpt, {"model": warm, "optimizer": torch.optim.Adam(warm.parameters())})
        m = fsdp(fresh(7), r.mesh)
        o = torch.optim.Adam(m.parameters(), lr=0.5)
        del warm
        gc.collect()
        dist.barrier()
        if r.rank == 0:
            evict(ckpt)
        dist.barrier()
        before = read_bytes()
        safeckpt.load(ckpt, {"model": m, "optimizer": o, "step": 0})
        measured = read_bytes() - before
        share = local_nbytes(m.state_dict()) + local_nbytes(list(o.state.values()))
        r.assert_reference(m, o)
        return {"read": measured, "share": share}

    def save_at_three() -> None:
        m = fsdp(fresh(8), r.mesh)
        o = torch.optim.Adam(m.parameters(), lr=1e-2)
        safeckpt.load(ckpt, {"model": m, "optimizer": o})
        safeckpt.save(r.out / "ckpt3", state_of(m, o, 3), max_shard_size="512KiB")

    def single_file_source() -> None:
        m = fsdp(fresh(9), r.mesh)
        o = torch.optim.Adam(m.parameters(), lr=0.5)
        safeckpt.load(r.out / "ref.safeckpt", {"model": m, "optimizer": o})
        r.assert_reference(m, o)

    def committed_fixture() -> None:
        import importlib.util

        fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "sharded"
        spec = importlib.util.spec_from_file_location("sharded_fixtures", fixtures / "make_fixtures.py")
        assert spec and spec.loader
        fx = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fx)
        expected = safetensors.torch.load_file(fixtures / "fsdp2-2ranks.expected.safetensors")
        m = fx.shard(fx.model(), r.mesh)
        safeckpt.load(fixtures / "fsdp2-2ranks", {"model": m}, strict=False)
        assert_bits_equal({k: expected[f"model/{k}"] for k in m.state_dict()}, dict(full(m.state_dict())))

    r.check("reshard", reshard)
    r.check("committed_fixture", committed_fixture)
    r.check("save_at_three", save_at_three)
    r.check("single_file_source", single_file_source)


def killed(r: Rank) -> None:
    model = fsdp(fresh(0), r.mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, steps=1)
    safeckpt.save(r.out / "ckpt", state_of(model, opt, 1))
    dist.barrier()
    if r.rank == 0:
        shutil.copytree(r.out / "ckpt", r.out / "ckpt-v1")
    dist.barrier()
    train(model, opt, steps=1)
    if r.rank == 1:
        writes = []
        real = st.write_all

        def dying(f: Any, data: Any) -> None:
            writes.append(len(data))
            if len(writes) == 3:  # header and two tensors written: die in the middle of the shard
                os._exit(17)
            real(f, data)

        st.write_all = dying  # type: ignore[assignment]
    r.results["second_save"] = "returned"
    try:
        safeckpt.save(r.out / "ckpt", state_of(model, opt, 2))
    except Exception as e:
        r.results["second_save"] = f"{type(e).__name__}: {e}"


SCENARIOS = {"two_ranks": two_ranks, "three_ranks": three_ranks, "killed": killed}


def worker(rank: int, world: int, scenario: str, out: str) -> None:
    torch.set_num_threads(1)  # several ranks share two cores
    out_dir = Path(out)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir / f'.pg-{scenario}'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    r = Rank(rank, world, out_dir)
    try:
        SCENARIOS[scenario](r)
    finally:
        (out_dir / f"{scenario}-{rank}.json").write_text(json.dumps(r.results))
        if scenario != "killed":
            leave_process_group()


def spawn(scenario: str, world: int, out: Path) -> list[dict[str, Any]]:
    mp.spawn(worker, args=(world, scenario, str(out)), nprocs=world)
    return [json.loads((out / f"{scenario}-{rank}.json").read_text()) for rank in range(world)]


def outcome(results: list[dict[str, Any]], name: str) -> list[Any]:
    got = [r.get(name, "not run") for r in results]
    for rank, value in enumerate(got):
        assert value == "ok" or not isinstance(value, str), f"rank {rank}: {value}"
    return got


# -- the tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    two = spawn("two_ranks", 2, out)
    three = spawn("three_ranks", 3, out)
    return {"out": out, "two": two, "three": three, "ref": torch.load(out / "ref.pt", weights_only=True)}


def test_fsdp2_training_matches_single_process(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "training_matches_reference")  # else every comparison below would be moot
    outcome(runs["two"], "save")


def test_every_rank_writes_its_shards_and_replicated_tensors_once(runs: dict[str, Any]) -> None:
    root = runs["out"] / "ckpt"
    index = msgpack.unpackb((root / fmt.INDEX).read_bytes(), raw=False)
    files = [f["name"] for f in index["files"]]
    assert len(files) == 2 and [n.split("-")[2] for n in files] == ["00000", "00001"] and index["world_size"] == 2
    chunks = {name: [(files[c["file"]], c["offsets"]) for c in t["chunks"]] for name, t in index["tensors"].items()}
    assert chunks["model/up.weight"] == [(files[0], [0, 0]), (files[1], [512, 0])]  # FSDP2: Shard(0) over 2
    assert chunks["optimizer/state/down.weight/exp_avg"] == [(files[0], [0, 0]), (files[1], [128, 0])]
    for replicated in ("model/scale", "optimizer/state/up.weight/step", "ids"):
        assert chunks[replicated] == [(files[0], [0] * len(index["tensors"][replicated]["shape"]))]
    assert sorted(os.listdir(root)) == sorted([fmt.INDEX, *files])


def test_explicit_sharded_save_of_replicated_state(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "replicated_only")
    root = runs["out"] / "replicated"
    index = msgpack.unpackb((root / fmt.INDEX).read_bytes(), raw=False)
    assert index["world_size"] == 2 and len(index["files"]) == 1  # rank 1 held nothing rank 0 did not
    assert all(len(t["chunks"]) == 1 for t in index["tensors"].values())
    loaded = safeckpt.load(root)
    assert loaded["step"] == 5 and list(loaded["model"]) == list(MLP().state_dict())


def test_an_error_on_one_rank_is_raised_on_every_rank(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "one_rank_fails")  # and nobody hangs in a collective the others skipped


def test_load_at_two_ranks_same_sharding(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "load_same_mesh")


def test_load_at_two_ranks_tensor_parallel_layout(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "load_tensor_parallel")


def test_strict_false_loads_sharded_model_with_missing_keys(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "strict_missing_module_keys")


def test_missing_top_level_key(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "strict_missing_top_level_key")


def test_shape_mismatch_is_an_error_even_when_not_strict(runs: dict[str, Any]) -> None:
    outcome(runs["two"], "shape_mismatch_always")


def test_load_at_three_ranks_reads_about_its_share(runs: dict[str, Any]) -> None:
    got = outcome(runs["three"], "reshard")
    if not any(m["read"] for m in got):
        pytest.skip("this filesystem reports no reads from storage (tmpfs?): nothing to measure")
    data = sum(f.stat().st_size for f in (runs["out"] / "ckpt").glob("shard-*"))
    for rank, m in enumerate(got):
        # each rank reads its slices (and the small replicated tensors, index and headers), not the files
        assert 0.9 * m["share"] <= m["read"] <= 1.1 * m["share"] + (256 << 10), (
            f"rank {rank}: {m}, {data} bytes on disk"
        )
        assert m["read"] < 0.5 * data, f"rank {rank} read {m['read']} of {data} bytes"
    print("bytes read per rank (read, share):", [(m["read"], m["share"]) for m in got])


def test_save_at_three_ranks_then_consolidate(runs: dict[str, Any]) -> None:
    outcome(runs["three"], "save_at_three")
    root = runs["out"] / "ckpt3"
    index = msgpack.unpackb((root / fmt.INDEX).read_bytes(), raw=False)
    assert index["world_size"] == 3 and len(index["files"]) > 3  # several 512 KiB files per rank
    assert len(index["tensors"]["model/up.weight"]["chunks"]) == 3
    loaded = safeckpt.load(root)
    assert_bits_equal(runs["ref"]["model"], loaded["model"])


def test_committed_two_rank_fixture_loads_at_three_ranks(runs: dict[str, Any]) -> None:
    outcome(runs["three"], "committed_fixture")


def test_single_file_checkpoint_loads_into_sharded_model(runs: dict[str, Any]) -> None:
    outcome(runs["three"], "single_file_source")


def test_load_in_one_process_consolidated(runs: dict[str, Any]) -> None:
    root, ref = runs["out"] / "ckpt", runs["ref"]
    model = fresh(11)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    state = {"model": model, "optimizer": opt, "step": 0}
    remainder = safeckpt.load(root, state)
    assert_bits_equal(ref["model"], model.state_dict())
    assert_bits_equal(ref["optimizer"], opt.state_dict())  # saved keyed by names, loaded by position
    assert state["step"] == 3 and sorted(remainder) == ["ids", "meta"]
    plain = safeckpt.load(root)
    assert_bits_equal(ref["model"], plain["model"])
    assert list(plain["optimizer"]["state"]) == [
        "up.weight",
        "up.bias",
        "down.weight",
        "down.bias",
        "norm.weight",
        "norm.bias",
    ]
    with pytest.raises(RuntimeError, match="wrapped checkpoint"):
        safeckpt.load_raw(root / fmt.INDEX, fresh(12), strict=False)


def test_cli_inspects_and_consolidates(runs: dict[str, Any], tmp_path: Path) -> None:
    root = runs["out"] / "ckpt"
    cmd = [sys.executable, "-m", "safeckpt"]
    shown = subprocess.run([*cmd, "inspect", str(root)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "safeckpt-sharded" in shown.stdout and "up.weight" in shown.stdout and "[1024, 256]" in shown.stdout
    out = tmp_path / "model.safetensors"
    done = subprocess.run([*cmd, "convert", str(root), str(out), "--key", "model"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = safetensors.torch.load_file(out)
    assert_bits_equal(dict(runs["ref"]["model"]), {k: written[k] for k in runs["ref"]["model"]})
    assert fmt.verify(root) == []


def test_no_pickle_anywhere_in_the_directories(runs: dict[str, Any]) -> None:
    for name in ("ckpt", "ckpt3"):
        root = runs["out"] / name
        for f in root.iterdir():
            data = f.read_bytes()
            assert not data.startswith((b"\x80", b"PK\x03\x04")) and b"\x80\x04\x95" not in data[:64], f
            if f.name == fmt.INDEX:
                index = msgpack.unpackb(data, raw=False)  # plain msgpack: no ext types at the top level
                assert isinstance(index["skeleton"], bytes)
            else:
                st.read_header(f)  # a valid safetensors file, nothing else


def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(mp.ProcessExitedException) as info:
        mp.spawn(worker, args=(2, "killed", str(tmp_path)), nprocs=2)
    assert info.value.exit_code == 17 and info.value.error_index == 1
    root, v1 = tmp_path / "ckpt", tmp_path / "ckpt-v1"
    index = msgpack.unpackb((root / fmt.INDEX).read_bytes(), raw=False)
    assert index == msgpack.unpackb((v1 / fmt.INDEX).read_bytes(), raw=False)  # the commit never happened
    assert_bits_equal(safeckpt.load(v1), safeckpt.load(root))
    assert safeckpt.load(root)["step"] == 1
    leftovers = set(os.listdir(root)) - set(os.listdir(v1))
    assert any(n.endswith(".tmp") for n in leftovers), leftovers  # rank 1 died inside its shard
    safeckpt.save(root, {"step": 3}, format="safeckpt-sharded")
    assert sorted(os.listdir(root)) == [fmt.INDEX]  # the next save collects every older file
