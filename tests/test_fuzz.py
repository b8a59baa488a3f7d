"""Fuzzing every reader: mutated valid files give a value or a `safeckpt.CheckpointError`, nothing else.

The harness (`fuzzing.py`) mutates shipped fixtures and files written here by safeckpt, torch and
safetensors, with hypothesis drawing the mutations (generic byte-level ones plus ones that know
safetensors headers, the msgpack skeleton, zip records, pickle opcodes and index files). Each input
runs in a worker subprocess with a per-input timeout, so an escape is any other exception type, a
crash (signal), a hang, peak memory growth beyond 64 times the input's size plus 64 MiB (the worker also
runs under an address-space limit so a huge lazy allocation fails loudly), or CPU time past the
resource model's bound (the cost oracle: 5 s plus 20 s per MB). The summary also prints the worst
CPU time and peak memory per input byte met ("fuzz cost per input byte").

Time: ``SAFECKPT_FUZZ_SECONDS`` (default 60) is split evenly between the six readers; the count of
inputs each reader ran is printed in the terminal summary ("fuzz inputs per reader"). For a long
local run: ``SAFECKPT_FUZZ_SECONDS=900 pytest tests/test_fuzz.py``. ``SAFECKPT_FUZZ_FAILURES=dir``
keeps every escaping input there.

Every input that once escaped is kept under ``tests/fuzz_corpus/<reader>/`` and replayed by
`test_corpus_replays_without_escape`.

atheris 3.0.0 installs on this Python (3.11); ``python tests/fuzz_atheris.py <reader>`` runs the
same oracle in-process under libFuzzer's coverage-guided mutation. It is not part of the suite.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import fuzzing

READERS = ["safeckpt", "safeckpt-sharded", "safetensors", "hf-sharded", "dcp", "torch"]
TOTAL = float(os.environ.get("SAFECKPT_FUZZ_SECONDS", "60"))
CORPUS = Path(__file__).parent / "fuzz_corpus"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[fuzzing.Seed]]:
    return fuzzing.build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> fuzzing.Worker:
    w = fuzzing.Worker(tmp_path_factory.mktemp("worker") / "stderr.log")
    w.start()
    yield w
    w.stop()


def _keep(reader: str, seed: fuzzing.Seed, data: bytes, n: int) -> str:
    where = os.environ.get("SAFECKPT_FUZZ_FAILURES")
    if not where:
        return ""
    out = Path(where) / reader / f"{n:05d}-{seed.label.replace('/', '__')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return f" (kept as {out})"


@pytest.mark.parametrize("reader", READERS)
def test_fuzz_reader(reader: str, seeds: dict[str, list[fuzzing.Seed]], worker: fuzzing.Worker, tmp_path: Path) -> None:
    """Mutations of this reader's seeds for TOTAL/len(READERS) seconds: no escape."""
    budget = TOTAL / len(READERS)
    stats = fuzzing.STATS.setdefault(reader, {"inputs": 0, "value": 0, "error": 0, "escape": 0, "seconds": 0.0})
    start = time.monotonic()
    stop = start + budget
    strategy = fuzzing.inputs(seeds[reader])
    escapes: list[str] = []

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=strategy)
    def batch(case: tuple[fuzzing.Seed, bytes]) -> None:
        # past the budget every example passes at once (while shrinking too, after a grace period)
        if time.monotonic() > (stop + 120 if escapes else stop):
            return
        seed, data = case
        path = fuzzing.materialize(seed, data, tmp_path / "input")
        result = worker.run(path, reader)
        stats["inputs"] += 1
        stats[result.status] += 1
        fuzzing.record_cost(stats, result)
        if result.status == "escape":
            escapes.append(result.detail)
            kept = _keep(reader, seed, data, int(stats["inputs"]))
            if os.environ.get("SAFECKPT_FUZZ_KEEP_GOING"):  # survey mode: collect every escape, fail at the end
                return
            raise AssertionError(f"{reader} escape on a mutation of {seed.label}{kept}:\n{result.detail}")

    try:
        while time.monotonic() < stop:
            batch()
    finally:
        stats["seconds"] += time.monotonic() - start
        stats["restarts"] = worker.restarts
    assert stats["inputs"] > 0
    assert not escapes, f"{len(escapes)} escapes, the first:\n{escapes[0]}"


def _corpus() -> list[Path]:
    return sorted(p for d in CORPUS.iterdir() if d.is_dir() for p in d.iterdir()) if CORPUS.is_dir() else []


@pytest.mark.parametrize("case", _corpus(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_replays_without_escape(case: Path, worker: fuzzing.Worker) -> None:
    """Every input that once escaped now gives a value or a CheckpointError."""
    result = worker.run(case, case.parent.name)
    assert result.status != "escape", result.detail


@pytest.mark.parametrize(
    ("misbehaviour", "caught_as"),
    [
        ("raise", "KeyError: 'a reader bug'"),
        ("touch", "peak memory grew by"),
        ("lazy", "RuntimeError"),  # torch's allocator fails under RLIMIT_AS
        ("hang", "hang: no answer within 3 s"),
        ("crash", "crash: the worker died (SIGSEGV)"),
        ("spin", "cost: "),
    ],
)
def test_oracle_catches(misbehaviour: str, caught_as: str, worker: fuzzing.Worker) -> None:
    """The harness's own check: each kind of escape a reader could have is reported as one, and
    the worker comes back for the next input."""
    small = Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "empty.safetensors"
    result = worker.run(small, "safetensors", timeout=3.0 if misbehaviour != "spin" else 30.0, selftest=misbehaviour)
    assert result.status == "escape"
    assert caught_as in result.detail
    assert worker.run(small, "safetensors").status == "value"


def test_cost_generators_build_what_they_name(seeds: dict[str, list[fuzzing.Seed]], tmp_path: Path) -> None:
    """The costly-class generators produce their class: flood snippets parse as pickles that push one
    value, and a special shard becomes a FIFO or a symlink out of the directory."""
    import pickletools

    for snippet in fuzzing.COST_SNIPPETS:
        ops = [op.name for op, _, _ in pickletools.genops(b"\x80\x04" + snippet + b".")]
        assert ops[-1] == "STOP"
    shard = next(s for s in seeds["safeckpt-sharded"] if "special" in s.kinds)
    fifo = fuzzing.materialize(shard, fuzzing.SPECIAL[0], tmp_path / "a") / shard.target
    link = fuzzing.materialize(shard, fuzzing.SPECIAL[1], tmp_path / "b") / shard.target
    assert fifo.is_fifo() and link.is_symlink() and link.resolve().parent == tmp_path / "b"
