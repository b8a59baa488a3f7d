"""The README, run: every ```python block and every command of every ```console/```bash block.

Blocks are collected by parsing README.md, so a block added later is run without touching this
file. Each ``## `` section is one story: its blocks run in order, the python ones in one namespace
(``__name__ == "__main__"``, as a pasted script), all in one fresh working directory holding a
copy of ``fixtures/``, so paths are written relative to the repository's root as a user would.

- ```python: executed; its printed output (and the traceback of an exception it raises) must match
  the ```text block right after it, if there is one: each shown line, in order, must equal an output
  line, where ``...`` in a line matches anything and a line that is only ``...`` marks lines left
  out. An exception nobody shows fails the test.
- ```console/```bash: each ``$ command`` runs with bash in the working directory, the venv's
  ``bin`` first on PATH (so ``safeckpt`` is the installed console script, a real subprocess); the
  lines under it are its expected output (matched as above). It must exit 0, or the number a
  ``# exits N`` comment on the command line says.
- Hidden markers, an HTML comment on the line before a block, set context a reader does not see:
  ``<!-- test: setup=hub -->`` runs the whole story against a local Hugging Face Hub
  (tests/minihub.py; ``HF_ENDPOINT``/``HF_TOKEN``/``HF_HOME`` set, user ``me``);
  ``<!-- test: setup=s3 -->`` against a local S3 server (tests/remote_server.py; ``AWS_*`` set,
  bucket ``my-bucket``);
  ``<!-- test: file=train.py -->`` writes the block to that file instead of running it (a later
  console block runs it: the torch.distributed story uses the real ``torchrun``, 2 gloo ranks).

Nothing is skipped silently: a block of another language, a ```text block that follows no python
block, or an unknown marker fails `test_every_block_is_accounted_for`; `SKIP` lists the commands
deliberately not run, each with its reason, and an entry that matches nothing fails too.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from safeckpt import user_types

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
TOKEN = "hf_me_write_token"

# Commands not run, by exact text, and why. The set-up commands create a venv and pip-install the
# package (CI's `.ci/run` runs the second verbatim, and it runs this very suite); of the first,
# the `safeckpt ...` steps after the install are run here all the same.
SKIP = {
    "python3 -m venv .venv": "creates a virtualenv: CI (.ci/run) does, from a fresh clone",
    ". .venv/bin/activate": "activates that virtualenv: the test already runs in one",
    "pip install -c constraints.txt -e .": "installs the package: already installed to run this test",
    'pip install -c constraints.txt -e ".[test]"': "installs the package: already installed to run this test",
    "python -m pytest": "the whole suite, which includes this test: CI (.ci/run) runs it",
}
MARKER = re.compile(r"^<!--\s*test:(.*)-->\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")  # indented fences (in a list item) count too
SHELLS = ("console", "bash", "sh", "shell")
SETUPS = ("hub", "s3")


@dataclass
class Block:
    lang: str
    line: int  # of the opening fence, 1-based
    code: str
    marker: dict[str, str] = field(default_factory=dict)
    expected: str | None = None  # the ```text block after a python block


@dataclass
class Story:
    section: str
    blocks: list[Block] = field(default_factory=list)


def parse(text: str) -> list[Story]:
    """The README's fenced blocks grouped by ``## `` section; raises on a block nothing would run."""
    stories: list[Story] = []
    section, lines, i = "(top)", text.splitlines(), 0
    previous: Block | None = None  # the last block, while only blank lines follow it
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = FENCE.match(line)
        if not m:
            if line.strip():
                previous = None
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start}: a ``` fence that is never closed")
        i += 1
        lang, code = m.group(2), textwrap.dedent("\n".join(body) + "\n")
        marker = _marker(lines, start - 1)
        if lang == "text":
            if previous is None or previous.lang != "python" or previous.expected is not None:
                raise ValueError(
                    f"README.md:{start}: a ```text block that follows no ```python block: nothing checks it"
                )
            previous.expected, previous = code, None
            continue
        if lang != "python" and lang not in SHELLS:
            raise ValueError(
                f"README.md:{start}: a ```{lang or '(no language)'} block: the docs test runs only python and console/bash"
            )
        if not stories or stories[-1].section != section:
            stories.append(Story(section))
        previous = Block(lang, start, code, marker)
        stories[-1].blocks.append(previous)
    return stories


