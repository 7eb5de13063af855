"""No import cycles among mlcontrast's modules, counting imports inside functions (lazy imports).

A lazy import hides a cycle from Python's import machinery but not from the design: the two modules still
depend on each other. This test reads every module's ``import`` statements with :mod:`ast` (wherever they
stand: module level, functions, ``try`` blocks), builds the graph of mlcontrast modules and looks for
strongly connected components of more than one module (or a module importing itself).

An edge goes to the module an ``import`` names: ``from a.b import c`` goes to ``a.b.c`` when that is a
module, else to ``a.b``. Parent packages that Python imports on the way are not edges: a package whose
``__init__`` re-exports its submodules is the normal layout, not a cycle.

Run ``python tests/test_import_graph.py`` to print the cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mlcontrast"


def _declared_extensions(root: Path) -> set[str]:
    """The compiled extensions ``setup.py`` declares (``*Extension("pkg._C", …)``), built or not."""
    setup = root / "setup.py"
    if not setup.is_file():
        return set()
    out = set()
    for node in ast.walk(ast.parse(setup.read_text(), str(setup))):
        func = getattr(node, "func", None)
        name = getattr(func, "id", None) or getattr(func, "attr", None) or ""
        if isinstance(node, ast.Call) and name.endswith("Extension") and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.add(node.args[0].value)
    return out


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path | None]:
    """Dotted module name → source file, for every ``.py`` under the package, plus its compiled extensions,
    built (``.so``/``.pyd``) or declared in ``setup.py``, with no source (None). Extensions are leaves:
    ``from package import _C`` is an edge to ``package._C``, not to ``package``."""
    out: dict[str, Path | None] = {m: None for m in _declared_extensions(root) if m.split(".")[0] == package}
    for path in sorted((root / package).rglob("*")):
        if path.suffix not in (".py", ".so", ".pyd"):
            continue
        parts = list(path.relative_to(root).parts)
        parts[-1] = parts[-1].split(".")[0]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path if path.suffix == ".py" else None
    return out


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path | None, modules: dict[str, Path | None]) -> set[str]:
    """The mlcontrast modules that ``module`` imports anywhere in its source file (none for an extension)."""
    found = set()
    if path is None:
        return found
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, is_package, node)
            # ``from pkg import sub`` imports the submodule ``pkg.sub``; ``from mod import name`` imports mod
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # ``import a.b.c`` of a non-module attribute: nearest module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a sorted list."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                out.append(sorted(comp))
    return sorted(out)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components that are cycles: more than one module, or a module that imports itself."""
    return [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]


def _describe(graph: dict[str, set[str]], cycle: list[str]) -> str:
    members = set(cycle)
    edges = [f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & members)]
    return "{" + ", ".join(cycle) + "}: " + "; ".join(edges)


# ---------------------------------------------------------------- the checker checks itself


def _write_package(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_finds_lazy_and_relative_cycles(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",  # a package re-exporting its submodule: no cycle
        "pkg/a.py": "def f():\n    from pkg.sub import b\n",  # lazy, and ``from pkg.sub import <module>``
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import c\n",  # relative
        "pkg/c.py": "import pkg.a\nimport os\n",
        "pkg/d.py": "from pkg.d import x\nfrom pkg import _C, _E\n",  # a self-import; extension modules
        "pkg/_C.abi3.so": "",  # built
        "setup.py": "setup(ext_modules=[CppExtension('pkg._E', [])])\n",  # declared, not built
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.d", "pkg._C", "pkg._E"} and graph["pkg._C"] == graph["pkg._E"] == set()
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"], ["pkg.d"]]


def test_no_cycle_in_a_chain(tmp_path):
    _write_package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg\n"})
    assert import_cycles(import_graph(tmp_path, "pkg")) == []


# ---------------------------------------------------------------- mlcontrast itself


def test_train_package_has_no_import_cycles():
    graph = import_graph()
    bad = [c for c in import_cycles(graph) if any(m.startswith(f"{PACKAGE}.train") for m in c)]
    assert not bad, "\n".join(_describe(graph, c) for c in bad)


def test_no_import_cycles():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(_describe(graph, c) for c in cycles)


if __name__ == "__main__":
    g = import_graph()
    found = import_cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges, {len(found)} cycle(s)")
    for c in found:
        print(_describe(g, c))
    sys.exit(1 if found else 0)
