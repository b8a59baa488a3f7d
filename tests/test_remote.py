"""Checkpoints at s3:// URLs, against moto's real S3-compatible server (tests/remote_server.py):
round trips through the API, all-or-nothing uploads, reads that cost what they read, and errors
that name the URL."""

from __future__ import annotations

import torch
from torch import nn

import safeckpt
from conformance import assert_bits_equal
from remote_server import S3

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
