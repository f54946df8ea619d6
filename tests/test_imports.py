"""The package's import structure: every module imports on its own, and no module imports one that imports
it back (issue 22: "no import circles").

* :func:`test_every_module_imports_alone`: each module of ``megatron_qrm`` is imported with no other module of
  the package loaded before it, so a module that works only because something else happened to be imported
  first fails here. A fresh interpreter per module would cost ~7 s of torch + megatron-core import each (two
  CPU cores); instead two interpreters import half the modules each, one by one, removing every
  ``megatron_qrm`` module from ``sys.modules`` before each (third-party packages stay loaded: they cannot
  depend on ours). ``__main__`` modules are left out: importing one runs its command.
* :func:`test_import_graph_has_no_cycle`: the static graph of ``megatron_qrm`` imports, function-level imports
  included (a circle hidden inside functions still ties two modules together), parsed with :mod:`ast`; every
  strongly connected component is reported by module names.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "megatron_qrm"

#: Import circles not removed yet, each the set of modules of one strongly connected component, with why
#: they remain. Empty: there are none. A listed circle that disappears must be removed from here.
KNOWN_CYCLES: set[frozenset[str]] = set()


def package_modules(root: Path = REPO, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` under ``root`` (packages as their
    ``__init__.py``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path], package: str = PACKAGE) -> set[str]:
    """The modules of ``modules`` that module ``name`` (file ``path``) imports anywhere in its body.

    ``from a.b import c`` names module ``a.b.c`` when that is a module, else ``a.b`` (``c`` is an attribute);
    relative imports resolve against the module's package. Importing ``a.b.c`` also runs ``a/__init__`` and
    ``a/b/__init__``; those parent edges are left out: a package's ``__init__`` re-exporting its submodules is
    not a circle of the code's layering.
    """
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")[: len(own_package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name and m.split(".")[0] == package}


def import_graph(root: Path = REPO, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root, package)
    return {name: imported_modules(name, path, modules, package) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list of names
    starting at its smallest, following imports (a shortest path back within the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(comp, graph) for comp in components]


def _cycle_through(comp: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle ``[a, ..., a]`` from the component's smallest module back to itself (breadth-first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(comp)} is not strongly connected")


def test_import_graph_has_no_cycle():
    cycles = import_cycles(import_graph())
    unexpected = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not unexpected, "import circles (module -> module it imports):\n" + "\n".join(
        " -> ".join(c) for c in unexpected)
    gone = KNOWN_CYCLES - {frozenset(c) for c in cycles}
    assert not gone, f"KNOWN_CYCLES lists circles that no longer exist (remove them): {gone}"


def test_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    """The check can fail: a planted circle through a function-level relative import is found and named."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("import pkg.sub.b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (pkg / "d.py").write_text("from pkg.sub import b\nfrom pkg.c import g\n")  # imports the circle, not in it
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.d"] == {"pkg.sub.b", "pkg.c"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


# Imports each module named on stdin's JSON list with no module of the package argv[1] loaded before it;
# prints [[module, traceback], ...] of those that fail.
_DRIVER = r"""
import importlib, json, sys, traceback
failures = []
for name in json.load(sys.stdin):
    for loaded in [m for m in sys.modules if m == sys.argv[1] or m.startswith(sys.argv[1] + ".")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures.append([name, traceback.format_exc()])
print(json.dumps(failures))
"""


def _import_alone(names: list[str], root: Path, package: str) -> list[list[str]]:
    """``[[module, traceback], ...]`` of the modules ``names`` that fail to import with nothing of ``package``
    imported before them (one interpreter, the package's modules removed from ``sys.modules`` between)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _DRIVER, package], input=json.dumps(names), capture_output=True,
                          text=True, cwd=root, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_alone_catches_a_module_that_needs_another_imported_first(tmp_path):
    """The check can fail: ``a`` reads ``pkg.b`` without importing it, which works only after ``import pkg.b``."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "b.py").write_text("X = 1\n")
    (tmp_path / "pkg" / "a.py").write_text("import pkg\nY = pkg.b.X\n")
    assert [name for name, _ in _import_alone(["pkg.b", "pkg.a"], tmp_path, "pkg")] == ["pkg.a"]
    # the same two in one interpreter without the clearing would both import: b first makes pkg.b an attribute


def test_every_module_imports_alone():
    # entry points (``python -m``) run their command when imported; they are plain calls of a module's main()
    names = [n for n in package_modules() if not n.endswith(".__main__")]
    # two interpreters side by side (the torch + megatron-core import they each pay once is CPU-bound)
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = pool.map(lambda part: _import_alone(part, REPO, PACKAGE), [names[0::2], names[1::2]])
        failures = [f for result in parts for f in result]
    assert not failures, "modules that do not import on their own:\n" + "\n".join(
        f"{name}:\n{tb}" for name, tb in failures)
