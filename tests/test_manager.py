"""CheckpointManager on real files: retention policies, restore round trips, files it must not
touch, failed and killed saves (real subprocesses killed mid-write and between commit and
cleanup), async saves against sync saves of the same state, and a real 2-rank gloo group."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import safeckpt
from conformance import assert_bits_equal, leave_process_group
from safeckpt import CheckpointManager
from safeckpt.formats import _safetensors
from safeckpt.manager import Best

INDEX = "safeckpt-index.msgpack"


class Tied(nn.Module):
    """An embedding tied to the output layer, a norm with running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mid = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.mid(self.emb(x)))))


def setup(seed: int = 0) -> tuple[Tied, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tied()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 1) -> None:
    for i in range(steps):
        x = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(i))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What torch itself says the state is, copied (a reference for bit-for-bit comparisons)."""
    clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    sd = opt.state_dict()
    return {
        "model": {k: clone(v) for k, v in model.state_dict().items()},
        "optimizer": {"state": {p: {k: clone(v) for k, v in s.items()} for p, s in sd["state"].items()}},
    }


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def newest(m: CheckpointManager) -> Path:
    path = m.latest()
    assert path is not None, f"{m} holds no checkpoint"
    return path


def tiny(step: int, **extra: Any) -> dict[str, Any]:
    return {"w": torch.full((3,), float(step)), "step": step, **extra}


# -- retention ---------------------------------------------------------------------------------------


def test_keep_last_files_and_sharded_directories(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2)
    assert m.steps() == [] and m.latest() is None
    for step in range(1, 6):
        shard = "16B" if step % 2 else None  # odd steps as sharded directories
        path = m.save(step, tiny(step), max_shard_size=shard)
        assert path == m.latest()
    assert m.steps() == [4, 5]
    assert names(tmp_path) == ["step-000000004.safeckpt", "step-000000005"]
    assert (tmp_path / "step-000000005" / INDEX).is_file()
    assert (
        safeckpt.load(newest(m))["step"] == 5
        and safeckpt.load(tmp_path / "step-000000004.safeckpt")["step"] == 4 == m.steps()[0]
    )


def test_keep_every_with_keep_last(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_every=3)
    for step in range(1, 11):
        m.save(step, tiny(step))
    assert m.steps() == [3, 6, 9, 10]


def test_no_policy_keeps_everything_and_the_newest_always_stays(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path / "all")
    for step in (0, 7, 8):
        m.save(step, tiny(step))
    assert m.steps() == [0, 7, 8]
    every = CheckpointManager(tmp_path / "every", keep_every=100)
    for step in (100, 150, 170):
        every.save(step, tiny(step))
    assert every.steps() == [100, 170]  # 150 went when 170 became the newest


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_k_by_metric_across_restarts(tmp_path: Path, mode: str) -> None:
    values = {1: 0.2, 2: 0.2, 3: 0.9, 4: 0.2, 5: 0.7, 6: float("nan"), 7: 0.4}
    m = CheckpointManager(tmp_path, keep_last=1, best=("val", mode, 2))
    for step in (1, 2, 3, 4):
        if mode == "min":
            m.save(step, tiny(step, val=torch.tensor(values[step])))  # read from the state
        else:
            m.save(step, tiny(step), metric=values[step])  # stored in the checkpoint by the manager
    # three tie at 0.2: the older two rank first (a newer checkpoint must be better to displace one)
    assert m.steps() == ([1, 2, 4] if mode == "min" else [1, 3, 4])
    # a new manager (a resumed run) ranks what is on disk by the values stored in the checkpoints
    m = CheckpointManager(tmp_path, keep_last=1, best=Best("val", mode, 2))  # type: ignore[arg-type]
    for step in (5, 6, 7):
        if mode == "min":
            m.save(step, tiny(step, val=values[step]))
        else:
            m.save(step, tiny(step), metric=values[step])
    assert m.steps() == ([1, 2, 7] if mode == "min" else [3, 5, 7])  # NaN ranks last
    remainder = m.restore({"w": torch.zeros(3)})
    assert remainder["val"] == 0.4 and remainder["step"] == 7


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_nan_metric_ranks_last(tmp_path: Path, mode: str) -> None:
    m = CheckpointManager(tmp_path, best=("val", mode, 1))
    for step, val in ((1, float("nan")), (2, 0.5), (3, 0.5)):
        m.save(step, tiny(step), metric=val)
    assert m.steps() == [2, 3]


def test_bad_arguments(tmp_path: Path) -> None:
    for kw in ({"keep_last": 0}, {"keep_every": -1}, {"keep_last": 1.5}, {"best": ("val", "lowest", 1)}):
        with pytest.raises(ValueError):
            CheckpointManager(tmp_path, **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple"):
        CheckpointManager(tmp_path, best="val")  # type: ignore[arg-type]
    plain, ranked = CheckpointManager(tmp_path), CheckpointManager(tmp_path, best=("val", "min", 1))
    with pytest.raises(ValueError, match="best="):
        plain.save(1, tiny(1), metric=0.5)
    with pytest.raises(ValueError, match="'val', which the state does not hold"):
        ranked.save(1, tiny(1))
    with pytest.raises(ValueError, match="not both"):
        ranked.save(1, tiny(1, val=0.1), metric=0.1)
    with pytest.raises(TypeError, match="real number"):
        ranked.save(1, tiny(1, val="low"))
    with pytest.raises(TypeError, match="step"):
        plain.save("1", tiny(1))  # type: ignore[arg-type]
    assert names(tmp_path) == []


# -- saving and restoring ----------------------------------------------------------------------------


def test_restore_round_trip_bit_for_bit(tmp_path: Path) -> None:
    model, opt = setup(0)
    m = CheckpointManager(tmp_path / "run", keep_last=3)
    expected = {}
    for step in (10, 20, 30):
        train(model, opt)
        m.save(step, {"model": model, "optimizer": opt, "step": step, "meta": {"lr": 1e-2}})
        expected[step] = snapshot(model, opt)
    assert m.steps() == [10, 20, 30] and m.latest() == tmp_path / "run" / "step-000000030.safeckpt"
    for at in (None, 20):
        fresh, fresh_opt = setup(1)
        state = {"model": fresh, "optimizer": fresh_opt, "step": 0}
        remainder = m.restore(state, step=at)
        assert state["step"] == (at or 30) and remainder == {"meta": {"lr": 1e-2}}
        got = snapshot(fresh, fresh_opt)
        assert_bits_equal(expected[at or 30], got)
        assert fresh.out.weight is fresh.emb.weight  # still tied
    whole = m.restore(step=10)  # no state: the whole checkpoint, as safeckpt.load gives it
    assert_bits_equal(expected[10]["model"], dict(whole["model"]))


def test_nothing_to_restore_names_the_directory(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty: no checkpoint to restore"):
        m.restore({"w": torch.zeros(3)})
    m.save(5, tiny(5))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 6; the steps there are 5"):
        m.restore({"w": torch.zeros(3)}, step=6)
    (tmp_path / "empty" / "step-000000009").mkdir()  # a directory without its index is no checkpoint
    assert m.steps() == [5]


def test_steps_only_go_forward_and_a_step_can_be_saved_again(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(5, tiny(5))
    with pytest.raises(ValueError, match=r"already holds step 5, newer than step 3"):
        m.save(3, tiny(3))
    m.save(5, tiny(5, note="again"), max_shard_size="16B")  # the same step, now as a directory
    assert names(tmp_path) == ["step-000000005"] and safeckpt.load(newest(m))["note"] == "again"
    m.save(5, tiny(5, note="third"))
    assert names(tmp_path) == ["step-000000005.safeckpt"] and safeckpt.load(newest(m))["note"] == "third"


def test_unrelated_files_are_never_touched(tmp_path: Path) -> None:
    theirs = {
        "notes.txt": b"mine",
        "step-abc.safeckpt": b"not a step",
        "step-000000001.pt": b"another format",
        "step-1.safeckpt.bak": b"a backup",
        ".step-000000001.safeckpt.tmp": b"no random part: not a temporary of ours",
        "other/step-000000001.safeckpt": b"in a subdirectory",
    }
    for name, data in theirs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(1, tiny(1), max_shard_size="16B")
    (tmp_path / "step-000000001" / "README").write_bytes(b"a note inside a checkpoint")
    for step in (2, 3):
        m.save(step, tiny(step))
    assert m.steps() == [3]
    for name, data in theirs.items():
        assert (tmp_path / name).read_bytes() == data, name
    # the deleted directory kept the file it did not write, and nothing else
    assert names(tmp_path / "step-000000001") == ["README"]


def test_a_failed_save_deletes_nothing(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=1)
    first = m.save(1, tiny(1))
    before = first.read_bytes()
    for manager in (m, CheckpointManager(tmp_path, keep_last=1, async_save=True)):
        with pytest.raises(TypeError, match=r"state\['hparams'\]\['callback'\]"):
            manager.save(2, tiny(2, hparams={"callback": object()}))
        manager.wait()
        assert m.latest() == first and first.read_bytes() == before and names(tmp_path) == [first.name]


# -- killed saves (real processes, really killed) ----------------------------------------------------

KILLED = """
import os, sys, torch
from safeckpt import CheckpointManager
from safeckpt.formats import _safetensors
directory, phase = sys.argv[1], sys.argv[2]
m = CheckpointManager(directory, keep_last=1)
state = lambda step: {"w": torch.full((4,), float(step)), "step": step}
if phase == "mid-write":
    m.save(1, state(1)); m.save(2, state(2))
    calls, real = [], _safetensors.write_all
    def dying(f, data):
        calls.append(1)
        if len(calls) == 2:  # the header is written, the tensor is not
            os._exit(17)
        real(f, data)
    _safetensors.write_all = dying
    m.save(3, state(3))
