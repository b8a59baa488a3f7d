"""What a new user trips over (issue 17): an honest `verify`, a registered type that does not lock a
file, global flags, JSON errors, one naming rule, shared convert defaults, a fast `--version`,
Ctrl-C, the Hub verbs, packaging.

The command runs in-process through `cli.main` (stdout captured) where a subprocess proves nothing
more; real subprocesses where the process boundary is the point (imports, signals).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import safeckpt
from safeckpt import cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def main(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """`safeckpt ARGS` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def flip_last_byte(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    dst.write_bytes(bytes(data))
    return dst


# -- 1. verify says what it checked ----------------------------------------------------------------


def test_verify_does_not_call_a_file_without_checksums_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(16, dtype=torch.float32)}, plain)  # stock safetensors: no checksums
    flipped = flip_last_byte(plain, tmp_path / "flipped.safetensors")
    for path in (plain, flipped):  # the flipped bit cannot be seen: the report must not say it was checked
        code, out, _ = main(capsys, "verify", path)
        assert code == cli.EXIT_UNVERIFIED == 3, out
        assert "checks     ok" not in out and "\nok" not in out
        assert "checksums  header none, data none" in out
        assert "NOT VERIFIED" in out and "tensor data could not be verified" in out
        code, out, _ = main(capsys, "verify", path, "--json")
        report = json.loads(out)
        assert code == 3 and report["checksums"] == {"header": "none", "data": "none"}
        assert report["checks"] == "none" and report["verified"] is False
        assert report["structure"] == "ok" and report["ok"] is True  # the structure checks stay
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(plain.read_bytes()[:-4])
    code, out, _ = main(capsys, "verify", truncated, "--json")
    assert code == 1 and json.loads(out)["structure"] == "failed"


def test_verify_reports_each_region_of_a_checksummed_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", {"w": torch.arange(16.0), "step": 3})
    code, out, _ = main(capsys, "verify", path)
    assert code == 0 and "checksums  header ok, data ok" in out and out.rstrip().endswith("every checksum matches")
    damaged = flip_last_byte(path, tmp_path / "damaged.safeckpt")
    code, out, _ = main(capsys, "verify", damaged, "--json")
    report = json.loads(out)
    assert code == 1 and report["checksums"] == {"header": "ok", "data": "failed"} and report["checks"] == "failed"
    header = bytearray(path.read_bytes())
    header[20] ^= 0x01  # inside the JSON header
    (tmp_path / "header.safeckpt").write_bytes(bytes(header))
    code, out, _ = main(capsys, "verify", tmp_path / "header.safeckpt", "--json")
    assert code == 1 and json.loads(out)["checksums"]["header"] == "failed"
    # a safetensors file safeckpt wrote records checksums: verified
    weights = safeckpt.save(tmp_path / "w.safetensors", {"w": torch.ones(3)})
    code, out, _ = main(capsys, "verify", weights, "--json")
    assert code == 0 and json.loads(out)["checksums"] == {"header": "ok", "data": "ok"}


def test_verify_torch_files_by_their_zip_crcs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "friend.pt"
    torch.save({"w": torch.arange(16.0)}, path)
    code, out, _ = main(capsys, "verify", path, "--json")
    assert code == 0 and json.loads(out)["checksums"] == {"header": "ok", "data": "ok"}
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(16.0)}, legacy, _use_new_zipfile_serialization=False)
    code, out, _ = main(capsys, "verify", legacy, "--json")
    assert code == 3 and json.loads(out)["checksums"] == {"header": "none", "data": "none"}


# -- 2. a value of an unregistered type does not lock the file --------------------------------------

_CHILD = r"""
import sys, torch, safeckpt
from safeckpt.user_types import Unregistered
path, canary = sys.argv[1], sys.argv[2]
net = torch.nn.Linear(3, 2)
assert sorted(safeckpt.open(path).tensors()) == ["state_dict/bias", "state_dict/weight"]
rest = safeckpt.load(path, {"state_dict": net})
assert torch.equal(net.weight, torch.full((2, 3), 2.0)), "the module loaded"
record = rest["hyper_parameters"]["cfg"]
assert isinstance(record, Unregistered) and record.name == "evilcfg17.Config" and record.data == {"lr": 0.5, "depth": 4}
other = torch.nn.Linear(3, 2)
safeckpt.load_raw(path, other)
assert torch.equal(other.bias, torch.full((2,), 2.0)), "load_raw loaded"
assert safeckpt.load(path)["epoch"] == 1
try:
    record.lr
except AttributeError as e:
    print("ATTR:", e)
try:
    safeckpt.load(path, {"hyper_parameters": {}})
except safeckpt.UnsafeCheckpointError as e:
    print("LOAD:", e)
import os
print("IMPORTED:", "evilcfg17" in sys.modules, os.path.exists(canary))
"""


def test_an_unregistered_type_is_an_inert_record_in_a_fresh_process(tmp_path: Path) -> None:
    import dataclasses
    import subprocess
    import sys

    from safeckpt.user_types import _unregister

    canary = tmp_path / "canary"
    (tmp_path / "evilcfg17.py").write_text(f"open({str(canary)!r}, 'w').close()\nclass Config: pass\n")

    @dataclasses.dataclass
    class Config:
        lr: float = 0.1
        depth: int = 2

    safeckpt.register_type(Config, name="evilcfg17.Config")  # a name that is an importable module with a payload
    try:
        net = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(net.weight, 2.0)
        torch.nn.init.constant_(net.bias, 2.0)
        state = {"state_dict": net, "epoch": 1, "global_step": 3, "hyper_parameters": {"cfg": Config(0.5, 4)}}
        path = safeckpt.save(tmp_path / "trainer.ckpt", state)
    finally:
        _unregister("evilcfg17.Config")
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(canary)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines())
    assert "has no attribute 'lr'" in lines["ATTR"] and "safeckpt.register_type(evilcfg17.Config)" in lines["ATTR"]
    assert lines["LOAD"].startswith(f"{path}: state['hyper_parameters']['cfg'] is a value of registered type")
    assert "safeckpt.register_type(evilcfg17.Config) before loading" in lines["LOAD"]
    assert lines["IMPORTED"] == "False False" and not canary.exists()
