"""The library's plan holds: stages layered, no import circles (lazy imports inside functions included).

``lint-imports`` checks the contracts in pyproject.toml; this file runs it, and `graph_summary` describes any
checkout's import graph in numbers (levels, circles, imports that run from a lower stage up to a higher one):

    python tests/test_layout.py                  # this checkout
    python tests/test_layout.py --root DIR       # another checkout (an old flat one: its modules mapped to stages
                                                 # by this checkout's ferdist.MOVED)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["shared", "data", "train", "serve", "track", "launch", "tune", "bench"]
"""Bottom to top: a module may import its own stage and the ones before it."""


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a graph: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def levels(edges: dict[str, set[str]]) -> int:
    """The longest chain of imports, counting modules (a circle counts as one module)."""
    merged = {m: min(c) for c in circles(edges) for m in c}
    dag = {merged.get(a, a): set() for a in edges}
    for a, targets in edges.items():
        dag[merged.get(a, a)] |= {merged.get(b, b) for b in targets} - {merged.get(a, a)}
    depth: dict[str, int] = {}

    def height(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((height(n) for n in dag.get(node, ())), default=0)
        return depth[node]

    return max((height(n) for n in dag), default=0)


def stage_of(module: str, moved: dict[str, str]) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in moved:  # a module of the flat layout
        return moved[parts[1]].split(".")[0]
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "launch" if parts[1:2] == ["launch"] else "shared"


def import_edges(package: str = "ferdist") -> dict[str, set[str]]:
    """module → the package's modules it imports, wherever the import statement is (grimp reads every one)."""
    graph = grimp.build_graph(package)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def graph_summary(edges: dict[str, set[str]], moved: dict[str, str]) -> dict[str, object]:
    upward = sorted(f"{a} → {b}" for a, targets in edges.items() for b in targets
                    if STAGES.index(stage_of(b, moved)) > STAGES.index(stage_of(a, moved)))  # fmt: skip
    return {"modules": len(edges), "levels": levels(edges), "circles": circles(edges), "upward": upward}


def test_the_cycle_finder_finds_a_lazy_circle_and_levels_count_the_chain() -> None:
    """What the layout test relies on: a circle through three modules is found, a chain of three is three levels."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert levels({"a": {"b"}, "b": {"c"}, "c": set()}) == 3
    assert levels({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == 2


def test_no_circles_and_no_import_runs_up_a_stage() -> None:
    import ferdist

    summary = graph_summary(import_edges(), ferdist.MOVED)
    assert summary["circles"] == [], summary["circles"]
    assert summary["upward"] == [], summary["upward"]


def test_the_import_contracts_hold() -> None:
    """``lint-imports`` (the layers, the shared ground, no circles); its own report is the failure message."""
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("old", ["serving", "registry", "model", "loop", "checkpoint", "inference"])
def test_old_module_paths_are_the_moved_modules(old: str) -> None:
    """Registered models name the flat layout's paths (a pickled ``ferdist.registry.FerModel``, a code file importing
    ``ferdist.serving``): each resolves to the very module that moved, not a copy."""
    import importlib

    import ferdist

    assert importlib.import_module(f"ferdist.{old}") is importlib.import_module(f"ferdist.{ferdist.MOVED[old]}")


if __name__ == "__main__":
    import argparse
    import json

    from ferdist import MOVED

    parser = argparse.ArgumentParser(description="The import graph of a checkout's ferdist package, in numbers.")
    parser.add_argument("--root", type=Path, help="the checkout to describe (default: this one)")
    args = parser.parse_args()
    moved = dict(MOVED)
    if args.root:
        for name in [m for m in sys.modules if m == "ferdist" or m.startswith("ferdist.")]:
            del sys.modules[name]
        sys.path.insert(0, str(args.root.resolve()))
        moved |= {"data": "data.loader", "launch": "launch.trainer"}  # the flat layout's modules of those names
    print(json.dumps(graph_summary(import_edges(), moved), indent=1, ensure_ascii=False))
