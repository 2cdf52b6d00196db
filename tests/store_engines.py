"""Store tests on both engines: ``store_database`` is a SQLite file or a fresh PostgreSQL
database (``tests/postgres.py``), one test run per engine. A test that also asks for
``db_path`` inspects the SQLite file itself, so its PostgreSQL run is skipped. The fixtures are
registered in ``tests/conftest.py``; a test file opens its store from ``store_database``:

    @pytest.fixture
    async def store(store_database):
        async with await open_store(store_database) as opened:
            yield opened
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aibridgeproxyd.database_url import DatabaseUrl, parse_database_url
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store import Store

ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The SQLite file of the test (skips the PostgreSQL run of a test that reads the file)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("engine") == "postgresql":
        pytest.skip("inspects the SQLite file itself")
    return tmp_path / "data" / "aibridgeproxyd.db"


@pytest.fixture
def store_database(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Path | DatabaseUrl:
    if engine == "sqlite":
        return tmp_path / "data" / "aibridgeproxyd.db"
    url = parse_database_url(request.getfixturevalue("postgres_url"))
    assert url is not None
    return url


# A PostgreSQL store has no key file beside it: the tests' stores seal with this key.
TEST_KEY = bytes(range(7, 39))


async def open_store(database: Path | DatabaseUrl, keyring: Keyring | None = None) -> Store:
    """``Store.open`` with the keyring a SQLite store finds beside its file, or for PostgreSQL
    ``TEST_KEY`` (unless ``keyring`` is given)."""
    if isinstance(database, DatabaseUrl) and keyring is None:
        keyring = Keyring([TEST_KEY])
    return await Store.open(database, keyring=keyring)
