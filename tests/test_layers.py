"""The dependency rule of the design, checked from the modules' own imports.

Parts depend one way: buckets <- protocol <- client <- transport <- session <- actor
<- cli; the fleet uses the client and the protocol, never a transport; no import
circle; nothing in the library imports the CLI, the test tools or the benchmarks.
Imports are read from each module's source (module level and inside functions,
but not those under ``if TYPE_CHECKING:``), so a lazy import does not hide a
circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "asyncsync"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the asyncsync modules it imports (at run time)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        skipped: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("asyncsync"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if not target.startswith("asyncsync"):
                    continue
                found.add(target)
                for alias in node.names:  # "from . import x" may name a submodule
                    if (PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))).exists() or (
                        PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))
                    ).with_suffix(".py").exists():
                        found.add(f"{target}.{alias.name}")
        found.discard(name)
        graph[name] = found
    return graph


GRAPH = _imports()


def _reaches(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read() -> None:
    # A reader that found nothing would pass every rule below.
    assert "asyncsync.buckets" in GRAPH["asyncsync.protocol"]
    assert "asyncsync.client" in GRAPH["asyncsync.fleet"]
    assert len(GRAPH) > 30


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("asyncsync.protocol", {"asyncsync.client", "asyncsync.transport", "asyncsync.fleet"}),
        ("asyncsync.client", {"asyncsync.transport", "asyncsync.fleet", "asyncsync.session"}),
        (
            "asyncsync.transport",
            {"asyncsync.fleet", "asyncsync.session", "asyncsync.plan", "asyncsync.keeper"},
        ),
        ("asyncsync.fleet", {"asyncsync.transport", "asyncsync.session", "asyncsync.receiver"}),
        ("asyncsync.buckets", {"asyncsync.cache", "asyncsync.protocol", "asyncsync.client"}),
        ("asyncsync.convert", {"asyncsync.session", "asyncsync.fleet", "asyncsync.transport"}),
    ],
)
def test_parts_depend_one_way(module: str, forbidden: set[str]) -> None:
    reached = set()
    for name in GRAPH:
        if name == module or name.startswith(module + "."):
            reached |= _reaches(name)
    bad = {r for r in reached if any(r == f or r.startswith(f + ".") for f in forbidden)}
    assert not bad, f"{module} reaches {sorted(bad)}"


def test_protocol_imports_buckets_only() -> None:
    assert GRAPH["asyncsync.protocol"] == {"asyncsync.buckets"}


def test_no_import_circle() -> None:
    circles = sorted(m for m in GRAPH if m in _reaches(m))
    assert not circles, f"modules that import themselves through others: {circles}"


def test_the_library_imports_no_tools() -> None:
    def tool(module: str) -> bool:
        return any(
            module == t or module.startswith(t + ".")
            for t in ("asyncsync.testing", "asyncsync.cli", "asyncsync.demo", "benchmarks")
        )

    for name, imported in GRAPH.items():
        if tool(name):
            continue
        tools = {i for i in imported if tool(i)}
        assert not tools, f"{name} imports {sorted(tools)}"
