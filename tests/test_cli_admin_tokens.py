"""``aibridgeproxyd admin-tokens create/list/revoke``: the HTTP API's tokens, managed like proxy
tokens (the token alone on stdout, shown once; only its hash stored; names and roles listed)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from tests import test_cli
from tests.test_cli import Cli, assert_one_line_error, db_dump

# The fixtures of test_cli.py: every command in an empty directory, main() in-process.
isolated = test_cli.isolated
cli = test_cli.cli


def test_create_prints_only_the_token_and_stores_its_hash_and_role(cli: Cli) -> None:
    result = cli("admin-tokens", "create", "ops", "--role", "auditor")
    assert result.code == 0, result.err
    token = result.out.removesuffix("\n")
    assert result.out == token + "\n" and len(token) >= 32
    assert "shown only once" in result.err and token not in result.err
    with sqlite3.connect(Path("data") / "aibridgeproxyd.db") as connection:
        rows = connection.execute("SELECT name, token_hash, role FROM admin_tokens").fetchall()
    assert rows == [("ops", hashlib.sha256(token.encode()).hexdigest(), "auditor")]
    assert token not in "\n".join(db_dump())


def test_list_shows_names_and_roles_never_tokens(cli: Cli) -> None:
    token = cli("admin-tokens", "create", "root", "--role", "admin").out.strip()
    table = cli("admin-tokens", "list")
    assert table.code == 0
    assert table.out.split()[:3] == ["NAME", "ROLE", "CREATED_AT"]
    assert table.out.splitlines()[1].split()[:2] == ["root", "admin"]
    (entry,) = json.loads(cli("admin-tokens", "list", "--json").out)
    assert set(entry) == {"name", "role", "created_at"} and entry["role"] == "admin"
    assert token not in table.out
    assert hashlib.sha256(token.encode()).hexdigest() not in table.out


def test_revoke_removes_the_token(cli: Cli) -> None:
    cli("admin-tokens", "create", "root", "--role", "admin")
    result = cli("admin-tokens", "revoke", "root")
    assert result.code == 0 and "revoked" in result.out
    assert json.loads(cli("admin-tokens", "list", "--json").out) == []


def test_bad_input_is_one_line_and_changes_nothing(cli: Cli) -> None:
    assert cli("admin-tokens", "create", "root", "--role", "admin").code == 0
    before = db_dump()
    for args, message in (
        (
            ("admin-tokens", "create", "root", "--role", "admin"),
            "admin token 'root' already exists",
        ),
        (("admin-tokens", "create", "x", "--role", "root"), "invalid choice: 'root'"),
        (("admin-tokens", "create", "x"), "required: --role"),
        (("admin-tokens", "create", "has space", "--role", "admin"), "invalid token name"),
        (("admin-tokens", "revoke", "ghost"), "admin token 'ghost' does not exist"),
    ):
        result = cli(*args)
        assert_one_line_error(result)
        assert result.code == 2 and message in result.err, result.err
    assert db_dump() == before
