"""End to end: a management API write is applied by the daemon that served it before the API
answers. A proxy token created through the API works on the very next connection, a revoked one
is refused on it, a provider created or changed through the API routes the very next request:
with one process, and with ``workers: 2`` (every worker has applied the write).

The reload timer is long (60 s): nothing but the write itself can make the daemon apply it.
Each check is made once, at once, many times over; none polls.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth

PROVIDERS = "/api/v2/ai/providers"
PROXY_TOKENS = "/api/v2/ai/proxy-tokens"
ROUNDS = 20
_names = itertools.count(1)

pytestmark = pytest.mark.usefixtures("clean_upstream")


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-workers"])
def daemon(request: pytest.FixtureRequest, upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    config: dict[str, Any] = {
        "upstream_ca_file": upstream.ca_pem_path,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        "reload_interval": "60s",
    }
    if request.param > 1:
        config["workers"] = request.param
    with DaemonProcess(config, ready_timeout=40) as d:
        yield d


@pytest.fixture(scope="module")
def api(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    """A client of the admin listener, as an admin."""
    admin = daemon.cli("admin-tokens", "create", "root", "--role", "admin", check=True).stdout
    with httpx.Client(
        base_url=daemon.admin_url,
        headers={"Authorization": f"Bearer {admin.strip()}"},
        trust_env=False,
        timeout=20.0,
        verify=daemon.admin_verify,
    ) as client:
        yield client


def chat(daemon: DaemonProcess, token: str, host: str) -> httpx.Response:
    """One chat completion to ``host`` through the proxy, on a new connection."""
    with daemon.httpx_client(token, timeout=10.0) as client:
        return client.post(
            f"https://{host}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )


def test_a_token_created_or_revoked_through_the_api_applies_on_the_next_connection(
    daemon: DaemonProcess, api: httpx.Client
) -> None:
    """The API wrote the token and answered; the daemon applied it at its next reload, up to
    half a second later (its change probe), so a client using the token at once could get a
    407 (created) or still get in (revoked)."""
    for _ in range(ROUNDS):
        name = f"user-{next(_names)}"
        created = api.post(PROXY_TOKENS, json={"name": name})
        assert created.status_code == 201, created.text
        token = created.json()["token"]
        assert daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code == 200
        assert api.delete(f"{PROXY_TOKENS}/{name}").status_code == 204
        assert daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code == 407


def test_a_provider_created_or_changed_through_the_api_routes_the_next_request(
    daemon: DaemonProcess, api: httpx.Client, upstream: FakeUpstream
) -> None:
    token = api.post(PROXY_TOKENS, json={"name": f"user-{next(_names)}"}).json()["token"]
    for round_ in range(ROUNDS // 4):
        name = f"corp-{next(_names)}"
        host = f"{name}.example"
        provider = {
            "name": name,
            "type": "openai-compat",
            "base_url": upstream.base_url,
            "hosts": [host],
            "api_keys": [{"api_key": f"sk-first-key-{round_:04d}"}],
        }
        assert api.post(PROVIDERS, json=provider).status_code == 201
        assert chat(daemon, token, host).status_code == 200
        assert upstream.requests[-1].headers["authorization"] == f"Bearer sk-first-key-{round_:04d}"
        patch = {"api_keys": [{"api_key": f"sk-second-key-{round_:04d}"}]}
        assert api.patch(f"{PROVIDERS}/{name}", json=patch).status_code == 200
        assert chat(daemon, token, host).status_code == 200
        assert upstream.requests[-1].headers["authorization"] == (
            f"Bearer sk-second-key-{round_:04d}"
        )
