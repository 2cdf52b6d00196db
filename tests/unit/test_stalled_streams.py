"""The stall watch's decision (``aibridgeproxyd.stalled_streams``), without a proxy."""

from __future__ import annotations

from aibridgeproxyd.stalled_streams import StalledStreams


def test_a_stream_waiting_for_the_stall_timeout_is_abandoned_with_how_long() -> None:
    stalled: StalledStreams[str] = StalledStreams(10)
    assert stalled.sweep(100.0, ["a"]) == []
    assert stalled.sweep(109.0, ["a", "b"]) == []
    assert stalled.sweep(110.0, ["a", "b"]) == [("a", 10.0)]


def test_a_stream_read_again_starts_over() -> None:
    stalled: StalledStreams[str] = StalledStreams(10)
    stalled.sweep(100.0, ["a"])
    stalled.sweep(105.0, [])
    assert stalled.sweep(112.0, ["a"]) == []
    assert stalled.sweep(122.0, ["a"]) == [("a", 10.0)]


def test_an_abandoned_stream_stays_abandoned_until_cancelled() -> None:
    stalled: StalledStreams[str] = StalledStreams(10)
    stalled.sweep(100.0, ["a"])
    assert stalled.sweep(111.0, ["a"]) == [("a", 11.0)]
    assert stalled.sweep(112.0, ["a"]) == [("a", 12.0)]  # its client was gone: not cancelled
    stalled.cancelled("a")
    assert stalled.sweep(113.0, ["a"]) == []
