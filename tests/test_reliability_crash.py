"""Crash safety, proven by SIGKILL: `safeckpt.save` runs in a real child process that is killed
(SIGKILL, no cleanup possible) at every phase of the write and at random instants, on top of an
existing checkpoint at the same path. After every kill the path must hold the previous checkpoint
or the new one, whole (``verify`` clean, every tensor bit-identical to what was saved), and what a
killed save leaves behind is never taken for a checkpoint and is cleaned up by the next save.

Children are forked from one "zygote" process that has imported torch and built the states once,
so a kill costs a fork, not an interpreter start. Phase kills stop the child at the n-th call of
a write step (half-way through ``write_all``, before ``fsync``, before ``os.replace``, before the
directory ``fsync``, before the sharded cleanup) for every n the save reaches, by wrapping those
functions in the child only: no hook in the library.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import evidence
import safeckpt
from safeckpt import formats
from safeckpt.errors import CorruptCheckpointError, UnknownFormatError
from safeckpt.formats import safeckpt_sharded as sharded

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL tests need fork (POSIX)")

# Two states of identical structure (~20 MB of tensors): what a previous and a new save hold.
STATES = textwrap.dedent(
    """
    import torch

    def make_state(which):
        g = torch.Generator().manual_seed({"A": 1, "B": 2}[which])
        return {
            "model": {
                "a": torch.randn(1024, 1024, generator=g),
                "b": torch.randn(1024, 1024, generator=g),
                "c": torch.randn(3072, 1024, generator=g),  # 12 MiB: split across shard files
                "bias": torch.randn(1024, generator=g),
            },
            "step": {"A": 100, "B": 200}[which],
            "note": "state " + which,
        }
    """
)
_ns: dict[str, Any] = {}
exec(STATES, _ns)  # our own constant, shared verbatim with the child processes
make_state = _ns["make_state"]

ZYGOTE = STATES + textwrap.dedent(
    """
    import json, os, sys, time, traceback
    import safeckpt
    from safeckpt import _fs, _storage
    from safeckpt.formats import _safetensors

    STATES = {w: make_state(w) for w in "AB"}

    def child(cmd):
        marker, hook, nth = cmd["marker"], cmd.get("hook"), cmd.get("nth", 0)
        replaced, calls = [], {}
        real_replace, real_fsync, real_write_all = os.replace, os.fsync, _fs.write_all
        real_fsync_dir, real_gc = _storage.fsync_dir, _storage.Layout.collect_garbage

        def stop(where):
            with open(marker + ".part", "w") as f:
                json.dump({"where": where, "replaced": replaced}, f)
            real_replace(marker + ".part", marker)
            time.sleep(600)  # until SIGKILL

        def hit(name):
            calls[name] = calls.get(name, 0) + 1
            return name == hook and calls[name] == nth

        def write_all(f, data):
            if hit("write_all"):
                view = memoryview(data).cast("B")
                real_write_all(f, view[: len(view) // 2])
                stop("write_all")
            real_write_all(f, data)

        def fsync(fd):
            if os.path.isfile(f"/proc/self/fd/{fd}") and hit("fsync"):
                stop("fsync")
            real_fsync(fd)

        def replace(a, b):
            if hit("replace"):
                stop("replace")
            real_replace(a, b)
            replaced.append(os.path.basename(b))

        def fsync_dir(d):
            if hit("fsync_dir"):
                stop("fsync_dir")
            real_fsync_dir(d)

        def collect_garbage(layout, root, keep):
            if hit("collect_garbage"):
                stop("collect_garbage")
            return real_gc(layout, root, keep)

        _safetensors.write_all = _storage.write_all = write_all
        os.fsync, os.replace, _storage.fsync_dir = fsync, replace, fsync_dir
        _storage.Layout.collect_garbage = collect_garbage
        with open(marker + ".ready", "w"):
            pass
        t = time.perf_counter()
        state = STATES[cmd["state"]]
        safeckpt.save(cmd["path"], state["model"] if cmd["tensors_only"] else state, **cmd["opts"])
        with open(marker + ".done.part", "w") as f:
            f.write(str(time.perf_counter() - t))
        real_replace(marker + ".done.part", marker + ".done")

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(2, 1)  # the protocol owns stdout
                child(cmd)
                code = 0
            except BaseException:
                traceback.print_exc()
                open(cmd["marker"] + ".failed", "w").close()
                code = 1
            os._exit(code)
        print(pid, flush=True)
        sys.stdin.readline()  # reaped only when the test says so: until then the pid stays ours to kill
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """
)


class Zygote:
    """The forking server: ``run`` starts one save in a fresh child and returns its pid."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.buf = b""

    def line(self, timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            if not chunk:
                raise RuntimeError(f"the zygote died (exit {self.proc.wait()})")
            self.buf += chunk
        text, self.buf = self.buf.split(b"\n", 1)
        return text.decode()

    def run(self, cmd: dict[str, Any]) -> int:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())  # type: ignore[union-attr]
        pid = self.line(120)  # the first request waits for torch to import
        assert pid is not None, "the zygote did not fork"
        return int(pid)

    def reap(self) -> int:
        """Let the zygote collect the child; its exit code (-9 if killed)."""
        self.proc.stdin.write(b"reap\n")  # type: ignore[union-attr]
        code = self.line(120)
        assert code is not None, "the child did not end"
        return int(code)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, Any]]:
    return {w: make_state(w) for w in "AB"}


