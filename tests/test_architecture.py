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
