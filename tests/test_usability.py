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


# -- 5. one naming rule for Python and the command ---------------------------------------------------


@pytest.mark.parametrize("name", ["x.pt", "x.pth", "x.bin", "out.xyz"])
def test_a_name_that_would_misname_the_format_is_refused(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {"w": torch.ones(2), "step": 1}
    with pytest.raises(ValueError) as info:
        safeckpt.save(tmp_path / name, state)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: the {Path(name).suffix} extension")
    assert 'format="torch"' in message and 'format="safeckpt"' in message
    assert list(tmp_path.iterdir()) == []
    src = safeckpt.save(tmp_path / "src.safeckpt", state)
    with pytest.raises(ValueError, match='format="torch"'):
        safeckpt.convert(src, tmp_path / name)
    code, _, err = main(capsys, "convert", src, tmp_path / name)
    assert code == 2 and "--format torch" in err and "--format safeckpt" in err and not (tmp_path / name).exists()
    # asked for by name, both are written: an export torch.load reads, or the native format
    safeckpt.save(tmp_path / name, state, format="safeckpt")
    assert safeckpt.open(tmp_path / name).format == "safeckpt"
    if name != "out.xyz":
        safeckpt.save(tmp_path / ("t" + name), state, format="torch")
        assert torch.load(tmp_path / ("t" + name), weights_only=True)["step"] == 1  # our own export


@pytest.mark.parametrize("name", ["last.ckpt", "run.safeckpt", "step-100", "w.safetensors"])
def test_native_names_need_no_format(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = safeckpt.save(tmp_path / name, {"w": torch.ones(2)})
    assert safeckpt.open(written).format == ("safetensors" if name.endswith(".safetensors") else "safeckpt")
    code, out, err = main(capsys, "convert", written, tmp_path / ("c-" + name))
    assert code == 0, err


# -- 3. global flags before or after the verb --------------------------------------------------------


def test_quiet_and_debug_work_before_and_after_the_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = safeckpt.save(tmp_path / "run.safeckpt", {"w": torch.ones(2)})
    loud = main(capsys, "verify", path)
    assert loud[0] == 0 and loud[1]
    for args in (["-q", "verify", path], ["verify", "-q", path], ["--quiet", "verify", path], ["verify", path, "-q"]):
        assert main(capsys, *args) == (0, "", ""), args
    missing = tmp_path / "absent.safeckpt"
    for args in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        code, _, err = main(capsys, *args)
        assert code == 2 and "Traceback" in err and "FileNotFoundError" in err, args
    code, _, err = main(capsys, "inspect", missing)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- 4. every --json error is one JSON object on stdout ----------------------------------------------


def test_json_errors_are_one_object_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = safeckpt.save(tmp_path / "run.safeckpt", {"w": torch.arange(8.0)})
    missing = tmp_path / "absent.safeckpt"
    cases = [
        (["inspect", missing], 2, str(missing)),
        (["verify", missing], 2, str(missing)),
        (["diff", good, missing], 2, str(missing)),
        (["convert", missing, tmp_path / "o.safeckpt"], 2, str(missing)),
        (["convert", good, good], 2, None),  # exists: --force
        (["convert", good, tmp_path / "o.pt"], 2, None),  # the naming rule
        (["inspect", good, "--depth", "0"], 2, None),  # an argument error
    ]
    for args, code, path in cases:
        plain_code, plain_out, plain_err = main(capsys, *args)
        json_code, out, err = main(capsys, *args, "--json")
        assert plain_code == json_code == code, (args, plain_err)
        assert plain_out == "" and err.strip() == plain_err.strip(), args  # stderr keeps its one line
        report = json.loads(out)  # one object, nothing else on stdout
        assert set(report) == {"error", "path", "hint", "key"} and report["error"], (args, report)
        assert report["path"] == path, (args, report)
        assert f"{report['error']}; {report['hint']}" in err or report["error"] in err, (args, report, err)
    _, out, _ = main(capsys, "inspect", missing, "--json")
    assert json.loads(out)["hint"] == "check the path"


# -- 7. --version, --help and argument errors never import torch; Ctrl-C is one line and 130 ----------

_BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported by a command that must not need it")
        return None
sys.meta_path.insert(0, _NoTorch())
"""

_SLOW_TORCH = """
import os, sys, time
class _SlowTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            open(os.environ["TORCH_IMPORT_MARK"], "w").close()  # the test sends SIGINT now
            time.sleep(30)
        return None
sys.meta_path.insert(0, _SlowTorch())
"""


def _command(tmp_path: Path, site: str, *args: Any, **kw: Any) -> Any:
    import os
    import subprocess
    import sys

    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(site)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), **kw.pop("env", {})}
    argv = [sys.executable, "-m", "safeckpt", *map(str, args)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_version_help_and_argument_errors_never_import_torch(tmp_path: Path) -> None:
    cases = [
        (["--version"], 0, f"safeckpt {safeckpt.__version__}"),
        (["--help"], 0, "exit codes"),
        (["verify", "--help"], 0, "examples:"),
        (["push", "--help"], 0, "--commit-message"),
        (["inspect"], 2, "the following arguments are required: path"),
        (["inspect", "x", "--depth", "0"], 2, "expected a positive whole number"),
        (["bogus"], 2, "invalid choice"),
        (["-q", "convert", "a", "b", "--json", "--max-shard-size"], 2, "expected one argument"),
    ]
    # reading a safetensors header needs no torch either (issue 19)
    cases.append((["inspect", str(FIXTURES / "hf" / "plain.safetensors")], 0, "float32 [0, 3]"))
    for args, code, text in cases:
        p = _command(tmp_path, _BLOCK_TORCH, *args)
        out, err = p.communicate(timeout=120)
        assert p.returncode == code, (args, err)
        assert text in out + err and "torch imported" not in err and "Traceback" not in err, (args, out, err)
    # the blocker has teeth: a file holding a torch value (here a dtype) does need torch
    p = _command(tmp_path, _BLOCK_TORCH, "inspect", _holding_a_torch_value(tmp_path))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "torch imported by a command that must not need it" in err


def _holding_a_torch_value(tmp_path: Path) -> Path:
    return safeckpt.save(tmp_path / "typed.safeckpt", {"w": torch.ones(2), "dtype": torch.float16})


def test_ctrl_c_during_the_torch_import_is_one_line_and_130(tmp_path: Path) -> None:
    import signal
    import time

    mark = tmp_path / "importing-torch"
    p = _command(
        tmp_path, _SLOW_TORCH, "inspect", _holding_a_torch_value(tmp_path), env={"TORCH_IMPORT_MARK": str(mark)}
    )
    deadline = time.monotonic() + 60
    while not mark.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mark.exists(), p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "" and err == "safeckpt inspect: interrupted\n", err


# -- 6. Python convert() and `safeckpt convert` share their defaults -----------------------------------


def test_convert_defaults_are_the_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safeckpt.formats._safetensors as st
    from safeckpt.errors import CorruptCheckpointError

    src = safeckpt.save(tmp_path / "src.safeckpt", {"w": torch.arange(8.0), "step": 2})
    dst = tmp_path / "dst.safeckpt"
    safeckpt.save(dst, {"old": torch.zeros(1)})
    before = dst.read_bytes()
    with pytest.raises(FileExistsError, match=r"dst\.safeckpt already exists; pass overwrite=True"):
        safeckpt.convert(src, dst)
    code, _, err = main(capsys, "convert", src, dst)
    assert code == 2 and "already exists; pass --force" in err
    assert dst.read_bytes() == before  # neither touched it
    assert safeckpt.convert(src, dst, overwrite=True) == dst and sorted(safeckpt.load(dst)) == ["step", "w"]
    # the read-back check is on by default: a writer that damages a tensor is caught
    original, original_span = st.tensor_bytes, st.span_bytes

    def flip(data: Any) -> memoryview:  # every byte: the bytes of several tensors may be written at once
        return memoryview(bytes(b ^ 0xFF for b in bytes(data)))

    monkeypatch.setattr(st, "tensor_bytes", lambda t: flip(original(t)))
    monkeypatch.setattr(st, "span_bytes", lambda span, n: flip(original_span(span, n)))
    monkeypatch.setattr(st, "copy_span", lambda *args: False)  # the kernel's file-to-file copy would bypass the fault
    count = {"progress": lambda n: None}  # as the command calls it
    with pytest.raises(CorruptCheckpointError, match="does not match"):
        safeckpt.convert(src, tmp_path / "checked.safeckpt", **count)
    safeckpt.convert(src, tmp_path / "unchecked.safeckpt", verify=False, **count)  # asked not to: written as is
    code, _, err = main(capsys, "convert", src, tmp_path / "cli.safeckpt")
    assert code == 1 and "does not match" in err


def test_convert_refuses_a_source_that_fails_its_checksums(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safeckpt.errors import CorruptCheckpointError

    good = safeckpt.save(tmp_path / "run.safeckpt", {"w": torch.arange(8.0)})
    damaged = flip_last_byte(good, tmp_path / "damaged.safeckpt")
    with pytest.raises(CorruptCheckpointError, match="fails its checksum.*nothing was written"):
        safeckpt.convert(damaged, tmp_path / "copy.safeckpt")
    code, out, err = main(capsys, "convert", damaged, tmp_path / "copy.safeckpt", "--json")
    assert code == 1 and "nothing was written" in json.loads(out)["hint"] and "fails its checksum" in err
    assert not (tmp_path / "copy.safeckpt").exists()
    # asked not to check, it converts what is there (as before)
    safeckpt.convert(damaged, tmp_path / "copy.safeckpt", verify=False)


def test_sharded_convert_into_a_directory_of_other_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = safeckpt.save(tmp_path / "src.safeckpt", {"a": torch.arange(64.0), "b": torch.arange(64.0) + 1})
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    code, _, err = main(capsys, "convert", src, notes, "--max-shard-size", "300", "--force")
    assert code == 2 and "holding files that are not a checkpoint" in err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    with pytest.raises(FileExistsError, match="choose a new or empty directory"):
        safeckpt.convert(src, notes, max_shard_size=300, overwrite=True)
    # a sharded checkpoint of the same format is replaced whole: no old shard stays beside the new set
    shards = tmp_path / "shards"
    code, _, err = main(capsys, "convert", src, shards, "--max-shard-size", "300")
    assert code == 0, err
    small = safeckpt.save(tmp_path / "small.safeckpt", {"a": torch.ones(2)})
    code, _, err = main(capsys, "convert", small, shards, "--max-shard-size", "300", "--force")
    assert code == 0, err
    assert sorted(safeckpt.load(shards)) == ["a"] and safeckpt.open(shards).format == "safeckpt-sharded"
    code, out, _ = main(capsys, "verify", shards, "--json")
    assert code == 0 and json.loads(out)["ok"]


# -- 8. the small things -------------------------------------------------------------------------------


def test_star_import_does_not_shadow_the_builtin_open() -> None:
    namespace: dict[str, Any] = {}
    exec("from safeckpt import *", namespace)
    assert "open" not in namespace and "save" in namespace and "load" in namespace
    assert callable(safeckpt.open) and safeckpt.open is not open  # still there, by its qualified name
    assert set(safeckpt.__all__) <= set(dir(safeckpt))


def test_convert_offers_only_writable_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safeckpt import formats

    # the list comes from the registry without importing the formats; the records agree with it
    assert cli._writable_names() == formats.writable() == [n for n in formats.names() if formats.get(n).write]
    assert "accelerate" not in formats.writable() and "dcp" not in formats.writable()
    code, out, _ = main(capsys, "convert", "--help")
    assert code == 0 and "dcp" not in out and ", ".join(formats.writable()) in " ".join(out.split())
    src = safeckpt.save(tmp_path / "a.safeckpt", {"w": torch.ones(2)})
    code, _, err = main(capsys, "convert", src, tmp_path / "d", "--format", "dcp")
    assert code == 2 and "invalid choice: 'dcp'" in err and not (tmp_path / "d").exists()


def test_inspect_parameters_line_follows_the_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    path = safeckpt.save(tmp_path / "run.safeckpt", {"model": model, "optimizer": opt, "step": 1})

    def parameters(*args: str) -> str:
        code, out, _ = main(capsys, "inspect", path, *args)
        assert code == 0
        return next(line for line in out.splitlines() if line.startswith("parameters:"))

    assert parameters() == "parameters: 20 in 'model' (62 elements in all tensors)"
    assert parameters("--include", "model/*") == "parameters: 20 in 'model' (20 elements in the selected tensors)"
    assert parameters("--include", "optimizer/*") == (
        "parameters: none selected (the weights are in 'model'; 42 elements in the selected tensors)"
    )


def test_convert_progress_bars_are_each_the_size_of_their_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import tqdm

    bars: list[dict[str, Any]] = []

    class Bar:
        def __init__(self, total: int, desc: str, **_: Any) -> None:
            self.record = {"desc": desc, "total": total, "done": 0}
            bars.append(self.record)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *_: Any) -> None:
            self.record["closed"] = True

        def update(self, n: int) -> None:
            self.record["done"] += n

    src = safeckpt.save(tmp_path / "a.safeckpt", {"w": torch.ones(1000), "v": torch.zeros(500)})
    size = 1500 * 4
    capsys.readouterr()
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(["convert", str(src), str(tmp_path / "b.safeckpt")]) == 0
    assert bars == [
        {"desc": "converting", "total": size, "done": size, "closed": True},
        {"desc": "verifying", "total": size, "done": size, "closed": True},
    ]


def test_a_failed_first_save_does_not_claim_a_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    existing = safeckpt.save(tmp_path / "old.safeckpt", {"w": torch.ones(2)})
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as first:
        safeckpt.save(tmp_path / "new.safeckpt", {"w": torch.ones(2)})
    assert "the disk is full" in str(first.value) and "no file was left there" in str(first.value)
    assert "previous" not in str(first.value) and not (tmp_path / "new.safeckpt").exists()
    with pytest.raises(OSError) as again:
        safeckpt.save(existing, {"w": torch.zeros(2)})
    assert "the previous file there is untouched" in str(again.value)


def test_the_wrote_line_names_the_destination_as_typed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = safeckpt.save(tmp_path / "a.safeckpt", {"w": torch.ones(2)})
    monkeypatch.chdir(tmp_path)
    cases = [
        ("b.safeckpt",),
        ("out/c.safetensors",),
        (str(tmp_path / "d.safeckpt"),),
        ("shards", "--max-shard-size", "100"),  # a sharded directory and a torch export were shown absolute
        ("e.pt", "--format", "torch"),
    ]
    for dst, *options in cases:
        code, out, err = main(capsys, "convert", src, dst, *options)
        assert code == 0 and out.startswith(f"wrote {dst} ("), (out, err)
        code, out, err = main(capsys, "convert", src, dst, *options, "--force", "--json")
        assert code == 0 and json.loads(out)["dst"] == dst, err
