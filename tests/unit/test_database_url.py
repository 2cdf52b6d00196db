"""``database_url``: SQLite paths and PostgreSQL URLs, refused with a reason naming the problem,
never the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from aibridgeproxyd.config import ConfigError, load_config
from aibridgeproxyd.database_url import DatabaseUrl, parse_database_url
from aibridgeproxyd.postgres import translate

SECRET = "s3cr3t-PASSWORD"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("sqlite:///data/x.db", Path("data/x.db")),
        ("sqlite:////var/lib/abp/x.db", Path("/var/lib/abp/x.db")),
        ("SQLITE:///x.db", Path("x.db")),
    ],
)
def test_sqlite_urls_name_a_file(text: str, path: Path) -> None:
    assert parse_database_url(text) == DatabaseUrl.sqlite(path)


def test_a_postgresql_url_keeps_its_parameters_and_prints_without_the_password() -> None:
    text = f"postgresql://abp:{SECRET}@db.internal:5432/abp?sslmode=verify-full"
    url = parse_database_url(text)
    assert url is not None and url.is_postgres and url.dsn == text
    assert SECRET not in url.redacted() and SECRET not in str(url)
    assert url.redacted() == "postgresql://abp:***@db.internal:5432/abp?sslmode=verify-full"
    assert parse_database_url("postgres://db/abp") == DatabaseUrl(
        "postgresql", dsn="postgres://db/abp"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("mysql://db/abp", "unsupported scheme 'mysql'"),
        ("just-a-path.db", "expected a URL"),
        ("sqlite://x.db", "sqlite:///<path>"),
        ("sqlite:///x.db?mode=ro", "file path only"),
        (f"postgresql://abp:{SECRET}@/abp", "needs a host"),
        (f"postgresql://abp:{SECRET}@db:5432", "needs a database name"),
        (f"postgresql://abp:{SECRET}@db:99999/abp", "not a valid PostgreSQL URL"),
        (f"postgresql://abp:{SECRET}@db:0/abp", "1-65535"),
    ],
)
def test_a_bad_url_is_refused_naming_the_problem_and_never_the_password(
    text: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_database_url(text)
    assert SECRET not in str(caught.value)


def test_the_config_key_names_itself_and_a_relative_sqlite_path_becomes_absolute(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="'database_url'") as caught:
        load_config(environ={"AIBRIDGEPROXYD_DATABASE_URL": f"redis://u:{SECRET}@h/0"})
    assert SECRET not in str(caught.value)
    config = load_config(environ={"AIBRIDGEPROXYD_DATABASE_URL": "sqlite:///rel/x.db"})
    assert config.database.path is not None and config.database.path.is_absolute()
    default = load_config(environ={"AIBRIDGEPROXYD_DATA_DIR": str(tmp_path)})
    assert default.database == DatabaseUrl.sqlite(tmp_path / "aibridgeproxyd.db")


@pytest.mark.parametrize(
    ("sqlite", "postgresql"),
    [
        ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = $1 AND c = $2"),
        ("SELECT '?' , ? FROM t", "SELECT '?' , $1 FROM t"),
        (
            "SELECT value FROM json_each(?)",
            "SELECT value FROM json_array_elements_text($1::json)",
        ),
        (
            "SELECT page.value FROM json_each(?) AS page",
            "SELECT page.value FROM json_array_elements_text($1::json) AS page(value)",
        ),
        ("SELECT json_group_array(DISTINCT m)", "SELECT json_agg(DISTINCT m)"),
        ("SELECT +provider AS key", "SELECT provider AS key"),
        ("SELECT a + 1, json_array(x, y)", "SELECT a + 1, json_build_array(x, y)"),
    ],
)
def test_the_stores_sql_is_translated_for_postgresql(sqlite: str, postgresql: str) -> None:
    assert translate(sqlite) == postgresql
