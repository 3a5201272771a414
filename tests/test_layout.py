"""The package's layers, read from the source: runtime imports go down, never round.

Layers, bottom up: the foundation (errors, report, stack); shm (the arena and
its primitives); linux (the emulated kernel); plugins (hookspecs, the manager
and the drivers); check (the tools); the CLI.  An annotation may name a type
of its own layer or one above through ``if TYPE_CHECKING:`` - never executed,
so it cannot make a cycle at import time - but runtime imports form a DAG
that only goes down, and nothing imports vfio_emu inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"vfio_emu": ROOT / "core", "vfio_emu.plugins": ROOT / "plugins"}
LAYERS = {"foundation": 0, "shm": 1, "linux": 2, "plugins": 3, "check": 4, "explore": 4, "cli": 5,
          "pytest_plugin": 5, "bench": 5}


#: The C modules (csrc/build_ffi.py): leaves of the graph (layer() places each).
EXTENSIONS = ("vfio_emu._stackwalk", "vfio_emu.shm._core", "vfio_emu.shm._fast")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS["shm"]  # the package itself: re-exports the primitives and the errors
    name = parts[1]
    if name in ("errors", "report", "stack", "_stackwalk"):
        return LAYERS["foundation"]
    return LAYERS[name]


def _is_type_checking(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The vfio_emu modules an import statement names (a `from package import module`
    names the module)."""
    out = set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                 for a in node.names]
    for name in names:
        while name and name not in known and name not in EXTENSIONS:
            name = name.rpartition(".")[0]
        if name.startswith("vfio_emu"):
            out.add(name)
    return out


def imports(path: Path, known: dict[str, Path]) -> tuple[set[str], set[str], list[int]]:
    """(runtime imports at module level, type-only imports, lines of function-local ones)."""
    tree = ast.parse(path.read_text(), str(path))
    runtime: set[str] = set()
    typing_only: set[str] = set()
    local: list[int] = []

    def walk(body: list[ast.stmt], into: set[str]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                into |= _targets(node, known)
            elif _is_type_checking(node):
                walk(node.body, typing_only)  # type: ignore[arg-type]
            elif isinstance(node, (ast.If, ast.Try)):
                walk(node.body, into)
                walk(getattr(node, "orelse", []), into)

    walk(tree.body, runtime)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if (isinstance(inner, (ast.Import, ast.ImportFrom))
                        and _targets(inner, known)):
                    local.append(inner.lineno)
    return runtime, typing_only, local


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        runtime, _, _ = imports(path, known)
        edges[name] = {t for t in runtime if t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_is_found_in_its_layer_folder():
    names = set(modules())
    for expected in ("vfio_emu.shm.arena", "vfio_emu.shm.refcount", "vfio_emu.shm.completion",
                     "vfio_emu.linux.slab", "vfio_emu.linux.device", "vfio_emu.linux.vfio",
                     "vfio_emu.linux.mdev", "vfio_emu.check.battery", "vfio_emu.check.lkdtm",
                     "vfio_emu.plugins.ccw", "vfio_emu.plugins.manager", "vfio_emu.cli"):
        assert expected in names


def test_the_runtime_import_graph_has_no_cycle():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(modules()))
def test_runtime_imports_only_go_down_the_layers(module):
    known = modules()
    runtime, typing_only, _ = imports(known[module], known)
    here = layer(module)
    up = sorted(t for t in runtime if layer(t) > here)
    assert up == [], f"{module} (layer {here}) imports from a layer above it"
    # A type-only import may look up for an annotation, but never leaves the stack of
    # layers a module belongs to: the primitives know nothing of the emulated kernel.
    if here <= LAYERS["shm"]:
        assert all(layer(t) <= LAYERS["shm"] for t in typing_only), typing_only


@pytest.mark.parametrize("module", sorted(modules()))
def test_nothing_imports_vfio_emu_inside_a_function(module):
    known = modules()
    _, _, local = imports(known[module], known)
    assert local == [], f"{module}: function-local imports at lines {local}"
