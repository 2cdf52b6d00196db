"""Strict HTTP/1 request framing (aibridgeproxyd.mitm.framing), driven event by event (no sockets)."""

from __future__ import annotations

import json

import pytest
from mitmproxy import options
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.test import tflow

from aibridgeproxyd.mitm.framing import (
    FramingError,
    FramingHttp1Server,
    framing_refusal,
    head_error_reason,
    request_body_size,
    request_framing_error,
)
from aibridgeproxyd.model import ApiFormat


def parse(*headers: bytes, version: bytes = b"HTTP/1.1"):  # type: ignore[no-untyped-def]
    return http1.read_request_head([b"POST / " + version, b"Host: a", *headers])


def server(error_format: ApiFormat | None = None) -> FramingHttp1Server:
    layer = FramingHttp1Server(Context(tflow.tclient_conn(), options.Options()))
    layer.error_format = error_format
    list(layer.handle_event(events.Start()))
    return layer


def feed(layer: FramingHttp1Server, data: bytes) -> list[commands.Command]:
    return list(layer.handle_event(events.DataReceived(layer.conn, data)))


def sent(cmds: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, commands.SendData))


def received(cmds: list[commands.Command]) -> list[object]:
    return [c.event for c in cmds if isinstance(c, ReceiveHttp)]


@pytest.mark.parametrize(
    ("headers", "version", "reason"),
    [
        ((b"Content-Length: 4", b"Transfer-Encoding: chunked"), b"HTTP/1.1", "both"),
        ((b"Transfer-Encoding: identity",), b"HTTP/1.1", "must be chunked"),
        ((b"Transfer-Encoding: gzip",), b"HTTP/1.1", "must be chunked"),
        ((b"Transfer-Encoding: chunked, gzip",), b"HTTP/1.1", "must be chunked"),
        ((b"Transfer-Encoding: chunked",) * 2, b"HTTP/1.1", "more than one Transfer-Encoding"),
        ((b"Transfer-Encoding: chunked",), b"HTTP/1.0", "only allowed in an HTTP/1.1"),
        ((b"Transfer-Encoding : chunked",), b"HTTP/1.1", "not a valid token"),
        ((b"Transfer-Encoding: gzip", b" , chunked"), b"HTTP/1.1", "obs-fold"),
        ((b"Content-Length: 4", b" 4"), b"HTTP/1.1", "obs-fold"),
        ((b"Content-Length: +4",), b"HTTP/1.1", "not a decimal number"),
        ((b"Content-Length: 4, 4",), b"HTTP/1.1", "not a decimal number"),
        ((b"Content-Length: 4", b"Content-Length: 5"), b"HTTP/1.1", "more than one Content"),
        ((b"Content-Length: 4", b"Content-Length: 4"), b"HTTP/1.1", "more than one Content"),
    ],
)
def test_untrustworthy_framing_is_named(
    headers: tuple[bytes, ...], version: bytes, reason: str
) -> None:
    request = parse(*headers, version=version)
    message = request_framing_error(request)
    assert message is not None and reason in message
    with pytest.raises(FramingError, match=reason):
        request_body_size(request)


@pytest.mark.parametrize(
    ("headers", "size"),
    [
        ((), 0),
        ((b"Content-Length: 12",), 12),
        ((b"Transfer-Encoding: chunked",), None),
        ((b"Transfer-Encoding: gzip, chunked",), None),
        ((b"transfer-encoding: CHUNKED",), None),
    ],
)
def test_sound_framing_gives_the_body_size(headers: tuple[bytes, ...], size: int | None) -> None:
    request = parse(*headers)
    assert request_framing_error(request) is None
    assert request_body_size(request) == size


def test_head_error_reasons_quote_nothing() -> None:
    line = b"CONNECT user@10.0.0.1:443 HTTP/1.1"
    reason = head_error_reason(line, ValueError(f"Bad HTTP request line: {line!r}"))
    assert "host:port" in reason and "10.0.0.1" not in reason
    assert "request line" in head_error_reason(b"GET x", ValueError("Bad HTTP request line: x"))
    assert "header line" in head_error_reason(b"GET / HTTP/1.1", ValueError("Invalid header"))


def test_refusal_shapes() -> None:
    text = framing_refusal(None, 400, "The thing is wrong.")
    head, _, body = text.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in head.lower() and b"server:" not in head.lower()
    assert body == b"The thing is wrong.\n"
    anthropic = framing_refusal(ApiFormat.ANTHROPIC, 400, "The thing is wrong.")
    payload = json.loads(anthropic.partition(b"\r\n\r\n")[2])
    assert payload == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "The thing is wrong."},
    }


