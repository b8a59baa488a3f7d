"""The module graph the architecture note describes, checked from the source: no import cycles
(lazy imports inside functions count: they are edges too) and no module using another module's
private (underscore) names. Static, so it costs no imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "safeckpt"


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only run nowhere)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every safeckpt import in ``path``."""
    is_package = path.name == "__init__.py"
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from . import api`: the module itself
                    yield sub, None, node.lineno
                else:
                    yield target, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("safeckpt"):
                    yield alias.name, None, node.lineno


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for m, path in known.items():
        for target, _, _ in imports(m, path, known):
            if target in known and target != m and not m.startswith(target + "."):
                edges[m].add(target)  # a submodule importing its own package's names is not an edge up
    return edges


def test_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles (lazy imports included): {cycles}"


def test_no_private_names_across_modules() -> None:
    known = modules()
    found = []
    for m, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> safeckpt module it stands for
        for target, name, line in imports(m, path, known):
            if name is not None and name.startswith("_") and target != m:
                found.append(f"{path.relative_to(SRC.parent)}:{line}: from {target} import {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = resolve(m, path.name == "__init__.py", node.level, node.module)
                for alias in node.names:
                    if f"{target}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(sorted(set(found)))


def test_the_checks_see_a_cycle_and_a_private_name() -> None:
    """The scan itself: a lazy import back up is an edge, `mod._x` is a private use."""
    known = modules()
    api_edges = graph()["safeckpt.api"]
    assert "safeckpt.formats" in api_edges and "safeckpt.state" in api_edges
    src = "def f():\n    from . import api\n    return api._hidden\n"
    tree = ast.parse(src)
    lazy = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert resolve("safeckpt.hub", False, lazy[0].level, lazy[0].module) == "safeckpt"
    assert "safeckpt.api" in known


# -- one module creates, renames and deletes files ---------------------------------------------------

_OS_MOVES = {"replace", "rename", "renames", "unlink", "remove", "rmdir", "removedirs", "link", "symlink", "truncate"}
_SHUTIL_MOVES = {"rmtree", "move", "copy", "copy2", "copyfile", "copytree"}
_PATH_MOVES = {"unlink", "rename", "rmdir", "symlink_to", "hardlink_to", "touch", "write_text", "write_bytes"}
_STORAGE = "safeckpt/_storage.py"
# (file, function) -> why it may write a file that is not a checkpoint file, outside `_storage`
ALLOWED_WRITERS: dict[tuple[str, str], str] = {}


def _is_write_mode(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and any(c in node.value for c in "wxa+")


def _mentions(node: ast.AST, names: set[str]) -> bool:
    return any(
        (isinstance(n, ast.Attribute) and n.attr in names) or (isinstance(n, ast.Name) and n.id in names)
        for n in ast.walk(node)
    )


def file_moves(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """``(line, enclosing function, call)`` for every call that creates, renames or deletes a file."""
    stack: list[tuple[ast.AST, str]] = [(tree, "<module>")]
    while stack:
        node, func = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        stack.extend((child, func) for child in ast.iter_child_nodes(node))
        if not isinstance(node, ast.Call):
            continue
        f, what = node.func, None
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        if isinstance(f, ast.Name) and f.id == "open" and _is_write_mode(mode):
            what = "open(..., write mode)"
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if owner == "os" and f.attr in _OS_MOVES:
                what = f"os.{f.attr}"
            elif (
                owner == "os"
                and f.attr == "open"
                and len(node.args) > 1
                and _mentions(node.args[1], {"O_CREAT", "O_TRUNC"})
            ):
                what = "os.open(O_CREAT)"
            elif owner == "shutil" and f.attr in _SHUTIL_MOVES:
                what = f"shutil.{f.attr}"
            elif owner not in ("os", "shutil", "_storage") and f.attr in _PATH_MOVES:
                what = f".{f.attr}()"
            elif (
                f.attr == "replace" and len(node.args) == 1 and not node.keywords
            ):  # Path.replace; str.replace takes two
                what = ".replace()"
            elif f.attr == "open" and owner != "os" and _is_write_mode(node.args[0] if node.args else mode):
                what = ".open(write mode)"
        if what:
            yield node.lineno, func, what


def test_only_storage_creates_renames_or_deletes_files() -> None:
    found = []
    for path in modules().values():
        rel = path.relative_to(SRC.parent).as_posix()
        if rel == _STORAGE:
            continue
        for line, func, what in file_moves(ast.parse(path.read_text(), str(path))):
            if (rel, func) not in ALLOWED_WRITERS:
                found.append(f"{rel}:{line} in {func}(): {what}")
    assert not found, "files created, renamed or deleted outside _storage:\n" + "\n".join(sorted(found))


def test_the_file_move_scan_sees_each_kind() -> None:
    src = (
        "import os, shutil\nfrom pathlib import Path\n"
        "def f(p, q, t):\n"
        "    os.replace(p, q); os.unlink(p); shutil.rmtree(p); Path(p).unlink(); Path(p).rename(q)\n"
        "    Path(p).replace(q); p.symlink_to(q); p.hardlink_to(q); p.rmdir(); os.link(p, q)\n"
        "    os.open(p, os.O_WRONLY | os.O_CREAT); open(p, 'wb'); open(p, mode='x'); p.open('w')\n"
        "    t.replace('a', 'b'); open(p); open(p, 'rb'); os.open(p, os.O_RDONLY); p.read_text()\n"
    )
    kinds = [what for _, func, what in file_moves(ast.parse(src)) if func == "f"]
    assert len(kinds) == 14, kinds
    assert {"os.open(O_CREAT)", "open(..., write mode)", ".replace()", ".open(write mode)"} <= set(kinds)
