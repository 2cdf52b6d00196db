"""Token usage read from responses as they stream: every provider format, awkward chunk
boundaries, compression, bounded memory, and which requests report usage at all.

Fixtures follow the providers' public API references; the ``fake_*`` ones are exactly what the
end-to-end fake upstream sends, so the numbers asserted here are the ones the e2e tests will see.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from typing import Any

import brotli
import pytest

from aibridgeproxyd.model import ApiFormat
from aibridgeproxyd.usage import (
    MAX_VALUE_BYTES,
    TOKEN_TYPES,
    ApiKind,
    Usage,
    api_kind_for,
    usage_from_json,
    usage_tap_for,
)
from tests.fakes import upstream as fake


def sse(data: Any, event: str | None = None, newline: str = "\n") -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}{newline}" if event else ""
    return f"{head}data: {payload}{newline}{newline}".encode()


def tapped(kind: ApiKind, chunks: list[bytes], content_encoding: str | None = None) -> Usage:
    tap = usage_tap_for(kind, content_encoding)
    for chunk in chunks:
        tap.feed(chunk)
    tap.finish()
    assert tap.problem is None
    return tap.usage


# --- fixtures ------------------------------------------------------------------------------------

CHAT = ApiKind.OPENAI_CHAT_COMPLETIONS
RESPONSES = ApiKind.OPENAI_RESPONSES
MESSAGES = ApiKind.ANTHROPIC_MESSAGES
GEMINI = ApiKind.GEMINI_GENERATE_CONTENT

# OpenAI chat completions, stream with stream_options.include_usage: every chunk says
# "usage": null, and one last chunk with empty choices carries the usage.
CHAT_STREAM = b"".join(
    [
        sse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                "usage": None,
            }
        ),
        sse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-2024-08-06",
                # Model output that merely talks about usage must not count.
                "choices": [
                    {"index": 0, "delta": {"content": 'say "usage": {"prompt_tokens": 9}'}}
                ],
                "usage": None,
            }
        ),
        sse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-2024-08-06",
                "choices": [],
                "usage": {
                    "prompt_tokens": 2006,
                    "completion_tokens": 300,
                    "total_tokens": 2306,
                    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 64},
                },
            }
        ),
        sse("[DONE]"),
    ]
)
CHAT_STREAM_USAGE = Usage(86, 300, 1920, None, "gpt-4o-2024-08-06", reasoning_output_tokens=64)

CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
    },
    indent=2,
).encode()

# OpenRouter reports cache writes inside prompt_tokens_details.
OPENROUTER_CHUNK = sse(
    {
        "object": "chat.completion.chunk",
        "model": "anthropic/claude-sonnet-4.5",
        "choices": [],
        "usage": {
            "prompt_tokens": 194,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 100},
            "cost": 0.95,
        },
    }
)

EMBEDDINGS_JSON = json.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
).encode()

# Responses API: response.created has "usage": null; response.completed has the usage. The
# echoed text.format schema has a property called "usage", which is not usage.
_SCHEMA = {"type": "object", "properties": {"usage": {"type": "object", "properties": {}}}}
_RESPONSE: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "status": "in_progress",
    "model": "o4-mini-2025-04-16",
    "output": [],
    "text": {"format": {"type": "json_schema", "name": "s", "schema": _SCHEMA}},
    "usage": None,
}
RESPONSES_STREAM = b"".join(
    [
        sse(
            {"type": "response.created", "sequence_number": 0, "response": _RESPONSE},
            event="response.created",
        ),
        sse(
            {"type": "response.output_text.delta", "sequence_number": 1, "delta": "ok"},
            event="response.output_text.delta",
        ),
        sse(
            {
                "type": "response.completed",
                "sequence_number": 2,
                "response": {
                    **_RESPONSE,
                    "status": "completed",
                    "output": [{"type": "message", "content": [{"type": "output_text"}]}],
                    "usage": {
                        "input_tokens": 328,
                        "input_tokens_details": {"cached_tokens": 128},
                        "output_tokens": 52,
                        "output_tokens_details": {"reasoning_tokens": 40},
                        "total_tokens": 380,
                    },
                },
            },
            event="response.completed",
        ),
    ]
)
RESPONSES_STREAM_USAGE = Usage(200, 52, 128, None, "o4-mini-2025-04-16", reasoning_output_tokens=40)

# Anthropic Messages: message_start carries input and cache counts, message_delta the
# cumulative output count.
ANTHROPIC_STREAM = b"".join(
    [
        sse(
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5-20250929",
                    "content": [],
                    "usage": {
                        "input_tokens": 25,
                        "cache_creation_input_tokens": 1000,
                        "cache_read_input_tokens": 2000,
                        "output_tokens": 1,
                    },
                },
            },
            event="message_start",
        ),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
            event="content_block_start",
        ),
        sse({"type": "ping"}, event="ping"),
        sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
            event="content_block_delta",
        ),
        sse({"type": "content_block_stop", "index": 0}, event="content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 15},
            },
            event="message_delta",
        ),
        sse({"type": "message_stop"}, event="message_stop"),
    ]
)
ANTHROPIC_STREAM_USAGE = Usage(25, 15, 2000, 1000, "claude-sonnet-4-5-20250929")

# Newer API versions repeat cumulative input and cache counts in message_delta (e.g. after
# server tool use); those win over message_start's.
ANTHROPIC_CUMULATIVE_DELTA = ANTHROPIC_STREAM.replace(
    b'"usage": {"output_tokens": 15}',
    b'"usage": {"input_tokens": 40, "cache_creation_input_tokens": 1000, '
    b'"cache_read_input_tokens": 2500, "output_tokens": 90, '
    b'"server_tool_use": {"web_search_requests": 1}}',
)

ANTHROPIC_JSON = json.dumps(
    {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 2095,
            "output_tokens": 503,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        },
    }
).encode()

# Bedrock InvokeModelWithResponseStream after conversion: Anthropic SSE, and Bedrock's
# invocation metrics on the last event.
BEDROCK_METRICS = {
    "inputTokenCount": 25,
    "outputTokenCount": 15,
    "invocationLatency": 812,
    "firstByteLatency": 301,
    "cacheReadInputTokenCount": 2000,
    "cacheWriteInputTokenCount": 1000,
}
BEDROCK_STREAM = ANTHROPIC_STREAM.replace(
    b'{"type": "message_stop"}',
    b'{"type": "message_stop", "amazon-bedrock-invocationMetrics": '
    + json.dumps(BEDROCK_METRICS).encode()
    + b"}",
)

# Gemini streamGenerateContent?alt=sse: CRLF framing, usageMetadata on every chunk, final
# counts on the last. Thinking tokens are output; cached content is part of the prompt count.
_GEMINI_CHUNK = {
    "candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}, "index": 0}],
    "usageMetadata": {"promptTokenCount": 1200, "totalTokenCount": 1200},
    "modelVersion": "gemini-2.5-flash",
    "responseId": "abc",
}
_GEMINI_LAST = {
    "candidates": [
        {"content": {"parts": [{"text": "lo"}], "role": "model"}, "finishReason": "STOP"}
    ],
    "usageMetadata": {
        "promptTokenCount": 1200,
        "candidatesTokenCount": 30,
        "totalTokenCount": 1480,
        "cachedContentTokenCount": 1024,
        "thoughtsTokenCount": 200,
        "toolUsePromptTokenCount": 50,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1024}],
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "abc",
}
GEMINI_SSE = sse(_GEMINI_CHUNK, newline="\r\n") + sse(_GEMINI_LAST, newline="\r\n")
GEMINI_USAGE = Usage(226, 230, 1024, None, "gemini-2.5-flash", reasoning_output_tokens=200)
# streamGenerateContent without alt=sse: one pretty-printed JSON array, element by element.
GEMINI_ARRAY = (
    b"[" + json.dumps(_GEMINI_CHUNK, indent=2).encode() + b"\n,\r\n"
    b"" + json.dumps(_GEMINI_LAST, indent=2).encode() + b"]"
)


def fake_frames(handler: Any, payload: dict[str, Any], events: int = 3) -> bytes:
    return b"".join(handler(payload, events, 1))


def fake_openai_usage(output_tokens: int) -> Usage:
    """What the fake upstream reports for OpenAI-format responses: cached tokens inside the
    prompt total, which the tap moves apart."""
    prompt = fake.INPUT_TOKENS - fake.CACHED_INPUT_TOKENS
    return Usage(
        prompt,
        output_tokens,
        fake.CACHED_INPUT_TOKENS,
        None,
        "gpt-4o-mini",
        reasoning_output_tokens=0,
    )


_STREAM_WITH_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
FAKE_CASES = [
    pytest.param(
        CHAT,
        fake_frames(fake.chat_completions, {"model": "gpt-4o-mini", **_STREAM_WITH_USAGE}),
        fake_openai_usage(3),
        id="fake-chat-stream",
    ),
    pytest.param(
        CHAT,
        json.dumps(fake.chat_completions({"model": "gpt-4o-mini"}, 5, 1)).encode(),
        fake_openai_usage(5),
        id="fake-chat-json",
    ),
    pytest.param(
        RESPONSES,
        fake_frames(fake.responses, {"model": "gpt-4o-mini", "stream": True}),
        fake_openai_usage(3),
        id="fake-responses-stream",
    ),
    pytest.param(
        MESSAGES,
        fake_frames(fake.messages, {"model": "claude-sonnet-4-5", "stream": True}),
        # Anthropic's input_tokens already exclude cache reads and writes.
        Usage(
            fake.INPUT_TOKENS,
            3,
            fake.CACHED_INPUT_TOKENS,
            fake.CACHE_CREATION_INPUT_TOKENS,
            "claude-sonnet-4-5",
        ),
        id="fake-messages-stream",
    ),
    pytest.param(
        ApiKind.OPENAI_EMBEDDINGS,
        json.dumps(
            fake.embeddings({"model": "text-embedding-3-small", "input": "x"}, 0, 1)
        ).encode(),
        Usage(fake.INPUT_TOKENS, None, None, None, "text-embedding-3-small"),
        id="fake-embeddings",
    ),
]

CASES = [
    pytest.param(CHAT, CHAT_STREAM, CHAT_STREAM_USAGE, id="chat-stream-include-usage"),
    pytest.param(CHAT, CHAT_JSON, Usage(19, 10, None, None, "gpt-4o-mini"), id="chat-json"),
    pytest.param(
        CHAT,
        OPENROUTER_CHUNK,
        Usage(90, 2, 4, 100, "anthropic/claude-sonnet-4.5"),
        id="openrouter-cache-writes",
    ),
    pytest.param(
        ApiKind.OPENAI_EMBEDDINGS,
        EMBEDDINGS_JSON,
        Usage(8, None, None, None, "text-embedding-3-small"),
        id="embeddings",
    ),
    pytest.param(RESPONSES, RESPONSES_STREAM, RESPONSES_STREAM_USAGE, id="responses-stream"),
    pytest.param(MESSAGES, ANTHROPIC_STREAM, ANTHROPIC_STREAM_USAGE, id="anthropic-stream"),
    pytest.param(
        MESSAGES,
        ANTHROPIC_CUMULATIVE_DELTA,
        Usage(40, 90, 2500, 1000, "claude-sonnet-4-5-20250929"),
        id="anthropic-cumulative-message-delta",
    ),
    pytest.param(
        MESSAGES, ANTHROPIC_JSON, Usage(2095, 503, 0, 0, "claude-haiku-4-5"), id="anthropic-json"
    ),
    pytest.param(MESSAGES, BEDROCK_STREAM, ANTHROPIC_STREAM_USAGE, id="bedrock-converted-stream"),
    pytest.param(GEMINI, GEMINI_SSE, GEMINI_USAGE, id="gemini-sse"),
    pytest.param(GEMINI, GEMINI_ARRAY, GEMINI_USAGE, id="gemini-json-array-stream"),
    pytest.param(
        GEMINI, json.dumps(_GEMINI_LAST).encode(), GEMINI_USAGE, id="gemini-generate-content"
    ),
    *FAKE_CASES,
]


# --- exact counts, whatever the chunking ---------------------------------------------------------


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_usage_from_a_whole_body(kind: ApiKind, body: bytes, expected: Usage) -> None:
    assert usage_from_json(kind, body) == expected


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_usage_is_exact_at_every_split_point(kind: ApiKind, body: bytes, expected: Usage) -> None:
    for split in range(len(body) + 1):
        assert tapped(kind, [body[:split], body[split:]]) == expected, f"split at {split}"


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_usage_is_exact_at_every_split_point_between_large_chunks(
    kind: ApiKind, body: bytes, expected: Usage
) -> None:
    # Large chunks are scanned in place rather than joined to the previous one's tail: the
    # split still falls at every byte of the body, keys included.
    padding = b"\n" * 5000
    stream = padding + body + padding
    for split in range(len(padding), len(padding) + len(body) + 1):
        assert tapped(kind, [stream[:split], stream[split:]]) == expected, f"split at {split}"


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_usage_is_exact_fed_one_byte_at_a_time(kind: ApiKind, body: bytes, expected: Usage) -> None:
    assert tapped(kind, [body[i : i + 1] for i in range(len(body))]) == expected


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_usage_is_exact_with_random_three_way_splits(
    kind: ApiKind, body: bytes, expected: Usage
) -> None:
    rng = random.Random(len(body))
    for _ in range(200):
        a, b = sorted(rng.randrange(len(body) + 1) for _ in range(2))
        assert tapped(kind, [body[:a], body[a:b], body[b:]]) == expected, (a, b)


@pytest.mark.parametrize(("kind", "body", "expected"), CASES)
def test_any_chunking_of_a_long_stream_reads_like_the_whole_body(
    kind: ApiKind, body: bytes, expected: Usage
) -> None:
    # Many usage keys, at every offset relative to the chunk edges.
    stream = body * 20
    whole = usage_from_json(kind, stream)
    rng = random.Random(len(stream))
    for _ in range(20):
        chunks, offset = [], 0
        while offset < len(stream):
            size = rng.choice((1, 2, 3, 5, 8, 13, 33, 34, 35, 100, 1000))
            chunks.append(stream[offset : offset + size])
            offset += size
        assert tapped(kind, chunks) == whole


# --- provider rules ------------------------------------------------------------------------------


def test_chat_stream_without_include_usage_reports_no_tokens_but_the_model() -> None:
    frames = fake_frames(fake.chat_completions, {"model": "gpt-4o", "stream": True})
    usage = tapped(CHAT, [frames])
    assert usage == Usage(model="gpt-4o")
    assert not usage.reported
    assert usage.tokens_by_type() == {}


def test_anthropic_stream_cut_after_message_start_keeps_the_input_counts() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: content_block_delta")]
    assert tapped(MESSAGES, [cut]) == Usage(25, 1, 2000, 1000, "claude-sonnet-4-5-20250929")


def test_bedrock_invocation_metrics_fill_only_what_anthropic_usage_left_out() -> None:
    metrics_only = sse(
        {
            "type": "message_stop",
            "amazon-bedrock-invocationMetrics": BEDROCK_METRICS,
        },
        event="message_stop",
    )
    assert tapped(MESSAGES, [metrics_only]) == Usage(25, 15, 2000, 1000)
    # With message_delta already reporting 15 output tokens, a different metrics figure is
    # ignored: the Anthropic events are the primary source.
    disagreeing = BEDROCK_STREAM.replace(b'"outputTokenCount": 15', b'"outputTokenCount": 99')
    assert tapped(MESSAGES, [disagreeing]).output_tokens == 15


def test_gemini_counts_thinking_as_output_and_cached_content_apart_from_input() -> None:
    usage = tapped(GEMINI, [GEMINI_SSE])
    # promptTokenCount 1200 includes 1024 cached; tool-use prompt 50 is extra input.
    assert usage.input_tokens == 1200 - 1024 + 50
    assert usage.cache_read_input_tokens == 1024
    # candidates 30 + thoughts 200.
    assert usage.output_tokens == 230


def test_openai_cached_tokens_are_not_counted_twice() -> None:
    usage = tapped(CHAT, [CHAT_STREAM])
    prompt_total = usage.input_tokens + usage.cache_read_input_tokens  # type: ignore[operator]
    assert prompt_total == 2006


def test_the_first_model_name_is_the_responses_own() -> None:
    # The Responses API lists tools after the model; an image tool names its own model.
    body = json.dumps(
        {
            "model": "gpt-4.1",
            "tools": [{"type": "image_generation", "model": "gpt-image-1"}],
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    ).encode()
    assert usage_from_json(RESPONSES, body).model == "gpt-4.1"


def test_non_ascii_model_name_survives() -> None:
    body = json.dumps({"model": "modèle-ü", "usage": {"prompt_tokens": 1}}, ensure_ascii=False)
    assert usage_from_json(CHAT, body.encode()).model == "modèle-ü"


def test_token_counts_by_type_use_the_counter_labels() -> None:
    # An unreported count (OpenAI names no cache writes) has no entry, not a 0.
    assert CHAT_STREAM_USAGE.tokens_by_type() == {
        "input": 86,
        "output": 300,
        "cache_read": 1920,
        "reasoning_output": 64,
    }
    every_type = Usage(1, 2, 3, 4, reasoning_output_tokens=5)
    assert tuple(every_type.tokens_by_type()) == TOKEN_TYPES


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff" * 100,
        b'"usage": {"prompt_tokens": "eleven"}',
        b'"usage": {"prompt_tokens": -5, "completion_tokens": true}',
        b'"usage": [1, 2, 3]',
        b'"usage": "usage"',
        b'{"usage" "usage": }}}',
        b"data: {not json}\n\n",
    ],
)
def test_garbage_never_raises_and_reports_nothing(garbage: bytes) -> None:
    assert not tapped(CHAT, [garbage]).reported


# --- compression ---------------------------------------------------------------------------------


def _zstd_compress(data: bytes) -> bytes:
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
    return zstd.compress(data)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some servers send
        ("br", brotli.compress),
        ("zstd", _zstd_compress),
        ("identity", lambda data: data),
    ],
)
def test_compressed_streams_are_read_through_their_content_encoding(
    encoding: str, compress: Any
) -> None:
    compressed = compress(ANTHROPIC_STREAM)
    for size in (1, 7, len(compressed)):
        pieces = [compressed[i : i + size] for i in range(0, len(compressed), size)]
        assert tapped(MESSAGES, pieces, content_encoding=encoding) == ANTHROPIC_STREAM_USAGE


def test_unknown_content_encoding_leaves_usage_unknown_without_failing() -> None:
    tap = usage_tap_for(CHAT, "compress")
    tap.feed(CHAT_STREAM)
    tap.finish()
    assert tap.usage == Usage()
    assert tap.problem is not None and "compress" in tap.problem


def test_corrupt_compressed_stream_is_reported_not_raised() -> None:
    tap = usage_tap_for(CHAT, "gzip")
    tap.feed(b"this is not gzip at all")
    tap.feed(CHAT_STREAM)
    tap.finish()
    assert not tap.usage.reported
    assert tap.problem is not None


def test_chunks_after_finish_are_ignored() -> None:
    tap = usage_tap_for(CHAT)
    tap.finish()
    tap.feed(CHAT_STREAM)
    assert tap.usage == Usage()


# --- bounded memory ------------------------------------------------------------------------------


def test_buffer_never_exceeds_one_event_over_a_ten_thousand_event_stream() -> None:
    frames = fake.chat_completions({"model": "gpt-4o-mini", **_STREAM_WITH_USAGE}, 10_000, 1)
    assert isinstance(frames, list)
    largest_event = max(len(frame) for frame in frames)
    stream = b"".join(frames)
    for chunk_size in (1, 97, 4096):
        if chunk_size == 1:
            # One byte at a time over the first and last 200 events is enough to cover every
            # boundary kind; the whole stream byte by byte would only make the test slow.
            head, tail = b"".join(frames[:200]), b"".join(frames[-200:])
            chunks = [bytes([b]) for b in head + tail]
        else:
            chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
        tap = usage_tap_for(CHAT)
        high_water = 0
        for chunk in chunks:
            tap.feed(chunk)
            high_water = max(high_water, tap.buffered_bytes)
        tap.finish()
        assert high_water <= largest_event, (chunk_size, high_water, largest_event)
        assert tap.usage.output_tokens == 10_000
        assert tap.usage.input_tokens == fake.INPUT_TOKENS - fake.CACHED_INPUT_TOKENS


def test_a_large_event_without_usage_is_never_buffered() -> None:
    # A 1 MiB text delta: only a possible partial key (under 40 bytes) is ever kept.
    event = sse({"type": "content_block_delta", "delta": {"text": "x" * (1 << 20)}})
    tap = usage_tap_for(MESSAGES)
    high_water = 0
    for i in range(0, len(event), 16 * 1024):
        tap.feed(event[i : i + 16 * 1024])
        high_water = max(high_water, tap.buffered_bytes)
    assert high_water < 40


def test_a_usage_value_that_never_closes_is_dropped_at_the_size_limit() -> None:
    tap = usage_tap_for(CHAT)
    tap.feed(b'{"usage": {"prompt_tokens": 5, "padding": "')
    for _ in range(2 * MAX_VALUE_BYTES // 1000):
        tap.feed(b"y" * 1000)
        assert tap.buffered_bytes <= MAX_VALUE_BYTES + 1000
    tap.feed(b'"}, "usage": {"prompt_tokens": 7, "completion_tokens": 1}}')
    tap.finish()
    # The oversized object was abandoned; the next one was read normally.
    assert tap.usage == Usage(7, 1)


@pytest.mark.parametrize(
    "unreadable",
    [
        pytest.param(b'{"usage":' * 50_000, id="keys-nested-in-keys"),
        pytest.param(b'{"usage": [' + b"[" * 5000 + b"]" * 5000 + b"]}" * 50, id="too-deep"),
        pytest.param(b'{"usage": x' * 50_000, id="not-json"),
    ],
)
def test_keys_inside_an_unreadable_value_are_skipped_with_it(
    unreadable: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A usage key whose value cannot be read (not JSON, or nested deeper than the parser goes)
    is skipped with every key inside that value: each was read again from its own position,
    a window each, so 450 KB of '{"usage":' took 85 s. The work stays a small multiple of the
    bytes, and a usage after it is still read."""
    import aibridgeproxyd.usage as usage_module

    decoded = 0
    real = usage_module._JSON.raw_decode

    def counting(text: str) -> Any:
        nonlocal decoded
        decoded += len(text)
        return real(text)

    monkeypatch.setattr(
        usage_module, "_JSON", type("J", (), {"raw_decode": staticmethod(counting)})
    )
    body = (
        unreadable
        + b" " * MAX_VALUE_BYTES
        + b'{"usage": {"prompt_tokens": 7, "completion_tokens": 1}}'
    )
    assert usage_from_json(CHAT, body) == Usage(7, 1)
    assert decoded < 3 * len(body)


