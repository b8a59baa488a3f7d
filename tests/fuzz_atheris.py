"""Coverage-guided fuzzing of one reader with atheris (libFuzzer), outside the test suite.

Same seeds and oracle as ``tests/test_fuzz.py`` (a value or a `safeckpt.CheckpointError`; any other
exception is a finding), but in-process and guided by coverage of safeckpt's own code. For a
directory format, the input replaces one file (the first seed's target) of a copy of the seed
directory. Crashes and hangs are libFuzzer's to report (``-timeout=``, ``-rss_limit_mb=``).

Example:
    python tests/fuzz_atheris.py torch -max_total_time=600 -rss_limit_mb=3000 -timeout=20
    python tests/fuzz_atheris.py hf-sharded -max_total_time=60

Needs ``pip install atheris`` (3.0.0 installs on CPython 3.11 x86-64).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzing

with atheris.instrument_imports(include=["safeckpt"]):
    import safeckpt
    from safeckpt import formats

    for _name in formats.names():  # format modules are imported lazily: instrument them now
        formats.get(_name)
    del safeckpt


def main() -> None:
    reader, libfuzzer_args = sys.argv[1], sys.argv[2:]
    work = Path(tempfile.mkdtemp(prefix="safeckpt-atheris-"))
    seeds = fuzzing.build_seeds(work / "seeds")[reader]
    seed = seeds[0]
    corpus = work / "corpus"
    corpus.mkdir()
    for i, s in enumerate(x for x in seeds if x.target == seed.target and x.root.suffix == seed.root.suffix):
        (corpus / f"seed{i}").write_bytes(s.data)
    scratch = work / "input"

    def one_input(data: bytes) -> None:
        path = fuzzing.materialize(seed, data, scratch)
        escapes, _ = fuzzing.exercise(path, reader)
        if escapes:
            raise AssertionError(f"{reader} escape:\n{escapes[0]}")

    try:
        atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
