"""Nothing claimed is lost, nothing half-done, against the real daemon.

- Records on a graceful stop: every interception whose response finished before exit is in the
  database afterwards, the last one included.
- The database file deleted or replaced under the running daemon: records never go to the
  unlinked file; they reach the new file, or are counted as dropped.
- A malformed provider row: that row alone is in error; the others keep routing; the daemon never
  starts with provider hosts open.
- The proxy's own refusals are recorded as refusals (``ttfb_ms`` null, ``error`` the code), and
  are neither logged as upstream answers nor counted in the upstream histograms.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, DaemonStartError, free_port

CHAT_URL = "https://api.openai.com/v1/chat/completions"


def records(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """Every interception record, newest first, read with the CLI (daemon running or not)."""
    result = daemon.cli("interceptions", "list", "--limit", "1000", check=True)
    return json.loads(result.stdout)


def point_openai_at(daemon: DaemonProcess, upstream: FakeUpstream) -> None:
    daemon.edit_provider("openai", upstream.base_url, "sk-central")


def wait_for_exit(daemon: DaemonProcess) -> int:
    daemon.wait_for(lambda: daemon.returncode is not None, 20, "daemon exits after SIGTERM")
    code = daemon.returncode
    assert code is not None
    return code


# --- records on SIGTERM ---------------------------------------------------------------------


def test_sigterm_with_50_open_streams_keeps_all_50_records(upstream: FakeUpstream) -> None:
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "drain_timeout": "30s"}
    with DaemonProcess(config) as daemon:
        point_openai_at(daemon, upstream)
        daemon.reload_and_wait()
        ids = [f"sigterm-{index}" for index in range(50)]
        gates = [upstream.gate(stream_id) for stream_id in ids]

        def stream(stream_id: str) -> list[str]:
            with (
                daemon.httpx_client(timeout=30) as client,
                client.stream(
                    "POST",
                    CHAT_URL,
                    json={"model": "gpt-4o", "stream": True, "messages": []},
                    headers={"x-fake-stream-id": stream_id, "x-fake-events": "3"},
                ) as response,
            ):
                return [line for line in response.iter_lines() if line.startswith("data:")]

        with ThreadPoolExecutor(len(ids)) as pool:
            futures = [pool.submit(stream, stream_id) for stream_id in ids]
            daemon.wait_for(
                lambda: all(gate.request is not None for gate in gates),
                20,
                "all 50 streams reached the upstream",
            )
            daemon.send_signal(signal.SIGTERM)
            daemon.wait_for(
                lambda: daemon.admin_get("/readyz").status_code == 503, message="draining"
            )
            for gate in gates:
                gate.open_gate()
            bodies = [future.result(timeout=30) for future in futures]
        assert all(body[-1] == "data: [DONE]" for body in bodies)
        assert wait_for_exit(daemon) == 0
        found = records(daemon)
        assert sorted(r["status"] for r in found) == [200] * 50
        assert all(r["error"] is None and r["streamed"] for r in found)
        assert len({r["request_id"] for r in found}) == 50


def test_the_last_record_before_sigterm_is_kept(upstream: FakeUpstream) -> None:
    """One request, then SIGTERM at once: its record is written before exit, every time."""
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}
    with DaemonProcess(config) as daemon:
        point_openai_at(daemon, upstream)
        for attempt in range(1, 4):
            if attempt > 1:
                daemon.start()
            else:
                daemon.reload_and_wait()
            with daemon.httpx_client() as client:
                response = client.post(
                    CHAT_URL,
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                )
            assert response.status_code == 200
            request_id = response.headers["x-aibridge-request-id"]
            daemon.send_signal(signal.SIGTERM)
            assert wait_for_exit(daemon) == 0
            found = records(daemon)
            assert len(found) == attempt, f"attempt {attempt}: {len(found)} records"
            assert found[0]["request_id"] == request_id


def test_streams_cut_at_the_drain_timeout_are_recorded_too(upstream: FakeUpstream) -> None:
    """A stream still open when drain_timeout runs out is closed by the daemon; its record
    (with the error) is written before exit, from the flow's last hook."""
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "drain_timeout": "1s"}
    with DaemonProcess(config) as daemon:
        point_openai_at(daemon, upstream)
        daemon.reload_and_wait()
        gate = upstream.gate("never-finishes")
        with (
            daemon.httpx_client() as client,
            client.stream(
                "POST",
                CHAT_URL,
                json={"model": "gpt-4o", "stream": True, "messages": []},
                headers={"x-fake-stream-id": "never-finishes", "x-fake-events": "3"},
            ) as response,
        ):
            gate.release()
            assert next(line for line in response.iter_lines() if line.startswith("data:"))
            daemon.send_signal(signal.SIGTERM)
            assert wait_for_exit(daemon) == 0
        (record,) = records(daemon)
        assert record["request_id"] == response.headers["x-aibridge-request-id"]
        assert record["error"] is not None


