"""Pointers into the docs resolve: every ``README.md#anchor`` or ``docs/<page>.md#anchor`` cited
in the code, the tests or the docs names a page that exists and a heading it has, so a comment
that says where a rule is written down keeps saying it; and every source file the docs name
exists, so a moved module does not leave the docs pointing at its old place."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("aibridgeproxyd", "addons", "tests")
# A page and an anchor, written as a path from the repository root (code and comments) or as a
# markdown link relative to the page that holds it.
POINTER = re.compile(r"((?:\.\./)?(?:README|docs/[\w-]+|[\w-]+)\.md)#([\w-]+)")
# A source file named in the docs, as a path from the repository root.
SOURCE_FILE = re.compile(r"\b((?:aibridgeproxyd|addons|tests)/[\w/]*\.py)\b")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


def pointers() -> list[tuple[Path, Path, str]]:
    """(file citing, page cited, anchor) for every pointer."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    files += [path for source in SOURCES for path in (ROOT / source).rglob("*.py")]
    files.remove(Path(__file__).resolve())  # its own docstring shows the pattern
    found = []
    for path in files:
        for match in POINTER.finditer(path.read_text()):
            page, anchor = match.groups()
            base = path.parent if path.suffix == ".md" else ROOT
            if path.suffix != ".md" and not page.startswith(("README", "docs/")):
                continue  # a bare name in code is not a pointer from the root
            found.append((path, (base / page).resolve(), anchor))
    return found


def test_the_slug_is_githubs() -> None:
    assert slug("Keys, BYOK and the proxy's own errors") == "keys-byok-and-the-proxys-own-errors"
    assert slug("`hosts` and `base_url`") == "hosts-and-base_url"
    assert slug("What a MITM'd request may carry upstream") == (
        "what-a-mitmd-request-may-carry-upstream"
    )


def test_every_pointer_into_the_docs_resolves() -> None:
    found = pointers()
    assert found, "no pointer found: the pattern is broken"
    broken = [
        f"{path.relative_to(ROOT)}: {page.relative_to(ROOT)}#{anchor}"
        for path, page, anchor in found
        if not page.is_file() or anchor not in anchors(page)
    ]
    assert not broken, "pointers to a missing page or heading:\n" + "\n".join(broken)


def test_every_source_file_the_docs_name_exists() -> None:
    named = {
        (page.relative_to(ROOT).as_posix(), match.group(1))
        for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
        for match in SOURCE_FILE.finditer(page.read_text())
    }
    assert named, "no source file found: the pattern is broken"
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).is_file())
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)
