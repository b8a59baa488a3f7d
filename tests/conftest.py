"""Shared pytest hooks."""

from __future__ import annotations

import sys
from typing import Any

from remote_server import s3, s3_server  # noqa: F401 - fixtures: a real S3-compatible server (moto)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The reliability numbers (kills, races, bit flips) and the fuzz harness's counts
    (tests/test_fuzz.py), so every run shows what was tried."""
    evidence = sys.modules.get("evidence")
    if getattr(evidence, "LINES", None):
        terminalreporter.write_sep("-", "reliability evidence")
        for line in evidence.LINES:  # type: ignore[union-attr]
            terminalreporter.write_line(line)
    fuzzing = sys.modules.get("fuzzing")
    stats = getattr(fuzzing, "STATS", None)
    if not stats:
        return
    tr = terminalreporter
    tr.write_sep("-", "fuzz inputs per reader")
    tr.write_line(f"{'reader':<18}{'inputs':>8}{'value':>8}{'CheckpointError':>17}{'escape':>8}{'seconds':>9}")
    for reader, s in stats.items():
        tr.write_line(
            f"{reader:<18}{s['inputs']:>8}{s['value']:>8}{s['error']:>17}{s['escape']:>8}{s['seconds']:>9.1f}"
        )
    total = sum(s["inputs"] for s in stats.values())
    tr.write_line(f"{'total':<18}{total:>8}  (worker restarts: {max(s.get('restarts', 0) for s in stats.values())})")
    tr.write_sep("-", "fuzz cost per input byte (resource model: formats/resource-model.md)")
    tr.write_line(
        f"{'reader':<18}{'worst CPU s/MB':>15}{'(input B)':>11}{'worst peak B/B':>16}{'(input B)':>11}{'max CPU s':>10}{'max peak MiB':>13}"
    )
    for reader, s in stats.items():
        if "cpu_max" not in s:
            continue
        tr.write_line(
            f"{reader:<18}{s['cpu_per_mb']:>15.2f}{s['cpu_per_mb_size']:>11}{s['peak_per_byte']:>16.1f}"
            f"{s['peak_per_byte_size']:>11}{s['cpu_max']:>10.2f}{s['peak_max'] / 2**20:>13.1f}"
        )
