"""The hostile corpus: every file is refused with the right error, names its cause and the file,
runs nothing (a canary file its payload would create stays absent), stays within a memory bound
and finishes (pytest-timeout). A control test proves the payloads are live: plain ``pickle`` or
``torch.load(weights_only=False)`` in a subprocess does create the canary."""

from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import psutil
import pytest
import torch
from make_attacks import CASES, CASES_AND_BYTES, CORPUS, Case, benign_zip

import safeckpt
from safeckpt.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from safeckpt.formats import torch_pickle as tp

ERRORS = {"unsafe": UnsafeCheckpointError, "corrupt": CorruptCheckpointError}
PEAK_LIMIT = 32 << 20  # bytes the reader may allocate (Python heap, traced) on any corpus file
RSS_LIMIT = 64 << 20


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(4, 4)


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "canary"
    monkeypatch.setenv("SAFECKPT_CANARY", str(path))
    return path


def test_corpus_is_what_the_generator_writes() -> None:
    assert len(CASES) >= 20
    for case, data in CASES_AND_BYTES:
        assert (CORPUS / case.file).read_bytes() == data, f"{case.file} is stale: run tests/attacks/make_attacks.py"
    assert (CORPUS / "m00_control.pt").read_bytes() == benign_zip()


def _entry_points(path: Path) -> list[tuple[str, object]]:
    return [
        ("open", lambda: safeckpt.open(path).to_python()),
        ("load", lambda: safeckpt.load(path)),
        ("load_raw", lambda: safeckpt.load_raw(path, MLP())),
        ("read", lambda: tp.read(path).to_python()),
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_hostile_file_is_refused(case: Case, canary: Path) -> None:
    path = CORPUS / case.file
    expected = ERRORS[case.error]
    process = psutil.Process()
    for name, entry in _entry_points(path):
        rss = process.memory_info().rss
        tracemalloc.start()
        try:
            with pytest.raises(expected) as info:
                entry()  # type: ignore[operator]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        msg = str(info.value)
        assert re.search(case.match, msg), f"{name}: {msg}"
        assert str(path) in msg, f"{name}: the message does not name the file: {msg}"
        assert peak < PEAK_LIMIT, f"{name}: allocated {peak >> 20} MiB reading a {path.stat().st_size}-byte file"
        assert process.memory_info().rss - rss < RSS_LIMIT, (
            f"{name}: RSS grew by {(process.memory_info().rss - rss) >> 20} MiB"
        )
        assert not canary.exists(), f"{name}: the payload ran"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_verify_and_globals_report_run_nothing(case: Case, canary: Path) -> None:
    path = CORPUS / case.file
    problems = tp.verify(path)
    assert problems, "verify found nothing wrong"
    assert any(str(path) in p for p in problems)
    try:
        report = tp.globals_report(path)
    except CheckpointError:
        report = []
    if case.error == "unsafe" and "global '" in case.match:
        name = re.search(r"'(.+?)'", case.match.replace("\\", ""))
        assert name and (name.group(1), False) in report, report
    assert not canary.exists()


def test_controls_read_like_torch_load() -> None:
    for name in ("m00_control.pt", "m00_control_zip64.pt"):
        ours = safeckpt.open(CORPUS / name).to_python()
        theirs = torch.load(CORPUS / name, weights_only=True)
        assert list(ours) == ["w"] and torch.equal(ours["w"], theirs["w"])


_RUN_PAYLOADS = """
import os, pickle, sys, torch
for path, canary in zip(sys.argv[1::2], sys.argv[2::2]):
    os.environ["SAFECKPT_CANARY"] = canary
    try:
        if path.endswith(".pkl"):
            pickle.loads(open(path, "rb").read())
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass  # several payloads run, then leave a broken stream behind
"""


@pytest.mark.timeout(300)
def test_payloads_are_live(tmp_path: Path) -> None:
    """Without safeckpt, each 'runs' payload does run: the canary checks above can fail."""
    live = [c for c in CASES if c.runs]
    assert len(live) >= 10
    args = []
    for case in live:
        args += [str(CORPUS / case.file), str(tmp_path / f"{case.file}.canary")]
    subprocess.run([sys.executable, "-c", _RUN_PAYLOADS, *args], capture_output=True, timeout=240)
    ran = {c.file for c in live if (tmp_path / f"{c.file}.canary").exists()}
    assert ran == {c.file for c in live}, (
        f"payloads that did not run under plain pickle/torch.load: {sorted({c.file for c in live} - ran)}"
    )
