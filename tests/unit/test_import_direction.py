"""Imports point one way (ARCHITECTURE.md): cli → server/bench → engine → executor → models → layers →
backends → loader → config. Every `import shoal...` in every module, top-level or inside a function,
is checked against that order; an import only for type checkers (`if TYPE_CHECKING:`) is not a
dependency and is skipped."""

from __future__ import annotations

import ast
from pathlib import Path

SHOAL = Path(__file__).resolve().parents[2] / "shoal"

# low → high: a module may import its own package and anything of a lower rank
RANK = {
    "errors": 0, "config": 0, "sampling_params": 0, "forward_batch": 0,
    "loader": 1, "planner": 1,
    "distributed": 2, "backends": 2,
    "layers": 3,
    "models": 4,
    "executor": 5,
    "engine": 6,
    "server": 7, "bench": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
}
# the planner runs without torch: it may use the configuration and nothing else of shoal's
PLANNER_MAY_IMPORT = {"planner", "config", "errors"}

# Known upward imports, each to be removed by moving the importer up a layer (the conformance runner
# and doctor into a tools layer) or the imported code down (quant formats below backends). The test
# also fails when one of these is gone, so the list only shrinks.
KNOWN = {
    ("backends/conformance/checks.py", "shoal.layers.quant"),
    ("backends/conformance/checks.py", "shoal.models.llama"),
    ("backends/conformance/e2e.py", "shoal"),
    ("backends/doctor.py", "shoal"),
}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def upward_imports(path: str, source: str) -> set[tuple[str, str]]:
    """(module path under shoal/, imported module) for every import of a higher layer."""
    importer = path.split("/")[0].removesuffix(".py")
    tree = ast.parse(source)
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "shoal":
            # `from shoal import engine` names a package; `__version__` is a constant of the root
            names = [f"shoal.{a.name}" if a.name in RANK else "shoal" for a in node.names if a.name != "__version__"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "shoal":
                continue
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == importer:
                continue
            if importer == "planner" and target not in PLANNER_MAY_IMPORT:
                found.add((path, name))
            elif RANK[target] > RANK[importer]:
                found.add((path, name))
    return found


def test_every_layer_imports_only_downward():
    found = set()
    for f in sorted(SHOAL.rglob("*.py")):
        rel = f.relative_to(SHOAL).as_posix()
        assert rel.split("/")[0].removesuffix(".py") in RANK, f"{rel}: give its package a rank in RANK"
        found |= upward_imports(rel, f.read_text(encoding="utf-8"))
    assert found - KNOWN == set(), "upward imports (see ARCHITECTURE.md for the order)"
    assert KNOWN - found == set(), "these upward imports are gone: remove them from KNOWN"


def test_the_check_catches_a_planted_upward_import():
    planted = "import torch\n\ndef f():\n    from shoal.engine.llm import LLM\n    return LLM\n"
    assert upward_imports("layers/planted.py", planted) == {("layers/planted.py", "shoal.engine.llm")}
    assert upward_imports("planner/planted.py", "import shoal.loader\n") == {("planner/planted.py", "shoal.loader")}
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shoal.engine.scheduler import X\n"
    assert upward_imports("executor/planted.py", guarded) == set()
    assert upward_imports("engine/planted.py", "from shoal.executor.model_runner import ModelRunner\n") == set()
    assert upward_imports("loader/planted.py", "from shoal import __version__, LLM\n") == {("loader/planted.py", "shoal")}
