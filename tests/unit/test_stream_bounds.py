"""Unit tests for the pure parts of the stream bounds: the reset budget, the deadline check
interval, the WebSocket message limit on wsproto connections, and the configuration keys."""

from __future__ import annotations

import gc

import wsproto
import wsproto.events
import wsproto.extensions
import wsproto.frame_protocol
from mitmproxy.proxy.layers.websocket import WebsocketConnection

from aibridgeproxyd.config import ConfigError, load_config
from aibridgeproxyd.mitm.memory_budget import BufferBudget
from aibridgeproxyd.mitm.stream_bounds import (
    MESSAGE_TOO_BIG,
    TRY_AGAIN_LATER,
    ResetBudget,
    StreamBounds,
    limit_websocket_messages,
)


def test_reset_budget_allows_the_limit_within_the_window_and_refuses_one_more() -> None:
    budget = ResetBudget(limit=3, window=10.0)
    assert [budget.spend(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert budget.spend(3.0) is False


def test_reset_budget_forgets_resets_older_than_the_window() -> None:
    budget = ResetBudget(limit=2, window=10.0)
    assert budget.spend(0.0) and budget.spend(5.0)
    assert budget.spend(10.0)  # the reset at 0.0 left the window
    assert not budget.spend(11.0)


def test_a_steady_reset_rate_below_the_budget_is_never_refused() -> None:
    budget = ResetBudget(limit=20, window=10.0)
    assert all(budget.spend(t * 0.5) for t in range(10_000))  # 2 per second for 83 minutes


def test_deadline_check_interval_is_a_quarter_of_the_shorter_timeout_within_bounds() -> None:
    assert StreamBounds().deadline_check_interval == 5.0
    assert (
        StreamBounds(upstream_response_timeout=1, upstream_idle_timeout=2).deadline_check_interval
        == 0.25
    )
    assert StreamBounds(upstream_idle_timeout=0.001).deadline_check_interval == 0.05
    assert StreamBounds(upstream_connect_timeout=2).deadline_check_interval == 0.5


# --- WebSocket messages ----------------------------------------------------------------------


class _Layer:
    """Stands in for a started WebsocketLayer: its two connections are all the limit touches."""

    def __init__(self, extensions: tuple[list, list] = ([], [])) -> None:
        self.client_ws = WebsocketConnection(
            wsproto.ConnectionType.SERVER,
            extensions[0],
            conn=None,  # type: ignore[arg-type]
        )
        self.server_ws = WebsocketConnection(
            wsproto.ConnectionType.CLIENT,
            extensions[1],
            conn=None,  # type: ignore[arg-type]
        )


def _client_frames(*fragments: bytes, extensions: list | None = None) -> bytes:
    """What a WebSocket client sends: one binary message made of `fragments`."""
    client = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT, extensions or [])
    data = b""
    for index, fragment in enumerate(fragments):
        last = index == len(fragments) - 1
        data += client.send(wsproto.events.BytesMessage(fragment, message_finished=last))
    return data


def _events(connection: WebsocketConnection, data: bytes) -> list[wsproto.events.Event]:
    connection.receive_data(data)
    return list(connection.events())


def _messages(connection: WebsocketConnection, data: bytes) -> list[wsproto.events.Message]:
    """The events `data` produces, every one of them a message."""
    events = _events(connection, data)
    messages = [event for event in events if isinstance(event, wsproto.events.Message)]
    assert messages == events
    return messages


def test_messages_up_to_the_limit_pass_whole_fragmented_or_not() -> None:
    layer = _Layer()
    limit_websocket_messages(layer, 1000, {})  # type: ignore[arg-type]
    events = _messages(layer.client_ws, _client_frames(b"a" * 1000))
    assert [len(e.data) for e in events] == [1000]
    events = _messages(layer.client_ws, _client_frames(b"b" * 400, b"c" * 600))
    assert sum(len(e.data) for e in events) == 1000
    assert events[-1].message_finished


def test_a_message_over_the_limit_becomes_a_1009_close_across_fragments() -> None:
    layer = _Layer()
    limit_websocket_messages(layer, 1000, {})  # type: ignore[arg-type]
    events = _events(layer.client_ws, _client_frames(b"a" * 600, b"b" * 600))
    assert isinstance(events[-1], wsproto.events.CloseConnection)
    assert events[-1].code == MESSAGE_TOO_BIG
    assert not any(isinstance(e, wsproto.events.Message) and e.message_finished for e in events)


def test_fragments_are_appended_in_place() -> None:
    layer = _Layer()
    limit_websocket_messages(layer, 1000, {})  # type: ignore[arg-type]
    buffer = layer.client_ws.frame_buf
    buffer[-1] += b"abc"
    first = buffer[-1]
    buffer[-1] += b"def"
    assert buffer[-1] is first and bytes(first) == b"abcdef"
    layer.client_ws.frame_buf = [b""]
    assert isinstance(layer.client_ws.frame_buf[-1], bytearray)
    assert b"".join([b"x", *layer.client_ws.frame_buf]) == b"x"


def test_a_compressed_message_is_not_inflated_beyond_the_limit() -> None:
    offer = "permessage-deflate"
    server_deflate = wsproto.extensions.PerMessageDeflate()
    server_deflate.finalize(offer)
    client_deflate = wsproto.extensions.PerMessageDeflate()
    client_deflate.finalize(offer)
    layer = _Layer(([server_deflate], []))
    limit_websocket_messages(layer, 1 << 20, {})  # type: ignore[arg-type]
    bomb = _client_frames(b"\0" * (64 << 20), extensions=[client_deflate])
    assert len(bomb) < 1 << 20
    events = _events(layer.client_ws, bomb)
    assert isinstance(events[-1], wsproto.events.CloseConnection)
    assert events[-1].code == MESSAGE_TOO_BIG
    assert sum(len(e.data) for e in events if isinstance(e, wsproto.events.Message)) <= 1 << 20


def _pieces(*pieces: tuple[bytes, bool]) -> list[bytes]:
    """What a WebSocket client sends for each ``(data, message_finished)`` piece, apart."""
    client = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT, [])
    return [
        client.send(wsproto.events.BytesMessage(data, message_finished=finished))
        for data, finished in pieces
    ]


