"""The folder listing shows the architecture: a small root, one-line docstrings, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import coordinator_agent

PACKAGE = Path(coordinator_agent.__file__).parent
SIDES = {"wire", "coordinator", "ha", "routing", "agent", "ops", "cli", "conformance"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package's own modules that ``path`` imports at module level or in functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("coordinator_agent"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / (submodule.replace(".", "/") + ".py")).is_file():
                    found.add(submodule)
                else:
                    found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_root_holds_at_most_ten_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 10, modules


def test_each_side_is_a_subpackage_with_a_one_line_docstring() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == SIDES
    for side in SIDES:
        docstring = ast.get_docstring(ast.parse((PACKAGE / side / "__init__.py").read_text()))
        assert docstring and "\n" not in docstring.strip(), side


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    # The package root loads its public names lazily (PEP 562), so importing it imports nothing.
    graph["coordinator_agent"] = set()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, " -> ".join([*visiting, module])
        visiting.append(module)
        for dependency in graph.get(module, ()):
            if dependency != module:
                visit(dependency)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_http_side_reads_the_coordinator_through_an_interface() -> None:
    for module, dependencies in _graph().items():
        if module.startswith("coordinator_agent.ops"):
            assert "coordinator_agent.coordinator.service" not in dependencies, module


def test_the_wire_knows_nothing_of_either_side() -> None:
    # Its one link outside is the metrics container it counts into (ops.metrics, a leaf).
    for module, dependencies in _graph().items():
        if module.startswith("coordinator_agent.wire"):
            sides = {d.split(".")[1] for d in dependencies - {"coordinator_agent.ops.metrics"}
                     if d.count(".") >= 1}
            assert not sides & {"coordinator", "agent", "routing", "ops", "cli"}, module
