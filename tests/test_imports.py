"""The import graph of gce_jax: no cycles, no private names across modules, one-way layers.

Read from the source with ``ast`` (nothing is imported), including imports
inside functions: a lazy import is still a dependency, and a cycle hidden in
a function body is still a cycle.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Iterator, Mapping

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "gce_jax"
# gce_jax.robustness: a module may import only modules before it.
ROBUSTNESS_LAYERS = ("specs", "evaluator", "diagnostics", "report")


def package_sources(root: pathlib.Path = ROOT / PACKAGE) -> dict[str, str]:
    """``module name -> source`` of every module under ``root`` (packages by their name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def _is_package(name: str, sources: Mapping[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in sources)


def _resolve(importer: str, node: ast.ImportFrom, sources: Mapping[str, str]) -> str:
    if not node.level:
        return node.module or ""
    pkg = importer if _is_package(importer, sources) else importer.rpartition(".")[0]
    base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
    return f"{base}.{node.module}" if node.module else base


def imports(importer: str, source: str,
            sources: Mapping[str, str]) -> Iterator[tuple[str, str | None, int]]:
    """``(module, name or None, line)`` of every gce_jax import in ``source``.

    ``from gce_jax.x import y`` gives ``('gce_jax.x.y', None, ...)`` when ``y``
    is a submodule, else ``('gce_jax.x', 'y', ...)``.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, node, sources)
            if module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in sources:
                    yield sub, None, node.lineno
                else:
                    yield module, alias.name, node.lineno


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """``module -> modules it makes Python import`` (within gce_jax).

    Importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` unless the
    importer lives inside ``a.b`` (which is then already being imported),
    so those package edges count too; the root package is left out.
    """
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for importer, source in sources.items():
        for module, _, _ in imports(importer, source, sources):
            parts = module.split(".")
            for i in range(2, len(parts) + 1):
                target = ".".join(parts[:i])
                inside = importer == target or importer.startswith(target + ".")
                if target in sources and target != importer and (i == len(parts) or not inside):
                    graph[importer].add(target)
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _package_of(module: str, sources: Mapping[str, str]) -> str:
    return module if _is_package(module, sources) else module.rpartition(".")[0]


def private_imports(sources: Mapping[str, str]) -> list[str]:
    """Imports of a private name, or of a private module from outside its package.

    A private submodule (``gce_jax.attacks._common``) and its names belong to
    its package: modules inside that package may import them.
    """
    bad = []
    for importer, source in sources.items():
        for module, name, line in imports(importer, source, sources):
            parts = module.split(".")
            private_at = next((i for i, p in enumerate(parts) if p.startswith("_")), None)
            if private_at is not None:
                owner = ".".join(parts[:private_at])
                if not (importer == owner or importer.startswith(owner + ".")):
                    bad.append(f"{importer}:{line} imports private module {module}")
                continue
            if name is not None and name.startswith("_"):
                bad.append(f"{importer}:{line} imports private name {module}.{name}")
    return bad


def layer_violations(sources: Mapping[str, str], package: str = f"{PACKAGE}.robustness",
                     layers: tuple[str, ...] = ROBUSTNESS_LAYERS) -> list[str]:
    """Imports inside ``package`` that go up (or sideways) its ``layers``."""
    rank = {f"{package}.{layer}": i for i, layer in enumerate(layers)}
    bad = []
    for importer, source in sources.items():
        if importer not in rank:
            continue
        for module, _, line in imports(importer, source, sources):
            if module == package:
                bad.append(f"{importer}:{line} imports its own package {package} "
                           "(which imports every layer)")
            elif module.startswith(package + "."):
                if module not in rank or rank[module] >= rank[importer]:
                    bad.append(f"{importer}:{line} imports {module}: "
                               f"only {' -> '.join(layers)} is allowed")
    return bad


# ---------------------------------------------------------------- the real package
@pytest.fixture(scope="module")
def sources():
    src = package_sources()
    assert f"{PACKAGE}.robustness.specs" in src and f"{PACKAGE}.attacks._common" in src
    return src


def test_no_import_cycles(sources):
    assert find_cycles(import_graph(sources)) == []


def test_no_private_names_across_modules(sources):
    assert private_imports(sources) == []


def test_robustness_layers_import_one_way(sources):
    assert layer_violations(sources) == []
    # Every layer exists, and the package really is layered (each one uses the one below).
    graph = import_graph(sources)
    for lower, upper in zip(ROBUSTNESS_LAYERS, ROBUSTNESS_LAYERS[1:]):
        assert f"{PACKAGE}.robustness.{lower}" in graph[f"{PACKAGE}.robustness.{upper}"]


def test_old_evaluation_modules_are_gone(sources):
    assert f"{PACKAGE}.evaluation" not in sources and f"{PACKAGE}.diagnostics" not in sources


# ------------------------------------------------------- the checks can fail
def _fake(**modules: str) -> dict[str, str]:
    return {f"{PACKAGE}.{k.replace('__', '.')}": v for k, v in modules.items()}


def test_a_cycle_through_a_function_level_import_is_found():
    src = _fake(a="import gce_jax.b\n", b="def f():\n    from gce_jax import a\n")
    assert find_cycles(import_graph(src)) == [["gce_jax.a", "gce_jax.b"]]


def test_a_cycle_through_a_package_init_is_found():
    src = _fake(pkg="from gce_jax.pkg.mod import f\n", pkg__mod="def f(): pass\n",
                other="from gce_jax.pkg.mod import f\n")
    assert find_cycles(import_graph(src)) == []  # a package importing its own module
    src[f"{PACKAGE}.pkg"] += "from gce_jax.other import g\n"
    assert find_cycles(import_graph(src)) == [["gce_jax.other", "gce_jax.pkg"]]


def test_private_names_and_modules_are_found():
    src = _fake(pkg="", pkg___impl="x = 1\n", pkg__mod="from gce_jax.pkg._impl import x\n",
                a="_y = 1\n", b="from gce_jax.a import _y\n",
                c="from gce_jax.pkg._impl import x\n", d="from gce_jax.pkg import _impl\n")
    bad = private_imports(src)
    assert len(bad) == 3 and not any(b.startswith("gce_jax.pkg.mod:") for b in bad), bad
    assert any("private name gce_jax.a._y" in b for b in bad)


def test_upward_and_package_imports_inside_robustness_are_found():
    src = _fake(robustness="", robustness__specs="def f():\n    from gce_jax.robustness "
                "import report\n", robustness__evaluator="from gce_jax.robustness.specs "
                "import f\n", robustness__diagnostics="import gce_jax.robustness\n",
                robustness__report="from gce_jax.robustness import diagnostics\n")
    bad = layer_violations(src)
    assert len(bad) == 2, bad
    assert any(b.startswith("gce_jax.robustness.specs:2") for b in bad)
    assert any(b.startswith("gce_jax.robustness.diagnostics:1") for b in bad)