TOTALS: dict[str, dict[str, int]] = {}


def _count(kind: str, what: str) -> None:
    TOTALS.setdefault(kind, {}).setdefault(what, 0)
    TOTALS[kind][what] += 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    for kind, counts in TOTALS.items():
        print(f"\n[reliability] SIGKILL {kind}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


# -- the three kinds of checkpoint under test ------------------------------------------------------

KINDS = {
    "safeckpt file": ("run.safeckpt", {}),
    "safetensors file": ("model.safetensors", {"format": "safetensors"}),
    "sharded directory": ("run", {"max_shard_size": "8MB"}),
}


def _tensors_of(state: dict[str, Any], kind: str) -> dict[str, torch.Tensor]:
    return {f"model/{k}" if kind != "safetensors file" else k: v for k, v in state["model"].items()}


def _save_in_process(path: Path, state: dict[str, Any], kind: str) -> None:
    opts = KINDS[kind][1]
    safeckpt.save(path, state["model"] if kind == "safetensors file" else state, **opts)


def which(path: Path, kind: str, states: dict[str, dict[str, Any]]) -> str:
    """Which state ``path`` holds, after checking it is whole: verify finds nothing, every tensor
    is bit-identical to that state's and its non-tensor values belong to the same state."""
    ckpt = safeckpt.open(path)
    problems = formats.get(ckpt.format).verify(ckpt.path)
    assert problems == [], problems
    got = {k: v.load() for k, v in ckpt.tensors().items()}
    found = []
    for w, state in states.items():
        want = _tensors_of(state, kind)
        if set(got) == set(want) and all(
            got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.int32), want[k].view(torch.int32))
            for k in want
        ):
            found.append(w)
    assert len(found) == 1, f"{path} holds neither state whole (torn?): tensors {sorted(got)}"
    if kind != "safetensors file":
        assert (ckpt["step"], ckpt["note"]) == (states[found[0]]["step"], states[found[0]]["note"]), "mixed state"
    return found[0]


def leftovers(path: Path, kind: str) -> list[str]:
    """What killed saves left next to (or in) the checkpoint."""
    if kind == "sharded directory":
        index = sharded.read_index(path)
        live = {f["name"] for f in index["files"]} | {sharded.INDEX}
        return sorted(set(os.listdir(path)) - live)
    return sorted(n for n in os.listdir(path.parent) if n != path.name)


