from collections.abc import Iterator

import pytest
from mitmproxy import connection, http, options
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    GetHttpConnection,
    GetHttpConnectionCompleted,
    HTTPMode,
    RegisterHttpConnection,
    ResponseData,
    SendHttp,
)
from mitmproxy.test import tflow, tutils

from aibridgeproxyd.destinations import DestinationRefusal
from aibridgeproxyd.mitm.http_layer import (
    AIBridgeHttpLayer,
    AIBridgeHttpStream,
    RefusedDial,
    as_http1,
)


def test_http2_request_becomes_http1_with_host_and_length() -> None:
    request = tutils.treq(
        http_version=b"HTTP/2.0", authority=b"api.openai.com", content=b'{"a": 1}'
    )
    request.headers.pop("content-length", None)
    request.headers.pop("host", None)
    request.headers.add("cookie", "a=1")
    request.headers.add("cookie", "b=2")
    as_http1(request)
    assert request.http_version == "HTTP/1.1"
    assert request.headers["host"] == "api.openai.com"
    assert request.authority == ""
    assert request.headers["content-length"] == "8"
    assert request.headers["cookie"] == "a=1; b=2"


def test_http1_request_is_left_alone() -> None:
    request = tutils.treq(content=b"")
    before = request.copy()
    as_http1(request)
    assert request.data == before.data


# --- dials the destination guard refused ---------------------------------------------------

KILLED = "Connection killed: private or reserved destination"


def test_a_refused_dial_reaches_the_waiting_stream_with_its_refusal() -> None:
    layer = AIBridgeHttpLayer(
        Context(tflow.tclient_conn(), options.Options()), HTTPMode.transparent
    )
    server = connection.Server(address=("10.1.2.3", 443))
    server.error = DestinationRefusal.BLOCKED  # set by the guard's server_connect
    request = GetHttpConnection(("10.1.2.3", 443), True, None, "tcp")
    layer.waiting_for_establishment[server].append(request)
    layer.command_sources[request] = stream = object()  # type: ignore[assignment]
    delivered: list[tuple[object, events.Event]] = []

    def event_to_child(child: object, event: events.Event) -> Iterator[None]:
        delivered.append((child, event))
        return iter(())

    layer.event_to_child = event_to_child  # type: ignore[method-assign,assignment]
    list(layer.register_connection(RegisterHttpConnection(server, KILLED)))
    ((child, event),) = delivered
    assert child is stream and isinstance(event, GetHttpConnectionCompleted)
    _, err = event.reply
    assert isinstance(err, RefusedDial) and err.refusal is DestinationRefusal.BLOCKED
    assert err == KILLED  # mitmproxy's text, as logged before


def answer_to_dial_failure(err: str) -> http.Response:
    stream = AIBridgeHttpStream(Context(tflow.tclient_conn(), options.Options()), 1)
    stream.flow = tflow.tflow()
    list(stream._answer_dial_failure(err))
    assert stream.flow.response is not None
    return stream.flow.response


def test_a_pass_through_request_to_a_blocked_destination_gets_403() -> None:
    response = answer_to_dial_failure(RefusedDial(KILLED, DestinationRefusal.BLOCKED))
    assert (response.status_code, response.content) == (
        403,
        b"Forbidden: private or reserved destination",
    )


def test_the_refusal_is_told_by_its_value_not_its_text() -> None:
    assert answer_to_dial_failure(KILLED).status_code == 502
    unresolved = RefusedDial("Connection killed: x", DestinationRefusal.UNRESOLVED)
    assert answer_to_dial_failure(unresolved).status_code == 502


# --- the recording's taps read a chunk once it is sent -----------------------------------------


def streaming_stream() -> AIBridgeHttpStream:
    opts = options.Options()
    opts.add_option("store_streamed_bodies", bool, False, "")  # the proxy server addon's
    context = Context(tflow.tclient_conn(), opts)
    stream = AIBridgeHttpStream(context, 1)
    stream.flow = tflow.tflow(resp=True)
    assert stream.flow.response is not None
    stream.flow.response.stream = True
    stream.server_state = stream.state_stream_response_body
    return stream


def test_a_streamed_chunk_goes_to_the_client_before_the_taps_read_it() -> None:
    stream = streaming_stream()
    read: list[bytes] = []
    stream._chunk_tap = read.append
    steps = stream._handle_event(ResponseData(1, b"data: {}\n\n"))
    command = next(steps)
    assert isinstance(command, SendHttp) and command.connection is stream.context.client
    assert isinstance(command.event, ResponseData) and command.event.data == b"data: {}\n\n"
    assert read == []  # the command is carried out (written) before the stream resumes
    with pytest.raises(StopIteration):
        steps.send(None)
    assert read == [b"data: {}\n\n"]


def test_an_empty_chunk_is_neither_sent_nor_read() -> None:
    stream = streaming_stream()
    read: list[bytes] = []
    stream._chunk_tap = read.append
    assert list(stream._handle_event(ResponseData(1, b""))) == []
    assert read == []
