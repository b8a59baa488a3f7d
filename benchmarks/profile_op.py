"""Where an operation's time goes: py-spy samples of the timed region only.

    python benchmarks/profile_op.py "safeckpt.save" --size 100MB --repeat 5 [--native] [--top 25]

Runs the op's set-up, then the op, ``--repeat`` times in this process while ``py-spy record``
samples it, and keeps only the samples taken inside the timed call (set-up is left out). Prints
the functions with the most samples (self and inclusive) and writes the collapsed stacks next to
the state files (load them into speedscope or inferno for a flame graph). Needs ``py-spy``
(``pip install py-spy``) and permission to ptrace this process (root, or ptrace_scope 0).
The state files must exist: run bench.py at the same size first.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops import OPS, Env
from state import parse_size

MARK = "timed_call"


def timed_call(run: Any) -> None:
    """The frame every kept sample passes through."""
    run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", choices=sorted(OPS), metavar="OP", help="an operation name as bench.py prints it")
    p.add_argument("--size", type=parse_size, default=parse_size("100MB"))
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "safeckpt-bench")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--native", action="store_true", help="include C/C++ frames (slower sampling)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, help="torch threads (as bench.py --threads)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    env, op = Env(args.size, args.workdir), OPS[args.op]
    if not (env.dir / "manifest.json").exists():
        sys.exit(f"no state files in {env.dir}: run `python benchmarks/bench.py --size {args.size}` first")
    raw = env.dir / f"profile-{args.op.replace('/', '_').replace(' ', '_')}.txt"
    cmd = [spy, "record", "-p", str(os.getpid()), "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--nonblocking"]
    if args.native:
        cmd.append("--native")
    recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # let py-spy attach before the first timed call
    times = []
    for _ in range(args.repeat):
        prepared = op.setup(env)
        t0 = time.perf_counter()
        timed_call(prepared.run)
        times.append(time.perf_counter() - t0)
        problem = prepared.check()
        prepared.cleanup()
        if problem:
            print(f"check failed: {problem}", file=sys.stderr)
    time.sleep(0.5)
    recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
    _, err = recorder.communicate(timeout=60)
    if not raw.exists():
        sys.exit(f"py-spy wrote nothing: {err.strip()}")
    report(raw, args.top, times)
    return 0


def report(raw: Path, top: int, times: list[float]) -> None:
    """Self and inclusive sample counts of the stacks that pass through `timed_call`."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        hits = [i for i, f in enumerate(frames) if f.startswith(MARK + " ")]
        if not hits or not count.isdigit():
            continue
        frames = frames[hits[0] + 1 :] or ["(timed_call itself)"]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    times_ms = ", ".join(f"{t * 1000:.0f}" for t in times)
    print(f"{total} samples in the timed calls ({times_ms} ms); collapsed stacks: {raw}\n")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"top {top} by {title} samples:")
        for frame, n in counter.most_common(top):
            print(f"  {100 * n / max(total, 1):5.1f}%  {frame}")
        print()


if __name__ == "__main__":
    raise SystemExit(main())
