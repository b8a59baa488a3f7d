"""The ``safeckpt`` command, run as a real subprocess of the installed console script.

Every verb on native files made here and on every kind of fixture shipped under ``fixtures/``,
every exit code, ``--json`` checked against what `safeckpt.open` reports in-process, converted
files checked with stock ``safetensors`` and ``torch.load`` (our own outputs only), a malicious
pickle whose payload would create a canary file, and the error lines users see.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

import safeckpt
from conformance import assert_bits_equal
from safeckpt import cli, formats
from safeckpt.compare import leaves
from safeckpt.errors import CheckpointError, UnknownFormatError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
_NEXT_TO_PYTHON = Path(sys.executable).parent / "safeckpt"
SCRIPT = str(_NEXT_TO_PYTHON) if _NEXT_TO_PYTHON.exists() else shutil.which("safeckpt")


def run(
    *args: Any, env: dict[str, str] | None = None, cwd: Path | None = None, stderr: Any = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; never through the shell."""
    assert SCRIPT, "the safeckpt console script is not installed (pip install -e .)"
    return subprocess.run(
        [SCRIPT, *map(str, args)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd, timeout=300
    )


def run_here(capsys: pytest.CaptureFixture[str], *args: Any) -> subprocess.CompletedProcess[str]:
    """The command in this process (`cli.main`), as `run` reports it: for tests where a subprocess
    proves nothing more (the console script itself is run by the tests that need a process)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([str(a) for a in args], code, out, err)


def error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed run (and check it is one line, without a traceback)."""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


class TiedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.l1 = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight  # tied


@pytest.fixture(scope="module")
def run_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = TiedNet()
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.99))
    model.head(model.l1(model.emb(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "step": 7, "hparams": {"lr": 0.001, "layers": [4, 4, 6]}}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, run_state: dict[str, Any]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    model, opt = run_state["model"], run_state["optimizer"]
    plain = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "hparams": dict(run_state["hparams"]),
    }
    torch.save(plain, d / "run.pt")
    changed = {**plain, "step": 8, "model": {k: v.clone() for k, v in model.state_dict().items()}}
    changed["model"]["l1.bias"] = changed["model"]["l1.bias"] + 0.25
    changed["model"]["l1.weight"] = changed["model"]["l1.weight"] * (1 + 1e-7)
    changed["model"]["extra"] = torch.ones(2)
    del changed["model"]["head.weight"], changed["model"]["emb.weight"]
    changed["model"]["emb.weight"] = model.emb.weight.detach().half()
    return {
        "run": safeckpt.save(d / "run.safeckpt", run_state),
        "run_pt": d / "run.pt",
        "changed": safeckpt.save(d / "changed.safeckpt", changed),
        "dir": d,
    }


# -- help, entry points ---------------------------------------------------------------------------


def test_help_on_every_verb_has_examples() -> None:
    top = run("--help")
    assert top.returncode == 0 and "exit codes" in top.stdout
    for verb in ("inspect", "convert", "verify", "diff"):
        assert verb in top.stdout
        p = run(verb, "--help")
        assert p.returncode == 0, p.stderr
        assert "examples:" in p.stdout and f"safeckpt {verb} " in p.stdout and "--quiet" in p.stdout
    assert run("--version").stdout.strip() == f"safeckpt {safeckpt.__version__}"


def test_python_dash_m_is_the_same_command(files: dict[str, Path]) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "safeckpt", "verify", files["run"], "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ok"] is True and json.loads(p.stdout)["format"] == "safeckpt"
    bad = subprocess.run(
        [sys.executable, "-m", "safeckpt", "verify", files["dir"] / "absent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("safeckpt verify: error: ")


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_text(files: dict[str, Path]) -> None:
    p = run("inspect", files["run"])
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.splitlines()[0].startswith(f"{files['run']}  (safeckpt, ")
    assert "l1.weight:" in out and "float32 [4, 4]  64 B" in out
    assert "betas:" in out and "(0.9, 0.99)" in out  # a short tuple of scalars on one line
    assert "step:" in out and "7" in out
    assert "tied:       model/emb.weight = model/head.weight" in out
    assert "weights:    under 'model'" in out and "--key model" in out
    assert "\x1b" not in out and "\r" not in out and p.stderr == ""


def test_inspect_shortens_long_keys_in_tied_groups() -> None:
    # a Trainer checkpoint: ModelCheckpoint's state key spells out its whole config, and its scores share a tensor
    p = run("inspect", FIXTURES / "lightning" / "trainer.ckpt")
    assert p.returncode == 0, p.stderr
    (tied,) = [line for line in p.stdout.splitlines() if line.startswith("tied:")]
    assert "callbacks/ModelCheckpoint{'monitor...}/best_model_score = " in tied
    assert max(len(part) for part in tied.split("/")) <= 40
    full = json.loads(run("inspect", "--json", FIXTURES / "lightning" / "trainer.ckpt").stdout)["tied"]
    assert any(len(name) > 100 for group in full for name in group)  # --json keeps the full names


def test_inspect_json_matches_open(files: dict[str, Path], run_state: dict[str, Any]) -> None:
    p = run("inspect", files["run"], "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    ckpt = safeckpt.open(files["run"])
    assert report["format"] == "safeckpt" and report["path"] == str(files["run"])
    assert report["file_bytes"] == files["run"].stat().st_size
    tensors = {e["path"]: e for e in report["entries"] if e["kind"] == "tensor"}
    assert list(tensors) == list(ckpt.tensors())
    for name, ref in ckpt.tensors().items():
        e = tensors[name]
        assert (e["dtype"], e["shape"], e["nbytes"]) == (
            str(ref.dtype).removeprefix("torch."),
            list(ref.shape),
            ref.nbytes,
        )
        assert "/".join(map(str, e["keys"])) == name
    values = {e["path"]: e for e in report["entries"] if e["kind"] == "value"}
    assert values["step"] == {"path": "step", "keys": ["step"], "kind": "value", "type": "int", "value": 7}
    assert values["optimizer/param_groups/0/betas"]["value"] == [0.9, 0.99]
    assert values["optimizer/param_groups/0/betas"]["type"] == "tuple"
    assert {"keys": ["optimizer", "state", 0, "exp_avg"]}.items() <= tensors["optimizer/state/0/exp_avg"].items()
    totals = report["totals"]
    assert totals["tensors"] == len({r.alias_key for r in ckpt.tensors().values()}) == len(tensors) - 1  # one tie
    assert totals["names"] == len(tensors)
    assert totals["nbytes"] == ckpt.nbytes and totals["numel"] == ckpt.numel
    model = run_state["model"]
    assert totals["parameters"] == sum(p.numel() for p in model.parameters())  # tied weight once, no optimizer state
    assert totals["by_dtype"]["float32"]["nbytes"] == ckpt.nbytes
    assert report["tied"] == [["model/emb.weight", "model/head.weight"]]
    assert report["weights_key"] == "model" and report["lightning"] is None


def test_inspect_depth_and_globs(files: dict[str, Path]) -> None:
    shallow = json.loads(run("inspect", files["run"], "--json", "--depth", "1").stdout)
    kinds = {e["path"]: e["kind"] for e in shallow["entries"]}
    assert kinds == {"model": "container", "optimizer": "container", "step": "value", "hparams": "container"}
    model = next(e for e in shallow["entries"] if e["path"] == "model")
    assert model["tensors"] == 3 and model["type"] in ("dict", "OrderedDict")
    only_model = json.loads(run("inspect", files["run"], "--json", "--include", "model/*").stdout)
    assert {e["path"] for e in only_model["entries"]} == {
        "model/emb.weight",
        "model/l1.weight",
        "model/l1.bias",
        "model/head.weight",
    }
    assert only_model["totals"]["tensors"] == 3
    nothing = run("inspect", files["run"], "--include", "nope/*")
    assert nothing.returncode == 2 and "no leaf matches" in error_line(nothing)


# -- convert --------------------------------------------------------------------------------------


def test_convert_key_to_safetensors_read_by_stock_safetensors(
    files: dict[str, Path], run_state: dict[str, Any]
) -> None:
    out = files["dir"] / "weights.safetensors"
    p = run("convert", files["run_pt"], out, "--key", "model")
    assert p.returncode == 0, p.stderr
    assert f"wrote {out} (safetensors, 3 tensors" in p.stdout and "verified" in p.stdout
    expected = run_state["model"].state_dict()
    with safe_open(out, "pt") as f:
        assert set(f.keys()) <= set(expected) and {"l1.weight", "l1.bias"} <= set(f.keys())
        for name in list(f.keys()):
            assert torch.equal(f.get_tensor(name), expected[name]), name
    model = TiedNet()
    safeckpt.load_raw(out, model)  # the tied weight comes back through the file's alias record
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_convert_torch_export_read_by_torch_load(files: dict[str, Path], run_state: dict[str, Any]) -> None:
    out = files["dir"] / "export.pt"
    refused = run("convert", files["run"], out)  # a .pt name without --format: refuse rather than mislabel
    assert refused.returncode == 2 and "--format torch" in error_line(refused) and not out.exists()
    p = run("convert", files["run"], out, "--format", "torch")
    assert p.returncode == 0, p.stderr
    loaded = torch.load(out, weights_only=False)  # our own trusted output
    assert loaded["step"] == 7 and loaded["hparams"] == {"lr": 0.001, "layers": [4, 4, 6]}
    for k, v in run_state["model"].state_dict().items():
        assert torch.equal(loaded["model"][k], v), k
    assert loaded["model"]["emb.weight"].data_ptr() == loaded["model"]["head.weight"].data_ptr()  # still tied
    assert_bits_equal(loaded["optimizer"]["state"], run_state["optimizer"].state_dict()["state"])


def test_convert_sharded_directories(files: dict[str, Path]) -> None:
    native = files["dir"] / "shards"
    p = run("convert", files["run"], native, "--max-shard-size", "200")
    assert p.returncode == 0, p.stderr
    assert safeckpt.open(native).format == "safeckpt-sharded"
    assert_bits_equal(safeckpt.load(native), safeckpt.load(files["run"]))
    hf = files["dir"] / "hf"
    p = run("convert", files["run"], hf, "--key", "model", "--format", "hf-sharded", "--max-shard-size", "100")
    assert p.returncode == 0, p.stderr
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    for shard in set(index["weight_map"].values()):
        with safe_open(hf / shard, "pt") as f:
            for name in list(f.keys()):
                assert torch.equal(f.get_tensor(name), safeckpt.open(files["run"]).tensors()[f"model/{name}"].load())


def test_convert_refuses_to_overwrite_without_force(files: dict[str, Path]) -> None:
    out = files["dir"] / "once.safeckpt"
    assert run("convert", files["run"], out, "--key", "model").returncode == 0
    before = out.read_bytes()
    again = run("convert", files["run"], out)
    assert again.returncode == 2
    assert str(out) in error_line(again) and "--force" in error_line(again)
    assert out.read_bytes() == before
    forced = run("convert", files["run"], out, "--force", "--quiet")
    assert forced.returncode == 0 and forced.stdout == "" and forced.stderr == ""
    assert_bits_equal(safeckpt.load(out), safeckpt.load(files["run"]))


def test_convert_include_exclude_and_bad_key(files: dict[str, Path]) -> None:
    out = files["dir"] / "no_opt.safeckpt"
    p = run("convert", files["run"], out, "--exclude", "optimizer/state/*", "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["verified"] is True and result["format"] == "safeckpt" and result["tensors"] == 3
    names = set(safeckpt.open(out).tensors())
    assert names == {"model/emb.weight", "model/l1.weight", "model/l1.bias", "model/head.weight"}
    assert safeckpt.load(out)["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)  # non-tensor values kept
    none = run("convert", files["run"], files["dir"] / "none.safeckpt", "--include", "model/nothing*")
    assert (
        none.returncode == 2
        and "no tensor matches" in error_line(none)
        and not (files["dir"] / "none.safeckpt").exists()
    )
    bad = run("convert", files["run"], files["dir"] / "x.safeckpt", "--key", "weights")
    line = error_line(bad)
    assert (
        bad.returncode == 2 and "no top-level key 'weights'" in line and "'model'" in line and str(files["run"]) in line
    )


def test_convert_verification_catches_a_lossy_writer(files: dict[str, Path], tmp_path: Path) -> None:
    """Inject a fault into the subprocess's writer (flip every byte of every tensor it writes):
    verification must catch it (exit 1) and --no-verify must not (exit 0)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import safeckpt.formats._safetensors as st\n"
        "def flip(data):  # every byte: the bytes of several tensors may be written at once\n"
        "    return memoryview(bytes(b ^ 0xFF for b in bytes(data)))\n"
        "_tensor, _span = st.tensor_bytes, st.span_bytes\n"
        "st.tensor_bytes = lambda t: flip(_tensor(t))\n"
        "st.span_bytes = lambda span, n: flip(_span(span, n))\n"
        "st.copy_span = lambda *args: False  # the kernel's file-to-file copy would bypass the fault\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    bad = run("convert", files["run"], tmp_path / "out.safeckpt", env=env)
    assert bad.returncode == 1, bad.stderr
    line = error_line(bad)
    assert "does not match" in line and "differ" in line and "model/l1.weight" in line
    unchecked = run("convert", files["run"], tmp_path / "unchecked.safeckpt", "--no-verify", env=env)
    assert unchecked.returncode == 0 and "not verified" in unchecked.stdout
    assert not torch.equal(
        safeckpt.open(tmp_path / "unchecked.safeckpt").tensors()["model/l1.weight"].load(),
        safeckpt.open(files["run"]).tensors()["model/l1.weight"].load(),
    )


# -- verify ---------------------------------------------------------------------------------------


def test_verify_clean_and_damaged(files: dict[str, Path], tmp_path: Path) -> None:
    ok = run("verify", files["run"], "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["checks"] == "ok"
    assert (
        report["tensors"]
        == report["tensors_read"]
        == len({r.alias_key for r in safeckpt.open(files["run"]).tensors().values()})
    )
    damaged = tmp_path / "damaged.safeckpt"
    data = bytearray(files["run"].read_bytes())
    data[-1] ^= 0x01  # the last byte of tensor data
    damaged.write_bytes(bytes(data))
    p = run("verify", damaged)
    assert p.returncode == 1
    assert "fails its checksum" in p.stdout and str(damaged) in p.stdout
    truncated = tmp_path / "truncated.safeckpt"
    truncated.write_bytes(files["run"].read_bytes()[:-10])
    t = run("verify", truncated, "--json")
    assert t.returncode == 1 and json.loads(t.stdout)["structure"] == "failed"
    i = run("inspect", truncated)
    assert i.returncode == 2 and str(truncated) in error_line(i) and "truncated" in error_line(i)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A torch.save file whose unpickling runs a shell command creating the file named in $SAFECKPT_CANARY."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ('touch "$SAFECKPT_CANARY"',))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": Payload()}, path)
    canary = tmp_path / "canary"
    return path, canary, {**os.environ, "SAFECKPT_CANARY": str(canary)}


def test_the_malicious_fixture_is_live(evil: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """Positive control: unpickled by torch, the payload does create the canary (so its absence below means something)."""
    path, _, env = evil
    control = tmp_path / "control"
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env={**env, "SAFECKPT_CANARY": str(control)}, check=True, timeout=300)
    assert control.exists()


def test_verify_malicious_pickle(evil: tuple[Path, Path, dict[str, str]]) -> None:
    path, canary, env = evil
    p = run("verify", path, env=env)
    assert p.returncode == 1, p.stderr
    assert "REFUSED  posix.system" in p.stdout and "allowed  torch._utils._rebuild_tensor_v2" in p.stdout
    report = json.loads(run("verify", path, "--json", env=env).stdout)
    assert {"name": "posix.system", "allowed": False} in report["globals"]
    assert report["ok"] is False and any("posix.system" in x for x in report["problems"])
    for verb in (["inspect", path], ["convert", path, path.with_suffix(".safeckpt")]):
        q = run(*verb, env=env)
        assert q.returncode == 2 and "posix.system" in error_line(q) and str(path) in error_line(q), verb
    assert not path.with_suffix(".safeckpt").exists()
    assert not canary.exists()


ATTACKS = Path(__file__).resolve().parent / "attacks"
# a sample of the shared hostile corpus (the attack suites run all of it in-process and prove each
# live payload does run under plain pickle): code execution by several routes, and index escapes
ATTACK_SAMPLE = [
    ("corpus/m01_posix_system.pkl", r"posix\.system"),
    ("corpus/m02_system_in_zip.pt", r"posix\.system"),
    ("corpus/m05_nested_load_from_bytes.pt", r"torch\.storage\._load_from_bytes"),
    ("corpus/m15_pickle_zip_polyglot.pt", r"posix\.system|polyglot|pickle"),
    ("corpus/m23_legacy_payload.pt", r"posix\.system"),
    ("corpus/m44_subprocess_getoutput.pkl", r"subprocess\.getoutput"),
    ("safetensors/i01_parent_path", r"'\.\./outside\.safetensors' is not a bare file name"),
    ("safetensors/i19_bin_shard_pickle_payload", r"global 'posix\.system'"),
]


@pytest.mark.parametrize(("name", "cause"), ATTACK_SAMPLE, ids=[n.split("/")[-1] for n, _ in ATTACK_SAMPLE])
def test_verify_hostile_corpus(name: str, cause: str, tmp_path: Path) -> None:
    path = ATTACKS / name
    if not path.exists():
        pytest.skip(f"{name} is not in the attack corpus")
    canary = tmp_path / "canary"
    p = run("verify", path, "--json", env={**os.environ, "SAFECKPT_CANARY": str(canary)})
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is False and any(re.search(cause, x) and str(path) in x for x in report["problems"]), report
    assert not canary.exists()


# -- diff -----------------------------------------------------------------------------------------


def test_diff_equal_across_formats_quietly(files: dict[str, Path]) -> None:
    q = run("diff", files["run"], files["run_pt"], "--quiet")
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""


def test_diff_reports_every_kind_of_change(files: dict[str, Path]) -> None:
    p = run("diff", files["run_pt"], files["changed"], "--json")
    assert p.returncode == 1, p.stderr
    d = json.loads(p.stdout)
    assert d["equal"] is False and d["a"]["format"] == "torch" and d["b"]["format"] == "safeckpt"
    assert [x["path"] for x in d["only_a"]] == ["model/head.weight"]
    assert [x["path"] for x in d["only_b"]] == ["model/extra"]
    changed = {c["path"]: c for c in d["changed"]}
    assert set(changed) == {"model/l1.weight", "model/l1.bias", "model/emb.weight", "step"}
    ckpt_a, ckpt_b = safeckpt.open(files["run_pt"]), safeckpt.open(files["changed"])
    for name in ("model/l1.weight", "model/l1.bias", "model/emb.weight"):
        a, b = ckpt_a.tensors()[name].load().double(), ckpt_b.tensors()[name].load().double()
        assert changed[name]["max_abs_diff"] == pytest.approx(float((a - b).abs().max()), rel=1e-12, abs=0), name
    assert changed["model/emb.weight"]["b"]["dtype"] == "float16"
    assert changed["step"]["a"]["value"] == 7 and changed["step"]["b"]["value"] == 8
    text = run("diff", files["run_pt"], files["changed"]).stdout
    assert "~ model/emb.weight" in text and "float32 [6, 4] -> float16 [6, 4]" in text
    assert "- model/head.weight" in text and "+ model/extra" in text and "~ step" in text and "7 -> 8" in text
    # a tolerance forgives the tiny change and not the large one; globs narrow the comparison
    tol = run("diff", files["run_pt"], files["changed"], "--include", "model/l1.*", "--atol", "1e-5", "--json")
    result = json.loads(tol.stdout)
    assert [c["path"] for c in result["changed"]] == ["model/l1.bias"] and tol.returncode == 1
    assert result["same"] == 1 and result["atol"] == 1e-5  # l1.weight: equal within the tolerance


# -- errors, quiet, pipes -------------------------------------------------------------------------


def test_missing_file_directory_and_unknown_inputs(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    for verb in (["diff", files["run"], missing], ["convert", missing, tmp_path / "o.safeckpt"]):
        p = run_here(capsys, *verb)
        line = error_line(p)
        assert p.returncode == 2 and str(missing) in line and "no such file" in line and "check the path" in line, verb
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    p = run_here(capsys, "inspect", empty)
    assert p.returncode == 2 and str(empty) in error_line(p) and "directory" in error_line(p)
    p = run_here(capsys, "convert", files["run"], empty, "--force")  # a directory where the output file should go
    line = error_line(p)
    assert p.returncode == 2 and f"{empty} is a directory" in line and "--max-shard-size" in line
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint\n")
    p = run_here(capsys, "verify", junk)
    assert p.returncode == 2 and str(junk) in error_line(p) and "safetensors" in error_line(p)
    p = run_here(capsys, "convert", files["run"], tmp_path / "o.bin", "--format", "bogus")
    assert p.returncode == 2 and "invalid choice: 'bogus'" in error_line(p) and "'safeckpt'" in error_line(p)
    p = run_here(capsys, "inspect", files["run"], "--depth", "zero")
    assert p.returncode == 2 and "--depth" in error_line(p)
    debug = run_here(capsys, "inspect", missing, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_unreadable_file_names_the_fix(files: dict[str, Path], tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    locked = tmp_path / "locked.safeckpt"
    shutil.copy(files["run"], locked)
    locked.chmod(0)
    p = run("inspect", locked)
    assert p.returncode == 2 and str(locked) in error_line(p) and "permission denied" in error_line(p)


def _stderr_on_a_tty(*args: Any) -> str:
    """Run with stderr on a pseudo-terminal (stdout still a pipe); return what reached the terminal."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    chunks: list[bytes] = []

    def drain() -> None:  # read while the command runs, so a full terminal buffer cannot stall it
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        p = run(*args, stderr=secondary)
    finally:
        os.close(secondary)
        reader.join(timeout=60)
        os.close(primary)
    assert p.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_tty_and_never_quiet(tmp_path: Path) -> None:
    big = safeckpt.save(tmp_path / "big.safeckpt", {f"layer{i}": torch.randn(512, 512) for i in range(24)})  # 25 MB
    piped = run("convert", big, tmp_path / "a.safeckpt")
    assert piped.returncode == 0 and piped.stderr == "" and "\x1b" not in piped.stdout and "\r" not in piped.stdout
    shown = _stderr_on_a_tty("convert", big, tmp_path / "b.safeckpt")
    assert "converting" in shown and "%" in shown and "B/s" in shown
    assert _stderr_on_a_tty("convert", big, tmp_path / "c.safeckpt", "--quiet") == ""


def test_output_pipes_cleanly_into_head(tmp_path: Path) -> None:
    many = safeckpt.save(tmp_path / "many.safeckpt", {f"value_{i}": i for i in range(20000)})  # ~0.5 MB of outline
    p = subprocess.run(
        f"'{SCRIPT}' inspect '{many}' | head -n 2", shell=True, capture_output=True, text=True, timeout=300
    )
    assert p.stdout.splitlines() == [
        f"{many}  (safeckpt, {many.stat().st_size / 1000:.3g} KB on disk)",
        "value_0:     0",
    ]
    assert p.stderr == ""


# -- every verb on every kind of fixture ----------------------------------------------------------


def _fixture_kinds() -> dict[str, Path]:
    """One fixture per kind found under fixtures/ (format + extension, or for a directory format
    the extensions of its data files, + the container a reader reports), the one with the most
    leaves of each kind; a directory the registry reads counts as one checkpoint (its shards are
    not visited)."""
    found: dict[str, list[Path]] = {}

    def visit(p: Path) -> None:
        try:
            fmt = formats.detect(p).NAME
        except (UnknownFormatError, OSError):
            fmt = None
        if fmt is not None:
            suffixes = {f.suffix for f in p.rglob("*") if f.is_file()} - {"", ".json", ".md", ".txt"}
            inner = sorted(suffixes) if p.is_dir() else [p.suffix]
            try:  # a torch file's container (zip, legacy) is a kind of its own
                container = safeckpt.open(p).info.get("container")
            except CheckpointError:
                container = "refused"  # the library will not read it: the CLI must refuse it the same way
            found.setdefault(f"{fmt}[{','.join(inner)}]" + (f"/{container}" if container else ""), []).append(p)
        elif p.is_dir():
            for child in sorted(p.iterdir()):
                visit(child)

    for area in sorted(FIXTURES.iterdir()) if FIXTURES.is_dir() else ():
        if area.is_dir():
            for child in sorted(area.iterdir()):
                visit(child)

    def richness(p: Path) -> int:
        try:
            return len(leaves(safeckpt.open(p).tree))
        except CheckpointError:
            return 0

    return {kind: max(paths, key=richness) for kind, paths in sorted(found.items())}


FIXTURE_KINDS = _fixture_kinds()


def _readable(path: Path) -> tuple[safeckpt.Checkpoint | None, str]:
    try:
        ckpt = safeckpt.open(path)
        ckpt.to_python()
        return ckpt, ""
    except CheckpointError as e:
        return None, str(e)


def _arrays_as_bytes(tree: Any) -> Any:
    """numpy arrays as (dtype, shape, bytes), which `assert_bits_equal` compares exactly."""
    if isinstance(tree, np.ndarray):
        return ("ndarray", tree.dtype.str, tree.shape, tree.tobytes())
    if isinstance(tree, dict):
        out = type(tree)() if type(tree) in (dict, OrderedDict, safeckpt.AttributeDict) else {}
        out.update((k, _arrays_as_bytes(v)) for k, v in tree.items())
        return out
    if type(tree) in (list, tuple):
        return type(tree)(_arrays_as_bytes(v) for v in tree)
    return tree


@pytest.mark.parametrize("kind", list(FIXTURE_KINDS))
def test_every_verb_on_fixture(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURE_KINDS[kind]
    ckpt, why = _readable(path)
    inspected = run_here(capsys, "inspect", path, "--json")
    verified = run_here(capsys, "verify", path, "--json")
    if ckpt is None:  # a fixture the library refuses (e.g. a pickled nn.Module): the CLI refuses it the same way
        assert inspected.returncode == 2 and error_line(inspected)
        assert verified.returncode == 1 and json.loads(verified.stdout)["ok"] is False, why
        return
    report = json.loads(inspected.stdout)
    assert report["format"] == ckpt.format
    tensors = {e["path"]: (e["dtype"], e["shape"]) for e in report["entries"] if e["kind"] == "tensor"}
    assert tensors == {n: (str(r.dtype).removeprefix("torch."), list(r.shape)) for n, r in ckpt.tensors().items()}
    assert report["totals"]["nbytes"] == ckpt.nbytes
    v = json.loads(verified.stdout)
    # 3: no problem, but a region without checksums (stock safetensors, legacy torch) was not verified
    assert verified.returncode == ((0 if v["verified"] else 3) if v["ok"] else 1) and v["format"] == ckpt.format
    assert v["ok"], v["problems"]
    out = tmp_path / "converted.safeckpt"
    converted = run_here(capsys, "convert", path, out)
    assert converted.returncode == 0, converted.stderr
    assert_bits_equal(_arrays_as_bytes(safeckpt.load(out)), _arrays_as_bytes(ckpt.to_python()))
    with safe_open(out, "pt") as f:  # the native file is a safetensors file: stock reader agrees
        stock = {name: f.get_tensor(name) for name in list(f.keys())}
    for name, ref in safeckpt.open(out).tensors().items():
        if ref.dtype not in (torch.complex128, torch.complex32):  # stored as their real view (documented)
            assert_bits_equal(stock[ref.name], ref.load().detach(), name)
    same = run_here(capsys, "diff", path, out)
    assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr


def test_error_lines_for_every_exception_kind() -> None:
    """The mapping from exceptions to one-line messages, in-process (the subprocess tests above
    cover the kinds a real run can be made to raise: missing, directory, unknown, unsafe, corrupt)."""
    from safeckpt.cli import _fix

    missing_hub = ImportError("No module named 'huggingface_hub'", name="huggingface_hub")
    assert _fix(missing_hub) == "No module named 'huggingface_hub'; install it: pip install 'safeckpt[hub]'"
    denied = PermissionError(13, "Permission denied", "/data/run.pt")
    assert _fix(denied) == "/data/run.pt: permission denied; check its permissions, or choose another path"
    assert _fix(KeyError("run.pt has no top-level key 'x'")) == "run.pt has no top-level key 'x'"
    assert _fix(TypeError("a\nb")) == "a b"  # one line, always
    located = ValueError("bad value")
    located.safeckpt_path = "m.pt"  # type: ignore[attr-defined]
    assert _fix(located) == "m.pt: bad value"
    assert _fix(ZeroDivisionError("x")).startswith("unexpected ZeroDivisionError: x; re-run with --debug")
