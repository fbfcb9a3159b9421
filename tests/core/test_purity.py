"""The pure layer stays pure: no I/O, no clock, no randomness, no trio."""

from __future__ import annotations

import ast
from pathlib import Path

import trio_stream._core

FORBIDDEN = {"trio", "h11", "hypercorn", "time", "random", "socket"}
CORE = Path(trio_stream._core.__file__).parent


def test_core_imports_nothing_impure() -> None:
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FORBIDDEN
            ]
    assert found == []
