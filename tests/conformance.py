"""The conformance suite every format module mixes in.

A format's test file subclasses `FormatConformance`, names the format and says how to produce a
file of it from a state dict (with the real producer where one exists):

    class TestSafetensorsConformance(FormatConformance):
        NAME = "safetensors"

        def make(self, directory, state_dict):
            path = directory / "m.safetensors"
            safetensors.torch.save_file(state_dict, path)
            return path

It then checks, on real bytes: sniffing (positive and negative), a bit-exact round trip against
what was saved, strict and partial ``load_raw``, and that a copy truncated at every header
boundary and at random points fails with `CorruptCheckpointError` (or `UnknownFormatError` when
the magic itself is gone): never another exception, a hang, or a large allocation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import psutil
import pytest
import torch

import safeckpt
from safeckpt import formats
from safeckpt.errors import CorruptCheckpointError, UnknownFormatError


class Net(torch.nn.Module):
    """A small model with a tied weight, a buffer and a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.l1 = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.head = torch.nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.l1(self.emb(x))))


class MLP(torch.nn.Module):
    """The model of fixtures/torch/friend.pt and its twins (see fixtures/torch/make_fixtures.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(8, 16)
        self.l2 = torch.nn.Linear(16, 4)


def sample_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in Net().state_dict().items()}


def assert_bits_equal(a: Any, b: Any, where: str = "root", *, strict: bool = False) -> None:
    """Equal by type, keys and bits (tensors compared as raw bytes, so nan and -0.0 count).

    With ``strict``, also each tensor's class (a Parameter stays a Parameter), ``requires_grad`` and
    device, and each dict's ``_metadata`` (what ``load_state_dict`` reads from an OrderedDict).
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b)} is not a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        )
        if strict:
            assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
            assert a.requires_grad == b.requires_grad and a.device == b.device, where
        assert tensor_bytes(a) == tensor_bytes(b), f"{where}: tensor bytes differ"
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        if strict:
            assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{where}: _metadata differs"
        for k in a:
            assert_bits_equal(a[k], b[k], f"{where}[{k!r}]", strict=strict)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bits_equal(x, y, f"{where}[{i}]", strict=strict)
    elif isinstance(a, argparse.Namespace):
        assert_bits_equal(vars(a), vars(b), where, strict=strict)
    elif isinstance(a, (np.ndarray, np.generic)):  # by bytes, so nan and -0.0 count here too
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, float) and a != a:
        assert b != b, f"{where}: nan became {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's values in C order (conjugation and negation applied), on the CPU."""
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so nan and -0.0 count), wherever each tensor lives."""
    a, b = a.detach().cpu(), b.detach().cpu()
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def sorted_dict(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its keys in sorted order (for comparing key order-insensitively, values in order)."""
    return {k: d[k] for k in sorted(d)}


def truncated_copies(path: Path, cut_points: list[int], dest: Path) -> list[tuple[str, Path]]:
    """Copies of ``path`` (a file, or one file of a directory at a time) cut at each point."""
    out = []
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        size = f.stat().st_size
        for cut in sorted({c for c in cut_points if 0 <= c < size}):
            target = dest / f"cut{len(out)}"
            if path.is_file():
                target.write_bytes(f.read_bytes()[:cut])
            else:
                shutil.copytree(path, target)
                (target / f.relative_to(path)).write_bytes(f.read_bytes()[:cut])
            out.append((f"{f.name}@{cut}", target))
    return out


