"""The content tap (aibridgeproxyd.response_content): tool calls and thoughts read from every API
format the product routes, streamed and not, however the stream is chunked or compressed, cut
at record_max_bytes, bounded, and never raising."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aibridgeproxyd import response_content
from aibridgeproxyd.adapters.bedrock import EventStreamToSse
from aibridgeproxyd.model import ToolCall
from aibridgeproxyd.response_content import (
    MAX_THOUGHTS,
    MAX_TOOL_CALLS,
    REDACTED_THINKING,
    ContentSwitches,
    ContentTap,
    ResponseContent,
    content_from_body,
    content_tap_for,
)
from aibridgeproxyd.usage import ApiKind
from aibridgeproxyd.utf8 import cut_utf8
from tests.fakes import tool_content as fake
from tests.fakes.bedrock import chunk_message
from tests.fakes.tool_content import FakeContent

try:
    from compression import zstd
except ImportError:  # Python < 3.14
    from backports import zstd  # type: ignore[no-redef]

BOTH = FakeContent(tool_call=True, thinking=True)
USAGE: dict[str, Any] = {"input_tokens": 1, "output_tokens": 2}
CALL = ToolCall(fake.TOOL_CALL_ID, fake.TOOL_NAME, fake.TOOL_ARGUMENTS)
ANTHROPIC_CALL = ToolCall(fake.anthropic_tool_id(1), fake.TOOL_NAME, fake.TOOL_ARGUMENTS)
EXPECTED = ResponseContent((CALL,), (fake.THOUGHT,))


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)


def gemini_sse() -> bytes:
    chunks = fake.gemini_chunks("gemini-2.5-flash", BOTH, USAGE)
    return b"".join(f"data: {json.dumps(chunk)}\r\n\r\n".encode() for chunk in chunks)


def gemini_array() -> bytes:
    chunks = fake.gemini_chunks("gemini-2.5-flash", BOTH, USAGE)
    return b"[" + b",\r\n".join(json.dumps(chunk, indent=2).encode() for chunk in chunks) + b"]"


def gemini_body() -> bytes:
    return json.dumps(fake.gemini_body(fake.gemini_chunks("m", BOTH, USAGE))).encode()


def openai_body(make: Callable[..., Any], stream: bool) -> bytes:
    reply = make({"model": "m", "stream": stream}, 1, BOTH, USAGE)
    return b"".join(reply) if isinstance(reply, list) else json.dumps(reply).encode()


@dataclass(frozen=True)
class Case:
    name: str
    api_kind: ApiKind
    body: Callable[[], bytes]
    expected: ResponseContent


CASES = [
    Case(
        "chat streamed",
        ApiKind.OPENAI_CHAT_COMPLETIONS,
        lambda: openai_body(fake.chat_completions, True),
        EXPECTED,
    ),
    Case(
        "chat body",
        ApiKind.OPENAI_CHAT_COMPLETIONS,
        lambda: openai_body(fake.chat_completions, False),
        EXPECTED,
    ),
    Case(
        "responses streamed",
        ApiKind.OPENAI_RESPONSES,
        lambda: openai_body(fake.responses, True),
        EXPECTED,
    ),
    Case(
        "responses body",
        ApiKind.OPENAI_RESPONSES,
        lambda: openai_body(fake.responses, False),
        EXPECTED,
    ),
    Case(
        "anthropic streamed",
        ApiKind.ANTHROPIC_MESSAGES,
        lambda: openai_body(fake.messages, True),
        ResponseContent((ANTHROPIC_CALL,), (fake.THOUGHT,)),
    ),
    Case(
        "anthropic body",
        ApiKind.ANTHROPIC_MESSAGES,
        lambda: openai_body(fake.messages, False),
        ResponseContent((ANTHROPIC_CALL,), (fake.THOUGHT,)),
    ),
    Case("gemini sse", ApiKind.GEMINI_GENERATE_CONTENT, gemini_sse, EXPECTED),
    Case("gemini json array", ApiKind.GEMINI_GENERATE_CONTENT, gemini_array, EXPECTED),
    Case("gemini body", ApiKind.GEMINI_GENERATE_CONTENT, gemini_body, EXPECTED),
]
STREAMS = [case for case in CASES if "body" not in case.name]


def tap_all(
    api_kind: ApiKind,
    pieces: list[bytes],
    switches: ContentSwitches | None = None,
    encoding: str | None = None,
) -> ContentTap:
    tap = ContentTap(api_kind, switches or ContentSwitches(), encoding)
    for piece in pieces:
        tap.feed(piece)
    tap.finish()
    return tap


def chunked(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_format_gives_its_tool_call_and_thought_streamed_or_not(case: Case) -> None:
    tap = tap_all(case.api_kind, [case.body()])
    assert tap.content == case.expected
    assert tap.problem is None
    assert content_from_body(case.api_kind, ContentSwitches(), case.body()) == case.expected


@pytest.mark.parametrize("case", STREAMS, ids=lambda case: case.name)
def test_a_stream_split_at_any_byte_gives_the_same_content(case: Case) -> None:
    body = case.body()
    for split in range(1, len(body)):
        assert tap_all(case.api_kind, [body[:split], body[split:]]).content == case.expected
    assert tap_all(case.api_kind, chunked(body, 1)).content == case.expected


def _compress(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "br":
        return bytes(brotli.compress(body))
    return bytes(zstd.compress(body))


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
@pytest.mark.parametrize("case", STREAMS, ids=lambda case: case.name)
def test_a_compressed_stream_is_read_through_its_content_encoding(
    case: Case, encoding: str
) -> None:
    compressed = _compress(encoding, case.body())
    tap = tap_all(case.api_kind, chunked(compressed, 7), encoding=encoding)
    assert tap.content == case.expected


def test_an_unknown_content_encoding_records_nothing_and_says_why() -> None:
    tap = tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, [b"xx"], encoding="compress")
    assert tap.content == ResponseContent() and "compress" in (tap.problem or "")


# --- switches and limits ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_switches_keep_only_what_is_on(case: Case) -> None:
    no_calls = tap_all(case.api_kind, [case.body()], ContentSwitches(tool_calls=False))
    assert no_calls.content == ResponseContent((), case.expected.thoughts)
    no_thoughts = tap_all(case.api_kind, [case.body()], ContentSwitches(thoughts=False))
    assert no_thoughts.content == ResponseContent(case.expected.tool_calls, ())
    assert content_tap_for(case.api_kind, ContentSwitches(False, False)) is None


def test_apis_without_tool_calls_get_no_tap() -> None:
    for kind in (ApiKind.OPENAI_EMBEDDINGS, ApiKind.OPENAI_COMPLETIONS, None):
        assert content_tap_for(kind, ContentSwitches()) is None


def test_utf8_text_is_cut_at_the_limit_on_a_character_boundary() -> None:
    assert cut_utf8("é" * 20, 10) == "é" * 5
    assert cut_utf8("é" * 20, 11) == "é" * 5
    assert cut_utf8("a€", 3) == "a"
    assert cut_utf8("abc", 3) == "abc"
    assert cut_utf8("\ud800x", 10) == "?x"  # a lone surrogate cannot be stored


def _chat_call_deltas(pieces: list[str], index: int = 0, call_id: str = "c") -> list[bytes]:
    def chunk(function: dict[str, Any], **extra: Any) -> bytes:
        call = {"index": index, "function": function, **extra}
        return sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})

    first = chunk({"name": "f", "arguments": ""}, id=call_id, type="function")
    return [first, *(chunk({"arguments": piece}) for piece in pieces)]


def test_streamed_arguments_are_cut_at_record_max_bytes_on_a_utf8_boundary() -> None:
    pieces = ['{"k": "', *["日本"] * 10, '"}']
    tap = tap_all(
        ApiKind.OPENAI_CHAT_COMPLETIONS, _chat_call_deltas(pieces), ContentSwitches(max_bytes=16)
    )
    (call,) = tap.content.tool_calls
    assert call.input == '{"k": "日本日'  # 7 ASCII bytes + 3 characters of 3 bytes
    assert len(call.input.encode()) <= 16


def test_huge_arguments_keep_only_the_limit_and_hold_nothing_between_events() -> None:
    switches = ContentSwitches(max_bytes=1000)
    tap = ContentTap(ApiKind.OPENAI_CHAT_COMPLETIONS, switches)
    for chunk in _chat_call_deltas(["x" * 10_000] * 100):
        tap.feed(chunk)
        assert tap.buffered_bytes == 0
    tap.finish()
    (call,) = tap.content.tool_calls
    assert call.input == "x" * 1000


def test_at_most_max_tool_calls_and_max_thoughts_are_kept() -> None:
    events = [
        {"type": "content_block_start", "index": i, "content_block": block}
        for i, block in enumerate(
            [{"type": "tool_use", "id": f"t{i}", "name": "f", "input": {}} for i in range(200)]
            + [{"type": "thinking", "thinking": f"thought {i}"} for i in range(200)]
        )
    ]
    tap = tap_all(ApiKind.ANTHROPIC_MESSAGES, [sse(*events)])
    assert len(tap.content.tool_calls) == MAX_TOOL_CALLS
    assert tap.content.tool_calls[-1].tool_call_id == f"t{MAX_TOOL_CALLS - 1}"
    assert len(tap.content.thoughts) == MAX_THOUGHTS
    assert "tool calls" in (tap.problem or "")


def test_a_never_ending_line_is_dropped_at_its_cap_and_the_stream_read_on() -> None:
    tap = ContentTap(ApiKind.OPENAI_CHAT_COMPLETIONS, ContentSwitches())
    tap.feed(b'data: {"choices": [{"delta": {"tool_calls": [')
    for _ in range(40):
        tap.feed(b"x" * 64 * 1024)
        assert tap.buffered_bytes <= response_content.MIN_LINE_CAP
    assert "skipped" in (tap.problem or "")
    tap.feed(b"still the same line\n\n")
    for chunk in _chat_call_deltas(['{"a": 1}']):
        tap.feed(chunk)
    tap.finish()
    assert tap.content.tool_calls == (ToolCall("c", "f", '{"a": 1}'),)


def test_a_json_body_over_its_cap_records_nothing_and_says_why() -> None:
    tap = ContentTap(ApiKind.OPENAI_CHAT_COMPLETIONS, ContentSwitches())
    tap.feed(b'{"choices": [{"message": {"content": "')
    for _ in range(40):
        tap.feed(b"x" * 64 * 1024)
    assert tap.buffered_bytes == 0 and "JSON body" in (tap.problem or "")
    tap.finish()
    assert tap.content == ResponseContent()


# --- cost: only events that can carry a call or a thought are parsed ------------------------


def test_text_deltas_are_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real_loads = json.loads

    def counting_loads(data: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(data)
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(response_content.json, "loads", counting_loads)
    plain = FakeContent(tool_call=False, thinking=False)
    for kind, make in (
        (ApiKind.OPENAI_CHAT_COMPLETIONS, fake.chat_completions),
        (ApiKind.OPENAI_RESPONSES, fake.responses),
        (ApiKind.ANTHROPIC_MESSAGES, fake.messages),
    ):
        frames = make({"stream": True}, 1, plain, USAGE)
        tap = tap_all(kind, chunked(b"".join(frames), 40))
        assert tap.content == ResponseContent()
    assert parsed == []


# --- details of each format ------------------------------------------------------------------


def test_anthropic_redacted_thinking_is_a_marker_and_signatures_are_ignored() -> None:
    events = [
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "redacted_thinking", "data": "ENCRYPTED"},
        },
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "thinking", "thinking": ""},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "thinking_delta", "thinking": "hm"},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "signature_delta", "signature": "SIG"},
        },
    ]
    tap = tap_all(ApiKind.ANTHROPIC_MESSAGES, [sse(*events)])
    assert tap.content.thoughts == (REDACTED_THINKING, "hm")
    body = {"content": [{"type": "redacted_thinking", "data": "ENCRYPTED"}]}
    content = content_from_body(
        ApiKind.ANTHROPIC_MESSAGES, ContentSwitches(), json.dumps(body).encode()
    )
    assert content.thoughts == (REDACTED_THINKING,)


def test_an_anthropic_tool_without_input_deltas_records_its_start_input() -> None:
    start = {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}
    events = [{"type": "content_block_start", "index": 0, "content_block": start}]
    tap = tap_all(ApiKind.ANTHROPIC_MESSAGES, [sse(*events)])
    assert tap.content.tool_calls == (ToolCall("toolu_1", "now", "{}"),)


def test_parallel_chat_tool_calls_are_told_apart_by_index() -> None:
    body = b"".join(
        _chat_call_deltas(['{"a":'], 0, "c0")
        + _chat_call_deltas(['{"b":'], 1, "c1")
        + [
            sse(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [
                                    {"index": 0, "function": {"arguments": "1}"}},
                                    {"index": 1, "function": {"arguments": "2}"}},
                                ]
                            },
                        }
                    ]
                }
            )
        ]
    )
    tap = tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, [body])
    assert tap.content.tool_calls == (
        ToolCall("c0", "f", '{"a":1}'),
        ToolCall("c1", "f", '{"b":2}'),
    )


def test_chat_reasoning_is_read_from_reasoning_content_or_reasoning() -> None:
    for name in ("reasoning_content", "reasoning"):
        events = [{"choices": [{"index": 0, "delta": {name: piece}}]} for piece in ("a", "b")]
        assert tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, [sse(*events)]).content.thoughts == ("ab",)


def test_responses_custom_tool_calls_and_reasoning_items_of_a_body() -> None:
    body = {
        "output": [
            {
                "id": "rs_1",
                "type": "reasoning",
                "summary": [
                    {"type": "summary_text", "text": "s1"},
                    {"type": "summary_text", "text": "s2"},
                ],
            },
            {
                "id": "ctc_1",
                "type": "custom_tool_call",
                "call_id": "call_9",
                "name": "apply_patch",
                "input": "*** Begin Patch",
            },
        ]
    }
    content = content_from_body(
        ApiKind.OPENAI_RESPONSES, ContentSwitches(), json.dumps(body).encode()
    )
    assert content == ResponseContent(
        (ToolCall("call_9", "apply_patch", "*** Begin Patch"),), ("s1", "s2")
    )


def test_a_truncated_responses_stream_keeps_the_arguments_so_far() -> None:
    body = openai_body(fake.responses, True)
    cut = body.index(b"response.function_call_arguments.done")
    tap = tap_all(ApiKind.OPENAI_RESPONSES, [body[:cut]])
    assert tap.content.tool_calls == (CALL,)  # assembled from the deltas alone


# --- WebSocket -------------------------------------------------------------------------------


def test_responses_over_websocket_read_one_event_per_message() -> None:
    frames = fake.responses({"stream": True}, 1, BOTH, USAGE)
    assert isinstance(frames, list)
    tap = ContentTap(ApiKind.OPENAI_RESPONSES, ContentSwitches())
    for frame in frames:
        tap.feed_message(frame.split(b"data: ", 1)[1])
    tap.finish()
    assert tap.content == EXPECTED


def test_realtime_function_calls_are_read_like_responses_ones() -> None:
    messages = [
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {
                "id": "item_1",
                "type": "function_call",
                "call_id": "call_r",
                "name": "lookup",
                "arguments": "",
            },
        },
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "item_1",
            "output_index": 0,
            "call_id": "call_r",
            "delta": '{"q"',
        },
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "item_1",
            "output_index": 0,
            "call_id": "call_r",
            "delta": ": 1}",
        },
        {"type": "response.audio_transcript.delta", "delta": "hello"},
    ]
    tap = ContentTap(ApiKind.OPENAI_REALTIME, ContentSwitches())
    for message in messages:
        tap.feed_message(json.dumps(message))
    assert tap.content.tool_calls == (ToolCall("call_r", "lookup", '{"q": 1}'),)


def test_gemini_live_tool_calls_and_thoughts() -> None:
    messages = [
        {"serverContent": {"modelTurn": {"parts": [{"text": "plan", "thought": True}]}}},
        {
            "serverContent": {
                "modelTurn": {"parts": [{"text": " more", "thought": True}]},
                "turnComplete": True,
            }
        },
        {
            "toolCall": {
                "functionCalls": [{"id": "fc_1", "name": "turn_on", "args": {"room": "hall"}}]
            }
        },
    ]
    tap = ContentTap(ApiKind.GEMINI_LIVE, ContentSwitches())
    for message in messages:
        tap.feed_message(json.dumps(message).encode())
    assert tap.content == ResponseContent(
        (ToolCall("fc_1", "turn_on", '{"room": "hall"}'),), ("plan more",)
    )


# --- garbage never raises --------------------------------------------------------------------

_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "index",
                    "delta",
                    "choices",
                    "tool_calls",
                    "function",
                    "content_block",
                    "item",
                    "output",
                    "candidates",
                    "content",
                    "parts",
                    "functionCall",
                    "thought",
                    "text",
                    "arguments",
                    "name",
                    "id",
                    "partial_json",
                    "thinking",
                    "reasoning_content",
                    "summary",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(list(ApiKind)),
    events=st.lists(_JSONISH, max_size=6),
    size=st.integers(1, 50),
)
def test_any_json_events_never_raise(kind: ApiKind, events: list[Any], size: int) -> None:
    body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    tap = ContentTap(kind, ContentSwitches(max_bytes=8))
    for piece in chunked(body, size):
        tap.feed(piece)
    for event in events:
        tap.feed_message(json.dumps(event))
    tap.finish()
    for call in tap.content.tool_calls:
        assert len(call.input.encode()) <= 8
    content_from_body(kind, ContentSwitches(), json.dumps(events).encode())


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(list(ApiKind)),
    data=st.binary(max_size=300),
    encoding=st.sampled_from([None, "gzip", "br", "zstd", "deflate"]),
)
def test_any_bytes_never_raise(kind: ApiKind, data: bytes, encoding: str | None) -> None:
    tap = ContentTap(kind, ContentSwitches(), encoding)
    for piece in chunked(data, 13):
        tap.feed(piece)
    tap.feed_message(data)
    tap.finish()
    assert isinstance(tap.content, ResponseContent)


def test_bedrock_event_stream_is_read_after_the_adapter_turned_it_into_anthropic_sse() -> None:
    frames = fake.messages({"stream": True}, 1, BOTH, USAGE)
    assert isinstance(frames, list)
    wire = b"".join(chunk_message(json.loads(f.split(b"data: ", 1)[1])) for f in frames)
    transform = EventStreamToSse()
    tap = ContentTap(ApiKind.ANTHROPIC_MESSAGES, ContentSwitches())
    for piece in [*chunked(wire, 11), b""]:
        tap.feed(transform.feed(piece))
    tap.finish()
    assert tap.content == ResponseContent((ANTHROPIC_CALL,), (fake.THOUGHT,))


def test_a_long_gemini_json_array_is_read_element_by_element_holding_one_at_most() -> None:
    text = {"candidates": [{"content": {"parts": [{"text": "x" * 1000}], "role": "model"}}]}
    elements = [json.dumps(text, indent=2).encode()] * 5000  # 5 MB of text
    elements += [json.dumps(fake.gemini_chunks("m", BOTH, USAGE)[-1], indent=2).encode()]
    body = b"[" + b"\n,\r\n".join(elements) + b"]"
    tap = ContentTap(ApiKind.GEMINI_GENERATE_CONTENT, ContentSwitches())
    for piece in chunked(body, 4096):
        tap.feed(piece)
        assert tap.buffered_bytes < 8192
    tap.finish()
    assert tap.content.tool_calls == (CALL,) and tap.problem is None


def test_a_never_ending_json_array_element_stops_the_read_at_its_cap() -> None:
    tap = ContentTap(ApiKind.GEMINI_GENERATE_CONTENT, ContentSwitches())
    tap.feed(b'[{"candidates": [{"content": {"parts": [{"text": "')
    for _ in range(40):
        tap.feed(b"}" * 64 * 1024)
    assert tap.buffered_bytes == 0 and "element" in (tap.problem or "")


def test_a_chat_custom_tool_call_records_its_input() -> None:
    call = {"id": "call_c", "type": "custom", "custom": {"name": "grep", "input": "TODO src/"}}
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [call]}}]}
    content = content_from_body(
        ApiKind.OPENAI_CHAT_COMPLETIONS, ContentSwitches(), json.dumps(body).encode()
    )
    assert content.tool_calls == (ToolCall("call_c", "grep", "TODO src/"),)


def test_one_character_deltas_cost_memory_near_their_text_not_an_object_each() -> None:
    """A stream of 1-character argument deltas must not keep a Python string per delta: the
    memory held stays within a small multiple of the text recorded."""
    import tracemalloc

    events = [
        'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":N,"id":"cN",'
        '"function":{"name":"f","arguments":""}}]}}]}\n\n'.replace("N", str(n))
        for n in range(32)
    ]
    delta = (
        'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":N,'
        '"function":{"arguments":"a"}}]}}]}\n\n'
    )
    tap = content_tap_for(ApiKind.OPENAI_CHAT_COMPLETIONS, ContentSwitches(max_bytes=2048))
    assert tap is not None
    tracemalloc.start()
    try:
        for event in events:
            tap.feed(event.encode())
        for _ in range(2048):  # one chunk per round: a delta for each call
            tap.feed("".join(delta.replace("N", str(n)) for n in range(32)).encode())
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 3 * 32 * 2048  # 64 KiB of text; a string per delta: about 9 times that
    tap.finish()
    calls = tap.content.tool_calls
    assert len(calls) == 32 and all(call.input == "a" * 2048 for call in calls)


# --- CPU: each byte is looked at a bounded number of times, whatever the chunking -------------


def _parsed_characters(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the characters every JSON parse is given (``json.loads`` parses through
    ``JSONDecoder.raw_decode`` too): one entry per parse."""
    parsed: list[int] = []
    real = json.JSONDecoder.raw_decode

    def counting(self: json.JSONDecoder, text: str, idx: int = 0) -> tuple[Any, int]:
        parsed.append(len(text) - idx)
        return real(self, text, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    return parsed


def _big_gemini_call(size: int) -> dict[str, Any]:
    """A Gemini chunk whose ``functionCall`` args are ``size`` bytes or so of JSON full of
    braces, strings and escapes (what the element scan steps through)."""
    args = {"x": [{}, {"s": 'a "q" \\ }{ b'}] * (size // 30)}
    part = {"functionCall": {"name": "f", "args": args}}
    return {"candidates": [{"content": {"parts": [part], "role": "model"}}]}


@pytest.mark.parametrize("size", [1, 7, 99, 64 * 1024])
def test_a_json_array_element_is_parsed_once_whatever_the_chunking(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    text = {"candidates": [{"content": {"parts": [{"text": "x" * 100}], "role": "model"}}]}
    elements = [json.dumps(text), json.dumps(_big_gemini_call(60_000)), json.dumps(text)]
    body = ("[" + ",\r\n".join(elements) + "]").encode()
    parsed = _parsed_characters(monkeypatch)
    tap = tap_all(ApiKind.GEMINI_GENERATE_CONTENT, chunked(body, size))
    # Each element found once (a failed try on the chunk it starts in at most), the one with
    # a call parsed once more; it used to be parsed again from its start at each "}".
    assert sum(parsed) <= 2 * len(body) + 2 * size
    (call,) = tap.content.tool_calls
    assert call.input.startswith('{"x": [{}, {"s": "a \\"q\\" ') and len(call.input) == 32 * 1024


class _CountingPattern:
    """A compiled pattern that counts the bytes its searches step over."""

    def __init__(self, pattern: Any, counted: list[int]) -> None:
        self.pattern, self.counted = pattern, counted

    def finditer(self, data: bytes, position: int = 0) -> Iterator[Any]:
        last = position
        for token in self.pattern.finditer(data, position):
            self.counted.append(token.end() - last)
            last = token.end()
            yield token
        self.counted.append(len(data) - last)  # searched to the end for one more

    def match(self, data: bytes, position: int = 0) -> Any:
        found = self.pattern.match(data, position)
        self.counted.append(found.end() - position)
        return found


@pytest.mark.parametrize("size", [1, 99])
def test_an_array_element_spanning_chunks_is_scanned_once(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    scanned: list[int] = []
    for name in ("_ARRAY_TOKEN", "_STRING_REST"):
        pattern = getattr(response_content, name)
        monkeypatch.setattr(response_content, name, _CountingPattern(pattern, scanned))
    body = b"[" + json.dumps(_big_gemini_call(30_000)).encode() + b"]"
    tap = tap_all(ApiKind.GEMINI_GENERATE_CONTENT, chunked(body, size))
    assert len(tap.content.tool_calls) == 1
    assert sum(scanned) <= len(body)


@pytest.mark.parametrize("size", [1, 7, 99, 64 * 1024])
def test_sse_events_are_parsed_once_whatever_the_chunking(
    monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    event = _big_gemini_call(60_000)
    body = b"".join(f"data: {json.dumps(e)}\r\n\r\n".encode() for e in (event, event))
    parsed = _parsed_characters(monkeypatch)
    tap = tap_all(ApiKind.GEMINI_GENERATE_CONTENT, chunked(body, size))
    assert len(tap.content.tool_calls) == 2
    assert sum(parsed) <= len(body)


_TRICKY_TEXT = st.text(alphabet='"\\{}[],: ae\n\u2028\U0001f600', max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    args=st.lists(st.dictionaries(_TRICKY_TEXT, _TRICKY_TEXT, max_size=3), min_size=1, max_size=4),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 2]),
    size=st.integers(1, 40),
)
def test_array_elements_with_any_strings_are_found_whatever_the_chunking(
    args: list[dict[str, str]], ascii_only: bool, indent: int | None, size: int
) -> None:
    """Braces, quotes and backslashes inside strings, escaped or not, cut anywhere."""
    parts = [{"functionCall": {"name": f"f{n}", "args": a}} for n, a in enumerate(args)]
    elements = [{"candidates": [{"content": {"parts": [part]}}]} for part in parts]
    text = ",\r\n".join(json.dumps(e, ensure_ascii=ascii_only, indent=indent) for e in elements)
    tap = tap_all(ApiKind.GEMINI_GENERATE_CONTENT, chunked(f"[{text}]".encode(), size))
    expected = [
        ToolCall(None, f"f{n}", json.dumps(a, ensure_ascii=False)) for n, a in enumerate(args)
    ]
    assert list(tap.content.tool_calls) == expected and tap.problem is None


# --- memory: what is kept is cut when it is kept ----------------------------------------------


def _held_after(feed: Callable[[], None]) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        feed()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held


def _big_start_events(kind: ApiKind, n: int) -> list[dict[str, Any]]:
    """``n`` events that each start a tool call (or a thought) with ~100 KB in it."""
    big = "y" * 100_000
    if kind == ApiKind.GEMINI_GENERATE_CONTENT:
        part = {"functionCall": {"name": "f", "args": {"s": big}}}
        return [{"candidates": [{"content": {"parts": [part]}}]}] * n
    if kind == ApiKind.ANTHROPIC_MESSAGES:
        block = {"type": "tool_use", "id": "t", "name": "f", "input": {"s": big}}
        return [{"type": "content_block_start", "index": i, "content_block": block}
                for i in range(n)]  # fmt: skip
    # A reasoning summary's index: a handle, kept as long as its thought.
    name = "response.reasoning_summary_text.delta"
    return [{"type": name, "item_id": "rs", "summary_index": f"{i}{big}", "delta": "t"}
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    [ApiKind.GEMINI_GENERATE_CONTENT, ApiKind.ANTHROPIC_MESSAGES, ApiKind.OPENAI_RESPONSES],
)
def test_huge_call_starts_and_handles_are_cut_when_kept(kind: ApiKind) -> None:
    events = [sse(event) for event in _big_start_events(kind, 40)]
    tap = ContentTap(kind, ContentSwitches(max_bytes=1024))

    def feed() -> None:
        for event in events:
            tap.feed(event)

    held = _held_after(feed)
    assert held < 40 * 4 * 1024  # it kept 40 x 100 KB: what it records is 40 x 1 KB
    tap.finish()
    content = tap.content
    assert len(content.tool_calls) + len(content.thoughts) == 40
    assert all(len(call.input) == 1024 for call in content.tool_calls)


@pytest.mark.parametrize(
    ("kind", "start", "piece"),
    [
        (ApiKind.OPENAI_CHAT_COMPLETIONS, b'data: {"choices": [{"delta": {"tool_calls": [', b"x"),
        (ApiKind.OPENAI_CHAT_COMPLETIONS, b'{"choices": [{"message": {"content": "', b"x"),
        (ApiKind.GEMINI_GENERATE_CONTENT, b'[{"candidates": [{"content": {"parts": [', b"{"),
        (ApiKind.OPENAI_CHAT_COMPLETIONS, b"data: [\n", b"data:1,\n"),  # an event of many lines
    ],
    ids=["sse line", "json body", "array element", "sse event"],
)
def test_what_is_held_in_tiny_chunks_costs_memory_near_its_length(
    kind: ApiKind, start: bytes, piece: bytes
) -> None:
    tap = ContentTap(kind, ContentSwitches())

    def feed() -> None:
        tap.feed(start)
        for _ in range(100_000):
            tap.feed(piece)

    held = _held_after(feed)
    assert tap.buffered_bytes > 80_000 and tap.problem is None
    assert held < 2 * tap.buffered_bytes  # not an object per chunk (or per line)


# --- SSE details: multi-line data, CR and CRLF line endings -----------------------------------


def test_an_event_whose_data_spans_lines_is_read_joined() -> None:
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}}
    event = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}
    text = json.dumps(event, indent=1)  # a line break between tokens only
    body = ("".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()
    expected = (ToolCall("c", "f", '{"a": 1}'),)
    for size in (1, 7, len(body)):
        tap = tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, chunked(body, size))
        assert tap.content.tool_calls == expected
        assert tap.buffered_bytes == 0


def test_events_not_parted_by_a_blank_line_are_read_one_line_each() -> None:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n" for e in _chat_events())
    tap = tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, [body])
    assert tap.content.tool_calls == (ToolCall("c", "f", '{"a": 1}'),)


