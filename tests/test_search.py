"""exitnas.search as a package: its modules import one way (no cycle, function-level imports
included) and each imports on its own in an interpreter that has not loaded the package."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from search_support import ROOT, SEARCH, search_modules


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports anywhere in its source (top level,
    inside functions or classes; ``from . import x``, ``from .x import y``, ``from ..pkg.x
    import y`` and absolute ``package.x``). Importing a submodule always loads the package
    first, so only importing a name the package's ``__init__`` defines counts as an edge to
    ``__init__``."""
    mods = {p.stem for p in folder.glob("*.py")}
    parent = package.rsplit(".", 1)[0]
    graph: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1:
                    base = f"{package}.{base}" if base else package
                elif node.level >= 2:
                    up = parent.rsplit(".", node.level - 2)[0] if node.level > 2 else parent
                    base = f"{up}.{base}" if base else up
                if base == package:  # ``from . import x``: module x, or a name __init__ defines
                    edges |= {a.name if a.name in mods else "__init__" for a in node.names}
                    continue
                targets = [base]
            else:
                continue
            for t in targets:
                if t.startswith(package + "."):
                    name = t[len(package) + 1:].split(".")[0]
                    if name in mods:
                        edges.add(name)
        edges.discard(path.stem)
        graph[path.stem] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_check_finds_a_planted_function_level_cycle(tmp_path):
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ._a import f\n")
    (pkg / "_a.py").write_text("def f():\n    from ._b import g\n    return g()\n")
    (pkg / "_b.py").write_text("import os\n\ndef g():\n    from pkg.sub import _c\n")
    (pkg / "_d.py").write_text("import pkg.sub._a\nfrom . import f\n")
    (pkg / "_c.py").write_text("class C:\n    def m(self):\n        from ..sub._a import f\n")
    graph = import_graph(pkg, "pkg.sub")
    assert graph == {"__init__": {"_a"}, "_a": {"_b"}, "_b": {"_c"}, "_c": {"_a"},
                     "_d": {"_a", "__init__"}}
    assert find_cycle(graph) == ["_a", "_b", "_c", "_a"]
    (pkg / "_c.py").write_text("X = 1\n")
    assert find_cycle(import_graph(pkg, "pkg.sub")) is None


def test_search_modules_import_one_way():
    graph = import_graph(SEARCH, "exitnas.search")
    assert set(graph) == set(search_modules()) and len(graph) >= 13
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the layering the package docstring states
    assert graph["_internals"] == set()
    assert graph["_backend"] <= {"_budget", "_genome", "_storage"}
    assert {"_inprocess", "_ray"} <= graph["_run"]
    for backend in ("_inprocess", "_ray"):
        assert "_backend" in graph[backend] and "_run" not in graph[backend]
    assert not any("__init__" in edges for m, edges in graph.items() if m != "__init__")


# Each child is forked from an interpreter that has imported torch and Optuna (what every
# module needs, and the bulk of the start-up time) but nothing of exitnas.search, so each
# import below starts from an unloaded package, in the module's own order.
FORK_IMPORTS = textwrap.dedent("""
    import os, sys, traceback
    import optuna, torch  # noqa: F401
    assert not any(m.startswith("exitnas.search") for m in sys.modules)
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                __import__(name)
                assert name in sys.modules
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(name)
    print("failed:", ",".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_search_module_imports_first_in_a_fresh_interpreter():
    names = [f"exitnas.search.{m}" if m != "__init__" else "exitnas.search"
             for m in search_modules()]
    r = subprocess.run([sys.executable, "-c", FORK_IMPORTS, *names], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "failed:", r.stdout + r.stderr[-3000:]
