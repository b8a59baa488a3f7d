"""The torch-free read path (issue 19): headers, ``inspect``, ``verify``, ``diff`` and ``convert``
between safetensors-based checkpoints run in a process that cannot import torch; torch is imported
only when a tensor is materialized. What the torch-free process wrote is then checked here, with
torch, bit for bit against the source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import safeckpt
from conformance import run_without_torch


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 4))
    m[2].to(torch.bfloat16)
    m.register_buffer("steps", torch.arange(5, dtype=torch.int64))
    return m


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint of each safetensors-based format, written with torch."""
    root = tmp_path_factory.mktemp("torch_free")
    m = _model()
    opt = torch.optim.Adam(m[0].parameters())
    m[0](torch.randn(2, 8)).sum().backward()
    opt.step()
    plain = root / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, plain, {"format": "pt"})
    state = {"model": m, "optimizer": opt, "step": 7, "betas": (0.9, 0.999), "name": "run"}
    return {
        "safetensors": plain,
        "safeckpt": safeckpt.save(root / "run.safeckpt", state),
        "safeckpt-sharded": safeckpt.save(root / "sharded", state, max_shard_size=200),
        "hf-sharded": safeckpt.save(root / "hf", m, format="hf-sharded", max_shard_size=200),
    }


FORMATS = ["safetensors", "safeckpt", "safeckpt-sharded", "hf-sharded"]


