"""The import arrows of the design: the scheduler, sampling, workers, executors and models never
reach up into the engine (engine/ uses them, not the other way round)."""
import ast
from pathlib import Path

import asyncllm

PACKAGE = Path(asyncllm.__file__).parent
LOWER = ("core", "sampling", "worker", "executor", "model", "kernels")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_lower_package_imports_the_engine():
    offenders = {}
    for package in LOWER:
        for path in (PACKAGE / package).rglob("*.py"):
            bad = {m for m in _imports(path) if m == "asyncllm.engine" or m.startswith("asyncllm.engine.")}
            if bad:
                offenders[str(path.relative_to(PACKAGE))] = bad
    assert offenders == {}
    assert len(list((PACKAGE / "core").rglob("*.py"))) >= 4  # the walk saw the files