def test_cl_te_request_is_refused_and_nothing_after_it_is_read() -> None:
    layer = server(ApiFormat.OPENAI)
    cmds = feed(
        layer,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nABCDGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    answer = sent(cmds)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_request"
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)
    # The flow is recorded as refused; no body and no second request is ever produced.
    kinds = [type(e) for e in received(cmds)]
    assert kinds == [RequestHeaders, RequestProtocolError]
    assert len(layer.buf) == 0
    assert feed(layer, b"GET /more HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_an_unparseable_head_is_refused_without_echo() -> None:
    layer = server()
    cmds = feed(layer, b"CONNECT 127.0.0.1:8080/ HTTP/1.1\r\n\r\n")
    answer = sent(cmds)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"127.0.0.1" not in answer and b"mitmproxy" not in answer
    assert received(cmds) == []
    assert any(isinstance(c, commands.CloseConnection) for c in cmds)


def test_a_broken_chunk_is_answered_400_before_the_close() -> None:
    layer = server(ApiFormat.OPENAI)
    cmds = feed(layer, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert [type(e) for e in received(cmds)] == [RequestHeaders]
    cmds = feed(layer, b"zz\r\nABCD\r\n0\r\n\r\n")
    kinds = [type(c) for c in cmds]
    assert kinds.index(commands.SendData) < kinds.index(commands.CloseConnection)
    assert sent(cmds).startswith(b"HTTP/1.1 400 ")
    assert [type(e) for e in received(cmds)] == [RequestProtocolError]


def test_a_sound_chunked_body_passes() -> None:
    layer = server()
    cmds = feed(
        layer,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nABCD\r\n0\r\n\r\n",
    )
    assert sent(cmds) == b""
    events_ = received(cmds)
    assert [type(e) for e in events_] == [RequestHeaders, RequestData, RequestEndOfMessage]


def test_mitmproxys_error_answer_becomes_one_plain_line() -> None:
    layer = server()
    cmds = feed(layer, b"GET / HTTP/1.0\r\n\r\n")
    assert [type(e) for e in received(cmds)] == [RequestHeaders, RequestEndOfMessage]
    message = "HTTP request has no host header, destination unknown."
    cmds = list(
        layer.handle_event(ResponseProtocolError(1, message, ErrorCode.DESTINATION_UNKNOWN))
    )
    answer = sent(cmds)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"mitmproxy" not in answer and b"text/html" not in answer
    assert b"Host header" in body and body.count(b"\n") == 1
    assert isinstance(cmds[-1], commands.CloseConnection)


def _stream_commands(alpn: bytes) -> list[commands.Command]:
    """AIBridgeHttpStream given a head mitmproxy's own check refuses (CL with TE), as a client
    layer that let it through would hand it over; hooks are completed as they come."""
    from mitmproxy.proxy.layers.http import HTTPMode

    from aibridgeproxyd.mitm.http_layer import AIBridgeHttpStream

    opts = options.Options()
    opts.add_option("validate_inbound_headers", bool, True, "mitmproxy's option (an addon's)")
    client = tflow.tclient_conn()
    client.alpn = alpn
    context = Context(client, opts)
    context.server = tflow.tserver_conn()
    stream = AIBridgeHttpStream(context, 1)
    stream.mode = HTTPMode.transparent
    list(stream.handle_event(events.Start()))
    request = parse(b"Content-Length: 4", b"Transfer-Encoding: chunked")
    request.scheme, request.host, request.port = "https", "a", 443
    seen = list(stream.handle_event(RequestHeaders(1, request, False)))
    while seen and isinstance(seen[-1], commands.StartHook):
        seen += list(stream.handle_event(events.HookCompleted(seen[-1])))
    return seen


def test_the_stream_closes_an_http1_connection_after_a_refused_head() -> None:
    from mitmproxy.proxy.layers.http import ResponseHeaders, SendHttp

    seen = _stream_commands(b"http/1.1")
    headers = [c.event for c in seen if isinstance(c, SendHttp)]
    assert isinstance(headers[0], ResponseHeaders)
    assert headers[0].response.status_code == 400
    assert headers[0].response.headers["connection"] == "close"
    assert isinstance(seen[-1], commands.CloseConnection)


def test_the_stream_keeps_an_http2_connection_after_a_refused_head() -> None:
    seen = _stream_commands(b"h2")
    assert not any(isinstance(c, commands.CloseConnection) for c in seen)
