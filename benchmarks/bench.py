"""safeckpt against torch, safetensors and Lightning Fabric, side by side, on one synthetic state.

    python benchmarks/bench.py --size 1GB                    # every group, 1 warm-up + 5 rounds
    python benchmarks/bench.py --size 100MB --only save,load --repeat 3
    python benchmarks/bench.py --size 10MB --repeat 1 --warmup 0     # smoke run
    python benchmarks/bench.py --report benchmarks/results/<run>.jsonl   # re-print a run's table

``--size`` is the model's parameter bytes (the anchors' convention): the full training state
(model + Adam) is about three times that, so ``--size 1GB`` is the 3.1 GB state of
``perf_anchors.md``. Each operation runs alone in a fresh process and only the operation is timed
(see ops.py). The operations of a group run interleaved (A B C A B C ...) after the warm-up round,
each row is the median over rounds, and every ratio is paired within a round. The table goes to
stdout; raw results to ``benchmarks/results/*.jsonl``; ``--write-results`` also writes
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import s3_server  # noqa: E402
from ops import GROUPS, OPS, available  # noqa: E402
from state import parse_size  # noqa: E402

GB = 1e9


# -- running ------------------------------------------------------------------------------------


class Runner:
    """Answers one request per op in a fresh process: a fork of a server that imported torch
    once (default), or a new interpreter per op (``exec_each``)."""

    def __init__(self, size: int, workdir: Path, exec_each: bool, log: Path, threads: int | None = None) -> None:
        self.size, self.workdir, self.exec_each, self.threads = size, workdir, exec_each, threads
        self.log = log.open("a")
        self.server: subprocess.Popen[str] | None = None
        # Users' installs have compiled bytecode; without it every fresh process would compile
        # safeckpt's modules on first use. Cache it outside the repository.
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
        if not exec_each:
            self.server = subprocess.Popen(
                [sys.executable, str(HERE / "ops.py"), "serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                text=True,
                env=self.env,
            )

    def __call__(self, op: str) -> dict[str, Any]:
        if self.server is None:
            cmd = [sys.executable, str(HERE / "ops.py"), "run", op, "--size", str(self.size)]
            cmd += ["--workdir", str(self.workdir)] + (["--threads", str(self.threads)] if self.threads else [])
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
            lines = done.stdout.strip().splitlines()
            return json.loads(lines[-1]) if lines else {"op": op, "error": f"exit status {done.returncode}, no result"}
        assert self.server.stdin and self.server.stdout
        request = {"op": op, "size": self.size, "workdir": str(self.workdir), "threads": self.threads}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        return json.loads(line) if line else {"op": op, "error": "the fork server exited; see its log"}

    def close(self) -> None:
        if self.server is not None:
            assert self.server.stdin
            self.server.stdin.close()
            self.server.wait()
        self.log.close()


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "src"], capture_output=True, text=True
        ).stdout
        return rev + ("+dirty src" if dirty.strip() else "")
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "safetensors", "lightning", "msgpack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["safeckpt"] = git_revision()
    out["python"] = platform.python_version()
    return out


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        mem = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal")), 0)
    return {"cpus": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release()}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    workdir = args.workdir.resolve()
    if HERE.parent in workdir.parents or workdir == HERE.parent:
        sys.exit(
            f"--workdir {workdir} is inside the repository; the state files are large, pick a directory outside it"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    s3 = None
    if (not args.only or "remote" in args.only) and importlib.util.find_spec("moto") is not None:
        # the remote group's server: started before the op server, which inherits the environment
        s3, s3_env = s3_server.start()
        os.environ.update(s3_env)
    runner = Runner(args.size, workdir, args.exec_each, workdir / "bench-stderr.log", args.threads)
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "type": "meta",
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "size": args.size,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "mode": "exec" if args.exec_each else "fork",
        "threads": args.threads,
        "load_start": os.getloadavg(),
        "versions": versions(),
        "machine": machine(),
    }
    try:
        prepared = runner("prepare")
        if "manifest" not in prepared:
            sys.exit(f"could not prepare the state files: {prepared.get('error')}\n{prepared.get('traceback', '')}")
        meta["manifest"] = prepared["manifest"]
        groups = [g for g in GROUPS if not args.only or g in args.only]
        meta["skipped"] = {}
        for group in groups:
            names = [n for n, op in OPS.items() if op.group == group]
            for n in names:
                why = available(OPS[n])
                if why:
                    meta["skipped"][n] = why
            names = [n for n in names if n not in meta["skipped"]]
            rounds = args.warmup + args.repeat
            for r in range(rounds):
                for name in names:
                    result = runner(name)
                    result.update(type="result", group=group, round=r - args.warmup, warmup=r < args.warmup)
                    rows.append(result)
                    shown = f"{result['time_s']:.4f} s" if "time_s" in result else result.get("error", "?")
                    print(f"[{group} {r + 1}/{rounds}] {name}: {shown}", file=sys.stderr, flush=True)
    finally:
        runner.close()
        if s3 is not None:
            s3_server.stop(s3)
    meta["load_end"] = os.getloadavg()
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return meta, rows


# -- reporting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A paired comparison of ``a`` (safeckpt) against ``b`` within each round."""

    a: str
    b: str
    kind: str = "time"  # time: t_a / t_b; bw: (bytes_a / t_a) / (bytes_b / t_b); diff, cpu diff: a - b (s)


