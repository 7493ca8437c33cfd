"""Import hygiene of the three packages (DESIGN.md, "Layout"; issue 12, item 4).

Every ``.py`` file under ``sde/``, ``dynamics/`` and ``experiments/`` is parsed with `ast` (nothing is
imported to build the graph). An import names a project module as follows: ``import a.b`` and
``from a.b import x`` name ``a.b``; ``from a import b`` names the submodule ``a.b`` when one exists,
else the package ``a`` itself (its ``__init__``). Relative imports are resolved against the
importing module. The implicit import of parent packages (``a`` when importing ``a.b``) is not
counted, as in import-linter.

- Cycles: only module-level imports count (statements outside any function or method, including
  those under ``if``/``try`` at module level). A lazy import inside a function runs after every
  module involved has finished loading, so it cannot produce a partially initialised module;
  such imports are allowed for a dependency that is one-way at runtime.
  A second test counts function-level imports too, so that a lazy import never hides a cycle.
- Private names: module-level and function-level imports both count. ``from X import _name`` and
  ``X._name`` (attribute access on a name bound to a project module) are refused when X is another
  module of the project; dunder names (``__version__``) are not private. tests/ are exempt.
- Layers: experiments -> dynamics <- sde (sde may use dynamics): dynamics imports neither sde nor
  experiments, and sde does not import experiments, at any level.
- Each package's ``__init__.py`` defines ``__all__`` and every name in it resolves (an attribute of
  the package or an importable submodule).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sde", "dynamics", "experiments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files() -> dict[str, Path]:
    files = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            files[_module_name(path)] = path
    return files


FILES = _project_files()
MODULES = set(FILES)


def _is_package(name: str) -> bool:
    return FILES[name].name == "__init__.py"


def _resolve_base(importer: str, node: ast.ImportFrom) -> str | None:
    """Absolute name of the module in ``from <base> import ...``."""
    if node.level == 0:
        return node.module
    anchor = importer if _is_package(importer) else importer.rpartition(".")[0]
    parts = anchor.split(".")
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    base = ".".join(parts)
    return f"{base}.{node.module}" if node.module else base


class _Imports(ast.NodeVisitor):
    """Collects (target module, lineno, module_level) edges, private-name uses and module aliases."""

    def __init__(self, importer: str):
        self.importer = importer
        self.depth = 0                      # > 0 inside a function body
        self.edges: list[tuple[str, int, bool]] = []
        self.private: list[str] = []
        self.aliases: dict[str, str] = {}   # local name -> project module it is bound to

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _edge(self, target: str, lineno: int):
        self.edges.append((target, lineno, self.depth == 0))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in MODULES:   # `import a.b.c` where c is not ours
                name = name.rpartition(".")[0]
            if not name:
                continue
            self._edge(name, node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = name
            else:                                 # `import a.b` binds `a`; `a.b` is reached as an attribute
                self.aliases.setdefault(name.split(".")[0], name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = _resolve_base(self.importer, node)
        if base is None or base.split(".")[0] not in PACKAGES:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:
                self._edge(sub, node.lineno)
                self.aliases[alias.asname or alias.name] = sub
                target = sub
            else:
                self._edge(base, node.lineno)
                target = base
            if alias.name.startswith("_") and not alias.name.startswith("__") and target != self.importer:
                self.private.append(f"{self.importer}:{node.lineno} from {base} import {alias.name}")

    def visit_Attribute(self, node: ast.Attribute):
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.aliases:
            module = self.aliases[value.id]
            names = list(reversed(chain))
            # walk `a.b.c._x`: extend the module while the next name is a submodule
            while names and f"{module}.{names[0]}" in MODULES:
                module = f"{module}.{names.pop(0)}"
            if names and names[0].startswith("_") and not names[0].startswith("__") \
                    and module != self.importer:
                self.private.append(f"{self.importer}:{node.lineno} {module}.{names[0]}")
            return                               # the whole chain is handled here
        self.generic_visit(node)


def _scan() -> dict[str, _Imports]:
    out = {}
    for name, path in FILES.items():
        visitor = _Imports(name)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        out[name] = visitor
    return out


SCAN = _scan()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_scan_sees_the_packages():
    # guard against a scanner that silently finds nothing
    assert {"sde.problem", "dynamics.objective", "experiments.trainer"} <= MODULES
    assert sum(len(v.edges) for v in SCAN.values()) > 50


def test_no_import_cycles_at_module_level():
    graph = {m: {t for t, _, top in v.edges if top and t != m} for m, v in SCAN.items()}
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail.append(" <-> ".join(comp) + ": " + "; ".join(
            f"{m} -> {t} (line {line})" for m in comp for t, line, top in SCAN[m].edges
            if top and t in members and t != m))
    assert not cycles, "module-level import cycles:\n" + "\n".join(detail)


def test_lazy_imports_do_not_close_a_cycle():
    # a function-level import is allowed only for a dependency that is one-way at runtime: counting
    # every import, the graph must still have no cycle
    graph = {m: {t for t, _, _ in v.edges if t != m} for m, v in SCAN.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles through function-level imports: " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    found = [p for v in SCAN.values() for p in v.private]
    assert not found, f"{len(found)} private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("low, high", [("dynamics", "sde"), ("dynamics", "experiments"),
                                       ("sde", "experiments")])
def test_dependencies_point_one_way(low, high):
    bad = [f"{m}:{line} imports {t}" for m, v in SCAN.items() if m.split(".")[0] == low
           for t, line, _ in v.edges if t.split(".")[0] == high]
    assert not bad, f"{low} must not import {high}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_defines_all_and_it_resolves(package):
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    assigned = [n for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    assert assigned, f"{package}/__init__.py does not define __all__"
    mod = importlib.import_module(package)
    names = list(mod.__all__)
    assert len(names) == len(set(names)), f"{package}.__all__ has duplicates"
    missing = []
    for name in names:
        if hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError:
            missing.append(name)
    assert not missing, f"{package}.__all__ names that do not resolve: {missing}"
