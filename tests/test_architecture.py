"""The house plan (docs/architecture.md): every module imports only its own layer and those
below it, and no two modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "chemtwin"
# Bottom to top; a module may import its own layer and any layer below it.
LAYERS = ("core", "spectral_models", "data", "tagging", "search", "methods", "evaluation", "cli")
GROUND = {"chemtwin", "chemtwin.errors"}  # the package root and the error type: below everything


def layer(module: str) -> int:
    if module in GROUND:
        return -1
    if module == "chemtwin.__main__":
        return LAYERS.index("cli")
    return LAYERS.index(module.split(".")[1])


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_NAMES = {".".join(p.relative_to(SRC.parent).with_suffix("").parts) for p in SRC.rglob("*.py")}


def chemtwin_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every chemtwin module ``path`` imports, at any depth of the file
    (``from chemtwin.pkg import mod`` imports the module ``chemtwin.pkg.mod``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "chemtwin"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "chemtwin":
            found += [(node.lineno, f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULE_NAMES
                       else node.module) for a in node.names]
    return found


def upward_imports(modules: dict[str, list[tuple[int, str]]]) -> list[str]:
    return [f"{name} (layer {LAYERS[layer(name)] if layer(name) >= 0 else 'root'}) imports {target} "
            f"(layer {LAYERS[layer(target)]}) at line {line}"
            for name, imports in modules.items() for line, target in imports if layer(target) > layer(name)]


def cycles(modules: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Import cycles among the modules (a package counts as its __init__ module)."""
    graph = {name: {t for _, t in imports if t in modules and t != name} for name, imports in modules.items()}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.fixture(scope="module")
def modules():
    return {module_name(p): chemtwin_imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_module_belongs_to_a_layer(modules):
    for name in modules:
        assert layer(name) >= -1, name


def test_no_module_imports_a_layer_above_its_own(modules):
    assert upward_imports(modules) == []


def test_no_import_cycles(modules):
    assert cycles(modules) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(modules):
    """The two checks are not vacuous: a data module importing the evaluation layer, and two
    modules importing each other, are both reported."""
    planted = dict(modules, **{"chemtwin.data.planted": [(3, "chemtwin.evaluation.bench")]})
    assert upward_imports(planted) == ["chemtwin.data.planted (layer data) imports chemtwin.evaluation.bench "
                                       "(layer evaluation) at line 3"]
    ring = dict(modules, **{"chemtwin.core.ring_a": [(1, "chemtwin.core.ring_b")],
                            "chemtwin.core.ring_b": [(1, "chemtwin.core.ring_a")]})
    assert ["chemtwin.core.ring_a", "chemtwin.core.ring_b", "chemtwin.core.ring_a"] in cycles(ring)
