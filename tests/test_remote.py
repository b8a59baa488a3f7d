"""Checkpoints at s3:// URLs, against moto's real S3-compatible server (tests/remote_server.py):
round trips through the API, all-or-nothing uploads, reads that cost what they read, and errors
that name the URL."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import safeckpt
from conformance import assert_bits_equal
from remote_server import S3, subprocess_env

HTTP_SLACK = 64 << 10  # request and response headers of a handful of requests


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))


def test_save_returns_the_url_and_load_round_trips(s3: S3) -> None:
    model, opt = _model(), None
    model2 = _model(1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    url = s3.url("run/step-1.safeckpt")
    out = safeckpt.save(url, {"model": model, "optimizer": opt, "step": 1}, storage_options=s3.options())
    assert out == url and isinstance(out, str)
    assert s3.fs().ls(f"{s3.bucket}/run") == [f"{s3.bucket}/run/step-1.safeckpt"]  # nothing else left there
    opt2 = torch.optim.AdamW(model2.parameters())
    state = {"model": model2, "optimizer": opt2, "step": 0}
    assert safeckpt.load(url, state, storage_options=s3.options()) == {}
    assert state["step"] == 1
    assert_bits_equal(model2.state_dict(), model.state_dict())
    assert_bits_equal(opt2.state_dict(), opt.state_dict())


def test_environment_alone_reaches_the_store(s3: S3) -> None:
    """Without storage_options the filesystem's defaults and AWS_* variables apply."""
    sd = dict(_model().state_dict())
    url = s3.url("weights.safetensors")
    safeckpt.save(url, sd)
    out = safeckpt.load(url)
    assert_bits_equal({k: out[k] for k in sd}, sd)  # safetensors keeps names sorted
    model = _model(3)
    safeckpt.load_raw(url, model)
    assert_bits_equal(dict(model.state_dict()), sd)


def test_open_reads_the_header_and_one_tensor_costs_its_bytes(s3: S3) -> None:
    torch.manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(256, 1024) for i in range(8)}  # 1 MiB each
    url = s3.url("big.safeckpt")
    safeckpt.save(url, sd, storage_options=s3.options())
    s3.proxy.reset()
    ckpt = safeckpt.open(url, storage_options=s3.options(counted=True))
    opened = s3.proxy.down
    assert opened < 64 << 10 + HTTP_SLACK, f"open transferred {opened} bytes"
    s3.proxy.reset()
    t = ckpt.tensors()["layer5.weight"].load()
    assert_bits_equal(t, sd["layer5.weight"])
    assert s3.proxy.down < 1.1 * t.nbytes + HTTP_SLACK, f"one tensor of {t.nbytes} bytes transferred {s3.proxy.down}"


def test_whole_load_reads_the_object_once(s3: S3) -> None:
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(64, 1024) for i in range(16)}
    url = s3.url("all.safeckpt")
    safeckpt.save(url, sd, storage_options=s3.options())
    size = s3.fs().size(f"{s3.bucket}/all.safeckpt")
    s3.proxy.reset()
    assert_bits_equal(safeckpt.load(url, storage_options=s3.options(counted=True)), sd)
    assert s3.proxy.down < 1.1 * size + HTTP_SLACK


def test_sharded_directory_round_trip_and_overwrite(s3: S3) -> None:
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(64, 64) for i in range(6)}
    url = s3.url("run/sharded")
    opts = s3.options()
    assert safeckpt.save(url, {"model": sd, "step": 1}, max_shard_size="40KB", storage_options=opts) == url
    first = sorted(s3.fs().ls(f"{s3.bucket}/run/sharded"))
    assert len(first) > 3
    sd2 = {k: v + 1 for k, v in sd.items()}
    safeckpt.save(url, {"model": sd2, "step": 2}, max_shard_size="40KB", storage_options=opts)
    second = sorted(s3.fs().ls(f"{s3.bucket}/run/sharded", refresh=True))
    assert not set(first) & set(second) - {f"{s3.bucket}/run/sharded/safeckpt-index.msgpack"}  # old generation gone
    out = safeckpt.load(url, storage_options=opts)
    assert out["step"] == 2
    assert_bits_equal(out["model"], sd2)


# -- errors name the URL, and never hang ------------------------------------------------------------


