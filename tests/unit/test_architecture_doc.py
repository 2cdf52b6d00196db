"""docs/architecture.md's layout tree names every module under aibridgeproxyd/ and addons/, and
only modules that exist, so the map a newcomer reads first cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "architecture.md"
PACKAGES = ("aibridgeproxyd", "addons")
# One level of the tree: a branch ("├── ", "└── ") or a continuation ("│   ", "    ").
INDENT = 4


def tree_lines(text: str) -> list[str]:
    """The lines of the first code block under "## Layout"."""
    layout = text[text.index("## Layout") :]
    match = re.search(r"```\n(.*?)```", layout, re.DOTALL)
    assert match is not None, "no code block under ## Layout"
    return match.group(1).splitlines()


def documented_modules(lines: list[str]) -> set[str]:
    """Paths of the ``.py`` files the tree names, rebuilt from its nesting: a name ending in
    ``/`` opens a folder for the deeper lines below it."""
    modules: set[str] = set()
    folders: list[str] = []
    for line in lines:
        match = re.match(r"^((?:[│ ]   |[├└]── )*)(\S+)", line)
        if match is None or not match.group(2).strip():
            continue
        depth = len(match.group(1)) // INDENT
        name = match.group(2)
        assert depth <= len(folders), f"line nested below no folder: {line!r}"
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            modules.add("/".join([*folders, name]))
    return modules


def existing_modules() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }


def test_the_tree_parser_follows_nesting() -> None:
    lines = [
        "pkg/              top",
        "├── a.py          one",
        "├── sub/          folder",
        "│   ├── b.py      two",
        "│   └── c.py      three",
        "└── d.py          four",
        "other/",
        "└── e.py",
    ]
    assert documented_modules(lines) == {
        "pkg/a.py",
        "pkg/sub/b.py",
        "pkg/sub/c.py",
        "pkg/d.py",
        "other/e.py",
    }


def test_every_module_is_in_the_architecture_tree() -> None:
    documented = documented_modules(tree_lines(DOCUMENT.read_text()))
    missing = sorted(existing_modules() - documented)
    assert not missing, f"modules missing from docs/architecture.md's tree: {', '.join(missing)}"


def test_the_architecture_tree_names_only_modules_that_exist() -> None:
    documented = documented_modules(tree_lines(DOCUMENT.read_text()))
    gone = sorted(documented - existing_modules())
    assert not gone, (
        f"docs/architecture.md's tree names modules that do not exist: {', '.join(gone)}"
    )
