"""The package's import graph: no circle anywhere in chatft (imports inside functions count too: a lazy import
hides a circle, it does not remove it), and no module imports a training stage but the stage dispatcher."""

from __future__ import annotations

import ast
from pathlib import Path

from chatft.args import STAGES
from chatft.training.stages import STAGE_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "chatft"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The chatft modules a file imports, anywhere in it; `from pkg import name` counts as pkg.name when that is
    a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "chatft.training.sft" in graph and "chatft.data.templates" in graph["chatft.data.dataset"]
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_only_the_dispatcher_imports_a_stage():
    stages = set(STAGE_MODULES.values())
    importers = {
        name: sorted(imported & stages)
        for name, imported in import_graph().items()
        if imported & stages and name != "chatft.training.stages"
    }
    assert importers == {}


def test_every_stage_has_a_module():
    assert set(STAGE_MODULES) == set(STAGES)