def _marker(lines: list[str], fence: int) -> dict[str, str]:
    """The ``<!-- test: key=value ... -->`` comment on the line before the fence at index ``fence``."""
    m = MARKER.match(lines[fence - 1]) if fence > 0 else None
    if m is None:
        return {}
    pairs = dict(p.split("=", 1) for p in m.group(1).split())
    unknown = set(pairs) - {"setup", "file"}
    if unknown or pairs.get("setup", "hub") not in SETUPS:
        raise ValueError(f"README.md:{fence + 1}: unknown test marker {m.group(0)!r}")
    return pairs


@dataclass
class Command:
    line: int
    text: str
    expected: str
    exit: int


def commands(block: Block) -> list[Command]:
    """A console block's commands: ``$ cmd`` lines with the output under them, or (no ``$``) one
    command per line, ``#`` lines being comments. Skipped steps of ``&&`` chains are dropped."""
    out: list[Command] = []
    lines = block.code.splitlines()
    prompt = any(x.startswith("$ ") for x in lines)
    for n, x in enumerate(lines, block.line + 1):
        if prompt and x.startswith("$ "):
            out.append(Command(n, x[2:], "", _exit(x)))
        elif prompt and out:
            out[-1].expected += x + "\n"
        elif not prompt and x.strip() and not x.lstrip().startswith("#"):
            steps = [s for s in x.split(" && ") if s.strip() not in SKIP]
            if steps:
                out.append(Command(n, " && ".join(steps), "", 0))
        elif prompt and x.strip():
            raise ValueError(f"README.md:{n}: output before any $ command")
    return out


def _exit(command: str) -> int:
    m = re.search(r"#.*\bexits (\d+)", command)
    return int(m.group(1)) if m else 0


def mismatch(expected: str, actual: str) -> str | None:
    """Why ``actual`` does not show ``expected`` (doctest's ELLIPSIS, lines in order), or None."""
    got = [x.rstrip() for x in actual.splitlines()]
    at = 0
    for want in (x.rstrip() for x in expected.splitlines()):
        if not want.strip() or want.strip() == "...":
            continue
        pattern = re.compile(".*".join(map(re.escape, want.split("..."))))
        hit = next((k for k in range(at, len(got)) if pattern.fullmatch(got[k])), None)
        if hit is None:
            return f"expected line not found (in order): {want!r}\n--- actual output ---\n{actual}"
        at = hit + 1
    return None


try:
    STORIES = parse(README.read_text(encoding="utf-8"))
except ValueError:
    STORIES = []  # test_every_block_is_accounted_for parses again and fails with the reason


def test_every_block_is_accounted_for() -> None:
    """Parsing succeeded (it raises on a block nothing runs), found the README's stories, and
    every SKIP entry still names a command in the README."""
    text = README.read_text(encoding="utf-8")
    assert parse(text) == STORIES
    python = [b for s in STORIES for b in s.blocks if b.lang == "python"]
    shell = [c for s in STORIES for b in s.blocks if b.lang != "python" for c in commands(b)]
    assert len(python) >= 10 and len(shell) >= 6, (len(python), len(shell))
    assert sum(1 for b in python if b.expected is not None) >= 5
    blocks = [b for s in STORIES for b in s.blocks]
    outputs = sum(1 for b in blocks if b.expected is not None)
    assert len(re.findall(r"^\s*```", text, re.M)) == 2 * (len(blocks) + outputs), "a fence the parser did not take"
    for skipped in SKIP:
        assert re.search(rf"(^| && ){re.escape(skipped)}( && |$)", text, re.M), f"SKIP entry matches nothing: {skipped}"


