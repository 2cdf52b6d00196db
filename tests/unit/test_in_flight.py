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