class FormatConformance:
    NAME: ClassVar[str]
    RANDOM_CUTS: ClassVar[int] = 12

    def make(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> Path:
        """Write ``state_dict`` into ``directory`` in this format; return the file or directory."""
        raise NotImplementedError

    def boundaries(self, path: Path) -> list[int]:
        """Offsets where this format's headers end (the truncation test cuts there, and at ±1)."""
        return [0, 1, 4, 8]

    def expected(self, state_dict: dict[str, torch.Tensor]) -> Any:
        """What reading the file back must give (by default, the state dict itself)."""
        return state_dict

    # -- the suite --------------------------------------------------------------------------------
    @pytest.fixture
    def made(self, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
        sd = sample_state_dict()
        return self.make(tmp_path, sd), sd

    def test_sniff_positive(self, made: tuple[Path, Any]) -> None:
        path, _ = made
        assert formats.detect(path).NAME == self.NAME

    def test_sniff_negative(self, tmp_path: Path) -> None:
        module = formats.get(self.NAME)
        junk = tmp_path / "junk.bin"
        for content in (b"", b"hello world\n", os.urandom(64), b"\x00" * 4096, b"PK\x05\x06" + b"\x00" * 18):
            junk.write_bytes(content)
            assert not module.sniff(content[: formats.HEAD_BYTES], junk), content[:16]
        empty_dir = tmp_path / "empty"
        empty_dir.mkdir()
        assert not module.sniff(b"", empty_dir)

    def test_round_trip(self, made: tuple[Path, Any]) -> None:
        path, sd = made
        ckpt = safeckpt.open(path)
        assert ckpt.format == self.NAME
        assert_bits_equal(dict(self.expected(sd)), dict(ckpt.to_python()))

    def test_load_raw_strict_and_partial(self, made: tuple[Path, Any], tmp_path: Path) -> None:
        path, sd = made
        model = Net()
        safeckpt.load_raw(path, model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), k

        class Bigger(Net):
            def __init__(self) -> None:
                super().__init__()
                self.extra = torch.nn.Linear(2, 2)

        bigger = Bigger()
        before = {k: v.clone() for k, v in bigger.state_dict().items()}
        with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "extra.weight"'):
            safeckpt.load_raw(path, bigger)
        for k, v in bigger.state_dict().items():  # a failed strict load changes nothing
            assert torch.equal(v, before[k]), k
        safeckpt.load_raw(path, bigger, strict=False)
        assert torch.equal(bigger.l1.weight, sd["l1.weight"])
        assert torch.equal(bigger.extra.weight, before["extra.weight"])

    def test_truncated(self, made: tuple[Path, Any], tmp_path: Path) -> None:
        path, _ = made
        rng = random.Random(0)
        size = path.stat().st_size if path.is_file() else max(p.stat().st_size for p in path.rglob("*") if p.is_file())
        cuts = [c + d for c in self.boundaries(path) for d in (-1, 0, 1)]
        cuts += [rng.randrange(size) for _ in range(self.RANDOM_CUTS)]
        dest = tmp_path / "cuts"
        dest.mkdir()
        rss = psutil.Process().memory_info().rss
        for label, copy in truncated_copies(path, cuts, dest):
            try:
                ckpt = safeckpt.open(copy)
                ckpt.to_python()
            except (CorruptCheckpointError, UnknownFormatError):
                pass
            except Exception as e:  # pragma: no cover - the failure message is the point
                pytest.fail(f"{label}: {type(e).__name__}: {e}")
            else:
                if path.is_file():
                    pytest.fail(f"{label}: a truncated file opened and read without error")
            grown = psutil.Process().memory_info().rss - rss
            assert grown < 256 << 20, f"{label}: reading a truncated file grew RSS by {grown >> 20} MiB"


def leave_process_group() -> None:
    """End a test rank's process group together with its peers: a barrier first, so no rank tears
    its gloo connections down while another is still using them (gloo then calls std::terminate in
    the slower rank: SIGABRT after the test's work is done, seen on a loaded 2-core machine)."""
    import torch.distributed as dist

    with contextlib.suppress(RuntimeError):  # a peer already failed: its error is what the test reports
        dist.barrier()
    dist.destroy_process_group()


# A prelude that makes `import torch` fail: the torch-free paths (headers, inspect, verify,
# convert to safetensors) are checked by running them in a process that cannot import it.
_NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: this path must not import torch")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(code: str, *args: str, cwd: Path | None = None, timeout: float = 120) -> Any:
    """Run ``code`` in a fresh interpreter where importing torch raises ImportError; the
    completed process (``returncode``, ``stdout``, ``stderr``). ``args`` become ``sys.argv[1:]``.

    Example:
        >>> p = run_without_torch("from safeckpt.cli import main; main(['inspect', 'm.safetensors'])")
        >>> p.returncode
        0
    """
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH + code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
