"""The bounded HTTP/1 server connection, driven event by event (no sockets)."""

from __future__ import annotations

import time

import pytest
from mitmproxy import options
from mitmproxy.connection import Server
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HTTPMode, RequestHeaders
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy
from mitmproxy.test import tflow

from aibridgeproxyd.mitm.client_bounds import (
    DIAL_TIMED_OUT,
    BoundedHttp1Server,
    BoundedHttpLayer,
    BoundedHttpStream,
    ConnectDeadline,
    load_options,
)
from aibridgeproxyd.mitm.proxy_answer import (
    MAX_PROXY_ANSWER_HEAD,
    BoundedHttpUpstreamProxy,
    bound_proxy_answer,
)
from aibridgeproxyd.model import ApiFormat


def server(limit: int, error_format: ApiFormat | None = None) -> BoundedHttp1Server:
    opts = options.Options()
    load_options(opts)
    opts.update(max_request_head=limit)
    layer = BoundedHttp1Server(Context(tflow.tclient_conn(), opts), error_format)
    list(layer.handle_event(events.Start()))
    return layer


def feed(layer: BoundedHttp1Server, data: bytes) -> list[commands.Command]:
    return list(layer.handle_event(events.DataReceived(layer.conn, data)))


def sent(cmds: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, commands.SendData))


def test_head_without_end_past_the_limit_gets_431_and_close() -> None:
    layer = server(1024)
    assert feed(layer, b"CONNECT a:443 HTTP/1.1\r\n" + b"X: y\r\n" * 100) == []
    cmds = feed(layer, b"X: y\r\n" * 100)
    assert sent(cmds).startswith(b"HTTP/1.1 431 ")
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)
    assert len(layer.buf) == 0  # nothing of it is kept
    assert feed(layer, b"more") == []  # and nothing after it is read


def test_complete_head_arriving_in_one_piece_past_the_limit_is_refused() -> None:
    layer = server(1024)
    cmds = feed(layer, b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"z" * 2000 + b"\r\n\r\n")
    assert sent(cmds).startswith(b"HTTP/1.1 431 ")
    assert not any(isinstance(c, ReceiveHttp) for c in cmds)


def test_head_within_the_limit_with_body_bytes_behind_it_passes() -> None:
    layer = server(1024)
    body = b"b" * 5000
    cmds = feed(layer, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + body)
    assert any(isinstance(c, ReceiveHttp) and isinstance(c.event, RequestHeaders) for c in cmds)
    assert b"431" not in sent(cmds)


def test_refusal_on_a_mitm_host_uses_the_client_format() -> None:
    layer = server(64, ApiFormat.ANTHROPIC)
    response = sent(feed(layer, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20))
    assert b"application/json" in response
    assert b'"type": "error"' in response


def test_chunk_size_line_that_never_ends_closes_the_connection() -> None:
    layer = server(1024)
    feed(layer, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    cmds = feed(layer, b"f" * 2000)  # a chunk-size line with no end
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)
    assert len(layer.buf) == 0


def test_an_http2_connection_layer_put_in_place_by_a_subclass_is_bounded_too() -> None:
    from mitmproxy.proxy.layers.http import HTTPMode
    from mitmproxy.proxy.layers.http._http2 import Http2Server

    from aibridgeproxyd.mitm.client_bounds import BoundedHttpLayer

    opts = options.Options()
    load_options(opts)
    opts.update(max_request_head=4096)
    opts.add_option("validate_inbound_headers", bool, True, "declared by mitmproxy's proxyserver")
    client = tflow.tclient_conn()
    client.alpn = b"h2"
    layer = BoundedHttpLayer(Context(client, opts), HTTPMode.transparent)
    foreign = Http2Server(layer.context.fork())
    layer.connections[client] = foreign
    list(layer.handle_event(events.Start()))
    assert layer.connections[client] is foreign
    assert foreign.h2_conn.decoder.max_header_list_size == 4096


# --- a tunnel's dial, held to upstream_connect_timeout --------------------------------------------


def tunnel_layer() -> tuple[BoundedHttpLayer, BoundedHttpStream]:
    """A regular proxy's HTTP layer with one CONNECT stream whose dial has not begun."""
    opts = options.Options()
    load_options(opts)
    opts.add_option("validate_inbound_headers", bool, True, "declared by mitmproxy's proxyserver")
    layer = BoundedHttpLayer(Context(tflow.tclient_conn(), opts), HTTPMode.regular)
    list(layer.handle_event(events.Start()))
    stream = BoundedHttpStream(layer.context.fork(), 1)
    stream.context.server = Server(address=("example.com", 443))
    stream.flow = tflow.tflow()
    return layer, stream


