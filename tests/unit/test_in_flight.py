"""What counts as in flight (``addons.in_flight``), for the drain and the in-flight gauge alike."""

from __future__ import annotations

from aibridgeproxyd.addons.in_flight import InFlight
from mitmproxy.test import tflow


def test_a_request_is_in_flight_from_its_headers_until_its_response() -> None:
    in_flight, flow = InFlight(), tflow.tflow(resp=True)
    assert in_flight.count == 0
    in_flight.requestheaders(flow)
    assert in_flight.count == 1
    in_flight.response(flow)
    assert in_flight.count == 0


def test_a_failed_request_leaves_flight_at_its_error() -> None:
    in_flight, flow = InFlight(), tflow.tflow(err=True)
    in_flight.requestheaders(flow)
    in_flight.error(flow)
    assert in_flight.count == 0


def test_a_websocket_session_stays_in_flight_after_its_upgrade_until_it_closes() -> None:
    in_flight, flow = InFlight(), tflow.twebsocketflow()
    in_flight.requestheaders(flow)
    in_flight.response(flow)  # the 101 upgrade
    assert in_flight.count == 1
    in_flight.websocket_end(flow)
    assert in_flight.count == 0


def test_landing_callbacks_run_once_whichever_hooks_come() -> None:
    in_flight, flow = InFlight(), tflow.tflow(resp=True)
    landed: list[str] = []
    in_flight.requestheaders(flow)
    in_flight.on_landing(flow, lambda: landed.append("gauge"))
    assert landed == []
    in_flight.response(flow)
    in_flight.error(flow)
    assert landed == ["gauge"]


def test_a_landing_callback_for_a_flow_not_in_flight_runs_at_once() -> None:
    landed: list[int] = []
    InFlight().on_landing(tflow.tflow(), lambda: landed.append(1))
    assert landed == [1]


def test_flows_are_counted_apart() -> None:
    in_flight = InFlight()
    first, second = tflow.tflow(resp=True), tflow.tflow(resp=True)
    in_flight.requestheaders(first)
    in_flight.requestheaders(second)
    in_flight.requestheaders(first)  # the same flow again: still one
    assert in_flight.count == 2
    in_flight.response(first)
    assert in_flight.count == 1


def test_an_upgrade_killed_in_its_response_hook_leaves_flight_when_its_connection_closes() -> None:
    """mitmproxy emits no error hook for a flow killed during its response hook and starts no
    WebSocket layer, so no websocket_end comes: the closing connection ends it (found by the
    security review: the drain waited drain_timeout on every stop)."""
    in_flight, flow = InFlight(), tflow.twebsocketflow()
    landed: list[str] = []
    in_flight.requestheaders(flow)
    in_flight.on_landing(flow, lambda: landed.append(flow.id))
    in_flight.response(flow)
    flow.kill()
    assert in_flight.count == 1
    in_flight.client_disconnected(flow.client_conn)
    assert (in_flight.count, landed) == (0, [flow.id])
    in_flight.websocket_end(flow)  # a late hook changes nothing
    assert landed == [flow.id]


def test_an_upgrade_refused_with_another_status_leaves_flight_at_its_response() -> None:
    in_flight, flow = InFlight(), tflow.twebsocketflow()
    assert flow.response is not None
    flow.response.status_code = 403
    in_flight.requestheaders(flow)
    in_flight.response(flow)
    assert in_flight.count == 0


def test_a_closing_connection_ends_only_its_own_flows() -> None:
    in_flight = InFlight()
    mine, other = tflow.tflow(), tflow.tflow()
    in_flight.requestheaders(mine)
    in_flight.requestheaders(other)
    in_flight.client_disconnected(mine.client_conn)
    assert in_flight.count == 1
    in_flight.response(other)
    in_flight.client_disconnected(other.client_conn)
    assert in_flight.count == 0
