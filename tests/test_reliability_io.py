"""Failing disks and concurrent processes, for real: a save that hits a file size limit
(``RLIMIT_FSIZE``), a full filesystem (a 2 MiB tmpfs in a private mount namespace), a read-only
directory (as an unprivileged user, since root ignores modes) or an injected I/O error raises an
``OSError`` naming the path and leaves the previous checkpoint byte for byte as it was, with no
temporary file behind. Two processes saving to one path leave one of their checkpoints, whole; a
reader loading a path while another process replaces it again and again gets a whole checkpoint
every time, never a mix (a sharded directory too: opening it holds every shard it names).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import evidence
import safeckpt
from safeckpt import formats
from safeckpt.formats import safeckpt_sharded as sharded

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX semantics (rename, flock, rlimits)")

STATES = textwrap.dedent(
    """
    import torch

    def make_state(which, size="big"):
        g = torch.Generator().manual_seed({"A": 1, "B": 2}[which])
        n = {"small": 8 * 1024, "big": 1024 * 1024}[size]  # float32s per tensor: 32 KiB or 4 MiB
        return {
            "model": {"w": torch.randn(n, generator=g), "v": torch.randn(n // 4, 4, generator=g)},
            "step": {"A": 100, "B": 200}[which],
            "note": "state " + which,
        }
    """
)
_ns: dict[str, Any] = {}
exec(STATES, _ns)  # our own constant, shared verbatim with the child processes
make_state = _ns["make_state"]

# kind -> (the checkpoint's name, save options)
KINDS = {
    "safeckpt file": ("run.safeckpt", {}),
    "safetensors file": ("model.safetensors", {"format": "safetensors"}),
    "sharded directory": ("run", {"max_shard_size": "1MB"}),
}


def _save(path: Path | str, which: str, kind: str, size: str = "big") -> Path:
    state = make_state(which, size)
    return safeckpt.save(path, state["model"] if kind == "safetensors file" else state, **KINDS[kind][1])


# -- failing writes: the child saves, catches and reports; the parent judges --------------------------

FAILING = STATES + textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import safeckpt

    spec = json.loads(sys.argv[1])
    KINDS = spec["kinds"]

    def snapshot(base):
        out = {}
        for d, _, files in os.walk(base):
            for f in files:
                p = os.path.join(d, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, base)] = fh.read().hex()
        return out

    def save(path, which, kind, size):
        state = make_state(which, size)
        return safeckpt.save(path, state["model"] if kind == "safetensors file" else state, **KINDS[kind][1])

    if spec.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing write()
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], spec["fsize"]))
    results = []
    for job in spec["jobs"]:
        base, path = job["base"], os.path.join(job["base"], KINDS[job["kind"]][0])
        if job.get("prepare"):
            save(path, "A", job["kind"], "small")
        before = snapshot(base)
        try:
            save(path, "B", job["kind"], "big")
            error = None
        except Exception as e:
            error = {
                "type": type(e).__name__, "oserror": isinstance(e, OSError), "errno": getattr(e, "errno", None),
                "filename": getattr(e, "filename", None), "message": str(e),
            }
        after = snapshot(base)
        reloaded = safeckpt.load(path) if os.path.exists(path) else None
        results.append({
            "kind": job["kind"], "path": os.path.realpath(path), "error": error,
            "unchanged": before == after, "new_files": sorted(set(after) - set(before)),
            "step": reloaded.get("step") if isinstance(reloaded, dict) else None,
        })
    print(json.dumps(results))
    """
)


def _run_failing(spec: dict[str, Any], prefix: list[str] | None = None, **kw: Any) -> list[dict[str, Any]]:
    spec = {**spec, "kinds": KINDS}
    run = subprocess.run(
        [*(prefix or []), sys.executable, "-c", FAILING, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check_failed(results: list[dict[str, Any]], want_errno: int, label: str) -> None:
    for r in results:
        e = r["error"]
        assert e is not None, f"{label}: {r['kind']} save succeeded"
        assert e["oserror"] and e["errno"] == want_errno, e
        assert r["path"] in e["message"] and e["filename"] == r["path"], e  # names the checkpoint, not a temporary
        assert r["unchanged"] and r["new_files"] == [], r  # previous checkpoint byte-identical, nothing left behind
        evidence.record(f"[reliability] {label}, {r['kind']}: {e['type']}: {e['message']}")


def _previous_checkpoints(tmp_path: Path) -> list[dict[str, Any]]:
    """One directory per kind under ``tmp_path`` holding a checkpoint, and the job that saves over it."""
    jobs = []
    for kind in KINDS:
        base = tmp_path / kind.replace(" ", "-")
        base.mkdir()
        _save(base / KINDS[kind][0], "A", kind, "small")
        jobs.append({"kind": kind, "base": str(base)})
    return jobs


def test_a_file_size_limit_fails_the_save_cleanly(tmp_path: Path) -> None:
    jobs = _previous_checkpoints(tmp_path)
    opts = dict(KINDS)
    before = {j["base"]: _tree(Path(j["base"])) for j in jobs}
    KINDS["sharded directory"] = ("run", {"max_shard_size": "1GB"})  # one shard, larger than the limit
    try:
        results = _run_failing({"fsize": 1 << 20, "jobs": jobs})
    finally:
        KINDS.update(opts)
    _check_failed(results, errno.EFBIG, "RLIMIT_FSIZE 1 MiB")
    for j in jobs:  # and seen from outside the child
        assert _tree(Path(j["base"])) == before[j["base"]]
    assert [r["step"] for r in results] == [100, None, 100]


def test_a_full_filesystem_fails_the_save_cleanly(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {mnt}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    jobs = [{"kind": kind, "base": str(mnt / kind.replace(" ", "-")), "prepare": True} for kind in KINDS]
    mkdirs = " && ".join(f"mkdir '{j['base']}'" for j in jobs)
    script = f'mount -t tmpfs -o size=2m tmpfs "$1" && {mkdirs} && shift && exec "$@"'
    prefix = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(mnt)]
    results = _run_failing({"jobs": jobs}, prefix)  # 4 MiB states into a 2 MiB filesystem
    _check_failed(results, errno.ENOSPC, "tmpfs of 2 MiB")
    assert [r["step"] for r in results] == [100, None, 100]


def test_a_read_only_directory_fails_the_save_cleanly(tmp_path: Path) -> None:
    prefix = None
    if os.geteuid() == 0:
        # root ignores modes; in a user namespace of its own (no uid mapped) it keeps only the
        # owner's mode bits on these root-owned files, like any unprivileged owner
        unshare = shutil.which("unshare")
        if unshare is None or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode:
            pytest.skip("running as root, and no user namespace to drop the privilege in")
        prefix = [unshare, "--user"]
    jobs = _previous_checkpoints(tmp_path)
    locked = [Path(j["base"]) for j in jobs] + [tmp_path / "sharded-directory" / "run"]
    before = _tree(tmp_path)
    try:
        for d in locked:
            d.chmod(0o555)
        results = _run_failing({"jobs": jobs}, prefix)
    finally:
        for d in locked:
            d.chmod(0o755)
    _check_failed(results, errno.EACCES, "read-only directory")
    assert _tree(tmp_path) == before
    assert [r["step"] for r in results] == [100, None, 100]


def test_a_read_only_file_in_a_writable_directory_is_replaced_like_any_rename(tmp_path: Path) -> None:
    # a save replaces the file by a rename: the directory's permissions decide, as for mv(1)
    path = _save(tmp_path / "run.safeckpt", "A", "safeckpt file", "small")
    path.chmod(0o444)
    _save(path, "B", "safeckpt file", "small")
    assert safeckpt.load(path)["step"] == 200 and os.listdir(tmp_path) == ["run.safeckpt"]


def _tree(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("step", ["write", "fsync"])
def test_an_io_error_fails_the_save_cleanly(
    tmp_path: Path, kind: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's EIO (injected: no real device fails on demand) on the second shard or on fsync."""
    path = _save(tmp_path / KINDS[kind][0], "A", kind, "small")
    before = _tree(tmp_path)
    real = getattr(os, step)
    calls = []

    def failing(fd: int, *args: Any) -> Any:
        if os.path.isfile(f"/proc/self/fd/{fd}") or not os.path.exists("/proc/self/fd"):
            calls.append(fd)
            if len(calls) == (3 if kind == "sharded directory" and step == "write" else 1):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, *args)

    monkeypatch.setattr(os, step, failing)
    with pytest.raises(OSError) as info:
        _save(path, "B", kind)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO and info.value.filename == os.path.realpath(path)
    assert os.path.realpath(path) in str(info.value) and "I/O error" in str(info.value)
    assert _tree(tmp_path) == before
    assert safeckpt.load(path)["step" if kind != "safetensors file" else "w"] is not None


# -- concurrent writers and readers -------------------------------------------------------------------

WORKER = STATES + textwrap.dedent(
    """
    import json, sys
    import safeckpt

    KINDS = json.loads(sys.argv[1])
    STATES = {w: make_state(w) for w in "AB"}

    def save(path, which, kind):
        state = STATES[which]
        safeckpt.save(path, state["model"] if kind == "safetensors file" else state, **KINDS[kind][1])

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "save":
            save(cmd["path"], cmd["state"], cmd["kind"])
        else:  # "flip": replace the checkpoint n times, alternating states
            for i in range(cmd["n"]):
                save(cmd["path"], "AB"[i % 2], cmd["kind"])
        print("done", flush=True)
    """
)


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(KINDS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "done", f"the worker failed (exit {self.proc.poll()})"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    ws = [Worker(), Worker()]
    yield ws
    for w in ws:
        w.close()


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, Any]]:
    return {w: make_state(w) for w in "AB"}


def whole(loaded: dict[str, Any], kind: str, states: dict[str, dict[str, Any]]) -> str:
    """Which state ``loaded`` is, all of it (every tensor's bits and every value)."""
    for w, state in states.items():
        want = state["model"] if kind == "safetensors file" else state
        got = loaded if kind == "safetensors file" else {**loaded, "model": loaded["model"]}
        if set(got) == set(want) and all(_same(got[k], want[k]) for k in want):
            return w
    raise AssertionError(f"a torn or mixed checkpoint: {sorted(loaded)}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, dict):
        return isinstance(a, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))
        )
    return a == b


ROUNDS = 20


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_processes_saving_to_one_path_leave_one_checkpoint_whole(
    tmp_path: Path, kind: str, workers: list[Worker], states: dict[str, dict[str, Any]]
) -> None:
    path = tmp_path / KINDS[kind][0]
    outcomes = {"A": 0, "B": 0}
    for _ in range(ROUNDS):
        for w, which in zip(workers, "AB", strict=True):
            w.send(op="save", path=str(path), state=which, kind=kind)
        for w in workers:
            w.wait()
        outcomes[whole(safeckpt.load(path), kind, states)] += 1
        assert formats.get(safeckpt.open(path).format).verify(path) == []
    _save(path, "A", kind)  # one more save: nothing of the concurrent ones is left behind
    left = (
        sorted(set(os.listdir(path)) - {f["name"] for f in sharded.read_index(path)["files"]} - {sharded.INDEX})
        if kind == "sharded directory"
        else sorted(os.listdir(tmp_path))
    )
    assert left == ([] if kind == "sharded directory" else [path.name]), left
    evidence.record(
        f"[reliability] two writers, {kind}: {ROUNDS} rounds, last writer A {outcomes['A']}x, B {outcomes['B']}x, never torn"
    )


SAVES = 40


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_reader_during_replacements_sees_a_whole_checkpoint(
    tmp_path: Path, kind: str, workers: list[Worker], states: dict[str, dict[str, Any]]
) -> None:
    path = _save(tmp_path / KINDS[kind][0], "A", kind)
    workers[0].send(op="flip", path=str(path), n=SAVES, kind=kind)
    reads = {"A": 0, "B": 0}
    assert workers[0].proc.stdout is not None
    out = workers[0].proc.stdout
    os.set_blocking(out.fileno(), False)
    try:
        while True:
            reads[whole(safeckpt.load(path), kind, states)] += 1
            if out.readline():
                break
            assert workers[0].proc.poll() is None, "the writer died"
    finally:
        os.set_blocking(out.fileno(), True)
    assert reads["A"] + reads["B"] > 0
    evidence.record(f"[reliability] reader during {SAVES} replacements, {kind}: {sum(reads.values())} loads: {reads}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_opened_checkpoint_outlives_its_replacement(
    tmp_path: Path, kind: str, states: dict[str, dict[str, Any]]
) -> None:
    path = _save(tmp_path / KINDS[kind][0], "A", kind)
    opened = safeckpt.open(path)  # nothing loaded yet
    _save(path, "B", kind)  # replaced; for the directory, A's shards are deleted by this save
    if kind == "sharded directory":
        assert not set(os.listdir(path)) & {c.shard.path.name for r in opened.tensors().values() for c in r.chunks}
    assert whole(opened.to_python(), kind, states) == "A"  # still the checkpoint that was opened, whole
    assert whole(safeckpt.load(path), kind, states) == "B"
