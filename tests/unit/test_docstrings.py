"""Every module and every public class of the daemon and its addons says what it is for: a
newcomer opening a file reads its purpose first. Reads the files (``ast``); imports nothing."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _files() -> Iterator[tuple[str, ast.Module]]:
    for root in (ROOT / "aibridgeproxyd", ROOT / "addons"):
        for path in sorted(root.rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def test_every_module_has_a_docstring() -> None:
    missing = [path for path, tree in _files() if not ast.get_docstring(tree)]
    assert missing == []


def test_every_public_class_has_a_docstring() -> None:
    missing = [
        f"{path}:{node.lineno}: {node.name}"
        for path, tree in _files()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and not node.name.startswith("_")
        and not ast.get_docstring(node)
    ]
    assert missing == []
