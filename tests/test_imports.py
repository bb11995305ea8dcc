"""No import circle in the package: no module of ``src/flora`` imports one that imports it
back, directly or through others, counting imports inside functions too.

The graph is read from the source (``import`` and ``from`` statements anywhere in a
module), not from what Python happens to import. An edge goes to the module named; a
``from pkg import name`` goes to ``pkg.name`` when that is a module, else to ``pkg``.
Importing a module of another package also runs that package's ``__init__``, so it adds
an edge to that package too (not for the importer's own packages, which are running
already)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def modules(root: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, (f, is_pkg) in mods.items():
        pkg = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for a in node.names:
                    targets.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
        edges = set()
        for t in targets:
            if t not in mods:
                continue  # outside the package
            edges.add(t)
            parent = t.rpartition(".")[0]
            while parent:  # the packages above the target run first
                if parent in mods and not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
                parent = parent.rpartition(".")[0]
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")  # lazily, inside a function
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    (pkg / "d.py").write_text("from p.sub.c import x\n")  # runs p.sub's __init__ too
    graph = import_graph(tmp_path)
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.a"}
    assert graph["p.d"] == {"p.sub.c", "p.sub"} and graph["p.sub.c"] == set()
    assert cycles(graph) == [["p.a", "p.b"]]


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "flora.accumulation.accumulator" in graph and graph["flora.distributed"]
    found = cycles(graph)
    assert not found, "import circles (each group imports itself back): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_old_import_paths_still_work():
    from flora import CompressedAccumulator
    from flora.accumulate import (ACCUMULATION_PROJECTIONS, CompressedAccumulator as Old, accumulate_compressed_,
                                  write_estimate_)
    from flora.accumulation import ACCUMULATION_PROJECTIONS as New
    from flora.distributed import check_agreement  # noqa: F401

    assert Old is CompressedAccumulator and ACCUMULATION_PROJECTIONS is New
    assert callable(accumulate_compressed_) and callable(write_estimate_)