def kill_trial(
    zygote: Zygote, path: Path, kind: str, state: str, marker: Path, hook: str | None, nth: int, delay: float | None
) -> tuple[str, dict[str, Any] | None]:
    """Start a save of ``state`` to ``path`` and kill it at the hook's ``nth`` call (or ``delay``
    seconds after it starts). Returns how it ended: "killed" (with the hook's report), "finished"
    (the save completed before the kill, or the hook was never reached)."""
    for suffix in ("", ".ready", ".done", ".failed"):
        Path(f"{marker}{suffix}").unlink(missing_ok=True)
    opts = KINDS[kind][1]
    cmd = {"marker": str(marker), "hook": hook, "nth": nth, "path": str(path), "state": state, "opts": opts}
    cmd["tensors_only"] = kind == "safetensors file"
    pid = zygote.run(cmd)
    done, failed = Path(f"{marker}.done"), Path(f"{marker}.failed")
    deadline = time.monotonic() + 120
    if delay is not None:
        while not Path(f"{marker}.ready").exists() and not failed.exists():
            assert time.monotonic() < deadline, "the child never started its save"
            time.sleep(0.001)
        time.sleep(delay)
    else:
        while not (marker.exists() or done.exists() or failed.exists()):
            assert time.monotonic() < deadline, "the child neither reached its hook nor finished"
            time.sleep(0.001)
    if delay is not None or not done.exists():
        os.kill(pid, signal.SIGKILL)  # not yet reaped: the pid is still this child's, even if it has exited
    code = zygote.reap()
    assert not failed.exists(), "the child's save failed; see its traceback on stderr"
    if code == 0 or done.exists():  # the save returned (and then perhaps the kill came)
        return "finished", None
    assert code == -signal.SIGKILL, code
    return "killed", json.loads(marker.read_text()) if marker.exists() else None


def _committed(kind: str, path: Path, report: dict[str, Any]) -> bool:
    """Whether the killed save had already renamed its commit record into place."""
    record = sharded.INDEX if kind == "sharded directory" else path.name
    return record in report["replaced"]


RANDOM_KILLS = 12
HOOKS = ("write_all", "fsync", "replace", "fsync_dir", "collect_garbage")


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_at_every_phase_and_at_random_instants(
    tmp_path: Path, kind: str, zygote: Zygote, states: dict[str, dict[str, Any]]
) -> None:
    path = tmp_path / "ckpt" / KINDS[kind][0]  # alone in its directory: the markers live beside it
    marker = tmp_path / "marker"
    _save_in_process(path, states["A"], kind)
    assert which(path, kind, states) == "A"
    current = "A"

    def other(w: str) -> str:
        return "B" if w == "A" else "A"

    def check_after(report: dict[str, Any] | None, new: str, outcome: str) -> str:
        got = which(path, kind, states)
        if outcome == "finished":
            assert got == new
        elif report is not None:
            assert got == (new if _committed(kind, path, report) else current), (report, got)
        else:
            assert got in (current, new)
        left = leftovers(path, kind)
        if kind != "sharded directory":
            # a save removes the temporaries of killed saves before writing: at most the last one's stays
            assert len(left) <= 1 and all(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in left), left
        else:
            # at most one dead generation (the last killed save's) besides the committed one, whose
            # lock file stays if the save was killed after its commit
            owners = [sharded.LAYOUT.generation_of(n) for n in left]
            gens = {gen for ours, gen in owners if ours} | {m["gen"] for n in left if (m := sharded.LOCK.match(n))}
            assert len(gens - {None, sharded.read_index(path)["generation"]}) <= 1 and all(
                ours or sharded.LOCK.match(n) for n, (ours, _) in zip(left, owners, strict=True)
            ), left
        return got

    # (b) every phase, every time the save reaches it
    for hook in HOOKS:
        nth = 1
        while True:
            new = other(current)
            outcome, report = kill_trial(zygote, path, kind, new, marker, hook, nth, None)
            current = check_after(report, new, outcome)
            if outcome == "finished":
                break
            _count(kind, f"{hook}")
            nth += 1

    # (a) random instants over the whole write: the save's duration measured uninterrupted first
    new = other(current)
    kill_trial(zygote, path, kind, new, marker, None, 0, None)
    current = check_after(None, new, "finished")
    took = float(Path(f"{marker}.done").read_text())
    rng = random.Random(f"safeckpt-{kind}")
    for _ in range(RANDOM_KILLS):
        new = other(current)
        outcome, _ = kill_trial(zygote, path, kind, new, marker, None, 0, rng.uniform(0, took * 1.1))
        before = current
        current = check_after(None, new, outcome)
        _count(
            kind,
            "random "
            + ("finished" if outcome == "finished" else f"killed, held {'new' if current != before else 'old'}"),
        )

    # the next save cleans up everything killed saves left
    _save_in_process(path, states[other(current)], kind)
    assert which(path, kind, states) == other(current)
    assert leftovers(path, kind) == []
    evidence.record(f"[reliability] {kind}: save takes {took * 1000:.0f} ms; kills: {TOTALS.get(kind)}")