def _chat_events() -> list[dict[str, Any]]:
    start = {"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}
    more = {"index": 0, "function": {"arguments": '{"a": 1}'}}
    return [{"choices": [{"index": 0, "delta": {"tool_calls": [t]}}]} for t in (start, more)]


@pytest.mark.parametrize("ending", ["\r", "\r\n"])
@pytest.mark.parametrize(
    "case", [c for c in STREAMS if "array" not in c.name], ids=lambda case: case.name
)
def test_cr_and_crlf_line_endings_read_like_lf(case: Case, ending: str) -> None:
    body = case.body().replace(b"\r\n", b"\n").replace(b"\n", ending.encode())
    for split in range(1, len(body)):
        assert tap_all(case.api_kind, [body[:split], body[split:]]).content == case.expected
    assert tap_all(case.api_kind, chunked(body, 1)).content == case.expected


@pytest.mark.parametrize(
    "event",
    [
        b'{"a":1,"b":[1.5,"x"]}',
        b'{"a":"\\ud800"}',  # a lone surrogate escape: orjson refuses it, json reads it
        b'{"a":NaN}',
        b'{"args":{"id":123456789012345678901234567890}}',  # over 64 bits: stays an int
        b'{"a":-18446744073709551617}',
        '{"a":1}'.encode("utf-16"),
        b'\xef\xbb\xbf{"a":1}',
    ],
)
def test_an_event_is_read_to_the_values_json_reads(event: bytes) -> None:
    # repr: the same types too (an int stays an int), and NaN compares equal as text.
    assert repr(response_content._loads(event)) == repr(json.loads(event))


@pytest.mark.parametrize("event", [b"[DONE]", b'{"a":1} x', b'{"a":"\xff"}'])
def test_an_unreadable_event_raises_as_json_does(event: bytes) -> None:
    with pytest.raises(ValueError):
        response_content._loads(event)


def test_a_block_whose_type_is_not_a_string_is_skipped_and_the_stream_read_on() -> None:
    # `{"type": [...]} in frozenset` raised TypeError, which stopped the whole tap.
    body = sse(
        {"type": "content_block_start", "index": 0, "content_block": {"type": ["tool_use"]}},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {}}},
    )  # fmt: skip
    tap = tap_all(ApiKind.ANTHROPIC_MESSAGES, [body])
    assert tap.problem is None
    assert [call.tool_call_id for call in tap.content.tool_calls] == ["toolu_2"]