# -- context -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import minihub

    srv = minihub.make_server(str(tmp_path_factory.mktemp("readme-hub")), tokens={TOKEN: "me"}, lfs_mode="never")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def use_hub(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point the Hub client (in-process and the CLI's subprocesses) at the local server, fresh cache."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    srv = request.getfixturevalue("hub_server")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# -- running -------------------------------------------------------------------------------------------


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    out = io.StringIO()
    raised: BaseException | None = None
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
        except Exception as e:
            raised = e
    text = out.getvalue()
    if raised is not None:
        if block.expected is None or "Traceback (most recent call last):" not in block.expected:
            raise AssertionError(f"README.md:{block.line}: the block raised\n{text}") from raised
        text += "".join(traceback.format_exception(raised))
    if block.expected is not None:
        why = mismatch(block.expected, text)
        assert why is None, f"README.md:{block.line}: {why}"


def run_command(command: Command, cwd: Path) -> None:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="200")
    r = subprocess.run(["bash", "-c", command.text], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    shown = f"$ {command.text}\n--- stdout ---\n{r.stdout}--- stderr ---\n{r.stderr}"
    assert r.returncode == command.exit, f"README.md:{command.line}: exit {r.returncode}, not {command.exit}\n{shown}"
    why = mismatch(command.expected, r.stdout + r.stderr)
    assert why is None, f"README.md:{command.line}: $ {command.text}\n{why}"


@pytest.mark.parametrize("story", STORIES, ids=[s.section for s in STORIES])
def test_story(story: Story, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    if any(b.marker.get("setup") == "hub" for b in story.blocks):
        use_hub(request, monkeypatch, tmp_path / ".hf-home")
    if any(b.marker.get("setup") == "s3" for b in story.blocks):
        request.getfixturevalue("s3_server").fs().mkdir("my-bucket", exist_ok=True)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    registered = set(user_types._BY_NAME)
    request.addfinalizer(lambda: [user_types._unregister(n) for n in set(user_types._BY_NAME) - registered])
    for block in story.blocks:
        if "file" in block.marker:
            (tmp_path / block.marker["file"]).write_text(block.code, encoding="utf-8")
        elif block.lang == "python":
            run_python(block, namespace)
        else:
            for command in commands(block):
                run_command(command, tmp_path)


def test_the_runner_has_teeth() -> None:
    """What would make a README change fail: wrong output, an unshown exception, a block nothing runs."""
    (story,) = parse("## s\n\n```python\nprint(1 + 1)\n```\n\n```text\n3\n```\n\n```python\n1 / 0\n```\n")
    namespace: dict[str, Any] = {}
    with pytest.raises(AssertionError, match="expected line not found.*'3'"):
        run_python(story.blocks[0], namespace)
    with pytest.raises(AssertionError, match="the block raised"):
        run_python(story.blocks[1], namespace)
    shown = parse(
        "## s\n```python\n1 / 0\n```\n```text\nTraceback (most recent call last):\nZeroDivisionError: ...\n```\n"
    )
    run_python(shown[0].blocks[0], namespace)
    for bad in (
        "## s\n\nprose\n\n```text\n3\n```\n",
        "## s\n```json\n{}\n```\n",
        "## s\n<!-- test: setup=gpu -->\n```python\n```\n",
    ):
        with pytest.raises(ValueError, match=r"README\.md:\d+"):
            parse(bad)
    (cli,) = parse("## s\n```console\n$ safeckpt verify x.pt   # exits 1: unsafe\nx.pt  (torch, ...)\n$ ls\n```\n")
    assert [(c.text.split()[0], c.expected, c.exit) for c in commands(cli.blocks[0])] == [
        ("safeckpt", "x.pt  (torch, ...)\n", 1),
        ("ls", "", 0),
    ]
    assert mismatch("a ... c\n...\nz\n", "a b c\nq\nz\n") is None and mismatch("z\na\n", "a\nz\n") is not None
