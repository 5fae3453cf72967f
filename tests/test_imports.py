"""The package's import graph has no circles, and imports its own modules lazily only where startup speed needs it.

Every module under ``src/maskaudit`` is parsed (not imported) with :mod:`ast`, and every import of
a ``maskaudit`` module is an edge, wherever it sits: at module level, inside a function or a
class, under ``try``. Only the bodies of ``if TYPE_CHECKING:`` blocks are skipped: they never run.
Relative imports are resolved; ``from maskaudit.x import y`` is an edge to ``maskaudit.x.y`` when
that is a module, else to ``maskaudit.x``; a package's ``__init__`` is the module ``maskaudit.pkg``.
Importing a submodule also runs its parent packages' ``__init__``; that is not counted as an edge
(a package that imports its own submodules, as ``maskaudit.data.sources`` does, is no circle).

A function-level import of a ``maskaudit`` module hides a circle from whoever reads the top of
the file, so only :data:`LAZY_ALLOWED` may have them: the command-line modules, which import the
pipeline inside the commands so that ``maskaudit --help`` answers at once
(``tests/test_cli_fast.py``). Lazy imports of heavy third-party packages are not looked at.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "maskaudit"

#: the modules that may import maskaudit modules inside functions (for a fast ``maskaudit --help``)
LAZY_ALLOWED = frozenset({"maskaudit.cli", "maskaudit.reader.cli"})


@dataclass(frozen=True)
class Import:
    """One import of a maskaudit module: who imports what, where, and whether inside a function."""

    source: str
    target: str
    path: Path
    line: int
    lazy: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.line}"


def module_name(path: Path) -> str:
    """``maskaudit.data.imaging`` for ``src/maskaudit/data/imaging.py``; a package's ``__init__`` is the package."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``node`` that can run, and whether it sits inside a function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            # the body never runs; an else branch does
            yield from _walk(ast.Module(body=child.orelse, type_ignores=[]), in_function)
        else:
            yield from _walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))


def _package(name: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _targets(node: ast.Import | ast.ImportFrom, name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The maskaudit modules an import statement loads (by the rules in the module's docstring)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "maskaudit" or alias.name.startswith("maskaudit."):
                yield alias.name
        return
    if node.level:
        base = _package(name, path).split(".")
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    if origin != "maskaudit" and not origin.startswith("maskaudit."):
        return
    for alias in node.names:
        submodule = f"{origin}.{alias.name}"
        yield submodule if submodule in known else origin


def imports() -> list[Import]:
    """Every import of a maskaudit module by a maskaudit module (self-imports left out)."""
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, lazy in _walk(tree):
            for target in _targets(node, name, path, known):
                if target != name:
                    found.append(Import(name, target, path, node.lineno, lazy))
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative), those of more than one node only."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from ``start`` back to it inside one strongly connected component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # pragma: no cover - a component always has one


def _graph(found: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules()}
    for each in found:
        graph[each.source].add(each.target)
    return graph


def test_the_walk_sees_every_kind_of_import():
    """The parser's own check: module level, lazy, relative, TYPE_CHECKING skipped, package targets."""
    known = modules()
    found = imports()
    assert {"maskaudit.cli", "maskaudit.data.sources", "maskaudit.data.imaging", "maskaudit.errors"} <= set(known)
    assert any(i.source == "maskaudit.data.imaging" and i.target == "maskaudit.errors" and not i.lazy for i in found)
    assert any(i.source == "maskaudit.cli" and i.lazy for i in found)  # its commands import the pipeline
    code = ast.parse("if TYPE_CHECKING:\n    import maskaudit.a\nelse:\n    import maskaudit.b\n"
                     "def f():\n    from . import c\n    from ..d import e\n")
    statements = list(_walk(code))
    assert [(type(n).__name__, lazy) for n, lazy in statements] == [("Import", False), ("ImportFrom", True),
                                                                    ("ImportFrom", True)]
    fake = ROOT / "data" / "sources" / "x.py"
    targets = [list(_targets(n, "maskaudit.data.sources.x", fake, {**known, "maskaudit.data.sources.c": fake}))
               for n, _ in statements]
    assert targets == [["maskaudit.b"], ["maskaudit.data.sources.c"], ["maskaudit.data.d"]]


def test_strongly_connected_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert cycle_through("a", {"a", "b", "c"}, graph) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = imports()
    graph = _graph(found)
    where = {}
    for each in found:
        where.setdefault((each.source, each.target), each.where)
    cycles = []
    for component in strongly_connected(graph):
        cycle = cycle_through(component[0], set(component), graph)
        edges = ", ".join(f"{a} -> {b} at {where[a, b]}" for a, b in zip(cycle, cycle[1:], strict=False))
        cycles.append(f"{' -> '.join(cycle)}  (component: {', '.join(component)}; {edges})")
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_lazy_imports_of_maskaudit_only_in_the_cli():
    lazy = [f"{i.where}: {i.source} imports {i.target} inside a function" for i in imports()
            if i.lazy and i.source not in LAZY_ALLOWED]
    assert not lazy, ("import maskaudit modules at the top of the file (only the CLI imports lazily, for a fast "
                      "--help):\n" + "\n".join(sorted(set(lazy))))
