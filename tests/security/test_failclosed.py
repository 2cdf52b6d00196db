"""End to end: a check that raises inside the real daemon refuses, it never lets through.

A fault is injected at the daemon's start-up (``faults/sitecustomize``, on PYTHONPATH only for
these daemons): one method of a check, or of something a check relies on, raises, as a bug
would. Before the fail-closed guard, mitmproxy logged the exception and carried on. For example,
a proxy-auth look-up that raised let the CONNECT through (200), and its requests went upstream
with the central key.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.fakes.tls import TunnelTarget
from tests.fakes.upstream import FakeUpstream
from tests.harness import REPO_ROOT, DaemonProcess, basic_auth

FAULTS = Path(__file__).resolve().parent / "faults"
CENTRAL_KEY = "sk-central-fault"


pytestmark = pytest.mark.usefixtures("clean_upstream")


def faulty_daemon(upstream: FakeUpstream, target: TunnelTarget, fault: str) -> DaemonProcess:
    pythonpath = os.pathsep.join(
        p for p in (str(FAULTS), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return DaemonProcess(
        {
            "upstream_ca_file": upstream.ca_pem_path,
            "auth_tunneled": True,
            "allowed_private_cidrs": ["127.0.0.0/8"],
            "allowed_ports": [443, target.port],
        },
        env={"ABP_TEST_FAULT": fault, "PYTHONPATH": pythonpath},
    )


def started(daemon: DaemonProcess, upstream: FakeUpstream) -> str:
    daemon.edit_provider("openai", upstream.base_url, CENTRAL_KEY)
    return daemon.create_token("alice")


def assert_refused_and_logged(daemon: DaemonProcess, upstream: FakeUpstream, fault: str) -> None:
    assert upstream.requests == [], "a request reached the upstream"
    logs = daemon.logs()
    assert "refused (fail closed)" in logs
    assert f"injected fault in {fault.partition(':')[2]}" in logs
    assert (daemon.metric("hook_failures_total", role="check") or 0) >= 1


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ("aibridgeproxyd.snapshot:Snapshot.identity_for_token", 407),
        ("aibridgeproxyd.snapshot:Snapshot.provider_for_host", 403),
    ],
)
def test_a_connect_check_that_raises_refuses_the_connect(
    upstream: FakeUpstream, target: TunnelTarget, fault: str, status: int
) -> None:
    with faulty_daemon(upstream, target, fault) as daemon:
        token = started(daemon, upstream)
        for destination in ("api.openai.com:443", f"127.0.0.1:{target.port}"):
            response = daemon.raw_connect(destination, basic_auth(token))
            assert response.status_code == status, (destination, response)
            assert b"injected" not in response.body and b"Traceback" not in response.body
        assert_refused_and_logged(daemon, upstream, fault)


@pytest.mark.parametrize(
    "fault",
    [
        "aibridgeproxyd.addons.intercept:Intercept.tls_clienthello",
        "aibridgeproxyd.addons.intercept:Intercept.next_layer",
        "aibridgeproxyd.addons.intercept:Intercept.http_connected",
    ],
)
def test_a_connection_level_check_that_raises_closes_the_connection(
    upstream: FakeUpstream, target: TunnelTarget, fault: str
) -> None:
    with faulty_daemon(upstream, target, fault) as daemon:
        token = started(daemon, upstream)
        with daemon.httpx_client(token) as client, pytest.raises(httpx.TransportError):
            client.get("https://api.openai.com/v1/models")
        assert_refused_and_logged(daemon, upstream, fault)


def test_a_routing_check_that_raises_answers_in_the_client_format(
    upstream: FakeUpstream, target: TunnelTarget
) -> None:
    fault = "aibridgeproxyd.addons.route:RouteRequests.request"
    with faulty_daemon(upstream, target, fault) as daemon:
        token = started(daemon, upstream)
        with daemon.httpx_client(token) as client:
            response = client.post(
                "https://api.openai.com/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer aibridgeproxyd"},
            )
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "internal_error"
        assert "injected" not in response.text
        assert_refused_and_logged(daemon, upstream, fault)


def test_a_destination_check_that_raises_refuses_the_dial(
    upstream: FakeUpstream, target: TunnelTarget
) -> None:
    fault = "aibridgeproxyd.addons.destinations:DestinationGuard.server_connect"
    with faulty_daemon(upstream, target, fault) as daemon:
        token = started(daemon, upstream)
        # A tunnel: mitmproxy dials at CONNECT time, and the dial is refused.
        response = daemon.raw_connect(f"127.0.0.1:{target.port}", basic_auth(token))
        assert response.status_code == 502, response
        assert b"injected" not in response.body
        # A MITM'd request: its upstream dial is refused too, answered in the client's format.
        with daemon.httpx_client(token) as client:
            answer = client.get(
                "https://api.openai.com/v1/models",
                headers={"Authorization": "Bearer aibridgeproxyd"},
            )
        assert answer.status_code == 502, answer.text
        assert "error" in answer.json()
        assert_refused_and_logged(daemon, upstream, fault)
