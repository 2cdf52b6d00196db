"""Proxy authentication: the decisions (``aibridgeproxyd.proxy_auth``) and the addon on its own,
driven with mitmproxy's test flows."""

from __future__ import annotations

import base64
from collections.abc import Mapping

import pytest
from aibridgeproxyd.addons.proxy_auth import ProxyAuth
from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.proxy_auth import (
    COOLDOWN,
    INVALID,
    LOOKUP_FAILED,
    MALFORMED,
    MISSING,
    Verdict,
    authenticate,
    named_caller,
    token_required,
)
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import Snapshot, build_snapshot
from aibridgeproxyd.token_refresh import TokenRefresher
from aibridgeproxyd.tokens import hash_token
from tests.unit.test_adapters_common import routed

TOKEN = "proxy-token-alice-0123456789"
NEW_TOKEN = "proxy-token-bob-created-just-now"


def basic(password: str, user: str = "x") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def snapshot() -> Snapshot:
    built = build_snapshot([routed("openai")], [])
    return Snapshot(by_host=built.by_host, token_names_by_hash={hash_token(TOKEN): "alice"})


def tracker() -> AuthFailureTracker:
    return AuthFailureTracker(limit=2, window=60.0, cooldown=30.0, log_interval=10.0)


def refresher(stored: Mapping[str, str] | Exception) -> TokenRefresher:
    async def read() -> Mapping[str, str]:
        if isinstance(stored, Exception):
            raise stored
        return stored

    return TokenRefresher(read, min_interval=0.0)


def failures_counted(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "coder_aibridgeproxyd_proxy_auth_failures_total", {"reason": reason}
    )
    return value or 0.0


# --- decisions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_mode", "auth_tunneled", "provider_host", "required"),
    [
        (False, True, True, False),
        (True, False, True, True),
        (True, False, False, False),
        (True, True, False, True),
    ],
)
def test_a_token_is_required_for_provider_hosts_and_with_auth_tunneled_for_all(
    token_mode: bool, auth_tunneled: bool, provider_host: bool, required: bool
) -> None:
    assert token_required(token_mode, auth_tunneled, provider_host) is required


def test_a_known_token_names_the_caller_even_where_none_is_needed() -> None:
    assert named_caller(basic(TOKEN), snapshot()) == ("alice", TOKEN)
    assert named_caller(basic("unknown-token"), snapshot()) == (None, None)
    assert named_caller(None, snapshot()) == (None, None)


@pytest.mark.parametrize(
    ("header", "reason"),
    [(None, MISSING), ("", MISSING), ("Bearer abc", MALFORMED), (basic(""), MALFORMED)],
)
async def test_a_header_without_a_token_is_refused_with_its_reason(
    header: str | None, reason: str
) -> None:
    verdict = await authenticate(header, "10.0.0.1", snapshot(), tracker(), None)
    assert verdict == Verdict(None, reason=reason)


async def test_a_token_in_the_snapshot_is_accepted_without_a_store_read() -> None:
    broken = refresher(RuntimeError("must not be read"))
    verdict = await authenticate(basic(TOKEN), "10.0.0.1", snapshot(), tracker(), broken)
    assert verdict == Verdict("alice", TOKEN)


async def test_a_token_created_after_the_snapshot_is_found_by_a_store_read() -> None:
    fresh = refresher({hash_token(NEW_TOKEN): "bob"})
    verdict = await authenticate(basic(NEW_TOKEN), "10.0.0.1", snapshot(), tracker(), fresh)
    assert verdict == Verdict("bob", NEW_TOKEN)


async def test_an_unknown_token_is_invalid() -> None:
    verdict = await authenticate(basic("nope-nope"), "10.0.0.1", snapshot(), tracker(), None)
    assert verdict == Verdict(None, reason=INVALID)
    empty = refresher({})
    verdict = await authenticate(basic("nope-nope"), "10.0.0.1", snapshot(), tracker(), empty)
    assert verdict == Verdict(None, reason=INVALID)


async def test_a_token_that_cannot_be_checked_is_refused() -> None:
    broken = refresher(OSError("database is locked"))
    verdict = await authenticate(basic("nope-nope"), "10.0.0.1", snapshot(), tracker(), broken)
    assert verdict == Verdict(None, reason=LOOKUP_FAILED)


async def test_a_source_in_its_cooldown_gets_no_store_read() -> None:
    failures = tracker()
    for _ in range(2):
        failures.record_failure("10.0.0.9", INVALID)
    broken = refresher(RuntimeError("must not be read"))
    verdict = await authenticate(basic("nope-nope"), "10.0.0.9", snapshot(), failures, broken)
    assert verdict.reason == COOLDOWN and 0 < verdict.retry_after <= 30
    # A known token still passes: the cool-down only spares the store.
    assert (await authenticate(basic(TOKEN), "10.0.0.9", snapshot(), failures, broken)).identity


# --- the addon -------------------------------------------------------------------------------


