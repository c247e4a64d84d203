"""The size limits the maintainers hold the code to: a module a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p for package in ("shard_tools", "pipelines", "mt_scale") for p in (REPO / package).rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 100


def test_the_three_packages_are_found() -> None:
    assert len(MODULES) > 40 and REPO / "mt_scale" / "train.py" in MODULES


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_over_400_lines_and_no_function_over_100(module: Path) -> None:
    text = module.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module.name}: split it by what its parts do"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module.name}: {', '.join(long)}"
