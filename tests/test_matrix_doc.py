"""
docs/matrix.rst names only tests that exist, and names every test of
tests/test_matrix.py and tests/test_hostile.py, so the table cannot drift
from the suite.
"""

from __future__ import annotations

import ast
import pathlib
import re
from typing import Set

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "matrix.rst"
_REF = re.compile(r"``(tests/test_\w+\.py)::(test_\w+)``")


def _tests(path: pathlib.Path) -> Set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    }


def test_tableNamesOnlyExistingTests() -> None:
    refs = _REF.findall(DOC.read_text())
    assert len(refs) > 30
    missing = [f"{f}::{t}" for f, t in refs if not (ROOT / f).exists() or t not in _tests(ROOT / f)]
    assert missing == []


def test_tableNamesEveryMatrixTest() -> None:
    named = {(f, t) for f, t in _REF.findall(DOC.read_text())}
    for module in ("tests/test_matrix.py", "tests/test_hostile.py"):
        unnamed = sorted(t for t in _tests(ROOT / module) if (module, t) not in named)
        assert unnamed == [], module
