"""Modules small enough to read in one sitting: none over 400 lines, no function over 60.

The exceptions are named here, each with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nf_lightning"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
LONG_MODULES: dict[str, str] = {}  # module -> why it may be longer
LONG_FUNCTIONS: dict[str, str] = {}  # module:function -> why


def test_no_module_is_longer_than_the_limit() -> None:
    long = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in long.items() if n > MAX_MODULE_LINES and m not in LONG_MODULES} == {}


def test_no_function_is_longer_than_the_limit() -> None:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(PACKAGE)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    found[name] = lines
    assert found == {}