def _no_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    p = run_without_torch(code, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    return p  # type: ignore[no-any-return]


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_describes_every_tensor_without_torch(fmt: str, sources: dict[str, Path]) -> None:
    path = sources[fmt]
    p = _no_torch(
        "import json, sys, safeckpt\n"
        "c = safeckpt.open(sys.argv[1])\n"
        "rows = {n: [r.dtype_info.name, list(r.shape), r.nbytes, repr(r)] for n, r in c.tensors().items()}\n"
        "text = str(c)\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps([c.format, rows, c.nbytes, text]))\n",
        str(path),
    )
    form, rows, nbytes, text = json.loads(p.stdout)
    ckpt = safeckpt.open(path)  # with torch: the same description, and torch's dtypes when asked
    assert form == fmt == ckpt.format and nbytes == ckpt.nbytes
    expected = {
        n: [str(r.dtype).removeprefix("torch."), list(r.shape), r.nbytes, repr(r)] for n, r in ckpt.tensors().items()
    }
    assert rows == expected and text == str(ckpt)
    assert {type(r.dtype) for r in ckpt.tensors().values()} == {torch.dtype}
    for name, ref in ckpt.tensors().items():
        assert ref.load().dtype is ref.dtype, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_inspect_verify_diff_run_without_torch(fmt: str, sources: dict[str, Path]) -> None:
    path = str(sources[fmt])
    cli = "import sys\nfrom safeckpt.cli import main\ncode = main(sys.argv[1:])\nassert 'torch' not in sys.modules\nsys.exit(code)\n"
    inspected = _no_torch(cli, "inspect", path, "--json")
    assert json.loads(inspected.stdout)["format"] == fmt
    verified = run_without_torch(cli, "verify", path)
    # a stock safetensors file records no checksum: "not verified" (3), never a crash; ours: ok (0)
    assert verified.returncode == (3 if fmt == "safetensors" else 0), verified.stderr[-3000:]
    assert "tensors" in verified.stdout
    same = _no_torch(cli, "diff", path, path)
    assert "identical" in same.stdout


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("suffix", [".safetensors", ".safeckpt"])
def test_convert_between_safetensors_formats_without_torch(
    fmt: str, suffix: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    src = sources[fmt]
    dst = tmp_path / f"out{suffix}"
    code = "import sys\nfrom safeckpt.cli import main\ncode = main(sys.argv[1:])\nassert 'torch' not in sys.modules\nsys.exit(code)\n"
    _no_torch(code, "convert", str(src), str(dst))  # verified by reading it back, still without torch
    a, b = safeckpt.open(src), safeckpt.open(dst)
    assert b.format == (
        "safetensors" if suffix == ".safetensors" and fmt in ("safetensors", "hf-sharded") else "safeckpt"
    )
    ta, tb = a.tensors(), b.tensors()
    if b.format == "safetensors":
        assert sorted(ta) == sorted(tb)
    flat = {n.replace("/", "."): r for n, r in tb.items()}
    for name, ref in ta.items():
        other = tb.get(name) or flat[name.replace("/", ".")]
        x, y = ref.load(), other.load()
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
    assert safeckpt.formats.get(b.format).verify(dst) == []  # fresh checksums over the copied bytes


def test_torch_typed_values_import_torch_only_when_present(tmp_path: Path) -> None:
    """A skeleton value of torch's own type (a dtype, a Size) is decoded by importing torch; a file
    without one is opened with torch never imported (no blocking: the import is just not made)."""
    plain = safeckpt.save(tmp_path / "plain.safeckpt", {"w": torch.ones(2), "step": 1})
    typed = safeckpt.save(tmp_path / "typed.safeckpt", {"w": torch.ones(2), "dtype": torch.float16})
    code = (
        "import sys, safeckpt\n"
        "c = safeckpt.open(sys.argv[1])\n"
        "print('torch' in sys.modules, c.tensors()['w'].dtype_info.name)\n"
    )
    for path, imported in ((plain, "False"), (typed, "True")):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [imported, "float32"]
    assert safeckpt.open(typed)["dtype"] is torch.float16


def test_a_safetensors_file_does_not_import_the_pickle_reader(sources: dict[str, Path]) -> None:
    p = _no_torch(
        "import sys, safeckpt\n"
        "safeckpt.open(sys.argv[1]).tensors()\n"
        "print(sorted(m for m in sys.modules if m.startswith('safeckpt.formats.')))\n",
        str(sources["safetensors"]),
    )
    assert "torch_pickle" not in p.stdout and "_pickle" not in p.stdout


def test_header_checks_still_refuse_bad_files_without_torch(sources: dict[str, Path], tmp_path: Path) -> None:
    """The fast header pass accepts only plainly valid headers: a duplicate key (here written by
    hand) still gets the precise message, in the torch-free process too."""
    bad = tmp_path / "dup.safetensors"
    header = (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    )
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    p = run_without_torch("import sys, safeckpt\nsafeckpt.open(sys.argv[1])\n", str(bad))
    assert p.returncode != 0 and "duplicate key 'a'" in p.stderr and "torch is blocked" not in p.stderr


def test_progress_counts_tensors_copied_file_to_file(sources: dict[str, Path], tmp_path: Path) -> None:
    """A progress callback (the command's bars) no longer turns copies into reads through torch:
    the copied tensors are counted when the write is done."""
    p = _no_torch(
        "import sys, safeckpt\n"
        "seen = []\n"
        "safeckpt.convert(sys.argv[1], sys.argv[2], progress=seen.append, verify=False)\n"
        "assert 'torch' not in sys.modules\n"
        "print(sum(seen), safeckpt.open(sys.argv[1]).nbytes)\n",
        str(sources["safeckpt"]),
        str(tmp_path / "out.safeckpt"),
    )
    counted, total = p.stdout.split()
    assert counted == total


@pytest.mark.parametrize("name", ["friend.pt", "friend_legacy.pt", "optimizer.pt"])
def test_a_pt_is_inspected_verified_and_converted_without_torch(name: str, tmp_path: Path) -> None:
    """A ``.pt`` from torch.save (zip and legacy): listed, verified (its storages' bytes in place,
    the zip's CRCs) and converted to safetensors by a process that cannot import torch; the copy
    is then compared, with torch, bit for bit against what torch.load gives."""
    src = Path(__file__).parent.parent / "fixtures" / "torch" / name
    cli = "import sys\nfrom safeckpt.cli import main\ncode = main(sys.argv[1:])\nassert 'torch' not in sys.modules\nsys.exit(code)\n"
    assert json.loads(_no_torch(cli, "inspect", str(src), "--json").stdout)["format"] == "torch"
    verified = run_without_torch(cli, "verify", str(src))
    # a zip has CRCs to check (ok: 0); a legacy file has none (not verified: 3); never a crash
    assert verified.returncode == (3 if "legacy" in name else 0), verified.stdout + verified.stderr[-3000:]
    dst = tmp_path / "out.safetensors"
    _no_torch(cli, "convert", str(src), str(dst))
    expected = dict(safeckpt.tree.iter_leaves(torch.load(src, weights_only=True)))  # our fixture, made by torch.save
    expected = {safeckpt.tree.path_name(p): t for p, t in expected.items() if isinstance(t, torch.Tensor)}
    out = safetensors.torch.load_file(dst)
    assert sorted(out) == sorted(expected) and out
    for key, t in out.items():
        ref = expected[key].contiguous()
        assert t.dtype == ref.dtype and t.shape == ref.shape, key
        assert torch.equal(t.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), key