# -- what killed saves leave is never taken for a checkpoint ----------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_killed_first_save_leaves_no_checkpoint_and_nothing_that_passes_for_one(
    tmp_path: Path, kind: str, zygote: Zygote, states: dict[str, dict[str, Any]]
) -> None:
    path = tmp_path / "ckpt" / KINDS[kind][0]
    marker = tmp_path / "marker"
    if kind == "sharded directory":
        # one shard: without the index, the directory holds a lone complete safetensors file
        kind_opts = KINDS[kind]
        KINDS[kind] = (kind_opts[0], {"max_shard_size": "1GB"})
        try:
            outcome, report = kill_trial(zygote, path, kind, "A", marker, "replace", 2, None)  # before the index
        finally:
            KINDS[kind] = kind_opts
        assert (
            outcome == "killed"
            and report is not None
            and report["replaced"] == [n for n in os.listdir(path) if n.startswith("shard-")]
        )
        assert formats.detect(path).NAME == "safeckpt-sharded"  # not hf-sharded's "one safetensors file"
        with pytest.raises(CorruptCheckpointError, match="interrupted save"):
            safeckpt.open(path)
    else:
        outcome, report = kill_trial(zygote, path, kind, "A", marker, "replace", 1, None)  # complete, not renamed
        assert outcome == "killed" and not path.exists()
        (temp,) = os.listdir(path.parent)
        assert temp.startswith(f".{path.name}.") and temp.endswith(".tmp")
        with pytest.raises(FileNotFoundError):
            safeckpt.open(path)
        with pytest.raises(UnknownFormatError):
            safeckpt.open(path.parent)  # the directory holds no checkpoint: the temporary is not one
    _save_in_process(path, states["B"], kind)  # the next save cleans up
    assert which(path, kind, states) == "B" and leftovers(path, kind) == []


def test_the_next_save_removes_dead_temporaries_and_never_a_live_one(tmp_path: Path) -> None:
    from safeckpt._storage import atomic_write

    path = tmp_path / "run.safeckpt"
    dead = tmp_path / f".{path.name}.0badc0de.tmp"
    dead.write_bytes(b"what a killed save left")  # nobody holds it
    unrelated = [tmp_path / ".other.safeckpt.0badc0de.tmp", tmp_path / f".{path.name}.notours.tmp"]
    for p in unrelated:
        p.write_bytes(b"x")
    with atomic_write(path) as f:  # a save in progress, holding its temporary
        (live,) = [
            p for p in tmp_path.iterdir() if p.name.startswith(f".{path.name}.") and p != dead and p not in unrelated
        ]
        f.write(b"the outer save")
        safeckpt.save(path, {"step": 1})  # another save to the same path meanwhile
        assert live.exists() and not dead.exists()
        assert safeckpt.load(path) == {"step": 1}
    assert path.read_bytes() == b"the outer save"  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, *(p.name for p in unrelated)])
