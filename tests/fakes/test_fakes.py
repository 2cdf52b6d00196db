"""The fakes themselves, driven directly with httpx and the official SDKs (no proxy)."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import anthropic
import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import openai
import pytest

from .tls import TUNNEL_TARGET_BODY, TunnelTarget, issued_by
from .upstream import (
    CACHE_CREATION_INPUT_TOKENS,
    CACHED_INPUT_TOKENS,
    HEADER_DELAY_MS,
    HEADER_DROP_AFTER,
    HEADER_EVENTS,
    HEADER_GATE,
    HEADER_RETRY_AFTER,
    HEADER_STATUS,
    HEADER_STREAM_ID,
    HEADER_USAGE,
    INPUT_TOKENS,
    FakeUpstream,
    presented_key,
    reply_text,
    text_deltas,
)

FAKE_THREAD_PREFIXES = ("fake-upstream", "tunnel-target")


def _fake_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(FAKE_THREAD_PREFIXES)]


@pytest.fixture(autouse=True)
def no_leaked_server_threads() -> Iterator[None]:
    assert _fake_threads() == []
    yield
    assert _fake_threads() == [], "a fake server outlived its test"


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def client_for(up: FakeUpstream, *, http2: bool = False) -> httpx.Client:
    return httpx.Client(
        verify=ssl.create_default_context(cafile=str(up.ca_pem_path)),
        http2=http2,
        trust_env=False,
        timeout=5.0,
    )


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(event name, data) per SSE frame, as lines arrive."""
    event: str | None = None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, line.removeprefix("data: ")
            event = None


# --- lifecycle and TLS -------------------------------------------------------------------------


def test_starts_within_a_second_on_a_loopback_port_with_a_cert_from_its_own_ca() -> None:
    started = time.monotonic()
    with FakeUpstream() as up:
        assert time.monotonic() - started < 1.0
        assert up.base_url == f"https://127.0.0.1:{up.port}/v1"
        with socket.create_connection((up.host, up.port)) as raw:
            context = ssl.create_default_context(cafile=str(up.ca_pem_path))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                cert = tls.getpeercert(binary_form=True)
        assert cert is not None
        assert issued_by(cert, up.ca_pem_path)
    assert not up.ca_pem_path.exists(), "temporary certificate files are removed on exit"


@pytest.mark.parametrize("http2", [False, True])
def test_serves_http1_and_h2_by_alpn(up: FakeUpstream, http2: bool) -> None:
    with client_for(up, http2=http2) as client:
        response = client.get(up.url("/models"))
    assert response.status_code == 200
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert up.requests[0].http_version == ("2" if http2 else "1.1")


def test_stop_is_prompt_while_a_gated_stream_and_a_keepalive_connection_are_open(
    up: FakeUpstream,
) -> None:
    client = client_for(up)
    try:
        client.get(up.url("/models"))  # leaves an idle keep-alive connection
        body = {"model": "m", "stream": True}
        up.gate("held")
        with client.stream(
            "POST", up.url("/chat/completions"), json=body, headers={HEADER_STREAM_ID: "held"}
        ) as response:
            assert response.status_code == 200
            started = time.monotonic()
            up.stop()
            assert time.monotonic() - started < 3.0
    finally:
        client.close()


# --- request recording -------------------------------------------------------------------------


def test_records_method_full_path_headers_body_and_version(up: FakeUpstream) -> None:
    body = b'{"model": "gpt-4o", "messages": []}'
    with client_for(up) as client:
        client.post(
            f"{up.origin}/api/v1/chat/completions?trace=1&x=y",
            content=body,
            headers=[
                ("Authorization", "Bearer sk-test"),
                ("X-Dup", "a"),
                ("X-Dup", "b"),
                ("Content-Type", "application/json"),
            ],
        )
    (request,) = up.wait_for_requests(1)
    assert request.method == "POST"
    assert request.path == "/api/v1/chat/completions?trace=1&x=y"
    assert request.path_only == "/api/v1/chat/completions"
    assert request.query == {"trace": ["1"], "x": ["y"]}
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers.get_list("x-dup") == ["a", "b"]
    assert request.body == body
    assert request.json()["model"] == "gpt-4o"
    assert request.http_version == "1.1"
    assert request.mentions("sk-test")
    assert request.mentions("trace=1")
    assert request.mentions("gpt-4o")
    assert not request.mentions("proxy-token")


