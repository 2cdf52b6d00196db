"""The destination guard, the classifier's head check and the route's answer on an unclaimed
tunnel, one addon at a time with mitmproxy's test flows."""

from __future__ import annotations

import json
import logging

import pytest
from aibridgeproxyd.addons.classify import Classify
from aibridgeproxyd.addons.destinations import BLOCKED, UNRESOLVED, DestinationGuard
from aibridgeproxyd.addons.route import RouteRequests
from mitmproxy import connection, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import tflow

from aibridgeproxyd.destinations import (
    ConnectVerdict,
    DestinationPolicy,
    DestinationRefusal,
    PlainRequestVerdict,
    dial_is_checked,
    judge_connect,
    judge_plain_request,
    port_allowed,
)
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.http_layer import CLOSE_CLIENT
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import Snapshot, build_snapshot
from tests.unit.test_adapters_common import routed


def holder_with_local_openai() -> SnapshotHolder:
    """An openai provider whose base_url is https://127.0.0.1:8443 (operator configuration)."""
    holder = SnapshotHolder()
    provider = routed("openai", base_url="https://127.0.0.1:8443/v1", keys=("k",))
    holder.current = build_snapshot([provider], [])
    return holder


def guard(holder: SnapshotHolder, connections: ConnectionTable) -> DestinationGuard:
    return DestinationGuard(holder, connections, DestinationPolicy(), (443, 8443), Metrics())


def hook_data(client: connection.Client, host: str, port: int) -> ServerConnectionHookData:
    return ServerConnectionHookData(server=connection.Server(address=(host, port)), client=client)


async def test_provider_upstream_is_exempt_for_a_mitm_connection_only() -> None:
    holder, connections = holder_with_local_openai(), ConnectionTable()
    mitm, tunnel = tflow.tclient_conn(), tflow.tclient_conn()
    connections.add(mitm, ConnectInfo(host="api.openai.com", port=443, intercept=True))
    connections.add(tunnel, ConnectInfo(host="127.0.0.1", port=8443))
    addon = guard(holder, connections)

    own_dial = hook_data(mitm, "127.0.0.1", 8443)
    await addon.server_connect(own_dial)
    assert own_dial.server.error is None

    client_tunnel = hook_data(tunnel, "127.0.0.1", 8443)
    await addon.server_connect(client_tunnel)
    assert client_tunnel.server.error == BLOCKED


@pytest.mark.parametrize("host", ["::%1", "::%251", "0x7f.1", "::ffff:127.0.0.1", "::"])
async def test_a_tunnel_to_a_private_spelling_is_refused_on_the_dial(host: str) -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host=host, port=443))
    data = hook_data(client, host, 443)
    await guard(SnapshotHolder(), connections).server_connect(data)
    assert data.server.error == BLOCKED


async def test_a_public_destination_is_pinned_to_the_address_checked() -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host="8.8.8.8", port=443))
    data = hook_data(client, "8.8.8.8", 443)
    await guard(SnapshotHolder(), connections).server_connect(data)
    assert data.server.error is None and data.server.address == ("8.8.8.8", 443)


async def test_plain_http_request_to_a_provider_host_gets_400_use_connect() -> None:
    holder = holder_with_local_openai()
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "API.OPENAI.COM.", 443
    await guard(holder, ConnectionTable()).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert json.loads(flow.response.content or b"")["error"]["code"] == "use_connect"


async def test_plain_http_request_to_a_blocked_port_says_why() -> None:
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "example.com", 25
    await guard(SnapshotHolder(), ConnectionTable()).requestheaders(flow)
    assert flow.response is not None
    assert (flow.response.status_code, flow.response.content) == (
        403,
        b"Forbidden: port not allowed",
    )


def test_connect_with_a_bare_cr_in_a_header_is_refused_before_classification() -> None:
    connections = ConnectionTable()
    classify = Classify(holder_with_local_openai(), connections, (443,), Metrics())
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.host, flow.request.port = "api.openai.com", 443
    flow.request.headers["x-note"] = "a\rb"
    classify.http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 400


def test_mitm_request_with_a_nul_in_a_header_gets_400_in_the_client_format() -> None:
    connections = ConnectionTable()
    classify = Classify(holder_with_local_openai(), connections, (443,), Metrics())
    flow = tflow.tflow()
    connections.add(
        flow.client_conn,
        ConnectInfo(host="api.openai.com", port=443, intercept=True, provider_type="openai"),
    )
    flow.request.headers["x-note"] = "a\x00b"
    classify.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert json.loads(flow.response.content or b"")["error"]["code"] == "invalid_header"


@pytest.mark.parametrize("provider_type", ["openai", "anthropic"])
def test_request_on_an_unclaimed_tunnel_gets_503_and_closes_it(provider_type: str) -> None:
    connections = ConnectionTable()
    route = RouteRequests(SnapshotHolder(), connections, "aibridgeproxyd")
    flow = tflow.tflow()
    flow.request.host = "api.openai.com"
    connections.add(
        flow.client_conn,
        ConnectInfo(
            host="api.openai.com",
            port=443,
            intercept=True,
            provider_name="gone",
            provider_type=provider_type,
        ),
    )
    route.requestheaders(flow)
    response = flow.response
    assert isinstance(response, http.Response) and response.status_code == 503
    body = json.loads(response.content or b"")
    if provider_type == "anthropic":
        assert body["type"] == "error"
    else:
        assert body["error"]["code"] == "provider_unavailable"
    assert response.headers["connection"] == "close"
    assert flow.metadata[CLOSE_CLIENT] is True


