"""The format registry as a public plug-in point: typed `Format` records, `register_format`, a
read-only view, and write options that are checked instead of dropped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import npz_format
import safeckpt
from safeckpt import cli, formats
from safeckpt.formats import Format

SD = {"l1.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "l1.bias": torch.tensor([1.5, -2.0])}


@pytest.fixture
def npz() -> Iterator[Format]:
    npz_format.register()
    try:
        yield npz_format.FORMAT
    finally:
        formats.unregister_format("npz")


@pytest.mark.parametrize("fmt", ["safetensors", "safeckpt", "torch"])
def test_single_file_formats_refuse_max_shard_size(tmp_path: Path, fmt: str) -> None:
    """The bug: ``format="safetensors", max_shard_size=100`` used to write one file and say nothing."""
    target = tmp_path / "out"
    with pytest.raises(TypeError, match=rf"format '{fmt}' does not take the option max_shard_size"):
        safeckpt.save(target, SD, format=fmt, max_shard_size=100)
    assert not target.exists()
    src = tmp_path / "src.safetensors"
    save_file(SD, src)
    with pytest.raises(TypeError, match="max_shard_size"):
        safeckpt.convert(src, tmp_path / "out2", format=fmt, max_shard_size=100)
    assert not (tmp_path / "out2").exists()


def test_sharded_formats_take_max_shard_size(tmp_path: Path) -> None:
    for fmt in ("safeckpt-sharded", "hf-sharded"):
        out = safeckpt.save(tmp_path / fmt, SD, format=fmt, max_shard_size=16)
        assert safeckpt.open(out).format == fmt
        assert len(list(Path(out).glob("*.safetensors"))) > 1  # 32 bytes of tensors at 16 bytes a shard


def test_read_only_format_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format 'dcp' can be read but not written; writable formats: safeckpt"):
        safeckpt.save(tmp_path / "x", SD, format="dcp")


def test_registry_is_a_read_only_typed_view() -> None:
    assert list(formats.registry) == formats.names()
    assert all(isinstance(formats.registry[n], Format) for n in formats.registry)
    assert formats.registry["safetensors"].write_options == frozenset()
    assert formats.registry["safeckpt-sharded"].write_options == {"max_shard_size"}
    assert formats.registry["dcp"].write is None
    with pytest.raises(TypeError):
        formats.registry["x"] = formats.registry["safeckpt"]  # type: ignore[index]
    with pytest.raises(ValueError, match="already registered"):
        safeckpt.register_format(formats.get("safeckpt"))
    with pytest.raises(ValueError, match="built-in"):
        formats.unregister_format("torch")


def test_an_outside_format_round_trips_through_open_convert_and_the_cli(
    npz: Format, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert formats.names().index("npz") < formats.names().index("torch")  # sniffed before the pickle catch-all
    src = tmp_path / "w.safetensors"
    save_file(SD, src)

    out = safeckpt.convert(src, tmp_path / "w.npz", verify=True)  # the plugin's extension picks it
    with np.load(out, allow_pickle=False) as z:  # the real consumer of the format reads what we wrote
        assert sorted(z.files) == sorted(SD)
        for k, v in SD.items():
            assert np.array_equal(z[k], v.numpy())
    ckpt = safeckpt.open(out)
    assert ckpt.format == "npz"
    assert {k: (r.dtype, r.shape) for k, r in ckpt.tensors().items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in SD.items()
    }
    model = torch.nn.Module()
    model.l1 = torch.nn.Linear(3, 2)
    safeckpt.load_raw(out, model)
    assert torch.equal(model.l1.weight, SD["l1.weight"]) and torch.equal(model.l1.bias, SD["l1.bias"])

    back = safeckpt.convert(out, tmp_path / "back.safetensors", verify=True)
    loaded = safeckpt.load(back)
    assert loaded.keys() == SD.keys() and all(torch.equal(loaded[k], SD[k]) for k in SD)

    assert cli.main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "npz"
    assert cli.main(["verify", str(out), "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["format"] == "npz" and verified["checksums"] == {"header": "ok", "data": "ok"}
    assert cli.main(["convert", str(out), str(tmp_path / "cli.safeckpt")]) == 0
    assert torch.equal(safeckpt.load(tmp_path / "cli.safeckpt")["l1.weight"], SD["l1.weight"])

    data = bytearray(Path(out).read_bytes())  # a flipped bit in the first array: the format's own verify finds it
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    data[start + 128 + 4] ^= 1  # past the 128-byte .npy header, inside l1.weight
    Path(out).write_bytes(bytes(data))
    assert cli.main(["verify", str(out), "--json"]) == 1
    assert "damaged" in capsys.readouterr().out


def test_outside_format_options_are_checked(npz: Format, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="format 'npz' does not take the option max_shard_size"):
        safeckpt.save(tmp_path / "w.npz", SD, format="npz", max_shard_size=10)


def test_a_sniffer_that_cannot_look_does_not_abort_detection(tmp_path: Path) -> None:
    def broken(head: bytes, path: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    fmt = Format("broken", (), "file", sniff=broken, read=npz_format.read)
    safeckpt.register_format(fmt)
    try:
        save_file(SD, tmp_path / "w.safetensors")
        assert formats.detect(tmp_path / "w.safetensors").name == "safetensors"
    finally:
        formats.unregister_format("broken")
