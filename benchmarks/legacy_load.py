"""Legacy (torch < 1.6, non-zip) files: safeckpt.load against torch.load(weights_only=True), side by side.

    python benchmarks/legacy_load.py                      # a ~17 MB synthetic legacy file
    python benchmarks/legacy_load.py path/to/legacy.pt    # any legacy file (e.g. Resemblyzer's pretrained.pt)

The synthetic file has the shape that made legacy reads slow: LSTM weights that are views of one
flattened storage, plus an optimizer's state, with every storage at an unaligned offset (legacy
files place storages wherever the pickle ends). Prints the best of N warm runs of each and the ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import safeckpt


def make(path: Path) -> None:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(40, 256, num_layers=3, batch_first=True)
    model = torch.nn.ModuleDict({"lstm": lstm, "linear": torch.nn.Linear(256, 256)})
    opt = torch.optim.Adam(model.parameters())
    lstm(torch.randn(2, 5, 40))[0].sum().backward()
    opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in lstm.parameters()])
    views, at = {}, 0
    for name, p in lstm.named_parameters():  # an old cuDNN LSTM's weights: views of one storage
        views[f"lstm.{name}"] = flat[at : at + p.numel()].view(p.shape)
        at += p.numel()
    state = {"step": 1, "model_state": {**views, "linear.weight": model["linear"].weight.detach()}}
    state["optimizer_state"] = opt.state_dict()
    from safeckpt.formats import torch_pickle

    for pad in range(8):  # legacy storages sit where the pickle ends: pad it until they are unaligned
        torch.save({"pad": "x" * pad, **state}, path, _use_new_zipfile_serialization=False)
        reader = torch_pickle._Reader(path)
        reader.read_legacy(())
        if all(s.offset % 4 for s in reader.storages.values()):
            break


def best(fn: Callable[[], object], n: int = 15) -> tuple[float, float]:
    """(best, median) of ``n`` warm runs, in seconds."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[n // 2]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp) / "legacy.pt"
        if len(sys.argv) == 1:
            make(path)
        (b_torch, m_torch) = best(lambda: torch.load(path, weights_only=True, map_location="cpu"))
        (b_ours, m_ours) = best(lambda: safeckpt.load(path))
        mb = path.stat().st_size / 1e6
        print(
            f"{path.name} ({mb:.1f} MB), best/median of 15: torch.load {b_torch * 1e3:.1f}/{m_torch * 1e3:.1f} ms, "
            f"safeckpt.load {b_ours * 1e3:.1f}/{m_ours * 1e3:.1f} ms, ratio {b_ours / b_torch:.2f}x/{m_ours / m_torch:.2f}x"
        )


if __name__ == "__main__":
    main()