def test_missing_bucket_and_object_name_the_url(s3: S3) -> None:
    url = f"s3://no-such-bucket-{s3.bucket}/step-1.safeckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(url)):
        safeckpt.load(url, storage_options=s3.options())
    with pytest.raises(OSError, match=re.escape(url)):
        safeckpt.save(url, {"step": 1}, storage_options=s3.options())
    missing = s3.url("nothing-here.safeckpt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        safeckpt.open(missing, storage_options=s3.options())


def test_wrong_credentials_name_the_url_and_the_fix(s3: S3) -> None:
    from moto.core.authorization import enable_iam_authentication

    url = s3.url("step-1.safeckpt")
    safeckpt.save(url, {"step": 1}, storage_options=s3.options())
    wrong = {**s3.options(), "key": "AKIAWRONGWRONGWRONG1", "secret": "not-the-secret"}
    with enable_iam_authentication():
        with pytest.raises(PermissionError, match=re.escape(url) + ".*credentials"):
            safeckpt.load(url, storage_options=wrong)
        with pytest.raises(PermissionError, match=re.escape(url) + ".*credentials"):
            safeckpt.save(url, {"step": 2}, storage_options=wrong)
    assert safeckpt.load(url, storage_options=s3.options())["step"] == 1


@pytest.mark.timeout(90)
def test_unreachable_endpoint_fails_quickly_naming_the_url(s3: S3) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {**s3.options(), "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    url = s3.url("step-1.safeckpt")
    with pytest.raises(OSError, match=re.escape(url)):
        safeckpt.load(url, storage_options=opts)


# -- all or nothing ----------------------------------------------------------------------------------


def test_an_upload_failing_midway_leaves_the_previous_object(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from safeckpt import _sources

    monkeypatch.setattr(_sources, "PART", 5 << 20)  # S3's smallest part: several parts for a small state
    url = s3.url("run/last.safeckpt")
    safeckpt.save(url, {"w": torch.zeros(4), "step": 1}, storage_options=s3.options())
    parts: list[int] = []
    real = s3fs.S3FileSystem._call_s3

    async def failing(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if len(parts) == 2:
                raise ConnectionResetError("the network went away")
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", failing)
    big = {"w": torch.randn(6 << 20), "step": 2}  # 24 MiB: parts 1..5
    with pytest.raises(OSError, match=re.escape(url)):
        safeckpt.save(url, big, storage_options=s3.options())
    monkeypatch.undo()
    assert len(parts) >= 2
    out = safeckpt.load(url, storage_options=s3.options())
    assert out["step"] == 1
    fs = s3.fs()
    assert fs.ls(f"{s3.bucket}/run") == [f"{s3.bucket}/run/last.safeckpt"]
    uploads = fs.call_s3("list_multipart_uploads", Bucket=s3.bucket).get("Uploads", [])
    assert uploads == [], "the multipart upload was aborted"


def test_a_killed_save_leaves_the_previous_checkpoint(s3: S3, tmp_path: Path) -> None:
    """A process killed while its upload is in flight: the previous object stays, whole."""
    url = s3.url("run/last.safeckpt")
    first = {"w": torch.arange(1000.0), "step": 1}
    safeckpt.save(url, first, storage_options=s3.options())
    before = s3.fs().info(f"{s3.bucket}/run/last.safeckpt")["ETag"]
    script = tmp_path / "save.py"
    script.write_text(
        "import sys, torch, safeckpt\n"
        "opts = {'client_kwargs': {'endpoint_url': sys.argv[2]}}\n"
        "safeckpt.save(sys.argv[1], {'w': torch.randn(16 << 20), 'step': 2}, storage_options=opts)\n"
        "print('finished')\n"
    )
    s3.proxy.reset()
    child = subprocess.Popen(
        [sys.executable, str(script), url, f"http://127.0.0.1:{s3.proxy.port}"],
        env=subprocess_env(s3),
        stdout=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while s3.proxy.up < 20 << 20 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until a part or more of the 64 MiB is on the wire
        assert child.poll() is None, "the save finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    fs = s3.fs()
    assert fs.info(f"{s3.bucket}/run/last.safeckpt")["ETag"] == before
    assert fs.ls(f"{s3.bucket}/run") == [f"{s3.bucket}/run/last.safeckpt"]
    assert_bits_equal(safeckpt.load(url, storage_options=s3.options()), first)


def test_two_writers_of_one_sharded_checkpoint_never_mix(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index is written on the condition that it is still the one the save started from: a
    save that lost the race says so, removes its own shards and leaves the winner's checkpoint."""
    from safeckpt import _remote

    url, opts = s3.url("run/sharded"), s3.options()
    sd = {f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}
    safeckpt.save(url, {"model": sd, "step": 1}, max_shard_size="20KB", storage_options=opts)
    real_etag = _remote._etag
    winner = {k: v + 10 for k, v in sd.items()}

    def etag_then_another_save(fs: Any, rpath: str) -> Any:
        tag = real_etag(fs, rpath)
        monkeypatch.setattr(_remote, "_etag", real_etag)
        safeckpt.save(url, {"model": winner, "step": 3}, max_shard_size="20KB", storage_options=opts)
        return tag

    monkeypatch.setattr(_remote, "_etag", etag_then_another_save)
    with pytest.raises(FileExistsError, match=re.escape(url) + ".*another save"):
        safeckpt.save(url, {"model": sd, "step": 2}, max_shard_size="20KB", storage_options=opts)
    out = safeckpt.load(url, storage_options=opts)
    assert out["step"] == 3
    assert_bits_equal(out["model"], winner)
    shards = [p for p in s3.fs().ls(f"{s3.bucket}/run/sharded") if p.endswith(".safetensors")]
    assert len({p.split("shard-")[1].split("-")[0] for p in shards}) == 1, "only the winner's generation is left"


# -- the manager, convert and the CLI on a URL ---------------------------------------------------------


def test_manager_rotates_and_restores_on_the_store(s3: S3) -> None:
    opts = s3.options()
    run = s3.url("run")
    manager = safeckpt.CheckpointManager(run, keep_last=2, keep_every=20, storage_options=opts)
    model = _model()
    for step in (10, 20, 30, 40):
        with torch.no_grad():
            model[0].bias.fill_(step)
        path = manager.save(step, {"model": model, "step": step}, max_shard_size="20KB" if step == 30 else None)
        assert str(path).startswith(run + "/step-")
    assert manager.steps() == [20, 30, 40]  # 10 rotated out; 20 kept by keep_every
    names = sorted(p.rsplit("/", 1)[1] for p in s3.fs().ls(f"{s3.bucket}/run"))
    assert names == ["step-000000020.safeckpt", "step-000000030", "step-000000040.safeckpt"]
    again = safeckpt.CheckpointManager(run, storage_options=opts)  # a fresh process's view of the store
    assert str(again.latest()) == f"{run}/step-000000040.safeckpt"
    fresh = _model(5)
    state = {"model": fresh, "step": 0}
    again.restore(state, step=30)
    assert state["step"] == 30 and float(fresh[0].bias[0].detach()) == 30.0
    manager.save(50, {"model": model, "step": 50})
    manager.save(60, {"model": model, "step": 60})
    assert manager.steps() == [20, 40, 50, 60]  # the last two, and every 20th
    assert not any("step-000000030" in p for p in s3.fs().ls(f"{s3.bucket}/run", refresh=True)), "sharded step removed"


def test_convert_between_local_and_url(s3: S3, tmp_path: Path) -> None:
    sd = dict(_model().state_dict())
    src = tmp_path / "w.safetensors"
    safeckpt.save(src, sd)
    url = s3.url("converted/w.safeckpt")
    assert safeckpt.convert(src, url, storage_options=s3.options()) == url
    with pytest.raises(FileExistsError, match=re.escape(url)):
        safeckpt.convert(src, url, storage_options=s3.options())
    back = safeckpt.convert(url, tmp_path / "back.safetensors", storage_options=s3.options())
    out = safeckpt.load(back)
    assert_bits_equal({k: out[k] for k in sd}, sd)


def test_cli_verbs_on_urls(s3: S3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect / verify / diff / convert take URLs; credentials and endpoint come from AWS_*."""
    from safeckpt.cli import main

    sd = dict(_model().state_dict())
    url = s3.url("cli/w.safeckpt")
    safeckpt.save(url, sd)
    assert main(["inspect", url, "--json"]) == 0
    assert "0.weight" in capsys.readouterr().out
    assert main(["verify", url, "-q"]) == 0
    other = s3.url("cli/copy.safetensors")
    assert main(["convert", url, other, "-q"]) == 0
    assert main(["diff", url, other, "-q"]) == 0
    assert main(["convert", url, other, "-q"]) != 0  # exists: --force to replace
    assert re.escape(other) and other in capsys.readouterr().err
    assert main(["convert", other, str(tmp_path / "local.safeckpt"), "-q"]) == 0
    # --storage-option reaches a server the environment does not name
    direct = ["--storage-option", f"endpoint_url=http://127.0.0.1:{s3.proxy.port}"]
    s3.proxy.reset()
    for verb in (["inspect", url, "-q"], ["verify", url, "-q"], ["diff", url, other, "-q"]):
        assert main([*verb, *direct]) == 0, verb
    assert s3.proxy.down > 0
    assert main(["inspect", url, "--storage-option", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# -- Lightning ---------------------------------------------------------------------------------------


def test_lightning_trainer_fits_and_resumes_on_s3(s3: S3) -> None:
    L = pytest.importorskip("lightning")
    from safeckpt.lightning import SafeCheckpointIO

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    root = s3.url("lightning")

    def trainer(epochs: int) -> Any:
        return L.Trainer(
            default_root_dir=root, max_epochs=epochs, plugins=[SafeCheckpointIO(storage_options=s3.options())],
            logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip

    torch.manual_seed(0)
    first = Tiny()
    trainer(1).fit(first, data)
    saved = [p for p in s3.fs().find(f"{s3.bucket}/lightning") if p.endswith(".ckpt")]
    assert len(saved) == 1, saved
    url = "s3://" + saved[0]
    assert safeckpt.open(url).format == "safeckpt"  # ours, not a pickle
    resumed = Tiny()
    t2 = trainer(2)
    t2.fit(resumed, data, ckpt_path=url)
    assert t2.current_epoch == 2 and t2.global_step == 4  # resumed after epoch 0: one more epoch of 2 steps
    now = [p for p in s3.fs().find(f"{s3.bucket}/lightning") if p.endswith(".ckpt")]
    assert [p.rsplit("/", 1)[1] for p in now] == ["epoch=1-step=4.ckpt"]  # ModelCheckpoint removed the old one
    io = SafeCheckpointIO(storage_options=s3.options())
    again = io.load_checkpoint("s3://" + now[0])
    assert again["global_step"] == 4
    assert_bits_equal(dict(again["state_dict"]), dict(resumed.state_dict()))
    io.remove_checkpoint("s3://" + now[0])
    assert not s3.fs().exists(now[0])


# -- any fsspec filesystem; sharded partial reads ------------------------------------------------------


def test_memory_filesystem_round_trips_files_and_directories() -> None:
    """A store without multipart uploads or conditional writes (fsspec's memory://) works the same."""
    sd = {f"w{i}": torch.randn(32, 32) for i in range(4)}
    assert safeckpt.save("memory://runs/a.safeckpt", {"model": sd, "step": 1}) == "memory://runs/a.safeckpt"
    assert_bits_equal(safeckpt.load("memory://runs/a.safeckpt")["model"], sd)
    safeckpt.save("memory://runs/b", {"model": sd, "step": 2}, max_shard_size="8KB")
    out = safeckpt.load("memory://runs/b")
    assert out["step"] == 2
    assert_bits_equal(out["model"], sd)


def test_partial_load_of_a_sharded_url_reads_only_the_needed_shard(s3: S3) -> None:
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(512, 512) for i in range(4)}  # 1 MiB each: one shard each
    url = s3.url("sharded")
    safeckpt.save(url, {"model": sd}, max_shard_size="1100KB", storage_options=s3.options())
    s3.proxy.reset()
    ckpt = safeckpt.open(url, storage_options=s3.options(counted=True))
    assert len(ckpt.info.get("shards", [])) == 4 or ckpt.format == "safeckpt-sharded"
    opened = s3.proxy.down
    assert opened < 4 * (64 << 10) + HTTP_SLACK, f"opening (index + 4 shard headers) transferred {opened} bytes"
    s3.proxy.reset()
    t = ckpt.tensors()["model/w2"].load()
    assert_bits_equal(t, sd["w2"])
    assert s3.proxy.down < 1.1 * t.nbytes + HTTP_SLACK, f"one shard's tensor cost {s3.proxy.down} bytes"


def test_a_damaged_object_fails_verify_naming_the_url(s3: S3) -> None:
    url = s3.url("damaged.safeckpt")
    sd = {"w": torch.arange(4096.0)}
    safeckpt.save(url, sd, storage_options=s3.options())
    fs, key = s3.fs(), f"{s3.bucket}/damaged.safeckpt"
    data = bytearray(fs.cat_file(key))
    data[-100] ^= 0xFF  # a byte of the tensor's data
    fs.pipe_file(key, bytes(data))
    with pytest.raises(safeckpt.CorruptCheckpointError, match=re.escape(url) + ".*checksum") as e:
        safeckpt.load(url, verify=True, storage_options=s3.options())
    assert "safeckpt-view" not in str(e.value)
    assert_bits_equal(safeckpt.load(url, storage_options=s3.options())["w"][:10], sd["w"][:10])  # unchecked: loads


def test_manager_async_save_to_the_store(s3: S3) -> None:
    manager = safeckpt.CheckpointManager(s3.url("async"), keep_last=1, async_save=True, storage_options=s3.options())
    model = _model()
    for step in (1, 2):
        manager.save(step, {"model": model, "step": step})
    manager.wait()
    assert manager.steps() == [2]
    state = {"model": _model(9), "step": 0}
    manager.restore(state)
    assert state["step"] == 2
    assert_bits_equal(dict(state["model"].state_dict()), dict(model.state_dict()))


def test_a_sharded_save_failing_midway_leaves_the_previous_checkpoint(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    from safeckpt import _remote

    url, opts = s3.url("run/sharded"), s3.options()
    sd = {f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}
    safeckpt.save(url, {"model": sd, "step": 1}, max_shard_size="20KB", storage_options=opts)
    before = sorted(s3.fs().ls(f"{s3.bucket}/run/sharded"))
    real, calls = _remote.put_file, []

    def failing(fs: Any, local: Path, rpath: str) -> None:
        calls.append(rpath)
        if len(calls) == 2:
            raise ConnectionResetError("the network went away")
        real(fs, local, rpath)

    monkeypatch.setattr(_remote, "put_file", failing)
    with pytest.raises(OSError, match=re.escape(url)):
        safeckpt.save(url, {"model": {k: v + 1 for k, v in sd.items()}, "step": 2}, max_shard_size="20KB",
                      storage_options=opts)  # fmt: skip
    monkeypatch.undo()
    assert sorted(s3.fs().ls(f"{s3.bucket}/run/sharded", refresh=True)) == before  # its shards removed
    out = safeckpt.load(url, storage_options=opts)
    assert out["step"] == 1
    assert_bits_equal(out["model"], sd)


def test_a_whole_load_into_a_module_streams_with_bounded_memory(s3: S3, tmp_path: Path) -> None:
    """Loading a 32 MiB model from a URL into its module streams the bytes into the parameters in
    1 MiB ranged reads: the process's peak memory grows by a few parts, never by the file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 1024))  # 2 x 16 MiB weights
    url = s3.url("stream/model.safetensors")
    safeckpt.save(url, model.state_dict(), storage_options=s3.options())
    size = s3.fs().size(f"{s3.bucket}/stream/model.safetensors")
    expected = tmp_path / "expected.safetensors"
    safeckpt.save(expected, model.state_dict())
    script = tmp_path / "load.py"
    script.write_text(
        "import json, sys, torch, safeckpt\n"
        "from torch import nn\n"
        "from safeckpt import _sources\n"
        "_sources.STREAM_PART = 1 << 20\n"
        "url, endpoint, expected = sys.argv[1:4]\n"
        "opts = {'client_kwargs': {'endpoint_url': endpoint}}\n"
        "model = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 1024))\n"
        "safeckpt.open(url, storage_options=opts)  # imports and the client, not measured\n"
        "def kb(field):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field)) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) restarts from here\n"
        "before = kb('VmRSS:')\n"
        "safeckpt.load_raw(url, model, storage_options=opts)\n"
        "peak = kb('VmHWM:')\n"
        "ref = safeckpt.load(expected)\n"
        "ok = all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())\n"
        "print(json.dumps({'grew': peak - before, 'bits_equal': ok}))\n"
    )
    s3.proxy.reset()
    done = subprocess.run(
        [sys.executable, str(script), url, f"http://127.0.0.1:{s3.proxy.port}", str(expected)],
        env=subprocess_env(s3), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["bits_equal"]
    print(f"peak memory grew by {got['grew']} bytes loading {size}; {s3.proxy.down} bytes transferred")
    assert s3.proxy.down < 1.1 * size + HTTP_SLACK + (64 << 10)  # once, plus the view's header probe
    assert got["grew"] < size / 3, f"peak memory grew by {got['grew']} bytes loading a {size}-byte file"


def test_a_whole_load_transfers_each_byte_once_in_any_order(s3: S3) -> None:
    """Module parameters streamed into place and the optimizer's state read whole share the
    transfer, whichever the state dict names first."""
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    url = s3.url("order.safeckpt")
    safeckpt.save(url, {"model": model, "optimizer": opt}, storage_options=s3.options())
    size = s3.fs().size(f"{s3.bucket}/order.safeckpt")
    for names in (("model", "optimizer"), ("optimizer", "model")):
        m2 = _model(7)
        objs = {"model": m2, "optimizer": torch.optim.Adam(m2.parameters())}
        s3.proxy.reset()
        safeckpt.load(url, {k: objs[k] for k in names}, storage_options=s3.options(counted=True))
        assert s3.proxy.down < 1.1 * size + HTTP_SLACK, (names, s3.proxy.down, size)
        assert_bits_equal(dict(m2.state_dict()), dict(model.state_dict()))
        assert_bits_equal(objs["optimizer"].state_dict()["state"], opt.state_dict()["state"])