# --- the database file deleted or replaced under the daemon ---------------------------------


def chat(daemon: DaemonProcess, token: str | None = None) -> httpx.Response:
    with daemon.httpx_client(token) as client:
        return client.post(
            CHAT_URL, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        )


def consistent_copy(database: Path, copy: Path) -> None:
    """A copy of a live database through SQLite's backup API (what an operator's backup is)."""
    source, target = sqlite3.connect(database), sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def test_records_follow_a_replaced_database_file(upstream: FakeUpstream) -> None:
    """`mv backup.db data/aibridgeproxyd.db` under a running daemon: later records and
    management writes go to (and come from) the new file, never the replaced one."""
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none", "reload_interval": "5m"}
    with DaemonProcess(config) as daemon:
        point_openai_at(daemon, upstream)
        daemon.reload_and_wait()
        database = daemon.data_dir / "aibridgeproxyd.db"
        first = chat(daemon).headers["x-aibridge-request-id"]
        daemon.wait_for(lambda: [r["request_id"] for r in records(daemon)] == [first])

        replacement = daemon.workdir / "replacement.db"
        consistent_copy(database, replacement)
        os.rename(replacement, database)
        second = chat(daemon).headers["x-aibridge-request-id"]
        daemon.wait_for(
            lambda: [r["request_id"] for r in records(daemon)] == [second, first],
            message="the record after the swap is in the file now at the path",
        )
        assert "was replaced while the daemon had it open" in daemon.logs()

        # The change probe follows the new file too: a write applies long before the 5m timer.
        upstream.reset()
        daemon.cli("providers", "edit", "openai", "--key", "sk-rotated", check=True)

        def rotated() -> bool:
            upstream.reset()
            chat(daemon)
            return upstream.requests[-1].headers["authorization"] == "Bearer sk-rotated"

        daemon.wait_for(rotated, 10, "the write to the new file reached the daemon")
        assert daemon.metric("interception_records_dropped_total") in (None, 0)


def test_records_are_counted_dropped_while_the_database_file_is_missing(
    upstream: FakeUpstream,
) -> None:
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}
    with DaemonProcess(config) as daemon:
        point_openai_at(daemon, upstream)
        daemon.reload_and_wait()
        database = daemon.data_dir / "aibridgeproxyd.db"
        backup = daemon.workdir / "backup.db"
        consistent_copy(database, backup)

        database.unlink()
        response = chat(daemon)
        assert response.status_code == 200  # routing goes on from the last snapshot
        daemon.wait_for(
            lambda: (
                daemon.metric("interception_records_dropped_total", reason="database_missing") == 1
            ),
            message="the record is counted as dropped",
        )
        assert not database.exists()  # never recreated behind the operator's back
        assert "was deleted while the daemon had it open" in daemon.logs()

        os.rename(backup, database)  # restored
        restored = chat(daemon).headers["x-aibridge-request-id"]
        daemon.wait_for(lambda: [r["request_id"] for r in records(daemon)] == [restored])
        assert daemon.metric("interception_records_dropped_total", reason="database_missing") == 1


