"""The dependency rules of the layout (README, "Layout of the repository"), read off the imports.

Every `import` and `from ... import` of our packages, at module level and inside functions alike,
is an edge between modules. The layers, lowest first: `protocol/`; the core (`streamer/`); the two
runtimes (`streamer/engine.py`, `workers/`); the services (`streamer/services/`); the apps
(`streamer/cli/`, `streamer/apps/`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "streamer", "workers")
# Heavy optional dependencies (the `bench` extra): the only imports allowed inside functions.
LAZY_OK = ("transformers", "accelerate", "matplotlib")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported module of ours or third-party top name, inside a function?, line)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(sub) for sub in ast.walk(node) if sub is not node)
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from pkg import mod` names a module where pkg.mod is one of ours
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = targets or [base]
        else:
            continue
        for target in targets:
            out.append((target, id(node) in inside, node.lineno))
    return out


def _layer(name: str) -> str:
    if name.startswith("protocol"):
        return "protocol"
    if name.startswith("workers"):
        return "pipeline runtime"
    if name == "streamer.engine":
        return "single-process runtime"
    if name.startswith("streamer.services"):
        return "service"
    if name.startswith(("streamer.cli", "streamer.apps")) or name == "streamer.__main__":
        return "app"
    if name == "streamer":  # the package's face: `streamer.load` re-exports the Python API
        return "app"
    return "core"


def _ours(target: str) -> str | None:
    """The module of ours an import names (the longest match), or None."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


EDGES = {
    name: [(t, lazy, line) for t, lazy, line in _imports(name) if _ours(t)] for name in MODULES
}

# (importer's layer, imported layer) pairs that break the layering
FORBIDDEN = (
    {
        ("protocol", layer)
        for layer in ("core", "single-process runtime", "pipeline runtime", "service", "app")
    }
    | {
        ("core", layer)
        for layer in ("single-process runtime", "pipeline runtime", "service", "app")
    }
    | {
        ("single-process runtime", "pipeline runtime"),
        ("pipeline runtime", "single-process runtime"),
        ("single-process runtime", "service"),
        ("pipeline runtime", "service"),
        ("single-process runtime", "app"),
        ("pipeline runtime", "app"),
        ("service", "app"),
    }
)


def test_the_modules_are_found():
    assert {"streamer.engine", "workers.compute", "protocol.codec", "streamer.cli"} <= set(MODULES)
    assert len(EDGES["streamer.engine"]) >= 5  # the parser sees imports


def test_no_layer_imports_a_layer_above_it_and_the_runtimes_never_meet():
    bad = [
        f"{name}:{line} ({_layer(name)}) imports {_ours(t)} ({_layer(_ours(t))})"
        for name, edges in EDGES.items()
        for t, _, line in edges
        if (_layer(name), _layer(_ours(t))) in FORBIDDEN
    ]
    assert bad == []


def test_the_server_and_client_know_engines_only_through_the_interface():
    bad = [
        f"{name} imports {_ours(t)}"
        for name in ("streamer.services.server", "streamer.services.client")
        for t, _, _ in EDGES[name]
        if "runtime" in _layer(_ours(t))
    ]
    assert bad == []


def test_nothing_imports_the_command_line():
    bad = [
        f"{name} imports {_ours(t)}"
        for name, edges in EDGES.items()
        for t, _, _ in edges
        if _ours(t).startswith("streamer.cli")
        and not name.startswith("streamer.cli")
        and name != "streamer.__main__"
    ]
    assert bad == []


def test_no_import_cycle():
    graph = {name: {_ours(t) for t, _, _ in edges} - {name} for name, edges in EDGES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_imports_inside_functions_only_for_heavy_optional_dependencies():
    bad = []
    for name in MODULES:
        for target, lazy, line in _imports(name):
            # the package's face imports the API when `streamer.load` is first used, so that
            # importing any core module (which imports the package first) stays light
            facade = name == "streamer" and target.startswith("streamer.services")
            if lazy and target.split(".")[0] not in LAZY_OK and not facade:
                bad.append(f"{name}:{line} imports {target} inside a function")
    assert bad == []


@pytest.mark.parametrize(
    "package,most", [("streamer", 600), ("workers", 600), ("streamer/cli", 400)]
)
def test_no_module_is_too_long(package, most):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > most
    }
    assert long == {}
