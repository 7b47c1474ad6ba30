"""The house's shape: no import cycle among metering_core's modules (imports inside
functions count: a lazy import is still a dependency), dependencies that point down (the
library knows nothing of the service, the CLI or AWS; no store imports another), and a
memory-only process never imports a provider SDK or the SQL toolkit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "metering_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """metering_core modules a module imports, at module level or inside a function (not
    under TYPE_CHECKING, which runs nothing); the root package is left out, as every
    submodule runs it first."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node):
            if isinstance(child, ast.Import):
                found |= {alias.name for alias in child.names}
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found |= {f"{child.module}.{alias.name}" for alias in child.names}
    return {name for name in found if name in modules and name != "metering_core"}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


EDGES = ("metering_core.server", "metering_core.cli", "metering_core.aws")
"""What stands on the library: the REST service, the command line, the Lambda handlers."""
STORES = ("metering_core.memory", "metering_core.sql")


def within(module: str, packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def test_the_library_imports_nothing_of_the_service_the_cli_or_aws() -> None:
    wrong = {
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if not within(module, (*EDGES, "metering_core.testing"))
        for target in targets
        if within(target, EDGES)
    }
    assert not wrong, sorted(wrong)


def test_no_store_imports_another() -> None:
    wrong = {
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if within(module, STORES)
        for target in targets
        if within(target, STORES) not in (None, within(module, STORES))
    }
    assert not wrong, sorted(wrong)


def test_no_import_cycle_among_metering_core_modules() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if target == node:
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_a_memory_process_imports_no_provider_sdk_nor_sqlalchemy() -> None:
    script = (
        "import sys, metering_core; metering_core.Metering('memory').close(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('stripe', 'sqlalchemy', 'alembic', 'fastapi', 'httpx')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