# --- which requests report usage -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("formats", "path", "kind"),
    [
        (frozenset(ApiFormat), "/v1/messages", MESSAGES),
        (frozenset({ApiFormat.OPENAI}), "/v1/messages", None),
        (frozenset({ApiFormat.ANTHROPIC}), "/v1/chat/completions", None),
        (frozenset({ApiFormat.ANTHROPIC}), "/v1beta/models/m:generateContent", None),
        (frozenset({ApiFormat.GEMINI}), "/v1beta/models/m:generateContent", GEMINI),
        (frozenset({ApiFormat.GEMINI}), "/v1beta/openai/chat/completions", None),
        (frozenset({ApiFormat.OPENAI}), "/v1/chat/completions/", CHAT),
    ],
)
def test_api_kind_recognises_only_the_formats_given(
    formats: frozenset[ApiFormat], path: str, kind: ApiKind | None
) -> None:
    # Each adapter's table of requests is in tests/unit/test_adapters_request_facts.py.
    assert api_kind_for("POST", path, formats) == kind


def test_a_brotli_bomb_in_a_streamed_response_is_decoded_in_bounded_pieces() -> None:
    """256 MiB of zeros compressed to a few hundred bytes: the tap decodes it piece by piece
    (``output_buffer_limit``), never holding the whole expansion at once."""
    import tracemalloc

    import brotli

    bomb = brotli.compress(b"\0" * (256 * 1024 * 1024), quality=5)
    tap = usage_tap_for(ApiKind.OPENAI_CHAT_COMPLETIONS, "br")
    tracemalloc.start()
    try:
        tap.feed(bomb)
        tap.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes"