else:
    CheckpointManager._clean = lambda self, step, path: os._exit(18)
    m.save(3, state(3))
"""


def test_killed_saves_leave_extra_checkpoints_never_missing_ones(tmp_path: Path) -> None:
    run = [sys.executable, "-c", textwrap.dedent(KILLED), str(tmp_path)]
    assert subprocess.run([*run, "mid-write"], timeout=120).returncode == 17
    m = CheckpointManager(tmp_path, keep_last=1)
    temps = [n for n in names(tmp_path) if n.startswith(".step-000000003.safeckpt.")]
    assert m.steps() == [2] and len(temps) == 1 and names(tmp_path) == [temps[0], "step-000000002.safeckpt"]
    # killed after the commit, before the cleanup: step 3 is whole, step 2 is still there
    assert subprocess.run([*run, "between-commit-and-cleanup"], timeout=120).returncode == 18
    assert m.steps() == [2, 3] and safeckpt.load(newest(m))["step"] == 3
    # a sharded checkpoint whose deletion was cut short after its index went
    safeckpt.save(tmp_path / "step-000000001", tiny(1), max_shard_size="16B")
    os.unlink(tmp_path / "step-000000001" / INDEX)
    assert m.steps() == [2, 3]
    m.save(4, tiny(4))  # the next save finishes every job left behind
    assert names(tmp_path) == ["step-000000004.safeckpt"]


# -- async -------------------------------------------------------------------------------------------


def test_async_save_writes_the_state_as_it_was_when_save_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = setup(0)
    train(model, opt)
    state: dict[str, Any] = {
        "model": model,
        "optimizer": opt,
        "step": 1,
        "meta": {"seen": [1, 2]},
        "ids": torch.arange(5),
    }
    before = snapshot(model, opt)
    sync = CheckpointManager(tmp_path / "sync").save(1, state)

    release, writing = threading.Event(), threading.Event()
    real = _safetensors.write_all

    def held(f: Any, data: Any) -> None:
        if threading.current_thread() is not threading.main_thread() and not writing.is_set():
            writing.set()  # the header is out; the first tensor's bytes wait until training moved on
            assert release.wait(60)
        real(f, data)

    monkeypatch.setattr(_safetensors, "write_all", held)
    m = CheckpointManager(tmp_path / "async", async_save=True)
    path = m.save(1, state)
    assert writing.wait(60) and m.latest() is None  # started, not committed
    train(model, opt, steps=3)  # in place: parameters, optimizer moments, a plain tensor, a nested value
    state["ids"].add_(100)
    state["meta"]["seen"].append(3)
    after = snapshot(model, opt)
    assert not torch.equal(after["model"]["mid.weight"], before["model"]["mid.weight"])  # it did change
    release.set()
    m.wait()
    assert m.latest() == path
    assert filecmp.cmp(sync, path, shallow=False)  # byte for byte the sync save of the same state
    loaded = safeckpt.load(path)
    assert_bits_equal(before["model"], dict(loaded["model"]))
    assert loaded["meta"] == {"seen": [1, 2]} and torch.equal(loaded["ids"], torch.arange(5))


def test_async_errors_surface_on_wait_or_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = CheckpointManager(tmp_path, keep_last=1, async_save=True)
    m.save(1, tiny(1))
    m.wait()
    real = _safetensors.write_all

    def full_disk(f: Any, data: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_safetensors, "write_all", full_disk)
    m.save(2, tiny(2))
    with pytest.raises(OSError, match="No space left"):
        m.wait()
    m.wait()  # reported once
    m.save(3, tiny(3))
    with pytest.raises(OSError, match="No space left"):
        m.save(4, tiny(4))  # the failed write is reported instead of starting another
    assert m.steps() == [1] and names(tmp_path) == ["step-000000001.safeckpt"]
    monkeypatch.setattr(_safetensors, "write_all", real)
    m.save(4, tiny(4))
    m.wait()
    assert m.steps() == [4]


# -- torch.distributed: a real 2-rank gloo group -------------------------------------------------------


def full(tree: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in tree.items()}


def ranks(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    root = Path(out)
    dist.init_process_group(
        "gloo", init_method=f"file://{root / '.pg'}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    results: dict[str, Any] = {}
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            fully_shard(model, mesh=mesh)
            return model, torch.optim.Adam(model.parameters(), lr=1e-2)

        run = root / "run"
        if rank == 0:
            run.mkdir()
            (run / "notes.txt").write_text("mine")
        dist.barrier()
        m = CheckpointManager(run, keep_last=1, best=("val", "min", 1))
        deleted: list[str] = []
        real_delete = m._delete

        def recorded(path: Path) -> None:
            deleted.append(path.name)
            real_delete(path)

        m._delete = recorded  # type: ignore[method-assign]
        model, opt = sharded(0)
        expected = {}
        for step, val in ((1, 0.5), (2, 0.3), (3, 0.4)):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            m.save(step, {"model": model, "optimizer": opt, "step": step}, metric=val)
            expected[step] = full(model.state_dict())
        results["steps"] = m.steps()
        results["deleted"] = deleted
        results["names"] = names(run)
        for at in (None, 2):
            fresh, fresh_opt = sharded(1)
            state = {"model": fresh, "optimizer": fresh_opt, "step": 0}
            remainder = m.restore(state, step=at)
            assert_bits_equal(expected[at or 3], full(fresh.state_dict()), f"restored step {at}")
            assert state["step"] == (at or 3) and remainder == {"val": 0.4 if at is None else 0.3}
        plain = CheckpointManager(root / "replicated", keep_last=1)  # DDP-style state: rank 0 writes
        commits: list[int] = []
        real_commit = plain._commit

        def counted(step: int, *args: Any) -> None:
            commits.append(step)
            real_commit(step, *args)

        plain._commit = counted  # type: ignore[method-assign]
        if rank == 1:  # rank 0 alone writes replicated state and may be steps ahead: the others must not mind
            while not (root / "replicated" / "step-000000002.safeckpt").exists():
                time.sleep(0.01)
        for step in (1, 2):
            plain.save(step, {"w": torch.full((2,), float(step)), "rank": rank})
        results["replicated"] = commits
        dist.barrier()
        results["replicated_steps"] = plain.steps()
        results["replicated_by"] = safeckpt.load(newest(plain))["rank"]
        try:
            CheckpointManager(root / "nothing").restore({"model": model})
            results["nothing"] = "restored"
        except FileNotFoundError as e:
            results["nothing"] = str(e)
        results["ok"] = True
    except Exception as e:
        results["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        (root / f"rank{rank}.json").write_text(json.dumps(results))
        leave_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_ranks_save_collectively_and_only_rank_0_deletes_or_writes_replicated_state(tmp_path: Path) -> None:
    mp.spawn(ranks, args=(2, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(res.get("ok") for res in got), "\n".join(f"rank {r}: {res.get('error')}" for r, res in enumerate(got))
    for res in got:
        assert res["steps"] == [2, 3]  # 3 newest, 2 best
        assert res["names"] == ["notes.txt", "step-000000002", "step-000000003"]
        assert "nothing: no checkpoint to restore" in res["nothing"]
    assert got[0]["deleted"] == ["step-000000001"] and got[1]["deleted"] == []
    assert got[0]["replicated"] == [1, 2] and got[1]["replicated"] == []
    assert [r["replicated_steps"] for r in got] == [[2], [2]] and [r["replicated_by"] for r in got] == [0, 0]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    for step in (2, 3):
        assert (tmp_path / "run" / f"step-{step:09d}" / INDEX).is_file()