def addon(
    connections: ConnectionTable, metrics: Metrics, *, mode: str = "token", tunneled: bool = False
) -> ProxyAuth:
    holder = SnapshotHolder()
    holder.current = snapshot()
    return ProxyAuth(holder, connections, mode, tunneled, metrics, failures=tracker())


def connect(
    connections: ConnectionTable, host: str, header: str | None, *, intercept: bool
) -> tuple[http.HTTPFlow, ConnectInfo]:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.host, flow.request.port = host, 443
    if header is not None:
        flow.request.headers["proxy-authorization"] = header
    info = ConnectInfo(host=host, port=443, intercept=intercept)
    connections.add(flow.client_conn, info)
    return flow, info


async def test_a_connect_to_a_provider_host_with_a_valid_token_names_the_caller() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow, info = connect(connections, "api.openai.com", basic(TOKEN), intercept=True)
    await addon(connections, metrics).http_connect(flow)
    assert flow.response is None
    assert (info.identity, info.proxy_token) == ("alice", TOKEN)
    assert "proxy-authorization" not in flow.request.headers


async def test_a_connect_to_a_provider_host_without_a_token_gets_407_and_is_counted() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow, info = connect(connections, "api.openai.com", None, intercept=True)
    await addon(connections, metrics).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 407
    assert flow.response.headers["proxy-authenticate"] == 'Basic realm="aibridgeproxyd"'
    assert flow.response.headers["connection"] == "close"
    assert info.identity is None
    assert failures_counted(metrics, MISSING) == 1


async def test_a_source_that_keeps_failing_gets_429_with_retry_after() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    auth = addon(connections, metrics)
    for _ in range(2):
        flow, _ = connect(connections, "api.openai.com", basic("wrong-token"), intercept=True)
        await auth.http_connect(flow)
        assert flow.response is not None and flow.response.status_code == 407
    flow, _ = connect(connections, "api.openai.com", basic("wrong-token"), intercept=True)
    await auth.http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 429
    assert flow.response.headers["retry-after"] == "30"
    assert failures_counted(metrics, COOLDOWN) == 1


async def test_a_tunneled_connect_needs_no_token_but_a_valid_one_names_the_caller() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow, info = connect(connections, "example.com", basic(TOKEN), intercept=False)
    await addon(connections, metrics).http_connect(flow)
    assert flow.response is None and info.identity == "alice"
    flow, info = connect(connections, "example.com", None, intercept=False)
    await addon(connections, metrics).http_connect(flow)
    assert flow.response is None and info.identity is None


async def test_auth_tunneled_requires_a_token_for_every_connect() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow, _ = connect(connections, "example.com", None, intercept=False)
    await addon(connections, metrics, tunneled=True).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 407


async def test_auth_none_never_refuses_and_never_forwards_the_header() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow, info = connect(connections, "api.openai.com", basic("wrong-token"), intercept=True)
    await addon(connections, metrics, mode="none").http_connect(flow)
    assert flow.response is None and info.identity is None
    assert "proxy-authorization" not in flow.request.headers


async def test_a_connect_classification_never_saw_is_refused() -> None:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.headers["proxy-authorization"] = basic(TOKEN)
    await addon(ConnectionTable(), Metrics()).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 407


async def test_an_answered_connect_only_loses_its_header() -> None:
    connections = ConnectionTable()
    flow, info = connect(connections, "api.openai.com", basic(TOKEN), intercept=True)
    flow.response = http.Response.make(403)
    await addon(connections, Metrics()).http_connect(flow)
    assert flow.response.status_code == 403 and info.identity is None
    assert "proxy-authorization" not in flow.request.headers


def plain_request(host: str, header: str | None) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.host = host
    if header is not None:
        flow.request.headers["proxy-authorization"] = header
    return flow


async def test_a_plain_request_to_a_provider_host_needs_a_token() -> None:
    metrics = Metrics()
    flow = plain_request("api.openai.com", None)
    await addon(ConnectionTable(), metrics).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 407
    flow = plain_request("api.openai.com", basic(TOKEN))
    await addon(ConnectionTable(), metrics).requestheaders(flow)
    assert flow.response is None and "proxy-authorization" not in flow.request.headers


async def test_a_plain_request_elsewhere_needs_one_only_with_auth_tunneled() -> None:
    flow = plain_request("example.com", None)
    await addon(ConnectionTable(), Metrics()).requestheaders(flow)
    assert flow.response is None
    flow = plain_request("example.com", None)
    await addon(ConnectionTable(), Metrics(), tunneled=True).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 407


async def test_requests_inside_a_tunnel_are_not_authenticated_again() -> None:
    connections = ConnectionTable()
    flow = plain_request("api.openai.com", basic("wrong-token"))
    connections.add(flow.client_conn, ConnectInfo(host="api.openai.com", port=443))
    await addon(connections, Metrics()).requestheaders(flow)
    assert flow.response is None
    # Left for the route, which removes it before the request goes upstream.
    assert "proxy-authorization" in flow.request.headers