PAIRS = [
    Pair("safeckpt.save", "torch.save+fsync"),
    Pair("safeckpt.save", "st.save_file+fsync"),
    Pair("safeckpt.save", "fabric.save+fsync"),
    Pair("safeckpt.save", "dd conv=fdatasync", "bw"),
    Pair("safeckpt.save", "write+fsync of the state's bytes", "bw"),
    Pair("safeckpt.load", "torch.load(mmap)+load_state_dict"),
    Pair("safeckpt.load", "torch.load+load_state_dict"),
    Pair("safeckpt.load", "fabric.load"),
    Pair("safeckpt.load_raw", "st.load_model"),
    Pair("safeckpt.load(device=cuda)", "st.load_file(device=cuda)"),
    Pair("safeckpt.load_raw [CUDA model]", "st.load_model [CUDA model]"),
    Pair("safeckpt.load_raw [CUDA model]", "torch.load(map_location=cuda)+load_state_dict"),
    Pair("safeckpt.load_raw assign=True [meta -> CUDA]", "st.load_file(device=cuda)"),
    Pair("safeckpt.convert", "cp+fsync"),
    Pair("safeckpt.convert", "torch.load(mmap)+st.save_file+fsync"),
    *(Pair(f"safeckpt.convert [{ext} -> .safetensors]", "cp+fsync") for ext in (".pt", ".safetensors", ".safeckpt")),
    Pair("safeckpt.open+1 tensor [.pt]", "torch.load(mmap)+1 tensor [.pt]"),
    Pair("safeckpt.open+1 tensor [.safetensors]", "safe_open+1 tensor [.safetensors]"),
    Pair("safeckpt.open+1 tensor [.safeckpt]", "safe_open+1 tensor [.safetensors]"),
    Pair("safeckpt.open [.pt]", "torch.load(mmap) lazy [.pt]"),
    Pair("safeckpt.open [.safetensors]", "safe_open keys [.safetensors]"),
    Pair("safeckpt.open [.safeckpt]", "safe_open keys [.safetensors]"),
    Pair("safeckpt.open+names [.safetensors]", "safe_open keys [.safetensors]"),
    Pair("safeckpt.open+names [.safeckpt]", "safe_open keys [.safetensors]"),
    *(
        Pair(f"safeckpt inspect CLI [{ext}]", "python -c 'import safeckpt.cli'", kind)
        for ext in (".pt", ".safeckpt", ".safetensors")
        for kind in ("diff", "cpu diff")
    ),
    *(
        Pair(f"safeckpt inspect CLI [{ext}]", "python -c 'import torch'")
        for ext in (".pt", ".safeckpt", ".safetensors")
    ),
    Pair("safeckpt --help", "hf version"),
    Pair("safeckpt --version", "hf version"),
]


@dataclass(frozen=True)
class Target:
    """One target of issue 7: ``measure`` gives per-round values whose median is held to ``bound``."""

    text: str
    measure: Callable[[Results], list[float]]
    bound: float
    at_most: bool = True
    unit: str = "x"
    note: str = ""
    big: bool = False  # the bound is stated for a 3 GB file


