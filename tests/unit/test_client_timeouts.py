"""The head and idle deadlines of a client connection (``aibridgeproxyd.client_timeouts``),
without a proxy or a timer."""

from __future__ import annotations

import pytest

from aibridgeproxyd.client_timeouts import Expiry, Phase, deadline, on_timer, timeout_reason


def never() -> float | None:
    raise AssertionError("read only for a tunnel")


def test_a_head_and_an_idle_connection_have_their_own_timeouts_from_the_phase_start() -> None:
    assert deadline(Phase.HEAD, 100.0, 5.0, 60.0, never) == 105.0
    assert deadline(Phase.IDLE, 100.0, 5.0, 60.0, never) == 160.0


def test_a_request_in_flight_has_no_deadline() -> None:
    assert deadline(Phase.BUSY, 100.0, 5.0, 60.0, never) is None


@pytest.mark.parametrize("phase", [Phase.TUNNEL, Phase.WEBSOCKET])
def test_a_tunnel_or_websocket_session_is_idle_from_its_last_byte_either_way(phase: Phase) -> None:
    assert deadline(phase, 100.0, 5.0, 60.0, lambda: 130.0) == 190.0
    assert deadline(phase, 100.0, 5.0, 60.0, lambda: None) == 160.0
    assert deadline(phase, 100.0, 5.0, 60.0, lambda: 90.0) == 160.0  # before the phase


def test_a_timer_firing_before_the_deadline_re_arms() -> None:
    assert on_timer(Phase.HEAD, 105.0, 104.0, lambda: True) is Expiry.EARLY


def test_a_response_still_going_to_a_slow_reader_is_not_idle_yet() -> None:
    assert on_timer(Phase.IDLE, 105.0, 105.0, lambda: True) is Expiry.STILL_SENDING
    assert on_timer(Phase.IDLE, 105.0, 105.0, lambda: False) is Expiry.CLOSE


@pytest.mark.parametrize("phase", [Phase.TUNNEL, Phase.WEBSOCKET])
def test_a_tunnel_past_its_deadline_is_closed_without_asking_about_responses(phase: Phase) -> None:
    def asked() -> bool:
        raise AssertionError("a tunnel's bytes are its activity")

    assert on_timer(phase, 105.0, 106.0, asked) is Expiry.CLOSE


@pytest.mark.parametrize(
    ("phase", "reason"),
    [
        (Phase.HEAD, "request_head_timeout"),
        (Phase.IDLE, "idle_timeout"),
        (Phase.TUNNEL, "idle_timeout"),
        (Phase.WEBSOCKET, "idle_timeout"),
    ],
)
def test_a_close_is_counted_as_a_head_or_an_idle_timeout(phase: Phase, reason: str) -> None:
    assert timeout_reason(phase) == reason
