"""Conversions copy a tensor's bytes file to file when they lie in the source as they are
(``copy_file_range``), reuse the source's recorded CRC-32, and fall back to reading otherwise."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import safeckpt
from conformance import assert_bits_equal
from safeckpt.formats import safeckpt as native


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    return {
        "w": w,
        "t": w.t(),
        "tied": w,
        "b": torch.arange(7, dtype=torch.int16),
        "z": torch.randn(3, dtype=torch.complex128),
    }


def copied(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, offset_src: int | None = None, *a: object) -> int:
        calls.append(count)
        return real(src, dst, count, offset_src, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "copy_file_range", spy)
    return calls


def test_native_to_native_is_a_byte_identical_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = safeckpt.save(tmp_path / "a.safeckpt", {"model": state(), "step": 3})
    calls = copied(monkeypatch)
    dst = safeckpt.convert(src, tmp_path / "b.safeckpt")
    assert calls and src.read_bytes() == dst.read_bytes()


def test_torch_zip_to_native_reuses_the_record_crc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = state()
    torch.save(sd, tmp_path / "a.pt")
    calls = copied(monkeypatch)
    dst = safeckpt.convert(tmp_path / "a.pt", tmp_path / "a.safeckpt")
    assert len(calls) >= 2  # w (and its tie) and b are whole storages; t is a transposed view, read instead
    assert native.verify(dst) == []
    assert_bits_equal({k: v.contiguous() for k, v in sd.items()}, dict(safeckpt.load(dst)))


def test_falls_back_to_reading_where_the_kernel_cannot_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = safeckpt.save(tmp_path / "a.safeckpt", state())

    def cannot(*_: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", cannot)
    dst = safeckpt.convert(src, tmp_path / "b.safeckpt")
    assert src.read_bytes() == dst.read_bytes() and native.verify(dst) == []


def test_a_damaged_source_is_caught_by_verify_not_hidden(tmp_path: Path) -> None:
    src = safeckpt.save(tmp_path / "a.safeckpt", {"w": torch.ones(1024)})
    data = bytearray(src.read_bytes())
    data[-5] ^= 0xFF  # inside w's bytes; the recorded CRC no longer matches
    src.write_bytes(bytes(data))
    with pytest.raises(safeckpt.CorruptCheckpointError, match="nothing was written"):
        safeckpt.convert(src, tmp_path / "b.safeckpt")  # by default the source's checksums are checked first
    dst = safeckpt.convert(src, tmp_path / "b.safeckpt", verify=False)
    assert any("'w' fails its checksum" in p for p in native.verify(dst))  # copied with its recorded CRC


def test_a_source_changed_after_open_is_refused(tmp_path: Path) -> None:
    src = safeckpt.save(tmp_path / "a.safeckpt", state())
    ckpt = safeckpt.open(src)
    os.utime(src, ns=(1, 1))
    with pytest.raises(safeckpt.CorruptCheckpointError, match="changed after it was opened"):
        native.write(ckpt, tmp_path / "b.safeckpt")
    assert not (tmp_path / "b.safeckpt").exists()


@pytest.mark.parametrize("pad", [16, 3])
def test_copied_bytes_keep_their_place_in_a_page(tmp_path: Path, pad: int) -> None:
    """The new header is padded so the data copied from another writer's file keeps its offset
    within a 4 KiB page (which the kernel copies page to page), where that offset is a multiple of
    8; otherwise the data starts on the usual 64-byte boundary. Either way the tensors load back
    bit for bit."""
    import json
    import struct

    from safeckpt.formats import _safetensors as st

    tensors = {f"w{i}": torch.randn(64, 64) for i in range(4)}
    blobs = [tensors[k].numpy().tobytes() for k in sorted(tensors)]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for k, b in zip(sorted(tensors), blobs, strict=True):
        header[k] = {"dtype": "F32", "shape": [64, 64], "data_offsets": [pos, pos + len(b)]}
        pos += len(b)
    text = json.dumps(header).encode()
    text += b" " * ((pad - 8 - len(text)) % 64)  # data starting at `pad` mod 64, as some writers leave it
    src = tmp_path / "other.safetensors"
    src.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    out = tmp_path / "copy.safeckpt"
    safeckpt.convert(src, out)
    start_in, start_out = st.read_header(src).data_start, st.read_header(out).data_start
    assert start_in % 64 == pad
    if pad % 8 == 0:
        assert start_out % 4096 == start_in % 4096 and start_out % 8 == 0
    else:
        assert start_out % 64 == 0
    back = safeckpt.open(out).to_python()
    for k, t in tensors.items():
        assert_bits_equal(back[k], t)
