"""Malformed safetensors files and hostile HF index directories: each is refused with a
`CorruptCheckpointError` (or `UnsafeCheckpointError` for a pickle payload) that names the file and
the cause; nothing hangs, nothing runs, and no case allocates more than a small bound.

The corpus in ``safetensors/`` is committed; ``make_safetensors_attacks.py`` made it (a test below
checks it still does, byte for byte). Large or special-file cases are built at test time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import make_safetensors_attacks as gen
import psutil
import pytest
from safetensors import safe_open

import safeckpt
from safeckpt import formats
from safeckpt.errors import CorruptCheckpointError, UnknownFormatError, UnsafeCheckpointError

ERRORS = {"corrupt": CorruptCheckpointError, "unsafe": UnsafeCheckpointError, "unknown": UnknownFormatError}
PEAK_BYTES = 1 << 20  # Python allocations while refusing a KB-sized case (or a sparse 100 MB one)
RSS_BYTES = 16 << 20


@pytest.fixture(autouse=True, scope="module")
def _warm_imports() -> None:
    for name in formats.names():  # so that import-time allocations are not charged to the first case
        formats.get(name)


@contextlib.contextmanager
def bounded(label: str, peak_limit: int = PEAK_BYTES, seconds: int = 60) -> Iterator[None]:
    """Fail if the block allocates more than ``peak_limit`` bytes of Python memory, grows RSS by more
    than `RSS_BYTES`, or is still running after ``seconds`` (a hang guard, not a speed test)."""

    def hang(*_: object) -> None:
        raise TimeoutError(f"{label}: still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    grown = psutil.Process().memory_info().rss - rss
    assert peak < peak_limit, f"{label}: allocated {peak} bytes"
    assert grown < RSS_BYTES, f"{label}: RSS grew by {grown >> 20} MiB"


@pytest.fixture
def canary() -> Iterator[Path]:
    gen.CANARY.unlink(missing_ok=True)
    yield gen.CANARY
    assert not gen.CANARY.exists(), "a pickle payload ran"


def refuse(path: Path, case: gen.Case, **bounds: int) -> str:
    with bounded(case.name, **bounds), pytest.raises(ERRORS[case.error]) as info:
        safeckpt.open(path).to_python()
    message = str(info.value)
    assert str(path) in message, f"{case.name}: the message does not name the file: {message}"
    assert re.search(case.pattern, message), f"{case.name}: {message}"
    return message


def test_corpus_is_what_the_generator_makes(tmp_path: Path) -> None:
    fresh = tmp_path / "corpus"
    gen.make(fresh)

    def listing(root: Path) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for p in sorted(root.rglob("*")):
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = "-> " + os.readlink(p)
            elif p.is_file():
                out[key] = p.read_bytes()
        return out

    assert listing(fresh) == listing(gen.CORPUS)
    assert {c.name for c in gen.CASES} == {p.name for p in gen.CORPUS.iterdir()} - {"outside.safetensors"}
    assert sum(c.name.startswith("s") for c in gen.CASES) >= 14


@pytest.mark.parametrize("case", gen.CASES, ids=lambda c: c.name.split(".")[0])
def test_refused(case: gen.Case, canary: Path) -> None:
    refuse(gen.CORPUS / case.name, case)


@pytest.mark.parametrize(
    "case", [c for c in gen.CASES if c.name.endswith(".safetensors")], ids=lambda c: c.name.split(".")[0]
)
def test_safetensors_reader_refuses_and_stock_differential(case: gen.Case) -> None:
    """The format reader itself refuses every file case, even the one no sniffer claims; and
    safetensors 0.8.0 accepts exactly the case we document it gets wrong (duplicate keys)."""
    path = gen.CORPUS / case.name
    with bounded(case.name), pytest.raises(CorruptCheckpointError) as info:
        formats.get("safetensors").read(path)
    assert str(path) in str(info.value)
    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is no dict
                f.get_tensor(k)
        stock_rejects = False
    except Exception:
        stock_rejects = True
    assert stock_rejects == case.stock_rejects, case.name


def test_pickle_payload_in_bin_shard_names_the_global(canary: Path) -> None:
    case = next(c for c in gen.CASES if c.name == "i19_bin_shard_pickle_payload")
    message = refuse(gen.CORPUS / case.name, case)
    assert "pytorch_model-00001-of-00001.bin" in message


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    gen.make_runtime(root)
    return root


@pytest.mark.parametrize("case", gen.RUNTIME, ids=lambda c: c.name)
def test_runtime_cases(case: gen.Case, runtime: Path) -> None:
    path = runtime / case.name
    if case.name == "r05_million_dim_shape":
        # the header is 2 MB of JSON; Python's parser holds it as a list of a million ints (~8 MB)
        refuse(path, case, peak_limit=8 * path.stat().st_size)
    else:
        refuse(path, case)
