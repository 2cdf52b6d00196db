"""End to end: policies written through one replica's API (``/api/v2/ai/policies``) on one real
PostgreSQL database apply on the other replica within a second (CONTRACT 15: "Policy changes
apply within 1 second on every replica"), and either replica's API reports the same limits.
The reload timer is a minute long, so only the store's change notification can do it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess
from tests.postgres import PostgresServer
from tests.test_e2e_api_policies import ENCRYPTION_KEY

POLICIES = "/api/v2/ai/policies"

pytestmark = pytest.mark.usefixtures("clean_upstream")


@pytest.fixture(scope="module")
def replicas(
    upstream: FakeUpstream, postgres_server: PostgresServer
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    config = {
        "database_url": postgres_server.create_database(),
        "upstream_ca_file": upstream.ca_pem_path,
        "reload_interval": "60s",
    }
    env = {"AIBRIDGEPROXYD_ENCRYPTION_KEYS": ENCRYPTION_KEY}
    with DaemonProcess(config, env=env) as first, DaemonProcess(config, env=env) as second:
        first.edit_provider("openai", upstream.base_url, "sk-openai-central")
        yield first, second


@pytest.fixture(scope="module")
def admin_token(replicas: tuple[DaemonProcess, DaemonProcess]) -> str:
    result = replicas[0].cli("admin-tokens", "create", "root", "--role", "admin", check=True)
    return result.stdout.strip()


def api(daemon: DaemonProcess, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=daemon.admin_url, trust_env=False, timeout=10.0) as client:
        return client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def chat_status(daemon: DaemonProcess, token: str) -> int:
    """The status of one gpt-4o chat completion through ``daemon``."""
    with daemon.httpx_client(token, timeout=5.0) as client:
        return client.post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        ).status_code


def within_a_second(daemon: DaemonProcess, token: str, status: int, since: float) -> None:
    """A request through ``daemon`` started within a second of ``since`` answers ``status``."""
    while True:
        started = time.monotonic()
        if chat_status(daemon, token) == status:
            assert started - since < 1.0, f"{status} only {started - since:.2f} s after the write"
            return
        assert started - since < 1.0, f"no {status} within a second of the write"
        time.sleep(0.02)  # polling interval, not synchronisation


def test_a_policy_set_through_one_replicas_api_applies_on_the_other_within_a_second(
    replicas: tuple[DaemonProcess, DaemonProcess], admin_token: str
) -> None:
    first, second = replicas
    token = first.create_token("alice", reload=False)
    second.wait_for(lambda: chat_status(second, token) == 200, message="the token on both")

    written = time.monotonic()
    allow_claude = {"models": ["claude-*"]}
    assert api(first, admin_token, "PUT", f"{POLICIES}/alice", json=allow_claude).status_code == 201
    within_a_second(second, token, 403, written)
    reports = [api(d, token, "GET", f"{POLICIES}/me/effective").json()["scopes"] for d in replicas]
    assert reports[0] == reports[1] and reports[0][0]["models"] == ["claude-*"]

    written = time.monotonic()
    assert api(second, admin_token, "DELETE", f"{POLICIES}/alice").status_code == 204
    within_a_second(first, token, 200, written)
