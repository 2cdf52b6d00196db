"""End to end: provider changes made with the CLI reach a running daemon without a restart, an
open MITM tunnel re-checks the live table on every request (a request on a tunnel whose host is
no longer claimed gets 503 and the tunnel is closed; the client's next connection is tunneled),
and a failed reload keeps the previous snapshot. The "original host" of the intercepted name
`localhost` is a TunnelTarget, so tunneled traffic stays on loopback too."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.tls import TunnelTarget, issued_by
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth, ca_bundle, open_tls_tunnel, trust

REQUEST_ID = "x-aibridge-request-id"


# A new daemon per test, and a clean upstream.
pytestmark = pytest.mark.usefixtures("clean_upstream")


@pytest.fixture
def original() -> Iterator[TunnelTarget]:
    """What `localhost:<port>` really is when no provider claims it."""
    with TunnelTarget() as target:
        yield target


@pytest.fixture
def daemon(
    upstream: FakeUpstream, original: TunnelTarget, tmp_path: Path
) -> Iterator[DaemonProcess]:
    bundle = ca_bundle(tmp_path / "upstream-roots.pem", upstream.ca_pem_path, original.ca_pem_path)
    config = {
        "upstream_ca_file": bundle,
        "allowed_private_cidrs": ["127.0.0.0/8", "::1/128"],
        "allowed_ports": [443, original.port],
        "reload_interval": "30s",  # changes must arrive through the write watcher and SIGHUP
    }
    with DaemonProcess(config) as d:
        yield d


def status_of(daemon: DaemonProcess, name: str) -> dict[str, object]:
    (row,) = [
        p
        for p in json.loads(daemon.cli("providers", "list", "--json", check=True).stdout)
        if p["name"] == name
    ]
    return row


def provider_info(daemon: DaemonProcess) -> dict[str, tuple[str, str]]:
    info: dict[str, tuple[str, str]] = {}
    for (name, labels), value in daemon.metrics().items():
        if name == daemon.metrics_prefix + "provider_info" and value == 1:
            label = dict(labels)
            info[label["provider_name"]] = (label["provider_type"], label["status"])
    return info


def change(daemon: DaemonProcess, *args: str) -> None:
    """A management write through the CLI, then wait until the daemon has reloaded."""
    daemon.cli(*args, check=True)
    daemon.reload_and_wait()


def test_reload_crud_sequence(
    daemon: DaemonProcess, upstream: FakeUpstream, original: TunnelTarget
) -> None:
    token = daemon.create_token("alice")
    url = f"https://localhost:{original.port}/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    central = {"authorization": "Bearer aibridgeproxyd"}

    # One client, one keep-alive connection: the tunnel opened in step 1 stays open until its
    # host is no longer claimed.
    def new_client() -> httpx.Client:
        return daemon.httpx_client(
            token,
            extra_ca=[original.ca_pem_path],
            limits=httpx.Limits(max_connections=1, keepalive_expiry=120),
        )

    client = new_client()

    def routed_key() -> str:
        upstream.reset()
        response = client.post(url, json=body, headers=central)
        assert response.status_code == 200, response.text
        assert REQUEST_ID in response.headers
        (request,) = upstream.requests
        return request.headers["authorization"]

    def refused_then_tunneled() -> None:
        """The open MITM tunnel's host is no longer claimed: 503 in the client format, the tunnel
        closes, and the client's next request goes through a new, tunneled connection."""
        before = len(original.requests)
        refused = client.post(url, json=body, headers=central)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "provider_unavailable"
        assert refused.headers["connection"] == "close"
        assert len(original.requests) == before  # a MITM'd host is never dialled as itself
        response = client.post(url, json=body, headers=central)
        assert response.status_code == 200
        assert REQUEST_ID not in response.headers
        assert len(original.requests) == before + 1

    def tunneled_on_a_new_connection() -> None:
        with open_tls_tunnel(
            daemon.proxy_host,
            daemon.proxy_port,
            f"localhost:{original.port}",
            trust(original.ca_pem_path),
            basic_auth(token),
        ) as tls:
            assert issued_by(tls.getpeercert(binary_form=True), original.ca_pem_path)

    try:
        # 1. create
        daemon.cli("providers", "disable", "openai", check=True)
        change(daemon, "providers", "add", "alpha", "--type", "openai", "--base-url", upstream.base_url,
               "--host", "localhost", "--key", "k-alpha")  # fmt: skip
        assert provider_info(daemon)["alpha"] == ("openai", "enabled")
        assert routed_key() == "Bearer k-alpha"

        # 2. rename (delete + add under a new name): the open tunnel follows the live table
        daemon.cli("providers", "delete", "alpha", check=True)
        change(daemon, "providers", "add", "beta", "--type", "openai", "--base-url", upstream.base_url,
               "--host", "localhost", "--key", "k-beta")  # fmt: skip
        info = provider_info(daemon)
        assert "alpha" not in info and info["beta"] == ("openai", "enabled")
        assert routed_key() == "Bearer k-beta"

        # 3. change host: localhost is no longer claimed, so the open tunnel is refused and closed
        change(daemon, "providers", "edit", "beta", "--host", "other.localhost")
        refused_then_tunneled()
        tunneled_on_a_new_connection()
        change(daemon, "providers", "edit", "beta", "--host", "localhost")
        client.close()  # its connection is a raw tunnel now: a new one is MITM'd again
        client = new_client()
        assert routed_key() == "Bearer k-beta"

        # 4. disable, 5. enable
        change(daemon, "providers", "disable", "beta")
        assert provider_info(daemon)["beta"] == ("openai", "disabled")
        assert status_of(daemon, "beta")["status"] == "disabled"
        refused_then_tunneled()
        tunneled_on_a_new_connection()
        change(daemon, "providers", "enable", "beta")
        assert provider_info(daemon)["beta"] == ("openai", "enabled")
        client.close()
        client = new_client()
        assert routed_key() == "Bearer k-beta"

        # 6. duplicate host: the later provider (by name) is in error, the first keeps routing
        change(daemon, "providers", "add", "gamma", "--type", "openai", "--base-url", upstream.base_url,
               "--host", "localhost", "--key", "k-gamma")  # fmt: skip
        assert provider_info(daemon)["gamma"] == ("openai", "error")
        assert "already claimed by provider 'beta'" in str(
            status_of(daemon, "gamma")["status_reason"]
        )
        assert routed_key() == "Bearer k-beta"

        # 7. delete: gamma takes the host over
        change(daemon, "providers", "delete", "beta")
        assert provider_info(daemon) == {"gamma": ("openai", "enabled"), "openai": ("openai", "disabled"),
                                         "anthropic": ("anthropic", "enabled")}  # fmt: skip
        assert routed_key() == "Bearer k-gamma"

        # 8. BYOK refused in the provider's error shape; central still works
        change(daemon, "providers", "edit", "gamma", "--no-byok")
        refused = client.post(url, json=body, headers={"authorization": "Bearer sk-own-key"})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "byok_not_allowed"
        assert REQUEST_ID in refused.headers
        assert routed_key() == "Bearer k-gamma"

        # 9. no key: central mode has nothing to inject
        change(daemon, "providers", "edit", "gamma", "--byok", "--clear-keys")
        missing = client.post(url, json=body, headers=central)
        assert missing.status_code == 403
        assert missing.json()["error"]["code"] == "no_key_configured"
        change(daemon, "providers", "edit", "gamma", "--key", "k-gamma")

        # 10. a failed reload keeps the previous snapshot
        database = daemon.data_dir / "aibridgeproxyd.db"
        moved = database.with_name("moved-away.db")
        database.rename(moved)
        try:
            success_before = daemon.metric("providers_last_reload_success_timestamp_seconds")
            daemon.reload_and_wait(require_success=False)
            assert (
                daemon.metric("providers_last_reload_success_timestamp_seconds") == success_before
            )
            assert (daemon.metric("providers_last_reload_timestamp_seconds") or 0) > (
                success_before or 0
            )
            assert routed_key() == "Bearer k-gamma"
            assert provider_info(daemon)["gamma"] == ("openai", "enabled")
            assert "provider reload failed" in daemon.logs()
        finally:
            moved.rename(database)
        daemon.reload_and_wait()
        assert routed_key() == "Bearer k-gamma"
    finally:
        client.close()

    assert daemon.metric("inflight_mitm_requests", provider="gamma") == 0
    # byok_not_allowed and no_key_configured
    assert (daemon.metric("mitm_responses_total", provider="gamma", code="403") or 0) == 2


