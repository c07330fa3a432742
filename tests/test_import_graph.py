"""The layering, kept by a test: every import points down, and the host-side layers import no JAX.

The graph is read from the source (every import statement, inside functions too, except those under
`if TYPE_CHECKING:`), so a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxserve", "pallas_kernels", "checkpoints_conv")

# What each layer may import besides itself (and the standard library and third-party packages).
ALLOWED = {
    "jaxserve.config": set(),
    "jaxserve.core": {"jaxserve.config"},
    "jaxserve.text": {"jaxserve.config", "jaxserve.core"},
    "jaxserve.model": {"jaxserve.config", "jaxserve.core", "pallas_kernels"},  # core: plain request data
    "jaxserve.worker": {"jaxserve.config", "jaxserve.core", "jaxserve.model", "pallas_kernels"},
    "jaxserve.spec_decode": {"jaxserve.config", "jaxserve.core", "jaxserve.model", "jaxserve.worker",
                             "pallas_kernels"},
    "jaxserve.server": {"jaxserve", "jaxserve.config", "jaxserve.core", "jaxserve.text", "jaxserve.engine_client"},
    "pallas_kernels": set(),
    "checkpoints_conv": {"jaxserve.config", "jaxserve.model", "jaxserve.text"},
}
# A name that is not itself a layer ("jaxserve": the package's lazy `__init__`, for its version; the
# top-level "jaxserve.engine_client") is allowed exactly, not with its submodules.
# Process entry points build the engine: they may import anything below them.
ENTRY_POINTS = {"jaxserve.server.__main__"}
NO_JAX_LAYERS = ("jaxserve.core", "jaxserve.text", "jaxserve.server")


def module_files() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, resolved to the longest module that exists."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".")[: None if is_pkg else -1]
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    full = f"{module}.{alias.name}"
                    resolve(full if full in mods else module)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = module_files()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer_of(module: str) -> str | None:
    return max((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), key=len,
               default=None)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_points_down(graph):
    upward = []
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None or module in ENTRY_POINTS:
            continue
        for dep in sorted(deps):
            if layer_of(dep) == layer:
                continue
            if not any(dep == ok or dep.startswith(ok + ".") for ok in ALLOWED[layer]):
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_pallas_kernels_import_only_jax_and_themselves(graph):
    bad = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("pallas_kernels")
           for d in deps if not d.startswith("pallas_kernels")]
    assert not bad, bad


def test_at_most_eight_modules_at_the_top_of_jaxserve():
    top = sorted(p.name for p in (ROOT / "jaxserve").glob("*.py"))
    assert len(top) <= 8, top


def test_every_subpackage_says_what_it_holds_and_may_import():
    for init in (ROOT / "jaxserve").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), f"{init.relative_to(ROOT)} has no docstring saying what it may import"


def test_host_side_layers_import_no_jax():
    """Importing every module of core, text and server (in a fresh interpreter) loads no JAX."""
    mods = sorted(m for m in module_files() if m.startswith(NO_JAX_LAYERS))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'jax' or k.startswith('jax.') or k == 'jaxlib'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"JAX imported by the host-side layers: {out.stdout.strip()}"
