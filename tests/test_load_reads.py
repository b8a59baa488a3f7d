"""``load_raw`` reads a safetensors file's bytes straight into the module's tensors (`state.read_all`):
each file opened once, and over several threads where there are cores to spare. Both ways must
leave exactly the file's bytes in every parameter."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import safeckpt
from safeckpt import state


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8, bias=False))


@pytest.mark.parametrize("cores", [1, 16])
def test_bytes_read_straight_into_the_parameters(cores: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    src = _model(0)
    safetensors.torch.save_model(src, str(path))
    monkeypatch.setattr(state, "PARALLEL_READS", 0)  # every load counts as big enough
    monkeypatch.setattr(state.os, "cpu_count", lambda: cores)
    opened: list[str] = []
    from safeckpt import _fs

    original = _fs.MappedFile.open

    def counting(self: _fs.MappedFile) -> object:
        opened.append(str(self.path))
        return original(self)

    monkeypatch.setattr(_fs.MappedFile, "open", counting)
    dst = _model(1)
    targets = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    safeckpt.load_raw(path, dst)
    assert opened == [str(path)]  # one open for every tensor of the file
    assert {k: v.data_ptr() for k, v in dst.state_dict().items()} == targets  # read in place
    for k, v in src.state_dict().items():
        assert torch.equal(v.view(torch.uint8), dst.state_dict()[k].view(torch.uint8)), k