def test_a_message_is_held_against_the_budget_until_it_is_complete() -> None:
    budget = BufferBudget(10_000)
    layer = _Layer()
    limit_websocket_messages(layer, 1000, {}, budget)  # type: ignore[arg-type]
    first, second = _pieces((b"a" * 400, False), (b"b" * 100, True))
    _messages(layer.client_ws, first)
    assert budget.used == 400
    (last,) = _messages(layer.client_ws, second)
    assert last.message_finished
    assert budget.used == 0


def test_a_message_the_budget_cannot_hold_becomes_a_1013_close() -> None:
    # Each session within max_websocket_message; together past max_buffered_bytes.
    budget = BufferBudget(1000)
    holding, refused = _Layer(), _Layer()
    for layer in (holding, refused):
        limit_websocket_messages(layer, 1000, {}, budget)  # type: ignore[arg-type]
    (piece,) = _pieces((b"a" * 700, False))
    _messages(holding.client_ws, piece)
    events = _events(refused.client_ws, piece)
    assert isinstance(events[-1], wsproto.events.CloseConnection)
    assert events[-1].code == TRY_AGAIN_LATER
    assert not any(isinstance(e, wsproto.events.Message) for e in events)
    assert budget.used == 700


def test_a_session_freed_mid_message_gives_its_bytes_back() -> None:
    budget = BufferBudget(10_000)
    layer = _Layer()
    limit_websocket_messages(layer, 1000, {}, budget)  # type: ignore[arg-type]
    (piece,) = _pieces((b"a" * 400, False))
    _messages(layer.client_ws, piece)
    assert budget.used == 400
    del layer
    gc.collect()
    assert budget.used == 0


# --- configuration -----------------------------------------------------------------------------


def test_stream_bound_keys_have_safe_defaults() -> None:
    config = load_config(environ={})
    assert config.http2_max_concurrent_streams == 100
    assert (config.http2_max_resets, config.http2_reset_window) == (200, 10.0)
    assert config.max_websocket_message == 16 * 1024 * 1024
    assert config.upstream_connect_timeout == 30.0
    assert config.upstream_response_timeout == 600.0
    assert config.upstream_idle_timeout == 300.0


def test_stream_bound_keys_parse_from_the_environment() -> None:
    config = load_config(
        environ={
            "AIBRIDGEPROXYD_HTTP2_MAX_RESETS": "50",
            "AIBRIDGEPROXYD_HTTP2_RESET_WINDOW": "1m",
            "AIBRIDGEPROXYD_MAX_WEBSOCKET_MESSAGE": "1MiB",
            "AIBRIDGEPROXYD_UPSTREAM_RESPONSE_TIMEOUT": "20m",
            "AIBRIDGEPROXYD_UPSTREAM_IDLE_TIMEOUT": "1s",
            "AIBRIDGEPROXYD_UPSTREAM_CONNECT_TIMEOUT": "5s",
        }
    )
    assert config.upstream_connect_timeout == 5.0
    assert (config.http2_max_resets, config.http2_reset_window) == (50, 60.0)
    assert config.max_websocket_message == 1024 * 1024
    assert (config.upstream_response_timeout, config.upstream_idle_timeout) == (1200.0, 1.0)


def test_bad_stream_bound_values_are_refused_naming_the_key() -> None:
    for key, value in (
        ("http2_max_resets", "0"),
        ("http2_max_resets", "1.5"),
        ("http2_max_concurrent_streams", str(2**31)),
        ("max_websocket_message", "lots"),
        ("upstream_idle_timeout", "soon"),
        ("upstream_connect_timeout", "0s"),
        ("upstream_connect_timeout", "30"),
    ):
        try:
            load_config(flags={key: value}, environ={})
        except ConfigError as error:
            assert key in str(error)
        else:
            raise AssertionError(f"{key}={value!r} was accepted")
