"""The floors of docs/architecture.md, kept: every import inside the package points to the same floor or
one below it, no import circle, and nothing at the package's top level except the public entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dynascope"

#: floor of each top-level part of the package, lowest first (docs/architecture.md)
FLOORS: dict[str, int] = {
    "core": 0, "datasets": 0,
    "store": 1,
    "diagnostics": 2,
    "probes": 3,
    "capture": 4,
    "analysis": 5,
    "reports": 6,
    "integrations": 7,
    "commands": 8,
    "run": 9, "__init__": 9, "__main__": 9,
}
ENTRY_POINTS = {"__init__.py", "__main__.py", "run.py"}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(mods: dict[str, tuple[Path, bool]] | None = None) -> dict[str, set[str]]:
    """module -> the package's modules it imports (function-level imports too; TYPE_CHECKING ones not)."""
    mods = _modules() if mods is None else mods
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    head = base[: len(base) - node.level + 1]
                    prefix = ".".join(head + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def floor(mod: str) -> int:
    parts = mod.split(".")
    return FLOORS["__init__"] if len(parts) == 1 else FLOORS[parts[1]]


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (floor {floor(a)}) -> {b} (floor {floor(b)})"
                  for a, tos in edges.items() for b in tos
                  if floor(b) > floor(a) and not a.startswith(b + ".") and b != "dynascope")


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's ``__init__`` that
    re-exports its own modules is not an edge back from them (``a.b`` importing ``a`` is counted only
    when ``a`` is not its parent package)."""
    graph = {a: {b for b in tos if not a.startswith(b + ".")} for a, tos in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_part_of_the_package_has_a_floor() -> None:
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert tops <= set(FLOORS), f"parts with no floor in FLOORS: {sorted(tops - set(FLOORS))}"


def test_no_module_at_the_top_level_but_the_entry_points() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS)
    assert loose == [], f"modules at the package's top level: {loose} (put each on its floor)"


def test_no_import_from_a_lower_floor_to_a_higher_one() -> None:
    assert upward(imports()) == []


def test_no_import_circle() -> None:
    assert circles(imports()) == []


def test_the_walk_sees_upward_imports_and_circles(tmp_path: Path) -> None:
    """The checks can fail: a planted upward import and a planted circle are found."""
    pkg = tmp_path / "dynascope"
    for sub in ("core", "reports"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from ..reports import b\n")
    (pkg / "reports" / "b.py").write_text("from ..core import a\n")
    (pkg / "core" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                       "if TYPE_CHECKING:\n    from ..reports import b\n")
    mods = {}
    for path in pkg.rglob("*.py"):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    edges = imports(mods)
    assert upward(edges) == ["dynascope.core.a (floor 0) -> dynascope.reports (floor 6)",
                             "dynascope.core.a (floor 0) -> dynascope.reports.b (floor 6)"]
    assert circles(edges) == [["dynascope.core.a", "dynascope.reports.b"]]


@pytest.mark.parametrize("name", ["probe", "load_run", "report", "findings", "compare", "figure", "figures",
                                  "Probe", "Curvature", "Sentinel", "Session", "RunData", "load_snapshot"])
def test_the_public_names_stay(name: str) -> None:
    import dynascope

    assert getattr(dynascope, name) is not None