class Results:
    def __init__(self, meta: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
        self.meta = meta
        self.manifest = meta.get("manifest", {})
        self.rows = [r for r in rows if r.get("type") == "result" and not r.get("warmup")]

    def of(self, op: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["op"] == op]

    def timed(self, op: str) -> dict[int, dict[str, Any]]:
        return {r["round"]: r for r in self.of(op) if "time_s" in r}

    def nbytes(self, op: str) -> int:
        key = OPS[op].nbytes
        return int(self.manifest.get(key, 0)) if key else 0

    def paired(self, pair: Pair) -> list[float]:
        a, b = self.timed(pair.a), self.timed(pair.b)
        out = []
        for r in sorted(set(a) & set(b)):
            ta, tb = a[r]["time_s"], b[r]["time_s"]
            if pair.kind == "cpu diff":
                out.append(a[r]["cpu_s"] - b[r]["cpu_s"])
            elif pair.kind == "diff":
                out.append(ta - tb)
            elif pair.kind == "bw":
                out.append((self.nbytes(pair.a) / ta) / (self.nbytes(pair.b) / tb))
            else:
                out.append(ta / tb)
        return out

    def times(self, op: str) -> list[float]:
        return [r["time_s"] for r in self.timed(op).values()]

    def per_round(self, op: str, fn: Callable[[dict[str, Any]], float | None]) -> list[float]:
        return [v for r in self.timed(op).values() if (v := fn(r)) is not None]


def _ratio(a: str, b: str, kind: str = "time") -> Callable[[Results], list[float]]:
    return lambda res: res.paired(Pair(a, b, kind))


def _extra_over(op: str, key: str) -> Callable[[Results], list[float]]:
    def measure(res: Results) -> list[float]:
        whole = res.manifest.get(key) or 1
        return res.per_round(op, lambda r: r["extra_rss"] / whole)

    return measure


def _anon_over(op: str, key: str) -> Callable[[Results], list[float]]:
    def measure(res: Results) -> list[float]:
        whole = res.manifest.get(key) or 1
        return res.per_round(
            op, lambda r: None if r.get("anon_peak") is None else (r["anon_peak"] - r["anon_start"]) / whole
        )

    return measure


BIG = "set for a 3 GB file"
TARGETS = [
    Target("save, fsync included, no slower than torch.save + fsync", _ratio("safeckpt.save", "torch.save+fsync"), 1.0),
    Target(
        "save bandwidth at least 0.8x `dd conv=fdatasync`",
        _ratio("safeckpt.save", "dd conv=fdatasync", "bw"),
        0.8,
        at_most=False,
    ),
    Target(
        "save bandwidth vs a plain write + fsync of the same just-built state (not an issue target)",
        _ratio("safeckpt.save", "write+fsync of the state's bytes", "bw"),
        0.8,
        at_most=False,
        note="the floor for copying this memory to a file here; dd's source is /dev/zero",
    ),
    Target("save at most 0.3x fabric.save (+fsync)", _ratio("safeckpt.save", "fabric.save+fsync"), 0.3),
    Target(
        "save peak RSS at most 1.1x the state (op's extra RSS / state)",
        _extra_over("safeckpt.save", "state_bytes"),
        0.1,
        note="extra = peak RSS during the op minus RSS at its start",
    ),
    Target(
        "load into model + optimizer no slower than torch.load(mmap) + load_state_dict",
        _ratio("safeckpt.load", "torch.load(mmap)+load_state_dict"),
        1.0,
    ),
    Target("load at most 0.5x fabric.load", _ratio("safeckpt.load", "fabric.load"), 0.5),
    Target(
        "load_raw of a safetensors model no slower than safetensors load_model",
        _ratio("safeckpt.load_raw", "st.load_model"),
        1.0,
    ),
    Target("convert .pt -> native at most 1.5x cp + fsync", _ratio("safeckpt.convert", "cp+fsync"), 1.5),
    *(
        Target(
            f"{ours} at least the bandwidth of safetensors load_file(device=cuda)",
            _ratio(ours, "st.load_file(device=cuda)"),
            1.0,
            note="issue 14; time ratio (same bytes); the gpu group, run where CUDA is available",
        )
        for ours in (
            "safeckpt.load(device=cuda)",
            "safeckpt.load_raw [CUDA model]",
            "safeckpt.load_raw assign=True [meta -> CUDA]",
        )
    ),
    *(
        Target(
            f"checksums cost at most 10% of save time (CRC-32, {impl})",
            _ratio(f"safeckpt.save [CRC {impl}]", "safeckpt.save [no CRC]"),
            1.1,
            note="issue 8; same save with every CRC taken as 0, interleaved in the same run",
        )
        for impl in ("zlib", "isal")
    ),
    Target(
        "load verify=True / load (not an issue target)",
        _ratio("safeckpt.load verify=True", "safeckpt.load [integrity]"),
        2.0,
        note="verify reads every tensor once more to recompute its CRC-32 before anything is loaded",
    ),
    Target(
        "convert peak anonymous RSS under 0.2x the file",
        _anon_over("safeckpt.convert", "pt_bytes"),
        0.2,
        note="anonymous memory sampled every 5 ms; mapped file pages are not a copy",
    ),
    *(
        Target(
            f"open + one tensor [{ext}] under 50 ms",
            lambda res, e=ext: res.times(f"safeckpt.open+1 tensor [{e}]"),
            0.05,
            unit="s",
            big=True,
        )
        for ext in (".pt", ".safeckpt", ".safetensors")
    ),
    *(
        Target(
            f"open [{ext}] under 100 ms", lambda res, e=ext: res.times(f"safeckpt.open [{e}]"), 0.1, unit="s", big=True
        )
        for ext in (".pt", ".safeckpt", ".safetensors")
    ),
    *(
        Target(
            f"`safeckpt inspect` [{ext}] under 100 ms beyond interpreter start + import",
            _ratio(f"safeckpt inspect CLI [{ext}]", "python -c 'import safeckpt.cli'", "cpu diff"),
            0.1,
            unit="s",
            note="CPU seconds (wall time on a busy machine is noisier than the difference); ",
            big=True,
        )
        for ext in (".pt", ".safeckpt", ".safetensors")
    ),
    # issue 15: against a local moto server (s3_server.py), so the server's own speed is in every number
    Target(
        "save to s3:// at least 0.9x the bandwidth of s3fs put_file of the same bytes",
        _ratio("safeckpt.save [s3]", "s3fs put_file [s3]", "bw"),
        0.9,
        at_most=False,
        note="issue 15; the remote group",
    ),
    Target("save to s3:// at most 0.3x fabric.save to the same URL", _ratio("safeckpt.save [s3]", "fabric.save [s3]"), 0.3),
    Target(
        "load from s3:// at least 0.9x the bandwidth of s3fs cat_file of the object",
        _ratio("safeckpt.load [s3]", "s3fs cat_file (whole object) [s3]", "bw"),
        0.9,
        at_most=False,
    ),
    Target("load from s3:// at most 0.3x fabric.load from the same URL", _ratio("safeckpt.load [s3]", "fabric.load [s3]"), 0.3),
    Target(
        "one tensor from s3:// vs downloading the whole object (time)",
        _ratio("safeckpt.open+1 tensor [s3]", "s3fs cat_file (whole object) [s3]"),
        0.1,
        note="bytes: tests/test_remote.py counts them (< 1.1x the tensor + the header)",
    ),
]


# issue 19: headers at the speed of safetensors' Rust, a CLI that does not wait for torch, loads at the limit
TARGETS_19 = [
    *(
        Target(
            f"issue 19: open + names [{ext}] at most 2x safe_open + keys",
            _ratio(f"safeckpt.open+names [{ext}]", "safe_open keys [.safetensors]"),
            2.0,
        )
        for ext in (".safetensors", ".safeckpt")
    ),
    *(
        Target(
            f"issue 19: open + one tensor [{ext}] at most 2x safe_open + get_tensor",
            _ratio(f"safeckpt.open+1 tensor [{ext}]", "safe_open+1 tensor [.safetensors]"),
            2.0,
        )
        for ext in (".safetensors", ".safeckpt")
    ),
    Target(
        "issue 19: open + one tensor [.pt] at most 0.5x torch.load(mmap) + index",
        _ratio("safeckpt.open+1 tensor [.pt]", "torch.load(mmap)+1 tensor [.pt]"),
        0.5,
        big=True,
    ),
    *(
        Target(
            f"issue 19: `safeckpt inspect` [{ext}] wall at most 0.25x `python -c 'import torch'`",
            _ratio(f"safeckpt inspect CLI [{ext}]", "python -c 'import torch'"),
            0.25,
            big=True,
        )
        for ext in (".pt", ".safeckpt", ".safetensors")
    ),
    Target("issue 19: `safeckpt --help` at most 1x `hf version`", _ratio("safeckpt --help", "hf version"), 1.0),
    Target("issue 19: `safeckpt --version` at most 1x `hf version`", _ratio("safeckpt --version", "hf version"), 1.0),
    Target("issue 19: load_raw at most 1x safetensors load_model", _ratio("safeckpt.load_raw", "st.load_model"), 1.0),
    *(
        Target(
            f"issue 19: convert [{ext} -> .safetensors] at most 1x cp + fsync",
            _ratio(f"safeckpt.convert [{ext} -> .safetensors]", "cp+fsync"),
            1.0,
            note="cp copies full.pt, about the size of every source here",
        )
        for ext in (".pt", ".safetensors", ".safeckpt")
    ),
]
TARGETS += TARGETS_19


def med(values: list[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "–"
    m = statistics.median(values)
    return fmt.format(m) + (f" [{fmt.format(min(values))}–{fmt.format(max(values))}]" if len(values) > 1 else "")


def seconds(values: list[float]) -> str:
    return med(values, "{:.4f}" if values and statistics.median(values) < 0.1 else "{:.3f}")


def gb(x: float) -> str:
    return f"{x / GB:.3f}"


def table(res: Results) -> str:
    m, meta = res.manifest, res.meta
    state, ver, mach = m.get("state_bytes", 0), meta.get("versions", {}), meta.get("machine", {})
    lines = [
        f"# safeckpt benchmarks: --size {meta['size'] / GB:g} GB (model), state {gb(state)} GB",
        "",
        f"Run {meta.get('started')} → {meta.get('finished')}, {meta.get('mode')} mode, "
        f"{meta.get('threads') or 'default'} torch threads, {meta.get('warmup')} warm-up + "
        f"{meta.get('repeat')} rounds per group, median [min–max] over rounds; ratios paired within a round; "
        "bytecode cached (as in an installed package).",
        f"Machine: {mach.get('cpus')} CPUs, {mach.get('mem_bytes', 0) / 2**30:.0f} GiB RAM, Linux {mach.get('kernel')}; "
        f"load average {meta.get('load_start', [0])[0]:.2f} at start, {meta.get('load_end', [0])[0]:.2f} at end.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        f"State: model {gb(m.get('model_bytes', 0))} GB + fused Adam after one step = {gb(state)} GB in "
        f"{m.get('tensors')} tensors; files: "
        + ", ".join(f"{n} {gb(s)} GB" for n, s in m.get("files", {}).items())
        + ".",
        "",
        "| group | operation | n | median s [min–max] | CPU s | GB/s | peak RSS GB | op's extra RSS GB (× state) "
        "| extra anon GB | check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, op in OPS.items():
        rows = res.of(name)
        if not rows:
            why = meta.get("skipped", {}).get(name)
            if why:
                lines.append(f"| {op.group} | {name} | 0 | skipped: {why} | | | | | | |")
            continue
        errors = [r["error"] for r in rows if "error" in r]
        times = res.times(name)
        if not times:
            lines.append(f"| {op.group} | {name} | 0 | error: {errors[0] if errors else 'no result'} | | | | | | |")
            continue
        nbytes = res.nbytes(name)
        timed = list(res.timed(name).values())
        peak = statistics.median(r["peak_rss"] for r in timed)
        extra = statistics.median(r["extra_rss"] for r in timed)
        anon = [r["anon_peak"] - r["anon_start"] for r in timed if r.get("anon_peak") is not None]
        problems = sorted({r["problem"] for r in timed if r.get("problem")} | set(errors))
        cmd = " (command)" if name.startswith(("dd", "cp", "python -c")) or "CLI" in name else ""
        rate = f"{nbytes / statistics.median(times) / GB:.2f}" if nbytes else "–"
        lines.append(
            f"| {op.group} | {name} | {len(times)} | {seconds(times)} | {statistics.median(r['cpu_s'] for r in timed):.3g} | "
            f"{rate} | {gb(peak)}{cmd} | "
            f"{gb(extra)} ({extra / state:.2f}) | {gb(statistics.median(anon)) if anon else '–'} | "
            f"{'; '.join(problems) if problems else 'ok'} |"
        )
    lines += [
        "",
        "Paired ratios (safeckpt / peer; `bw` compares bandwidth, higher is better; `diff` is wall seconds, "
        "`cpu diff` CPU seconds):",
        "",
    ]
    lines += ["| safeckpt | vs | kind | median [min–max] |", "|---|---|---|---|"]
    for pair in PAIRS:
        values = res.paired(pair)
        if values:
            lines.append(f"| {pair.a} | {pair.b} | {pair.kind} | {med(values)} |")
    lines += ["", "Targets of issue 7 and issue 19 (median of the per-round values):", ""]
    lines += ["| target | measured | bound | status | note |", "|---|---|---|---|---|"]
    for t in TARGETS:
        values = t.measure(res)
        if not values:
            lines.append(f"| {t.text} | – | | n/a | not measured (peer skipped or group not run) |")
            continue
        m_ = statistics.median(values)
        ok = m_ <= t.bound if t.at_most else m_ >= t.bound
        sign = "≤" if t.at_most else "≥"
        shown = f"{med(values)} s" if t.unit == "s" else f"{med(values)}x"
        note = t.note + (f"target {BIG}; this state's files are {gb(m.get('pt_bytes', 0))} GB" if t.big else "")
        lines.append(
            f"| {t.text} | {shown} | {sign} {t.bound:g}{' s' if t.unit == 's' else 'x'} | {'met' if ok else '**missed**'} | {note} |"
        )
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()) + "."]
    lines += [
        "",
        "GB/s counts the state's tensor bytes (save, load), the model's (load_raw, gpu), the .pt file's (convert, cp) "
        "or dd's bytes. Peak RSS is the whole process's (the command's for dd, cp and the CLI); the op's extra RSS is "
        "its peak minus the RSS at its start, and includes file pages an mmap reader maps; extra anon counts "
        "anonymous memory only (sampled). Every save writes a new file after `os.sync()`, and fsyncs it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("100MB"),
        help="model parameter bytes (state ≈ 3x): 10MB, 100MB, 1GB, 3GB",
    )
    p.add_argument("--repeat", type=int, default=5, help="timed rounds per group (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--only", type=lambda s: s.split(","), help=f"comma-separated groups: {','.join(GROUPS)}")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "safeckpt-bench",
        help="where state files live (outside the repo)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads in each op's process (default: torch's own); 1 steadies a busy machine",
    )
    p.add_argument(
        "--exec",
        dest="exec_each",
        action="store_true",
        help="a new interpreter per op instead of a fork of one that imported torch",
    )
    p.add_argument("--write-results", action="store_true", help="also write the table to benchmarks/RESULTS.md")
    p.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the JSON lines go")
    p.add_argument("--report", type=Path, nargs="+", help="print the tables of earlier runs' JSON lines and exit")
    args = p.parse_args(argv)
    if args.only and set(args.only) - set(GROUPS):
        p.error(f"unknown group(s) {sorted(set(args.only) - set(GROUPS))}; groups: {', '.join(GROUPS)}")
    if args.report:
        texts = []
        for path in args.report:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            meta = next(r for r in records if r.get("type") == "meta")
            texts.append(table(Results(meta, records)))
        text = "\n".join(texts)
    else:
        meta, rows = run(args)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stamp = meta["started"].replace(":", "")
        out = args.results_dir / f"{stamp}-{meta['size'] / GB:g}GB.jsonl"
        out.write_text("".join(json.dumps(r) + "\n" for r in [meta, *rows]))
        print(f"raw results: {out}", file=sys.stderr)
        text = table(Results(meta, rows))
    print(text)
    if args.write_results:
        (HERE / "RESULTS.md").write_text(
            text
            + "\nReproduce: `python benchmarks/bench.py --size <SIZE> --write-results` (see benchmarks/README.md).\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
