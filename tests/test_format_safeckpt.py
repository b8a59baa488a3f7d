"""The native single-file format: conformance, stock safetensors compatibility, integrity."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import safeckpt
from conformance import FormatConformance, Net, assert_bits_equal, sample_state_dict
from safeckpt.errors import CorruptCheckpointError
from safeckpt.formats import _safetensors as st
from safeckpt.formats import safeckpt as native


class TestSafeckptConformance(FormatConformance):
    NAME = "safeckpt"

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        return safeckpt.save(directory / "m.safeckpt", state_dict)

    def boundaries(self, path: Path) -> list[int]:
        header = st.read_header(path)
        return [0, 8, header.data_start, *(e.begin for e in header.entries.values()), header.size - 1]


def test_stock_safetensors_reads_every_tensor(tmp_path: Path) -> None:
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    path = safeckpt.save(tmp_path / "run.safeckpt", {"model": model, "optimizer": opt, "step": 1})
    with safe_open(path, "pt") as f:
        names = set(f.keys())
        assert "model/l1.weight" in names and "optimizer/state/0/exp_avg" in names
        assert torch.equal(f.get_tensor("model/l1.weight"), model.l1.weight)
        assert torch.equal(f.get_tensor("optimizer/state/2/exp_avg_sq"), opt.state_dict()["state"][2]["exp_avg_sq"])
        assert f.metadata()["safeckpt.version"] == "1"


def test_data_is_aligned_and_header_padded(tmp_path: Path) -> None:
    path = safeckpt.save(
        tmp_path / "a.safeckpt", {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5, dtype=torch.float64)}
    )
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 64 == 0
    header = st.read_header(path)
    for e in header.entries.values():
        assert e.begin % e.dtype.itemsize == 0


def test_verify_detects_flipped_bit(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "a.safeckpt", sample_state_dict())
    assert native.verify(path) == []
    header = st.read_header(path)
    entry = header.entries["l1.weight"]
    data = bytearray(path.read_bytes())
    data[entry.begin] ^= 0x01
    path.write_bytes(bytes(data))
    problems = native.verify(path)
    assert len(problems) == 1 and "l1.weight" in problems[0]
    with pytest.raises(CorruptCheckpointError, match="l1.weight"):
        safeckpt.load(path, verify=True)


def test_skeleton_references_missing_tensor(tmp_path: Path) -> None:
    path = safeckpt.save(tmp_path / "a.safeckpt", {"w": torch.ones(2)})
    header = st.read_header(path)
    meta = dict(header.metadata)
    import base64

    from safeckpt import codec

    meta["safeckpt.skeleton"] = base64.b64encode(
        codec.encode({"w": torch.ones(2), "v": torch.zeros(1)}, lambda p, t: [p[-1], 0])
    ).decode()
    st.write(tmp_path / "b.safeckpt", [st.Item("w", torch.float32, (2,), lambda: torch.ones(2))], meta)
    with pytest.raises(CorruptCheckpointError, match="'v'"):
        safeckpt.open(tmp_path / "b.safeckpt")


def test_round_trip_full_state(tmp_path: Path) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.tensor([0, 3])).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 5}
    path = safeckpt.save(tmp_path / "x.safeckpt", state)
    assert_bits_equal(state, safeckpt.load(path))


def test_walking_printing_and_sizing_read_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net()
    path = safeckpt.save(tmp_path / "c.safeckpt", {"model": model, "step": 3})

    def no_data(self: object) -> None:
        raise AssertionError("tensor data was read")

    from safeckpt import _fs

    monkeypatch.setattr(_fs.MappedFile, "map", property(no_data))
    ckpt = safeckpt.open(path)
    assert "model" in str(ckpt) and "l1.weight" in str(ckpt)
    assert ckpt.nbytes == sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert ckpt["step"] == 3 and ckpt.tensors()["model/l1.weight"].shape == (3, 4)
    with pytest.raises(AssertionError, match="tensor data was read"):
        ckpt.tensors()["model/l1.weight"].load()


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def test_load_into_a_module_copies_from_the_map_without_a_second_copy(tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)])  # ~100 MB
    path = safeckpt.save(tmp_path / "big.safeckpt", {"model": model})
    target = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)])
    size = sum(p.numel() * 4 for p in model.parameters())
    before = _rss_anon()
    safeckpt.load(path, {"model": target})
    grown = _rss_anon() - before
    assert grown < size // 10, f"anonymous memory grew by {grown >> 20} MiB loading a {size >> 20} MiB model"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), target.parameters(), strict=True))


def test_module_loads_read_straight_into_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safeckpt import state

    model = Net()
    path = safeckpt.save(tmp_path / "w.safetensors", model.state_dict())
    reads: list[str] = []
    real = state.read_all
    monkeypatch.setattr(state, "read_all", lambda pairs: reads.extend(ref.name for ref, _ in pairs) or real(pairs))
    target = Net()
    safeckpt.load_raw(path, target)
    assert sorted(reads) == sorted(model.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), target.state_dict().values(), strict=True)
    )

    seen: list[str] = []
    hooked = Net()
    hooked.l1._register_load_state_dict_pre_hook(lambda sd, prefix, *a: seen.append(prefix))
    reads.clear()
    safeckpt.load_raw(path, hooked)  # a hook may look at or change the incoming tensors: they go through it
    assert reads == [] and seen == ["l1."]
    assert torch.equal(hooked.l1.weight, model.l1.weight)


def test_sizes_count_every_tensor_even_where_two_paths_give_one_name(tmp_path: Path) -> None:
    """``tensors()`` names tensors by path, so ``"a/b"`` and ``["a"]["b"]`` share a name there;
    ``nbytes`` and ``numel`` count both (the second gets ``~1`` in the file)."""
    path = tmp_path / "names.safeckpt"
    safeckpt.save(path, {"a/b": torch.ones(4), "a": {"b": torch.ones(2)}})
    ckpt = safeckpt.open(path)
    assert len(ckpt.tensors()) == 1 and ckpt.nbytes == 24 and ckpt.numel == 6