def wake(layer: BoundedHttpLayer, deadline: ConnectDeadline) -> list[commands.Command]:
    return list(layer.handle_event(events.Wakeup(deadline)))


def wake_after(started_ago: float) -> tuple[BoundedHttpStream, list[commands.Command]]:
    """The stream, and its layer's answer to a 30 s deadline of a connect begun that long ago."""
    layer, stream = tunnel_layer()
    stream.context.server.timestamp_start = time.time() - started_ago
    deadline = ConnectDeadline(30, 30)
    layer.command_sources[deadline] = stream
    return stream, wake(layer, deadline)


def test_a_dial_not_begun_at_its_deadline_is_checked_again_a_whole_timeout_later() -> None:
    # Waiting for one of mitmproxy's per-address slots, or in the server_connect hook.
    layer, stream = tunnel_layer()
    deadline = stream.dial_deadline()
    layer.command_sources[deadline] = stream
    (again,) = wake(layer, deadline)
    assert isinstance(again, ConnectDeadline)
    assert (again.delay, again.timeout) == (30.0, 30.0)
    assert layer.command_sources[again] is stream
    assert DIAL_TIMED_OUT not in stream.flow.metadata


def test_a_dial_is_checked_again_when_its_connect_will_have_taken_the_timeout() -> None:
    _, (again,) = wake_after(10)
    assert isinstance(again, ConnectDeadline)
    assert 19 < again.delay <= 20


def test_a_connect_that_took_the_timeout_is_closed_and_marked_timed_out() -> None:
    stream, (close,) = wake_after(31)
    assert isinstance(close, commands.CloseConnection)
    assert close.connection is stream.context.server
    assert stream.flow.metadata[DIAL_TIMED_OUT] == 30


@pytest.mark.parametrize("outcome", ["connected", "failed"])
def test_a_dial_that_ended_is_left_alone(outcome: str) -> None:
    layer, stream = tunnel_layer()
    server = stream.context.server
    server.timestamp_start = time.time() - 31
    if outcome == "connected":
        server.timestamp_tcp_setup = time.time()
    else:
        server.error = "connection refused"
    deadline = ConnectDeadline(30, 30)
    layer.command_sources[deadline] = stream
    assert wake(layer, deadline) == []
    assert deadline not in layer.command_sources


# --- a corporate proxy's answer to CONNECT, bounded ------------------------------------------------


class _Sink(layer.Layer):
    """A tunnel's child that keeps the bytes it gets."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.received = b""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            self.received += event.data
        yield from ()


def proxy_tunnel() -> tuple[BoundedHttpUpstreamProxy, _Sink]:
    """A tunnel to example.com:443 through a proxy, as the HTTP layer builds it."""
    context = Context(tflow.tclient_conn(), options.Options())
    context.server = Server(address=("example.com", 443), via=("http", ("proxy.corp", 3128)))
    stack = HttpUpstreamProxy.make(context, send_connect=True)
    sink = _Sink(context)
    stack /= sink
    bound_proxy_answer(stack[0])
    assert isinstance(stack[0], BoundedHttpUpstreamProxy)
    return stack[0], sink


def handshake(tunnel: BoundedHttpUpstreamProxy, data: bytes) -> tuple[bool, str | None]:
    commands_ = tunnel.receive_handshake_data(data)
    while True:
        try:
            next(commands_)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000, b"HTTP/1.1 200 " + b"a" * 70_000]
)
def test_a_proxy_answer_to_connect_without_an_end_within_the_bound_fails_the_tunnel(
    answer: bytes,
) -> None:
    tunnel, _ = proxy_tunnel()
    assert handshake(tunnel, answer[:40_000]) == (False, None)
    done, error = handshake(tunnel, answer[40_000:])
    assert not done
    assert (
        error
        == f"upstream proxy proxy.corp:3128 sent an answer to CONNECT over {MAX_PROXY_ANSWER_HEAD} bytes"
    )
    assert len(tunnel.buf) == 0


def test_the_targets_bytes_after_the_proxys_200_are_not_held_to_the_bound() -> None:
    tunnel, sink = proxy_tunnel()
    after = b"t" * (MAX_PROXY_ANSWER_HEAD * 2)
    assert handshake(tunnel, b"HTTP/1.1 200 Connection established\r\n\r\n" + after) == (True, None)
    assert sink.received == after
