"""Sharded saves and loads across ranks at an s3:// URL: a real gloo process group of 2 ranks
(spawned as in tests/test_distributed.py) against moto's S3-compatible server (tests/remote_server.py).

Each rank checks inside its process and reports to the tests: a round trip bit for bit, the bytes
each rank downloads for its share (through a byte-counting proxy of its own), and a save that
fails on one rank mid-upload, which fails on both and leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
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
from remote_server import S3, CountingProxy
from safeckpt.tree import map_leaves

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.slow,
]

WORLD = 2
HTTP_SLACK = 64 << 10


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 128))  # 512 KiB weights: halves per rank


def _sharded(seed: int, mesh: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    model(torch.randn(4, 128, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _full(tree: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return map_leaves(tree, lambda _, x: x.full_tensor() if isinstance(x, DTensor) else x)


def _local_bytes(tree: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for x in _leaves(tree):
        x = x.to_local() if isinstance(x, DTensor) else x
        total += x.numel() * x.element_size()
    return total


def _leaves(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_leaves(tree, lambda _, x: out.append(x) if isinstance(x, torch.Tensor) else None)
    return out


def _listing(opts: dict[str, Any], url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    return sorted(p.rsplit("/", 1)[1] for p in fs.ls(url[len("s3://") :], refresh=True))


def scenario(rank: int, url: str, opts: dict[str, Any], endpoint: tuple[str, int]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, Any] = {}

    def check(name: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
            results[name] = "ok" if value is None else value
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        dist.barrier()

    model, opt = _sharded(0, mesh)
    _step(model, opt, 0)
    first = {"model": _full(model.state_dict()), "optimizer": _full(opt.state_dict())}

    def save() -> list[str]:
        out = safeckpt.save(url, {"model": model, "optimizer": opt, "step": 1}, storage_options=opts)
        assert out == url and isinstance(out, str)
        return _listing(opts, url)

    def round_trip() -> dict[str, int]:
        proxy = CountingProxy(endpoint)  # this rank's downloads only
        counted = {**opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
        m, o = _sharded(1, mesh)
        state = {"model": m, "optimizer": o, "step": 0}
        remainder = safeckpt.load(url, state, storage_options=counted)
        down = proxy.down
        proxy.close()
        assert remainder == {} and state["step"] == 1
        assert_bits_equal(first["model"], _full(m.state_dict()), "model")
        assert_bits_equal(first["optimizer"], _full(o.state_dict()), "optimizer")
        return {"down": down, "share": _local_bytes(m.state_dict()) + _local_bytes(o.state_dict()["state"])}

    def failing_save() -> list[str]:
        from safeckpt import _remote

        _step(model, opt, 1)
        real = _remote.put_file
        if rank == 1:

            def dying(fs: Any, local: Path, rpath: str) -> None:
                raise ConnectionResetError("the network went away")

            _remote.put_file = dying  # type: ignore[assignment]
        try:
            with pytest.raises(OSError if rank == 1 else RuntimeError, match="network went away"):
                safeckpt.save(url, {"model": model, "optimizer": opt, "step": 2}, storage_options=opts)
        finally:
            _remote.put_file = real  # type: ignore[assignment]
        dist.barrier()  # every rank has cleaned up its uploads
        m, o = _sharded(2, mesh)
        state = {"model": m, "optimizer": o, "step": 0}
        safeckpt.load(url, state, storage_options=opts)  # the previous checkpoint, whole
        assert state["step"] == 1
        assert_bits_equal(first["model"], _full(m.state_dict()), "model")
        return _listing(opts, url)

    def next_save() -> list[str]:
        safeckpt.save(url, {"model": model, "optimizer": opt, "step": 3}, storage_options=opts)
        return _listing(opts, url)

    check("save", save)
    check("round_trip", round_trip)
    check("failing_save", failing_save)
    check("next_save", next_save)
    return results


def worker(rank: int, out: str, url: str, opts: dict[str, Any], endpoint: tuple[str, int]) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / '.pg'}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    results: dict[str, Any] = {}
    try:
        results = scenario(rank, url, opts, endpoint)
    finally:
        (out_dir / f"rank-{rank}.json").write_text(json.dumps(results))
        leave_process_group()


@pytest.fixture(scope="module")
def runs(s3_server: S3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("remote-dist")
    bucket = f"dist-{os.getpid()}"
    s3_server.fs().mkdir(bucket)
    url = f"s3://{bucket}/run/step"
    host, port = s3_server.endpoint.rsplit("//", 1)[1].split(":")
    mp.spawn(worker, args=(str(out), url, s3_server.options(), (host, int(port))), nprocs=WORLD)
    return {"ranks": [json.loads((out / f"rank-{r}.json").read_text()) for r in range(WORLD)]}


def outcome(runs: dict[str, Any], name: str) -> list[Any]:
    got = [r.get(name, "not run") for r in runs["ranks"]]
    for rank, value in enumerate(got):
        assert value == "ok" or not isinstance(value, str), f"rank {rank}: {value}"
    return got


def _shards(names: list[str]) -> set[str]:
    return {n for n in names if n.endswith(".safetensors")}


def test_every_rank_uploads_its_shards_and_rank_0_commits_the_index(runs: dict[str, Any]) -> None:
    listing = outcome(runs, "save")[0]
    assert "safeckpt-index.msgpack" in listing
    shards = _shards(listing)
    assert [n.split("-")[2] for n in sorted(shards)] == ["00000", "00001"], listing  # one file per rank
    assert set(listing) == shards | {"safeckpt-index.msgpack"}, "nothing staged or temporary left on the store"


def test_a_load_across_ranks_round_trips_and_reads_each_ranks_share(runs: dict[str, Any]) -> None:
    for rank, m in enumerate(outcome(runs, "round_trip")):
        # its slices, the replicated tensors, the index and two headers: not the other rank's half
        assert m["down"] < 1.1 * m["share"] + 4 * HTTP_SLACK, f"rank {rank}: {m}"
    print("bytes downloaded per rank (down, share):", [(m["down"], m["share"]) for m in outcome(runs, "round_trip")])


def test_a_rank_failing_mid_save_fails_every_rank_and_leaves_the_previous_checkpoint(runs: dict[str, Any]) -> None:
    before = outcome(runs, "save")[0]
    after = outcome(runs, "failing_save")
    assert after[0] == after[1] == before, "the failed save's uploads were removed; the index is the old one"


def test_the_next_save_replaces_the_previous_generation(runs: dict[str, Any]) -> None:
    before = _shards(outcome(runs, "save")[0])
    now = outcome(runs, "next_save")[0]
    assert len(_shards(now)) == 2 and not _shards(now) & before