# --- the per-event fast paths read what a plain json.loads of each event reads --------------


def _events(body: bytes) -> list[bytes]:
    """An SSE body cut after each event's blank line (LF or CRLF)."""
    ending = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    return [event + ending for event in body.split(ending) if event]


@pytest.mark.parametrize(
    "case", [c for c in STREAMS if "array" not in c.name], ids=lambda case: case.name
)
def test_a_stream_fed_one_event_per_chunk_gives_the_same_content(case: Case) -> None:
    pieces = _events(case.body())
    assert len(pieces) > 3
    assert tap_all(case.api_kind, pieces).content == case.expected


def _read_with_json_only(kind: ApiKind, pieces: list[bytes]) -> ContentTap:
    """The tap with every event parsed whole by ``json.loads`` (exact integers), as before
    orjson and the tool-input frames."""
    with (
        mock.patch.object(response_content, "_loads", lambda data, *_: json.loads(data)),
        mock.patch.object(response_content, "_learn_frame", lambda *_: None),
    ):
        return tap_all(kind, pieces)


_INDEX = st.integers() | st.floats(allow_nan=False) | st.text(max_size=3) | st.none()
_ARGUMENTS = st.text(alphabet='"\\{}[],: ae\n\u2028\U0001f600', max_size=12)


@st.composite
def _chat_chunks(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Chat chunks of tool-call deltas, their indexes of any JSON type (a 20-digit integer,
    which orjson reads as a float, among them), beside a number of any size."""
    chunks = []
    for _ in range(draw(st.integers(1, 6))):
        call: dict[str, Any] = {"index": draw(_INDEX), "function": {"arguments": draw(_ARGUMENTS)}}
        if draw(st.booleans()):
            call.update(id=draw(st.text(max_size=4)), type="function")
            call["function"]["name"] = draw(st.text(max_size=4))
        delta = {"tool_calls": [call]}
        if draw(st.booleans()):
            delta["reasoning_content"] = draw(st.text(max_size=4))
        choice = {"index": draw(_INDEX), "delta": delta, "finish_reason": None}
        chunks.append({"id": "c", "created": draw(st.integers()), "choices": [choice]})
    return chunks


@settings(max_examples=200, deadline=None)
@given(chunks=_chat_chunks(), size=st.integers(1, 400))
def test_chat_tool_call_deltas_record_what_json_reads(
    chunks: list[dict[str, Any]], size: int
) -> None:
    body = sse(*chunks)
    expected = _read_with_json_only(ApiKind.OPENAI_CHAT_COMPLETIONS, [body]).content
    for pieces in (_events(body), chunked(body, size), [body]):
        assert tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, pieces).content == expected


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([ApiKind.OPENAI_CHAT_COMPLETIONS, ApiKind.OPENAI_RESPONSES]),
    events=st.lists(_JSONISH, max_size=6),
)
def test_chat_and_responses_events_of_any_shape_record_what_json_reads(
    kind: ApiKind, events: list[Any]
) -> None:
    body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    expected = _read_with_json_only(kind, [body]).content
    assert tap_all(kind, _events(body)).content == expected
    assert tap_all(kind, [body]).content == expected


# --- tool-input pieces read by their call's frame: what a whole parse reads -------------------

_PIECE = st.text(alphabet='"\\{}[],: ae\n\u2028\U0001f600', max_size=10)
# Members that may come before or after the part the handler reads: scalars, strings holding
# what a frame looks for, and (after it) members the handler reads, which must win.
_EXTRA_VALUE = (
    st.none() | st.integers() | st.floats(allow_nan=False) | st.booleans()
    | st.sampled_from(['"arguments":"x"', '"partial_json":"x"', "}]}", "\\"]) | _PIECE
)  # fmt: skip
_EXTRA_KEY = st.sampled_from(["id", "obfuscation", "model", "x", "arguments", "partial_json"])


@st.composite
def _piece_streams(draw: st.DrawFn, kind: ApiKind) -> list[bytes]:
    """Events of argument pieces, mostly alike (same call, same members around, one changing
    member after), sometimes not: another call, a member the handler reads repeated after the
    piece, other spacing; each event one chunk."""
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]))
    head_extra = draw(st.dictionaries(_EXTRA_KEY, _EXTRA_VALUE, max_size=2))
    events = [b"data: " + json.dumps(start).encode() + b"\n\n" for start in _call_starts(kind)]
    for _ in range(draw(st.integers(1, 12))):
        index = draw(st.sampled_from([0, 0, 0, 1, 10**20, "a"]))
        piece = draw(_PIECE)
        if kind is ApiKind.ANTHROPIC_MESSAGES:
            delta = {"type": "input_json_delta", "partial_json": piece}
            event: dict[str, Any] = {"type": "content_block_delta", "index": index}
            event.update(head_extra)
            event["delta"] = delta
            repeated = draw(st.sampled_from(["index", "type", "delta", "other"]))
        else:
            call = {"index": index, "function": {"arguments": piece}}
            choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
            event = {**head_extra, "choices": [choice]}
            repeated = draw(st.sampled_from(["choices", "other"]))
        text = json.dumps(event, separators=separators)[:-1]
        for key, value in draw(st.dictionaries(_EXTRA_KEY, _EXTRA_VALUE, max_size=2)).items():
            text += separators[0] + json.dumps(key) + separators[1] + json.dumps(value)
        if draw(st.integers(0, 9)) == 0:  # now and then, a member the handler reads, again
            text += separators[0] + json.dumps(repeated) + separators[1] + '{"index": 5}'
        events.append(b"data: " + text.encode() + b"}" + b" " * draw(st.integers(0, 1)) + b"\n\n")
    return events


def _call_starts(kind: ApiKind) -> list[dict[str, Any]]:
    """The start of a call (its id and name) for each index ``_piece_streams`` uses."""
    indexes: list[Any] = [0, 1, 10**20, "a"]
    if kind is ApiKind.ANTHROPIC_MESSAGES:
        block = {"type": "tool_use", "name": "f", "input": {}}
        return [
            {"type": "content_block_start", "index": i, "content_block": {**block, "id": f"t{i}"}}
            for i in indexes
        ]
    calls = [
        {"index": i, "id": f"c{i}", "function": {"name": "f", "arguments": ""}} for i in indexes
    ]
    return [{"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]} for call in calls]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    kind=st.sampled_from([ApiKind.OPENAI_CHAT_COMPLETIONS, ApiKind.ANTHROPIC_MESSAGES]),
)
def test_pieces_read_by_their_calls_frame_are_what_a_whole_parse_reads(
    data: st.DataObject, kind: ApiKind
) -> None:
    events = data.draw(_piece_streams(kind))
    expected = _read_with_json_only(kind, events)
    tap = tap_all(kind, events)
    assert tap.content == expected.content
    assert tap.problem == expected.problem
    assert len(tap.content.tool_calls) >= 2  # the calls started: what they record is compared


def test_a_calls_argument_pieces_are_read_without_a_parse_after_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []
    real_loads = response_content._loads

    def counting_loads(data: Any, *args: Any) -> Any:
        parsed.append(bytes(data))
        return real_loads(data, *args)

    monkeypatch.setattr(response_content, "_loads", counting_loads)
    start = {"index": 0, "id": "call_1", "function": {"name": "Bash", "arguments": ""}}
    pieces = ['{"comm', 'and": "ls', ' -la"', ', "n": 1', "}"] * 10
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [start]}}]}] + [
        {
            "id": "chatcmpl-1",
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                    "finish_reason": None,
                }
            ],
            "obfuscation": "x" * (number % 7),
        }
        for number, piece in enumerate(pieces)
    ]
    tap = tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, _events(sse(*events)))
    assert tap.content.tool_calls == (ToolCall("call_1", "Bash", "".join(pieces)),)
    assert len(parsed) == 2  # the call's start, and its first piece, which gives the frame


@pytest.mark.parametrize("over", [0, 1])
def test_an_event_over_the_line_cap_is_skipped_and_said_even_whole_in_one_chunk(over: int) -> None:
    switches = ContentSwitches(max_bytes=1024)
    cap = max(response_content.MIN_LINE_CAP, 4 * switches.max_bytes)
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}
    event = json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    line = b"data: " + event.encode()
    line += b" " * (cap + over - len(line))  # JSON allows the trailing spaces
    tap = tap_all(ApiKind.OPENAI_CHAT_COMPLETIONS, [line + b"\n\n"], switches)
    if over:
        assert tap.content == ResponseContent() and "skipped" in (tap.problem or "")
    else:
        assert len(tap.content.tool_calls) == 1 and tap.problem is None