def test_revoked_token_is_refused_on_new_connections(daemon: DaemonProcess) -> None:
    token = daemon.create_token("bob")
    assert daemon.raw_connect("api.anthropic.com:443", basic_auth(token)).status_code == 200
    change(daemon, "tokens", "revoke", "bob")
    assert daemon.raw_connect("api.anthropic.com:443", basic_auth(token)).status_code == 407


def test_a_daemon_killed_on_this_machine_is_not_waited_for() -> None:
    """``kill -9`` leaves the daemon's presence row (a fresh heartbeat) in the store: the CLI
    sees its process has ended and does not wait for it to apply a revoke."""
    with DaemonProcess({"reload_interval": "30s"}) as killed:
        killed.create_token("bob")
        killed.send_signal(signal.SIGKILL)  # not reaped yet: a zombie while the CLI runs
        result = killed.cli("tokens", "revoke", "bob", check=True)
    # The note comes only after the whole wait (5 s) for a daemon that did not confirm.
    assert "did not confirm" not in result.stderr


def test_auth_tunneled_requires_a_token_for_tunnels_too(original: TunnelTarget) -> None:
    plain_target = TunnelTarget(tls=False)
    with (
        plain_target,
        DaemonProcess(
            {
                "auth_tunneled": True,
                "allowed_private_cidrs": ["127.0.0.0/8"],
                "allowed_ports": [original.port, plain_target.port],
            }
        ) as d,
    ):
        token = d.create_token("carol")
        assert d.raw_connect(original.address).status_code == 407
        assert d.raw_connect(original.address, basic_auth(token)).status_code == 200
        with httpx.Client(proxy=d.proxy_url, trust_env=False) as anonymous:
            response = anonymous.get(f"{plain_target.url}/x")
            assert response.status_code == 407
            assert response.headers["proxy-authenticate"] == 'Basic realm="aibridgeproxyd"'
        with httpx.Client(proxy=d.proxy_url_for(token), trust_env=False) as authenticated:
            assert authenticated.get(f"{plain_target.url}/x").status_code == 200
        (request,) = plain_target.requests
        assert "proxy-authorization" not in request.headers


def test_before_the_first_successful_load_nothing_is_intercepted(tmp_path: Path) -> None:
    """A daemon whose database cannot be read at start fails to start rather than route blind."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "aibridgeproxyd.db").write_bytes(b"this is not a database" * 100)
    daemon = DaemonProcess({"data_dir": data_dir}, ready_timeout=10)
    try:
        with pytest.raises(Exception):  # noqa: B017 - start-up must fail, whatever the error type
            daemon.start()
        assert daemon.returncode == 1
        assert "cannot start" in daemon.logs() and "database" in daemon.logs()
    finally:
        daemon.close()
