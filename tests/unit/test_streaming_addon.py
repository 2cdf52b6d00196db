"""The streaming decision and the addon that applies it, driven with mitmproxy's test flows;
and the WebSocket addon that forgets each message once every other addon has seen it."""

from __future__ import annotations

import pytest
from aibridgeproxyd.addons.streaming import BUFFER_LIMIT, StreamResponses, should_stream
from aibridgeproxyd.addons.websocket import ForgetWebSocketMessages
from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.interception.state import METADATA_KEY, ConnectInfo, RequestContext
from tests.unit.test_adapters_common import routed


@pytest.mark.parametrize(
    ("headers", "streams"),
    [
        ({"content-type": "text/event-stream; charset=utf-8", "content-length": "10"}, True),
        ({"content-type": "application/x-ndjson", "content-length": "10"}, True),
        ({"content-type": "application/vnd.amazon.eventstream", "content-length": "10"}, True),
        ({"content-type": "application/json"}, True),  # no length: chunked or until close
        ({"content-length": "²"}, True),  # not a length int() reads
        ({"content-length": str(BUFFER_LIMIT + 1)}, True),
        ({"content-length": str(BUFFER_LIMIT)}, False),
        ({"content-type": "application/json", "content-length": "2"}, False),
    ],
)
def test_only_small_answers_of_known_length_are_buffered(
    headers: dict[str, str], streams: bool
) -> None:
    assert should_stream(http.Headers((), **headers)) is streams


def answer(status: int, headers: dict[str, str]) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.response = http.Response.make(status, b"", headers)
    flow.response.headers.pop("content-length", None)
    flow.response.headers.update(headers)
    return flow


class Upper:
    """A response transform that upper-cases the stream."""

    started = False

    def start(self, response: http.Response) -> None:
        self.started = True

    def feed(self, chunk: bytes) -> bytes:
        return chunk.upper()


def with_transform(flow: http.HTTPFlow, transform: Upper) -> None:
    flow.metadata[METADATA_KEY] = RequestContext(
        request_id="r",
        connect=ConnectInfo("api.anthropic.com", 443),
        provider=routed("openai"),
        adapter=ADAPTERS["openai"],
        transform=transform,
    )


def test_an_event_stream_is_streamed_and_a_small_json_answer_buffered() -> None:
    sse = answer(200, {"content-type": "text/event-stream"})
    StreamResponses().responseheaders(sse)
    assert sse.response is not None and sse.response.stream is True
    small = answer(200, {"content-type": "application/json", "content-length": "2"})
    StreamResponses().responseheaders(small)
    assert small.response is not None and small.response.stream is False


def test_a_successful_answer_with_a_transform_streams_through_it() -> None:
    flow = answer(200, {"content-type": "application/json", "content-length": "2"})
    transform = Upper()
    with_transform(flow, transform)
    StreamResponses().responseheaders(flow)
    assert flow.response is not None and transform.started
    assert flow.response.stream == transform.feed


def test_an_error_answer_never_goes_through_the_transform() -> None:
    flow = answer(400, {"content-type": "application/json", "content-length": "2"})
    transform = Upper()
    with_transform(flow, transform)
    StreamResponses().responseheaders(flow)
    assert flow.response is not None and flow.response.stream is False
    assert not transform.started


def test_each_websocket_message_is_forgotten_after_the_chain_saw_it() -> None:
    flow = tflow.twebsocketflow()
    assert flow.websocket is not None and flow.websocket.messages
    ForgetWebSocketMessages().websocket_message(flow)
    assert flow.websocket.messages == []