def test_routes_on_path_suffix_whatever_the_base_path(up: FakeUpstream) -> None:
    with client_for(up) as client:
        for prefix in ("", "/v1", "/api/v1", "/openai/deployments/prod"):
            response = client.post(f"{up.origin}{prefix}/chat/completions", json={"model": "m"})
            assert response.json()["object"] == "chat.completion", prefix
    assert [r.path for r in up.requests] == [
        "/chat/completions",
        "/v1/chat/completions",
        "/api/v1/chat/completions",
        "/openai/deployments/prod/chat/completions",
    ]


def test_unknown_route_is_a_404_in_the_provider_error_shape(up: FakeUpstream) -> None:
    with client_for(up) as client:
        openai_style = client.post(up.url("/nope"), json={})
        anthropic_style = client.post(
            up.url("/nope"), json={}, headers={"anthropic-version": "2023-06-01"}
        )
    assert openai_style.status_code == 404
    assert "no route" in openai_style.json()["error"]["message"]
    assert anthropic_style.status_code == 404
    assert anthropic_style.json()["type"] == "error"
    assert anthropic_style.json()["error"]["type"] == "not_found_error"


# --- OpenAI endpoints --------------------------------------------------------------------------


def test_chat_completion_returns_the_reply_and_usage(up: FakeUpstream) -> None:
    with client_for(up) as client:
        response = client.post(
            up.url("/chat/completions"), json={"model": "gpt-4o"}, headers={HEADER_EVENTS: "4"}
        )
    completion = response.json()
    assert response.headers["content-type"] == "application/json"
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "gpt-4o"
    assert completion["choices"][0]["message"]["content"] == reply_text(4)
    assert completion["usage"]["prompt_tokens"] == INPUT_TOKENS
    assert completion["usage"]["completion_tokens"] == 4
    assert completion["usage"]["prompt_tokens_details"]["cached_tokens"] == CACHED_INPUT_TOKENS


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_sends_chunks_then_done(up: FakeUpstream, include_usage: bool) -> None:
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": include_usage}}
    with (
        client_for(up) as client,
        client.stream("POST", up.url("/chat/completions"), json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [data for _, data in sse_events(response.iter_lines())]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(data) for data in frames[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reply_text()
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert usage_chunks == [chunks[-1]]
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == len(text_deltas(3))
    else:
        assert usage_chunks == []


def test_responses_non_stream_and_stream(up: FakeUpstream) -> None:
    with client_for(up) as client:
        response = client.post(up.url("/responses"), json={"model": "gpt-4o", "input": "hi"})
        with client.stream(
            "POST", up.url("/responses"), json={"model": "gpt-4o", "stream": True}
        ) as stream:
            events = [(name, json.loads(data)) for name, data in sse_events(stream.iter_lines())]
    assert response.json()["object"] == "response"
    assert response.json()["output"][0]["content"][0]["text"] == reply_text()
    names = [name for name, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names.count("response.output_text.delta") == 3
    assert names[-1] == "response.completed"
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 3


def test_embeddings_as_floats_and_base64(up: FakeUpstream) -> None:
    with client_for(up) as client:
        floats = client.post(up.url("/embeddings"), json={"input": ["a", "b"], "dimensions": 4})
        packed = client.post(
            up.url("/embeddings"), json={"input": "a", "encoding_format": "base64"}
        )
    data = floats.json()["data"]
    assert [item["index"] for item in data] == [0, 1]
    assert len(data[0]["embedding"]) == 4
    decoded = struct.unpack("<8f", base64.b64decode(packed.json()["data"][0]["embedding"]))
    assert decoded[0] == pytest.approx(0.1)


def test_models_in_each_provider_shape(up: FakeUpstream) -> None:
    with client_for(up) as client:
        openai_models = client.get(up.url("/models")).json()
        anthropic_models = client.get(
            up.url("/models"), headers={"anthropic-version": "2023-06-01"}
        ).json()
    assert openai_models["object"] == "list"
    assert openai_models["data"][0]["object"] == "model"
    assert anthropic_models["data"][0]["type"] == "model"
    assert anthropic_models["has_more"] is False


# --- Anthropic ---------------------------------------------------------------------------------


def test_messages_non_stream_returns_usage(up: FakeUpstream) -> None:
    with client_for(up) as client:
        message = client.post(up.url("/messages"), json={"model": "claude-x"}).json()
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": reply_text()}]
    assert message["usage"] == {
        "input_tokens": INPUT_TOKENS,
        "cache_creation_input_tokens": CACHE_CREATION_INPUT_TOKENS,
        "cache_read_input_tokens": CACHED_INPUT_TOKENS,
        "output_tokens": 3,
    }


def test_messages_stream_follows_the_documented_sequence(up: FakeUpstream) -> None:
    with (
        client_for(up) as client,
        client.stream(
            "POST",
            up.url("/messages"),
            json={"model": "claude-x", "stream": True},
            headers={HEADER_EVENTS: "2"},
        ) as response,
    ):
        events = [(name, json.loads(data)) for name, data in sse_events(response.iter_lines())]
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == INPUT_TOKENS
    assert events[-2][1]["usage"] == {"output_tokens": 2}


# --- test controls -----------------------------------------------------------------------------


def test_gate_sends_each_event_only_after_release(up: FakeUpstream) -> None:
    body = {"model": "m", "stream": True}
    headers = {HEADER_STREAM_ID: "s1", HEADER_GATE: "1", HEADER_EVENTS: "3"}
    state = up.stream("s1")
    with (
        client_for(up) as client,
        client.stream("POST", up.url("/chat/completions"), json=body, headers=headers) as response,
    ):
        frames = sse_events(response.iter_lines())
        for seen in range(3):
            # Nothing leaves the upstream before the test lets it: the stream waits on the gate.
            assert state.sent == seen
            up.release("s1")
            next(frames)
            assert state.sent == seen + 1
        state.open_gate()
        rest = [data for _, data in frames]
    assert rest[-1] == "[DONE]"
    assert state.wait_finished() == "completed"
    assert up.completed_streams == ["s1"]


def test_gate_can_be_set_up_before_the_request_without_a_header(up: FakeUpstream) -> None:
    state = up.gate("pre")
    state.release(2)  # releases made before the request arrives are kept
    with (
        client_for(up) as client,
        client.stream(
            "POST",
            up.url("/messages"),
            json={"stream": True},
            headers={HEADER_STREAM_ID: "pre"},
        ) as response,
    ):
        frames = sse_events(response.iter_lines())
        assert [name for name, _ in (next(frames), next(frames))] == [
            "message_start",
            "content_block_start",
        ]
        assert state.sent == 2
        state.open_gate()
        assert [name for name, _ in frames][-1] == "message_stop"


def test_paced_stream_spaces_events_by_the_delay(up: FakeUpstream) -> None:
    headers = {HEADER_STREAM_ID: "paced", HEADER_DELAY_MS: "30", HEADER_EVENTS: "2"}
    with client_for(up) as client:
        client.post(up.url("/chat/completions"), json={"stream": True}, headers=headers)
    sent_at = up.stream("paced").sent_at
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    assert len(gaps) == 4
    assert min(gaps) >= 0.025


def test_forced_status_per_api_key(up: FakeUpstream) -> None:
    up.fail_key("sk-limited", 429, retry_after=7)
    up.fail_key("sk-revoked", 401)
    with client_for(up) as client:

        def call(key: str) -> httpx.Response:
            return client.post(
                up.url("/chat/completions"), json={}, headers={"authorization": f"Bearer {key}"}
            )

        limited, revoked, good = call("sk-limited"), call("sk-revoked"), call("sk-good")
        anthropic_revoked = client.post(
            up.url("/messages"), json={}, headers={"x-api-key": "sk-revoked"}
        )
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert revoked.status_code == 401
    assert good.status_code == 200
    assert anthropic_revoked.status_code == 401
    assert anthropic_revoked.json()["error"]["type"] == "authentication_error"

    up.clear_failures()
    up.fail_all(500)
    with client_for(up) as client:
        assert client.post(up.url("/chat/completions"), json={}).status_code == 500


def test_forced_status_by_request_header(up: FakeUpstream) -> None:
    with client_for(up) as client:
        response = client.post(
            up.url("/messages"),
            json={},
            headers={HEADER_STATUS: "529", HEADER_RETRY_AFTER: "3"},
        )
    assert response.status_code == 529
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("http2", [False, True])
def test_client_abort_mid_stream_is_detected(up: FakeUpstream, http2: bool) -> None:
    headers = {HEADER_STREAM_ID: "cut", HEADER_GATE: "1"}
    state = up.stream("cut")
    client = client_for(up, http2=http2)
    try:
        with client.stream(
            "POST", up.url("/chat/completions"), json={"stream": True}, headers=headers
        ) as response:
            up.release("cut")
            next(sse_events(response.iter_lines()))
            # httpx closes an HTTP/1.1 connection whose body was not read to the end, but sends
            # no RST_STREAM on h2, so there only closing the connection tells the server.
            if http2:
                client.close()
    finally:
        client.close()
    assert state.wait_finished() == "aborted"
    assert up.aborted_streams == ["cut"]
    assert state.sent == 1


def test_h2_stream_reset_is_detected_while_the_connection_stays_open(up: FakeUpstream) -> None:
    # What a proxy does when its client cancels one h2 stream: RST_STREAM, connection kept.
    context = ssl.create_default_context(cafile=str(up.ca_pem_path))
    context.set_alpn_protocols(["h2"])
    body = b'{"stream": true}'
    request_headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "https"),
        (":authority", f"127.0.0.1:{up.port}"),
        ("content-length", str(len(body))),
        (HEADER_STREAM_ID, "rst"),
        (HEADER_GATE, "1"),
    ]
    with (
        socket.create_connection((up.host, up.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        connection.send_headers(1, request_headers)
        connection.send_data(1, body, end_stream=True)
        tls.sendall(connection.data_to_send())
        up.release("rst")
        got_data = False
        while not got_data:
            events = connection.receive_data(tls.recv(65536))
            got_data = any(isinstance(e, h2.events.DataReceived) for e in events)
            tls.sendall(connection.data_to_send())
        connection.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        tls.sendall(connection.data_to_send())
        assert up.stream("rst").wait_finished() == "aborted"


def test_drop_after_cuts_the_connection_mid_stream(up: FakeUpstream) -> None:
    headers = {HEADER_STREAM_ID: "drop", HEADER_DROP_AFTER: "2"}
    with (
        client_for(up) as client,
        client.stream(
            "POST", up.url("/chat/completions"), json={"stream": True}, headers=headers
        ) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        for _ in response.iter_lines():
            pass
    assert up.stream("drop").wait_finished() == "dropped"
    assert up.stream("drop").sent == 2


# --- official SDKs against the fake ------------------------------------------------------------


def test_openai_sdk_reads_every_endpoint(up: FakeUpstream) -> None:
    # The SDKs bring their own HTTP client class (httpx2 in recent releases), so use theirs.
    verify = ssl.create_default_context(cafile=str(up.ca_pem_path))
    with openai.DefaultHttpxClient(verify=verify, trust_env=False) as http_client:
        client = openai.OpenAI(
            api_key="sk-test", base_url=up.base_url, http_client=http_client, max_retries=0
        )
        completion = client.chat.completions.create(model="gpt-4o", messages=[])
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=[], stream=True, stream_options={"include_usage": True}
            )
        )
        with client.responses.stream(model="gpt-4o", input="hi") as stream:
            final = stream.get_final_response()
        embedding = client.embeddings.create(model="text-embedding-3-small", input="hi")
        models = client.models.list()
    assert completion.choices[0].message.content == reply_text()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert final.output_text == reply_text()
    assert final.usage is not None and final.usage.input_tokens == INPUT_TOKENS
    assert len(embedding.data[0].embedding) == 8
    assert [m.id for m in models] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    assert up.requests[0].headers["authorization"] == "Bearer sk-test"


def _sdk_client(up: FakeUpstream, http_client: httpx.Client) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test", base_url=up.base_url, http_client=http_client, max_retries=0
    )


def test_compact_answers_a_compaction_the_sdk_reads(up: FakeUpstream) -> None:
    verify = ssl.create_default_context(cafile=str(up.ca_pem_path))
    with openai.DefaultHttpxClient(verify=verify, trust_env=False) as http_client:
        compacted = _sdk_client(up, http_client).responses.compact(
            model="gpt-5.1-codex-max", input=[{"role": "user", "content": "hi"}]
        )
    assert compacted.object == "response.compaction"
    assert [item.type for item in compacted.output] == ["message", "compaction"]
    assert compacted.usage.input_tokens == INPUT_TOKENS
    assert up.requests[0].path == "/v1/responses/compact"


def test_usage_header_is_reported_verbatim(up: FakeUpstream) -> None:
    usage = {"prompt_tokens": 10032, "completion_tokens": 12, "cache_creation_input_tokens": 10017}
    headers = {HEADER_USAGE: json.dumps(usage)}
    with client_for(up) as client:
        chat = client.post(up.url("/chat/completions"), json={"model": "m"}, headers=headers)
        stream_body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        with client.stream(
            "POST", up.url("/chat/completions"), json=stream_body, headers=headers
        ) as stream:
            chunks = [data for _, data in sse_events(stream.iter_lines())]
        responses = client.post(
            up.url("/responses"), json={"model": "m", "stream": True}, headers=headers
        )
    assert chat.json()["usage"] == usage
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["usage"] == usage
    completed = [json.loads(d) for _, d in sse_events(iter(responses.text.splitlines()))][-1]
    assert completed["response"]["usage"] == usage


@pytest.mark.parametrize("encoding", ["gzip", "zstd", "br"])
def test_compressed_request_bodies_are_read_decoded(up: FakeUpstream, encoding: str) -> None:
    from mitmproxy.net.encoding import encode

    body = json.dumps({"model": "gpt-4.1", "messages": []}).encode()
    with client_for(up) as client:
        response = client.post(
            up.url("/chat/completions"),
            content=encode(body, encoding),
            headers={"content-type": "application/json", "content-encoding": encoding},
        )
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-4.1"
    assert up.requests[0].json()["model"] == "gpt-4.1"


def test_realtime_session_speaks_the_realtime_events_the_sdk_reads(up: FakeUpstream) -> None:
    client = openai.OpenAI(api_key="sk-test", base_url=up.base_url, max_retries=0)
    options: Any = {"ssl": ssl.create_default_context(cafile=str(up.ca_pem_path))}
    usage = {
        "input_tokens": 132,
        "output_tokens": 121,
        "input_token_details": {"cached_tokens": 64},
    }
    with client.realtime.connect(
        model="gpt-4o-realtime-preview",
        extra_headers={HEADER_USAGE: json.dumps(usage)},
        websocket_connection_options=options,
    ) as connection:
        created = connection.recv()
        connection.send(cast(Any, {"type": "no.such.event"}))
        error = connection.recv()
        connection.response.create()
        events = []
        for event in connection:
            events.append(event)
            if event.type == "response.done":
                break
    assert created.type == "session.created"
    assert created.session.model == "gpt-4o-realtime-preview"
    assert error.type == "error"
    assert [e.type for e in events] == [
        "response.created",
        *["response.output_text.delta"] * 3,
        "response.done",
    ]
    done = events[-1]
    assert done.type == "response.done" and done.response.usage is not None
    assert done.response.usage.model_dump(exclude_none=True) == usage
    (upgrade,) = up.requests
    assert (upgrade.method, upgrade.path) == ("GET", "/v1/realtime?model=gpt-4o-realtime-preview")
    assert upgrade.headers["authorization"] == "Bearer sk-test"


def test_anthropic_sdk_reads_messages_and_streams(up: FakeUpstream) -> None:
    verify = ssl.create_default_context(cafile=str(up.ca_pem_path))
    with anthropic.DefaultHttpxClient(verify=verify, trust_env=False) as http_client:
        client = anthropic.Anthropic(
            api_key="sk-ant", base_url=up.origin, http_client=http_client, max_retries=0
        )
        message = client.messages.create(model="claude-x", max_tokens=10, messages=[])
        with client.messages.stream(model="claude-x", max_tokens=10, messages=[]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        tokens = client.messages.count_tokens(model="claude-x", messages=[])
    assert message.content[0].type == "text"
    assert text == reply_text()
    assert final.usage.output_tokens == 3
    assert final.usage.cache_read_input_tokens == CACHED_INPUT_TOKENS
    assert tokens.input_tokens == INPUT_TOKENS
    # Recent SDKs send the key as a bearer token, older ones as x-api-key.
    assert presented_key(up.requests[0].headers) == "sk-ant"
    assert up.requests[0].path == "/v1/messages"


# --- tunnel target -----------------------------------------------------------------------------


def test_tunnel_target_answers_with_its_own_ca_cert() -> None:
    with FakeUpstream() as up, TunnelTarget() as target:
        with socket.create_connection((target.host, target.port)) as raw:
            context = ssl.create_default_context(cafile=str(target.ca_pem_path))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                cert = tls.getpeercert(binary_form=True)
                tls.sendall(b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := tls.recv(65536):
                    reply += chunk
        assert cert is not None
        assert issued_by(cert, target.ca_pem_path)
        assert not issued_by(cert, up.ca_pem_path)
        assert reply.startswith(b"HTTP/1.1 200")
        assert reply.endswith(TUNNEL_TARGET_BODY)
        assert target.wait_for_requests(1)[0].path == "/anything"


def test_tunnel_target_bulk_download_and_plain_http() -> None:
    with TunnelTarget() as target, TunnelTarget(tls=False) as plain:
        verify = ssl.create_default_context(cafile=str(target.ca_pem_path))
        with httpx.Client(verify=verify, trust_env=False) as client:
            bulk = client.get(f"{target.url}/bulk", params={"bytes": 200_000})
            small = client.get(f"{plain.url}/hello")
    assert len(bulk.content) == 200_000
    assert plain.url.startswith("http://")
    assert small.content == TUNNEL_TARGET_BODY
