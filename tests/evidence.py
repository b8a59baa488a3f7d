"""Numbers the reliability tests measure (kills survived, rounds raced, flips caught), collected
so that pytest's terminal summary shows them on every run (see ``conftest.py``)."""

from __future__ import annotations

LINES: list[str] = []


def record(line: str) -> None:
    """Keep ``line`` for the summary (and print it for ``pytest -s``)."""
    print(f"\n{line}", flush=True)
    LINES.append(line)
