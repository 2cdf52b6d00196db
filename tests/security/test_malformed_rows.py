"""A provider row that cannot be read closes its hosts (fail closed: docs/providers.md#statuses).

Regression for the tester's report: with openai on ``api.openai.com`` and ``localhost`` and
``keys`` set to ``not json`` in SQLite, the row showed status ``error`` and an unauthenticated
``CONNECT api.openai.com:443`` was tunneled (the daemon dialled the real host), also after a
restart. Now every host such a row would claim answers 503 ``provider misconfigured``: neither
tunneled nor routed, logged and counted. Other ``error`` statuses (no key with BYOK off) still
tunnel their hosts, like a disabled provider.

Runs the real daemon; the rows are changed with sqlite3 behind the CLI's validation.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth

MISCONFIGURED = b"provider misconfigured"

# (SQL assignment on the openai row, the hosts it must close). openai was given the hosts
# api.openai.com and localhost; a row whose hosts cannot be read closes the type's defaults and
# the hosts it had before it broke (the second tester's find: custom hosts stayed tunneled).
CORRUPTIONS = [
    ("keys = 'not json'", ("api.openai.com", "localhost")),
    ("hosts = 'not json'", ("api.openai.com", "localhost")),
    ("hosts = '[\"not a host!\"]'", ("api.openai.com", "localhost")),
    ("hosts = '[1]'", ("api.openai.com", "localhost")),
    ("settings = 'not json'", ("api.openai.com", "localhost")),
    ("type = 42", ("api.openai.com", "localhost")),
    ("enabled = 7", ("api.openai.com", "localhost")),
    ("name = 'Not A Name'", ("api.openai.com", "localhost")),
    ("base_url = 42", ("api.openai.com", "localhost")),
    ("base_url = 'not a url'", ("api.openai.com", "localhost")),
]


@pytest.fixture
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    """openai on the fake upstream with the hosts api.openai.com and localhost (the repro)."""
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as daemon:
        daemon.edit_provider(
            "openai", upstream.base_url, "sk-central",
            options=["--host", "api.openai.com", "--host", "localhost"],
        )  # fmt: skip
        daemon.reload_and_wait()
        yield daemon


def database(daemon: DaemonProcess) -> sqlite3.Connection:
    return sqlite3.connect(daemon.data_dir / "aibridgeproxyd.db")


def openai_row(daemon: DaemonProcess) -> tuple[int, tuple[Any, ...]]:
    """(rowid, every column) of the openai row, to put it back after a corruption."""
    with database(daemon) as connection:
        row = connection.execute("SELECT rowid, * FROM providers WHERE name = 'openai'").fetchone()
    return row[0], tuple(row[1:])


def corrupt(daemon: DaemonProcess, assignment: str) -> None:
    with database(daemon) as connection:
        connection.execute(f"UPDATE providers SET {assignment} WHERE name = 'openai'")


def restore(daemon: DaemonProcess, rowid: int, row: tuple[Any, ...]) -> None:
    with database(daemon) as connection:
        connection.execute("DELETE FROM providers WHERE rowid = ?", (rowid,))
        marks = ", ".join("?" * len(row))
        connection.execute(f"INSERT INTO providers VALUES ({marks})", row)


def assert_closed(daemon: DaemonProcess, host: str, token: str) -> None:
    for proxy_auth in (None, basic_auth(token)):
        answer = daemon.raw_connect(f"{host}:443", proxy_auth)
        assert answer.status_code == 503, (host, proxy_auth is not None, answer)
        assert MISCONFIGURED in answer.body


def test_the_reported_row_closes_its_hosts_at_runtime_and_after_a_restart(
    daemon: DaemonProcess,
) -> None:
    token = daemon.create_token("alice")
    assert daemon.raw_connect("api.openai.com:443").status_code == 407
    corrupt(daemon, "keys = 'not json'")
    daemon.reload_and_wait()
    listed = daemon.cli("providers", "show", "openai", "--json", check=True).stdout
    assert '"status": "error"' in listed
    for host in ("api.openai.com", "localhost", "API.OpenAI.com."):
        assert_closed(daemon, host, token)
    assert daemon.metric("blocked_connections_total", reason="provider_misconfigured") == 6
    assert "claims it but its row cannot be read" in daemon.logs()
    # The other providers are untouched: anthropic still needs a token.
    assert daemon.raw_connect("api.anthropic.com:443").status_code == 407

    daemon.stop()
    daemon.start()
    assert daemon.admin_get("/readyz").status_code == 200
    for host in ("api.openai.com", "localhost"):
        assert_closed(daemon, host, token)


@pytest.mark.parametrize(("assignment", "closed"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_every_unreadable_column_closes_the_hosts(
    daemon: DaemonProcess, assignment: str, closed: tuple[str, ...]
) -> None:
    token = daemon.create_token("alice")
    rowid, original = openai_row(daemon)
    corrupt(daemon, assignment)
    daemon.reload_and_wait()
    for host in closed:
        assert_closed(daemon, host, token)
    restore(daemon, rowid, original)
    daemon.reload_and_wait()
    assert daemon.raw_connect("api.openai.com:443").status_code == 407
    with daemon.httpx_client(token) as client:
        response = client.post(
            "https://api.openai.com/v1/chat/completions", json={"model": "gpt-4o", "messages": []}
        )
    assert response.status_code == 200


def test_a_row_without_a_readable_type_or_hosts_closes_every_unclaimed_default_host(
    daemon: DaemonProcess,
) -> None:
    """Nothing says which hosts the row claimed: every type's default host that no healthy
    provider claims is closed; anthropic's, claimed by the healthy anthropic row, still routes."""
    token = daemon.create_token("alice")
    corrupt(daemon, "type = 42, hosts = 'x'")
    daemon.reload_and_wait()
    for host in ("api.openai.com", "generativelanguage.googleapis.com", "openrouter.ai"):
        assert_closed(daemon, host, token)
    assert daemon.raw_connect("api.anthropic.com:443").status_code == 407


def test_a_plain_http_request_to_a_closed_host_is_refused(daemon: DaemonProcess) -> None:
    token = daemon.create_token("alice")
    corrupt(daemon, "keys = 'not json'")
    daemon.reload_and_wait()
    with httpx.Client(proxy=daemon.proxy_url_for(token), trust_env=False) as client:
        response = client.get("http://api.openai.com/v1/models")
    assert response.status_code == 503
    assert MISCONFIGURED in response.content


def test_other_error_statuses_still_tunnel_their_hosts(daemon: DaemonProcess) -> None:
    """No key with BYOK off is an operator's decision, not an unreadable row: tunneled
    like a disabled provider (docs/providers.md#statuses), so no proxy token is asked and no 503
    is answered."""
    daemon.cli("providers", "edit", "openai", "--clear-keys", "--no-byok", check=True)
    daemon.reload_and_wait()
    shown = daemon.cli("providers", "show", "openai", "--json", check=True).stdout
    assert '"status": "error"' in shown
    answer = daemon.raw_connect("api.openai.com:443")
    # Tunneled: the daemon dials the real host, which this sandbox may not reach (502).
    assert answer.status_code in (200, 502), answer
    assert MISCONFIGURED not in answer.body
