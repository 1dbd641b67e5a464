"""The architecture holds: package edges as shared/DESIGN.md draws them, no circle of imports, and every
backend named only by its record."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kiln", "exporter", "optimizers", "runtimes", "plugins")
# Which packages each may import. exporter and optimizers take the numpy-only kind contracts of runtimes;
# everyone may use plugins, the lowest package (the kernel, its cache folder, the ONNX node helpers).
ALLOWED = {
    "kiln": {"exporter", "optimizers", "plugins", "runtimes"},
    "exporter": {"runtimes", "plugins"},
    "optimizers": {"runtimes", "plugins"},
    "runtimes": {"plugins"},
    "plugins": set(),
}
# What exporter and optimizers may import of runtimes: the kind contracts, the signature, the engine format.
RUNTIMES_CONTRACTS = {"runtimes.decoder_lm", "runtimes.diffusion", "runtimes.signature", "runtimes.engine_dir", "runtimes.errors"}
BACKEND_NAMES = {"onnxruntime", "aoti", "tensorrt"}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (`from a.b import c` may name module a.b.c or a name in a.b)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@pytest.fixture(scope="module")
def edges() -> dict[str, set[tuple[str, bool]]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {(target, top) for imported, top in _imports(path)
                       if (target := _resolve(imported, modules)) and target != name}
    return graph


def test_package_edges_are_the_designs(edges):
    wrong = []
    for module, targets in edges.items():
        package = module.split(".")[0]
        for target, _ in targets:
            other = target.split(".")[0]
            if other == package:
                continue
            if other not in ALLOWED[package]:
                wrong.append(f"{module} -> {target}")
            elif other == "runtimes" and package in ("exporter", "optimizers") and target not in RUNTIMES_CONTRACTS:
                wrong.append(f"{module} -> {target} (only the kind contracts)")
    assert not wrong, "imports beyond the design: " + ", ".join(sorted(wrong))


def test_no_circle_of_imports(edges):
    """Module-level imports form no cycle; a function-level import may break none either (no hidden cycle)."""
    graph = {m: {t for t, _ in targets} for m, targets in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_code_branches_on_a_backend_or_target_name():
    """Backends and targets are looked up as records: no `==`, `in` or `endswith` tests their names.

    "cpu" and "cuda" are also device names (the manifest's `device`), and plugins/ builds its kernel for
    compilers of its own (cuda, rocm, cpu): both are left out.
    """
    from kiln.targets import TARGETS

    names = (BACKEND_NAMES | set(TARGETS)) - {"cpu", "cuda"}
    found = []
    for name, path in _modules().items():
        if name.startswith("plugins"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
                operands = node.args
            else:
                continue
            for operand in operands:
                constants = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(c, ast.Constant) and c.value in names for c in constants):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "tests of a backend or target name: " + ", ".join(found)