# --- the decisions behind the guard's hooks -----------------------------------------------------


def test_plain_request_verdicts_in_order_provider_closed_row_port() -> None:
    holder = holder_with_local_openai()
    provider_host = judge_plain_request(holder.current, "api.openai.com", 25, (80,))
    assert provider_host.use_connect is not None and provider_host.use_connect.type == "openai"
    assert judge_plain_request(holder.current, "example.com", 25, (80,)) == PlainRequestVerdict(
        port_not_allowed=True
    )
    assert judge_plain_request(holder.current, "example.com", 80, (80,)) == PlainRequestVerdict()


def test_connect_verdicts_in_order_port_then_provider_or_closed_row() -> None:
    holder = holder_with_local_openai()
    snapshot = Snapshot(by_host=holder.current.by_host, closed_hosts={"broken.example": "row"})
    # A port outside the policy is refused whoever claims the host.
    for host in ("api.openai.com", "broken.example", "example.com"):
        assert judge_connect(snapshot, host, 25, (443,)) == ConnectVerdict(port_not_allowed=True)
    provider_host = judge_connect(snapshot, "api.openai.com", 443, (443,))
    assert provider_host.intercept is not None and provider_host.intercept.type == "openai"
    assert judge_connect(snapshot, "broken.example", 443, (443,)) == ConnectVerdict(closed_by="row")
    assert judge_connect(snapshot, "example.com", 443, (443,)) == ConnectVerdict()


def test_a_plain_request_to_a_provider_or_closed_host_is_judged_by_host_on_any_port() -> None:
    holder = holder_with_local_openai()
    snapshot = Snapshot(by_host=holder.current.by_host, closed_hosts={"broken.example": "row"})
    assert judge_plain_request(snapshot, "api.openai.com", 80, (443,)).use_connect is not None
    assert judge_plain_request(snapshot, "broken.example", 80, (443,)) == PlainRequestVerdict(
        closed_by="row"
    )


def test_one_port_policy_for_connect_and_plain_requests() -> None:
    assert port_allowed(443, frozenset({443}))
    assert not port_allowed(25, (443, 8443))


async def test_plain_http_request_to_a_host_that_does_not_resolve_is_502_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The operator debugging "this fails through the proxy" finds why in the log, as for a
    # tunnel; the client gets a bare 502.
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "no-such-host.invalid", 443
    with caplog.at_level(logging.INFO, logger="aibridgeproxyd.destinations"):
        await guard(SnapshotHolder(), ConnectionTable()).requestheaders(flow)
    assert flow.response is not None
    assert (flow.response.status_code, flow.response.content) == (502, b"Bad Gateway")
    (record,) = [r for r in caplog.records if "no-such-host.invalid" in r.getMessage()]
    assert record.getMessage() == f"request to no-such-host.invalid:443 failed: {UNRESOLVED}"
    assert not hasattr(record, "connect_id")  # a plain request has none: no empty field


async def test_plain_http_request_to_a_private_address_is_logged_without_an_empty_connect_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The line read `destination refused: ... connect_id="" host=10.1.2.3 ...`: an empty field
    # the operator cannot use. A plain request has no connect id, so the line has none.
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "10.1.2.3", 443
    with caplog.at_level(logging.INFO, logger="aibridgeproxyd.destinations"):
        await guard(SnapshotHolder(), ConnectionTable()).requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 403
    (record,) = [r for r in caplog.records if "destination refused" in r.getMessage()]
    fields = [getattr(record, name) for name in ("host", "port", "resolved_ip")]
    assert fields == ["10.1.2.3", 443, "10.1.2.3"]
    assert not hasattr(record, "connect_id")


@pytest.mark.parametrize(
    ("address", "client_target", "checked"),
    [
        (("8.8.8.8", 443), None, True),  # a dial of the proxy's own, not the corporate proxy
        (("proxy.corp", 3128), None, False),  # the corporate proxy: operator configuration
        (("proxy.corp", 3128), ("proxy.corp", 3128), True),  # a client's tunnel to it
    ],
)
def test_only_the_corporate_proxy_is_exempt_and_only_when_the_proxy_dials_it(
    address: tuple[str, int], client_target: tuple[str, int] | None, checked: bool
) -> None:
    assert dial_is_checked(address, client_target, ("proxy.corp", 3128)) is checked


def test_a_refused_tunnel_says_forbidden_and_other_failures_say_nothing() -> None:
    addon = guard(SnapshotHolder(), ConnectionTable())
    refused, failed = tflow.tflow(), tflow.tflow()
    for flow, error in ((refused, BLOCKED), (failed, "Connection refused to 203.0.113.9")):
        flow.response = http.Response.make(502, b"Cannot connect to 203.0.113.9: detail")
        flow.server_conn.error = error
        addon.http_connect_error(flow)
    assert refused.response is not None and failed.response is not None
    assert (refused.response.status_code, refused.response.content) == (
        403,
        b"Forbidden: private or reserved destination",
    )
    assert (failed.response.status_code, failed.response.content) == (502, b"Bad Gateway")


async def test_a_refused_dial_carries_its_reason_as_a_value() -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host="10.1.2.3", port=443))
    data = hook_data(client, "10.1.2.3", 443)
    await guard(SnapshotHolder(), connections).server_connect(data)
    assert data.server.error is DestinationRefusal.BLOCKED