# --- a malformed provider row -----------------------------------------------------------------

CORRUPTIONS = [
    ("keys = '[\"sk-victim-secret\"'", "keys is not valid JSON"),
    ("settings = '{\"api_version\": '", "settings is not valid JSON"),
    ("hosts = 'victim.example'", "hosts is not valid JSON"),
    ("type = 'no-such-type'", "unknown provider type 'no-such-type'"),
]


def corrupt_row(daemon: DaemonProcess, assignment: str, name: str = "victim") -> None:
    """Change a provider row with sqlite3 directly, behind the CLI's validation."""
    with sqlite3.connect(daemon.data_dir / "aibridgeproxyd.db") as connection:
        connection.execute(f"UPDATE providers SET {assignment} WHERE name = ?", (name,))


def provider_states(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    listed = json.loads(daemon.cli("providers", "list", "--json", check=True).stdout)
    return {provider["name"]: provider for provider in listed}


@pytest.fixture
def daemon_with_victim(upstream: FakeUpstream) -> Iterator[tuple[DaemonProcess, str]]:
    """openai routed to the fake, plus `victim` (openai-compat on victim.example), and a token."""
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as daemon:
        point_openai_at(daemon, upstream)
        daemon.cli(
            "providers", "add", "victim", "--type", "openai-compat", "--base-url",
            upstream.base_url, "--host", "victim.example", "--key", "sk-victim-secret",
            check=True,
        )  # fmt: skip
        token = daemon.create_token("alice")
        yield daemon, token


def test_a_malformed_row_is_in_error_alone_and_the_others_keep_routing(
    daemon_with_victim: tuple[DaemonProcess, str],
) -> None:
    daemon, token = daemon_with_victim
    with sqlite3.connect(daemon.data_dir / "aibridgeproxyd.db") as connection:
        original = connection.execute(
            "SELECT type, hosts, keys, settings FROM providers WHERE name = 'victim'"
        ).fetchone()
    for assignment, reason in CORRUPTIONS:
        corrupt_row(daemon, assignment)
        daemon.reload_and_wait()  # the reload succeeds: one row does not fail it
        states = provider_states(daemon)
        assert states["victim"]["status"] == "error", assignment
        assert reason in states["victim"]["status_reason"]
        assert "sk-victim-secret" not in json.dumps(states)
        assert states["openai"]["status"] == "enabled"
        assert daemon.metric("provider_info", provider_name="victim", status="error") == 1
        assert chat(daemon, token).status_code == 200
        table = daemon.cli("providers", "list")
        assert table.returncode == 0, table.stderr
        assert reason in table.stdout
        shown = daemon.cli("providers", "show", "victim", "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "error"
        with sqlite3.connect(daemon.data_dir / "aibridgeproxyd.db") as connection:
            connection.execute(
                "UPDATE providers SET type = ?, hosts = ?, keys = ?, settings = ? "
                "WHERE name = 'victim'",
                original,
            )
        daemon.reload_and_wait()
        assert provider_states(daemon)["victim"]["status"] == "enabled"
    assert "provider reload failed" not in daemon.logs()


def test_a_restart_with_a_malformed_row_keeps_provider_hosts_closed(
    daemon_with_victim: tuple[DaemonProcess, str],
) -> None:
    """Regression: with `keys` not JSON, a restart used to leave every provider host tunneled
    without proxy auth (the first load failed and the daemon routed nothing)."""
    daemon, token = daemon_with_victim
    corrupt_row(daemon, "keys = '[\"sk-victim-secret\"'")
    daemon.stop()
    daemon.start()
    assert daemon.raw_connect("api.openai.com:443").status_code == 407
    assert chat(daemon, token).status_code == 200
    assert provider_states(daemon)["victim"]["status"] == "error"
    assert daemon.admin_get("/readyz").status_code == 200


def test_the_daemon_refuses_to_start_when_the_provider_table_cannot_be_read(
    upstream: FakeUpstream,
) -> None:
    """Fail closed at start: no provider table, no proxy listener (one line, exit code 1)."""
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as daemon:
        daemon.stop()
        with sqlite3.connect(daemon.data_dir / "aibridgeproxyd.db") as connection:
            connection.execute("ALTER TABLE providers RENAME TO providers_gone")
            connection.execute("CREATE TABLE providers (name TEXT PRIMARY KEY)")
        with pytest.raises(DaemonStartError):
            daemon.start()
        assert daemon.returncode == 1
        errors = [line for line in daemon.logs().splitlines() if "cannot start" in line]
        assert len(errors) == 1, daemon.logs()
        assert "Traceback" not in daemon.logs()
        with pytest.raises(OSError):
            socket.create_connection((daemon.proxy_host, daemon.proxy_port), timeout=2).close()


# --- the proxy's own refusals ------------------------------------------------------------------


def test_the_proxys_own_refusals_are_recorded_as_refusals(upstream: FakeUpstream) -> None:
    """BYOK refused and an unreachable upstream: records with the refusal's code and no TTFB,
    no "upstream answered" line, nothing in the upstream histograms; a real upstream error
    still is all three."""
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as daemon:
        point_openai_at(daemon, upstream)
        daemon.cli("providers", "edit", "openai", "--no-byok", check=True)
        closed_port = free_port()
        daemon.cli(
            "providers", "add", "gone", "--type", "openai-compat", "--base-url",
            f"https://127.0.0.1:{closed_port}/v1", "--host", "gone.example", "--key", "sk-gone",
            check=True,
        )  # fmt: skip
        token = daemon.create_token("alice")
        with daemon.httpx_client(token) as client:
            byok = client.post(
                CHAT_URL, json={"model": "gpt-4o", "messages": []},
                headers={"authorization": "Bearer sk-users-own-key"},
            )  # fmt: skip
            unreachable = client.post(
                "https://gone.example/v1/chat/completions", json={"model": "m", "messages": []}
            )
            upstream_error = client.post(
                CHAT_URL, json={"model": "gpt-4o", "messages": []}, headers={"x-fake-status": "500"}
            )
        assert (byok.status_code, unreachable.status_code, upstream_error.status_code) == (
            403, 502, 500,
        )  # fmt: skip
        found = daemon.wait_for(lambda: (found := records(daemon)) and len(found) == 3 and found)
        by_id = {r["request_id"]: r for r in found}
        refused = by_id[byok.headers["x-aibridge-request-id"]]
        assert (refused["status"], refused["error"], refused["ttfb_ms"]) == (
            403,
            "byok_not_allowed",
            None,
        )
        failed = by_id[unreachable.headers["x-aibridge-request-id"]]
        assert (failed["status"], failed["error"], failed["ttfb_ms"]) == (
            502,
            "upstream_unreachable",
            None,
        )
        answered = by_id[upstream_error.headers["x-aibridge-request-id"]]
        assert answered["status"] == 500 and answered["error"] is None
        assert answered["ttfb_ms"] is not None
        assert daemon.metric("upstream_ttfb_seconds_count", provider="gone") in (None, 0)
        assert daemon.metric("upstream_duration_seconds_count", provider="gone") in (None, 0)
        assert daemon.metric("upstream_ttfb_seconds_count", provider="openai") == 1
        assert daemon.metric("upstream_duration_seconds_count", provider="openai") == 1
        answered_lines = [
            line for line in daemon.logs().splitlines() if "upstream answered" in line
        ]
        assert len(answered_lines) == 1 and "upstream answered 500" in answered_lines[0]
