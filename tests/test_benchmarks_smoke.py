"""The benchmark harness runs end to end at a tiny size and reports every operation.

No timing is asserted: this checks the harness (fresh processes, the state files, each op's own
correctness check after it ran, the table), not the speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_harness_reports_every_op(tmp_path: Path) -> None:
    from ops import OPS, available

    cmd = [sys.executable, str(BENCH / "bench.py"), "--size", "2MB", "--repeat", "1", "--warmup", "0"]
    cmd += ["--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = {line: [c.strip() for c in line.strip().strip("|").split("|")] for line in done.stdout.splitlines()}
    rows = {c[1]: line for line, c in cells.items() if line.startswith("| ") and len(c) == 10}  # a skipped op's too
    for name, op in OPS.items():
        assert name in rows, f"no row for {name}:\n{done.stdout}"
        if available(op) is None:  # ran, and its own check of what it loaded/wrote passed
            assert rows[name].endswith("| ok |"), rows[name]
        else:
            assert "skipped" in rows[name], rows[name]
    assert "Targets of issue 7" in done.stdout and "| save, fsync included" in done.stdout
    (jsonl,) = (tmp_path / "results").glob("*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records[0]["type"] == "meta" and records[0]["manifest"]["state_bytes"] > 0
    assert {r["op"] for r in records[1:]} == {n for n, op in OPS.items() if available(op) is None}
    assert all("time_s" in r and r["problem"] is None for r in records[1:]), [
        r for r in records[1:] if "time_s" not in r
    ]
    replay = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--report", str(jsonl)], capture_output=True, text=True
    )
    assert replay.returncode == 0 and replay.stdout.splitlines()[8:] == done.stdout.splitlines()[8:]
