"""The CONNECT classification (``aibridgeproxyd.classification``) and the classify addon on
its own, driven with mitmproxy's test flows. The CR/LF/NUL refusals of a CONNECT and of a
MITM'd request head are in test_destination_addons.py."""

from __future__ import annotations

from aibridgeproxyd.addons.classify import Classify
from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.classification import TUNNEL, ConnectClass, classify_connect
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import Snapshot, build_snapshot
from tests.unit.test_adapters_common import routed

OPENAI = routed("openai")


def snapshot() -> Snapshot:
    """OpenAI enabled on api.openai.com; broken.example claimed by an unreadable row."""
    built = build_snapshot([OPENAI], [])
    return Snapshot(by_host=built.by_host, closed_hosts={"broken.example": "broken-row"})


def connect_flow(host: str, port: int = 443) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.host, flow.request.port = host, port
    return flow


def classify(connections: ConnectionTable, metrics: Metrics | None = None) -> Classify:
    holder = SnapshotHolder()
    holder.current = snapshot()
    return Classify(holder, connections, (443, 8443), metrics or Metrics())


def blocked(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "coder_aibridgeproxyd_blocked_connections_total", {"reason": reason}
    )
    return value or 0.0


# --- the decision ----------------------------------------------------------------------------


def test_a_provider_host_in_any_spelling_is_intercepted_for_its_provider() -> None:
    for host in ("api.openai.com", "API.OpenAI.com", "api.openai.com."):
        assert classify_connect(snapshot(), host) == ConnectClass(provider=OPENAI)


def test_a_host_of_an_unreadable_row_is_closed_and_names_the_row() -> None:
    assert classify_connect(snapshot(), "broken.example") == ConnectClass(closed_by="broken-row")


def test_any_other_host_is_tunneled() -> None:
    assert classify_connect(snapshot(), "example.com") is TUNNEL
    assert classify_connect(Snapshot(), "api.openai.com") is TUNNEL


# --- the addon -------------------------------------------------------------------------------


def test_a_connect_to_a_provider_host_is_recorded_as_intercepted() -> None:
    connections = ConnectionTable()
    flow = connect_flow("api.openai.com")
    classify(connections).http_connect(flow)
    info = connections.get(flow.client_conn)
    assert flow.response is None
    assert info is not None
    assert (info.host, info.port, info.intercept) == ("api.openai.com", 443, True)
    assert (info.provider_name, info.provider_type) == ("openai", "openai")


def test_a_connect_elsewhere_is_recorded_as_tunneled_and_passes() -> None:
    connections = ConnectionTable()
    flow = connect_flow("example.com", 8443)
    classify(connections).http_connect(flow)
    info = connections.get(flow.client_conn)
    assert flow.response is None
    assert info is not None and not info.intercept and info.provider_name is None


def test_a_port_outside_allowed_ports_is_refused_and_counted() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow = connect_flow("api.openai.com", 22)
    classify(connections, metrics).http_connect(flow)
    assert flow.response is not None
    assert (flow.response.status_code, flow.response.content) == (
        403,
        b"Forbidden: port not allowed",
    )
    assert blocked(metrics, "port_not_allowed") == 1
    info = connections.get(flow.client_conn)
    assert info is not None and not info.intercept  # recorded, never classified


def test_a_connect_to_a_host_of_an_unreadable_row_is_refused_with_503() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    flow = connect_flow("broken.example")
    classify(connections, metrics).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert b"broken-row" not in (flow.response.content or b"")
    assert blocked(metrics, "provider_misconfigured") == 1


def test_a_bad_head_outside_a_mitm_tunnel_gets_plain_text_400() -> None:
    connections = ConnectionTable()
    flow = tflow.tflow()
    connections.add(flow.client_conn, ConnectInfo(host="example.com", port=443))
    flow.request.headers["x-note"] = "a\nb"
    classify(connections).requestheaders(flow)
    assert flow.response is not None
    assert flow.response.status_code == 400
    assert flow.response.headers["content-type"] == "text/plain"
    assert flow.response.content == b"Bad Request: invalid character in request header"


def test_a_trailer_with_a_cr_is_refused_when_the_body_ends() -> None:
    connections = ConnectionTable()
    flow = tflow.tflow()
    flow.request.trailers = http.Headers(((b"x-sum", b"a\rb"),))
    classify(connections).request(flow)
    assert flow.response is not None and flow.response.status_code == 400


def test_a_head_already_answered_is_left_alone() -> None:
    connections = ConnectionTable()
    flow = tflow.tflow(resp=True)
    flow.request.headers["x-note"] = "a\x00b"
    classify(connections).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 200
