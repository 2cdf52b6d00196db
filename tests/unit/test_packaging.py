"""The wheel ships every package of the source tree: setuptools installs only the packages
pyproject.toml lists, and an editable install used in development would hide a missing one."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_in_the_source_tree_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "aibridgeproxyd").rglob("__init__.py")
    } | {"aibridgeproxyd.addons"}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert (ROOT / "addons" / "__init__.py").exists()
