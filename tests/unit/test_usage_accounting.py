"""The token-accounting rule of contract section 10.1, over every API variant the proxy routes:
``input_tokens`` is fresh input only, ``input + cache_read + cache_creation`` is the whole prompt
the provider billed, ``reasoning_output_tokens`` is the reasoning part of the output, and a count
the provider did not report is None, never 0.

One table of answers, each read the ways it reaches the proxy: whole (buffered) and streamed,
plain and compressed (gzip, br, zstd), through the same functions the recording addon calls
(``tap_usage``, ``finished_usage``, ``websocket_usage``). The examples of issue 10 are here with
their exact values. Shapes follow the providers' API references: OpenAI chat completions,
Responses and Realtime; Anthropic Messages (streaming); Gemini ``UsageMetadata`` and Live
``BidiGenerateContentServerMessage``; OpenRouter "Usage Accounting"; LiteLLM's usage object.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import brotli
import pytest
from mitmproxy import http, websocket
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.interception.recording import (
    finished_usage,
    read_api_kind,
    read_request_model,
    sum_usage,
    tap_usage,
    websocket_usage,
)
from aibridgeproxyd.interception.state import (
    ConnectInfo,
    RecordingState,
    RequestContext,
    request_context,
)
from aibridgeproxyd.store import Store
from aibridgeproxyd.usage import ApiKind, Usage, usage_from_json
from tests.unit.test_adapters_common import client_request, routed
from tests.unit.test_interceptions_addon import KEY, Proxy, upstream


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


def _zstd(data: bytes) -> bytes:
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
    return zstd.compress(data)


COMPRESSIONS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda data: data,
    "gzip": gzip.compress,
    "br": brotli.compress,
    "zstd": _zstd,
}


@dataclass(frozen=True)
class Variant:
    """One API variant's answer: ``whole`` as a buffered body, ``stream`` as streamed, either
    None where the API has no such form; ``expected`` what is recorded; ``billed_prompt`` the
    whole prompt the provider billed (input + cache reads + cache writes)."""

    kind: ApiKind
    whole: bytes | None
    stream: bytes | None
    expected: Usage
    billed_prompt: int


# --- OpenAI chat completions and OpenAI-compatible gateways -------------------------------------


def chat_answers(model: str, usage: dict[str, Any]) -> tuple[bytes, bytes]:
    """A chat completion with ``usage``, whole and streamed (``include_usage``: every chunk says
    ``"usage": null``, the last one, with no choices, carries it)."""
    whole = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": usage,
    }
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model}
    stream = b"".join(
        [
            sse({**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}}], "usage": None}),
            sse({**chunk, "choices": [], "usage": usage}),
            sse("[DONE]"),
        ]
    )
    return json.dumps(whole).encode(), stream


def chat(model: str, usage: dict[str, Any], expected: Usage, billed: int) -> Variant:
    whole, stream = chat_answers(model, usage)
    return Variant(ApiKind.OPENAI_CHAT_COMPLETIONS, whole, stream, expected, billed)


# --- Responses ----------------------------------------------------------------------------------


def responses(model: str, usage: dict[str, Any], expected: Usage, billed: int) -> Variant:
    response = {"id": "resp_1", "object": "response", "model": model, "output": []}
    whole = {**response, "status": "completed", "usage": usage}
    stream = b"".join(
        [
            sse(
                {"type": "response.created", "response": {**response, "usage": None}},
                "response.created",
            ),
            sse(
                {"type": "response.output_text.delta", "delta": "ok"}, "response.output_text.delta"
            ),
            sse({"type": "response.completed", "response": whole}, "response.completed"),
        ]
    )
    return Variant(ApiKind.OPENAI_RESPONSES, json.dumps(whole).encode(), stream, expected, billed)


# The example: POST /v1/responses/compact answers one JSON object, never a stream.
COMPACT = {
    "id": "cmp_1",
    "object": "response.compaction",
    "output": [{"type": "compaction", "encrypted_content": "gAAAA"}],
    "usage": {
        "input_tokens": 192000,
        "input_tokens_details": {"cached_tokens": 150000},
        "output_tokens": 2100,
    },
}

# --- Anthropic Messages and Bedrock after conversion --------------------------------------------

ANTHROPIC_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 25,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "output_tokens": 15,
    },
}
_START_USAGE = {**ANTHROPIC_MESSAGE["usage"], "output_tokens": 1}  # type: ignore[dict-item]
ANTHROPIC_STREAM = b"".join(
    [
        sse(
            {
                "type": "message_start",
                "message": {**ANTHROPIC_MESSAGE, "content": [], "usage": _START_USAGE},
            },
            "message_start",
        ),
        sse(
            {"type": "content_block_delta", "index": 0, "delta": {"text": "ok"}},
            "content_block_delta",
        ),
        # message_delta carries the cumulative output count only.
        sse({"type": "message_delta", "usage": {"output_tokens": 15}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
)
# Bedrock's converted stream adds its invocation metrics to the last event.
BEDROCK_STREAM = ANTHROPIC_STREAM.replace(
    b'{"type": "message_stop"}',
    b'{"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 25, '
    b'"outputTokenCount": 15, "cacheReadInputTokenCount": 2000, '
    b'"cacheWriteInputTokenCount": 1000}}',
)
ANTHROPIC_USAGE = Usage(25, 15, 2000, 1000, "claude-sonnet-4-5")

# --- Gemini -------------------------------------------------------------------------------------

GEMINI_FIRST = {
    "candidates": [{"content": {"parts": [{"text": "o"}], "role": "model"}}],
    "usageMetadata": {"promptTokenCount": 1200, "totalTokenCount": 1200},
    "modelVersion": "gemini-2.5-flash",
}
GEMINI_LAST = {
    "candidates": [
        {"content": {"parts": [{"text": "k"}], "role": "model"}, "finishReason": "STOP"}
    ],
    "usageMetadata": {
        "promptTokenCount": 1200,
        "cachedContentTokenCount": 1024,
        "toolUsePromptTokenCount": 50,
        "candidatesTokenCount": 30,
        "thoughtsTokenCount": 200,
        "totalTokenCount": 1480,
    },
    "modelVersion": "gemini-2.5-flash",
}
# Thinking is output, and its reasoning part; the tool-use prompt is fresh input.
GEMINI_USAGE = Usage(226, 230, 1024, None, "gemini-2.5-flash", reasoning_output_tokens=200)


VARIANTS = {
    "openai-chat-cache-read-and-reasoning": chat(
        "gpt-5-2025-08-07",
        {
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 64},
        },
        # OpenAI reports no cache writes: None, not 0.
        Usage(86, 300, 1920, None, "gpt-5-2025-08-07", reasoning_output_tokens=64),
        2006,
    ),
    # The example: an openai-compat provider in front of a LiteLLM-style server, naming
    # the same cache writes twice.
    "openai-compat-gateway-cache-writes": chat(
        "claude-sonnet-4-5",
        {
            "prompt_tokens": 10032,
            "completion_tokens": 12,
            "prompt_tokens_details": {"cache_creation_tokens": 10017},
            "cache_creation_input_tokens": 10017,
        },
        Usage(15, 12, None, 10017, "claude-sonnet-4-5"),
        10032,
    ),
    # LiteLLM's full usage object: reads and writes each under an OpenAI and an Anthropic name.
    "litellm-reads-and-writes-under-both-names": chat(
        "claude-sonnet-4-5",
        {
            "prompt_tokens": 10532,
            "completion_tokens": 12,
            "total_tokens": 10544,
            "prompt_tokens_details": {"cached_tokens": 500, "cache_creation_tokens": 10017},
            "cache_read_input_tokens": 500,
            "cache_creation_input_tokens": 10017,
        },
        Usage(15, 12, 500, 10017, "claude-sonnet-4-5"),
        10532,
    ),
    # OpenRouter "Usage Accounting": cache writes inside prompt_tokens_details.
    "openrouter-cache-writes": chat(
        "anthropic/claude-sonnet-4.5",
        {
            "prompt_tokens": 194,
            "completion_tokens": 2,
            "total_tokens": 196,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost": 0.95,
        },
        Usage(94, 2, 0, 100, "anthropic/claude-sonnet-4.5", reasoning_output_tokens=0),
        194,
    ),
    # An older LiteLLM (BerriAI/litellm#15056): prompt_tokens without the cache writes, which
    # are larger than it; taken as the fresh input.
    "litellm-prompt-without-cache-writes": chat(
        "claude-3-7-sonnet",
        {
            "prompt_tokens": 31,
            "completion_tokens": 467,
            "total_tokens": 498,
            "prompt_tokens_details": {"cached_tokens": 0},
            "cache_creation_input_tokens": 1253,
            "cache_read_input_tokens": 0,
        },
        Usage(31, 467, 0, 1253, "claude-3-7-sonnet"),
        1284,
    ),
    # A Gemini translation reporting reasoning on top of completion_tokens
    # (router-for-me/CLIProxyAPI#5733): total_tokens shows it, output includes it.
    "openai-compat-reasoning-outside-completion": chat(
        "gemini-2.5-flash",
        {
            "prompt_tokens": 21,
            "completion_tokens": 0,
            "total_tokens": 81,
            "completion_tokens_details": {"reasoning_tokens": 60},
        },
        Usage(21, 60, None, None, "gemini-2.5-flash", reasoning_output_tokens=60),
        21,
    ),
    "openai-embeddings": Variant(
        ApiKind.OPENAI_EMBEDDINGS,
        json.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            }
        ).encode(),
        None,
        Usage(8, None, None, None, "text-embedding-3-small"),
        8,
    ),
    "responses-cache-read-and-reasoning": responses(
        "o4-mini-2025-04-16",
        {
            "input_tokens": 328,
            "input_tokens_details": {"cached_tokens": 128},
            "output_tokens": 52,
            "output_tokens_details": {"reasoning_tokens": 40},
            "total_tokens": 380,
        },
        Usage(200, 52, 128, None, "o4-mini-2025-04-16", reasoning_output_tokens=40),
        328,
    ),
    # Responses' cache-write field (OpenRouter, Azure AI Foundry ResponseUsageInputTokensDetails).
    "responses-cache-writes": responses(
        "anthropic/claude-sonnet-4.5",
        {
            "input_tokens": 5000,
            "input_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 3000},
            "output_tokens": 10,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 5010,
        },
        Usage(1000, 10, 1000, 3000, "anthropic/claude-sonnet-4.5", reasoning_output_tokens=0),
        5000,
    ),
    "responses-compact": Variant(
        ApiKind.OPENAI_RESPONSES,
        json.dumps(COMPACT).encode(),
        None,
        Usage(42000, 2100, 150000, None),
        192000,
    ),
    "anthropic-messages": Variant(
        ApiKind.ANTHROPIC_MESSAGES,
        json.dumps(ANTHROPIC_MESSAGE).encode(),
        ANTHROPIC_STREAM,
        ANTHROPIC_USAGE,
        3025,
    ),
    # Bedrock InvokeModel answers the Anthropic message as is; the stream is converted.
    "bedrock-after-conversion": Variant(
        ApiKind.ANTHROPIC_MESSAGES,
        json.dumps(ANTHROPIC_MESSAGE).encode(),
        BEDROCK_STREAM,
        ANTHROPIC_USAGE,
        3025,
    ),
    "gemini-generate-content": Variant(
        ApiKind.GEMINI_GENERATE_CONTENT,
        json.dumps(GEMINI_LAST).encode(),
        sse(GEMINI_FIRST) + sse(GEMINI_LAST),
        GEMINI_USAGE,
        1250,
    ),
    # streamGenerateContent without alt=sse: one JSON array, element by element.
    "gemini-json-array-stream": Variant(
        ApiKind.GEMINI_GENERATE_CONTENT,
        None,
        json.dumps([GEMINI_FIRST, GEMINI_LAST], indent=2).encode(),
        GEMINI_USAGE,
        1250,
    ),
}

WHOLE = [pytest.param(v, id=name) for name, v in VARIANTS.items() if v.whole is not None]
STREAMED = [pytest.param(v, id=name) for name, v in VARIANTS.items() if v.stream is not None]
ENCODINGS = list(COMPRESSIONS)


def buffered_usage(variant: Variant, encoding: str) -> Usage:
    """What the recording addon reads from a buffered 2xx answer (``finished_usage``)."""
    assert variant.whole is not None
    flow = tflow.tflow()
    flow.response = http.Response.make(200, variant.whole, {"content-type": "application/json"})
    if encoding != "identity":
        flow.response.encode(encoding)
        assert flow.response.raw_content != variant.whole
    return finished_usage(flow, RecordingState(api_kind=variant.kind))


def streamed_usage(variant: Variant, encoding: str, chunk_size: int = 7) -> Usage:
    """What the recording addon reads from a streamed 2xx answer: the tap (``tap_usage``) fed
    the bytes as they reach the client, still compressed, in small chunks."""
    assert variant.stream is not None
    body = COMPRESSIONS[encoding](variant.stream)
    headers = {"content-type": "text/event-stream"}
    if encoding != "identity":
        headers["content-encoding"] = encoding
    response = http.Response.make(200, b"", headers)
    response.stream = True
    recording = RecordingState(api_kind=variant.kind)
    tap_usage(response, recording, transformed=False)
    assert response.stream is True  # the taps read chunks once sent, never transform them
    assert recording.chunk_tap is not None
    for start in range(0, len(body), chunk_size):
        recording.chunk_tap(body[start : start + chunk_size])
    flow = tflow.tflow()
    flow.response = response
    usage = finished_usage(flow, recording)
    assert recording.usage_tap is not None and recording.usage_tap.problem is None
    return usage


def billed_prompt(usage: Usage) -> int:
    parts = (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens)
    return sum(part or 0 for part in parts)


# --- the rule over every HTTP variant -----------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("variant", WHOLE)
def test_a_buffered_answer_is_recorded_by_the_rule_compressed_or_not(
    variant: Variant, encoding: str
) -> None:
    usage = buffered_usage(variant, encoding)
    assert usage == variant.expected
    assert billed_prompt(usage) == variant.billed_prompt


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("variant", STREAMED)
def test_a_streamed_answer_is_recorded_by_the_rule_compressed_or_not(
    variant: Variant, encoding: str
) -> None:
    usage = streamed_usage(variant, encoding)
    assert usage == variant.expected
    assert billed_prompt(usage) == variant.billed_prompt


@pytest.mark.parametrize("variant", STREAMED)
def test_a_stream_fed_in_one_piece_reads_like_one_fed_byte_by_byte(variant: Variant) -> None:
    assert streamed_usage(variant, "identity", 1) == streamed_usage(variant, "identity", 1 << 20)


def test_cache_writes_named_twice_by_a_gateway_are_counted_once() -> None:
    usage = VARIANTS["openai-compat-gateway-cache-writes"].expected
    assert (usage.input_tokens, usage.cache_creation_input_tokens, usage.output_tokens) == (
        15,
        10017,
        12,
    )


def test_a_count_the_provider_did_not_report_is_null_not_zero() -> None:
    chat_usage = VARIANTS["openai-chat-cache-read-and-reasoning"].expected
    assert chat_usage.cache_creation_input_tokens is None
    assert "cache_creation" not in chat_usage.tokens_by_type()
    # Anthropic reports no reasoning count; a chat stream without include_usage, nothing.
    assert ANTHROPIC_USAGE.reasoning_output_tokens is None
    no_usage = chat_answers("gpt-4o", {})[1].replace(b'"usage": {}', b'"usage": null')
    assert usage_from_json(ApiKind.OPENAI_CHAT_COMPLETIONS, no_usage) == Usage(model="gpt-4o")


def test_a_count_past_a_trillion_is_not_trusted_and_stays_null() -> None:
    # An upstream reporting 1e20 tokens would make a cost and a row no integer column holds.
    body = json.dumps(
        {"model": "gpt-4o", "usage": {"prompt_tokens": 10**20, "completion_tokens": 7}}
    ).encode()
    usage = usage_from_json(ApiKind.OPENAI_CHAT_COMPLETIONS, body)
    # Without a prompt total to split, chat usage reports nothing rather than half of it.
    assert (usage.input_tokens, usage.output_tokens, usage.reported) == (None, None, False)
    anthropic = usage_from_json(
        ApiKind.ANTHROPIC_MESSAGES,
        b'{"usage": {"input_tokens": 100000000000000000000, "output_tokens": 7}}',
    )
    assert (anthropic.input_tokens, anthropic.output_tokens) == (None, 7)


def test_reasoning_is_recorded_where_reported_and_stays_part_of_the_output() -> None:
    recorded = {
        name: (v.expected.reasoning_output_tokens, v.expected.output_tokens)
        for name, v in VARIANTS.items()
    }
    assert recorded["openai-chat-cache-read-and-reasoning"] == (64, 300)
    assert recorded["responses-cache-read-and-reasoning"] == (40, 52)
    assert recorded["gemini-generate-content"] == (200, 230)
    for reasoning, output in recorded.values():
        assert reasoning is None or (output is not None and reasoning <= output)
    assert GEMINI_USAGE.tokens_by_type()["reasoning_output"] == 200


# --- which requests these answers belong to -----------------------------------------------------


@pytest.mark.parametrize(
    ("provider_type", "path", "kind"),
    [
        # API kinds come from path segments, not from an exact suffix.
        ("openai", "/v1/responses/compact", ApiKind.OPENAI_RESPONSES),
        ("openai", "/v1/responses/compact/", ApiKind.OPENAI_RESPONSES),
        ("openai-compat", "/v1/responses/compact", ApiKind.OPENAI_RESPONSES),
        ("openrouter", "/api/v1/responses/compact", ApiKind.OPENAI_RESPONSES),
        ("azure", "/openai/v1/responses/compact", ApiKind.OPENAI_RESPONSES),
        ("copilot", "/responses/compact", ApiKind.OPENAI_RESPONSES),
        ("openai-compat", "/gateway/v1/chat/completions", ApiKind.OPENAI_CHAT_COMPLETIONS),
        # A deployment named like an API does not make the request that API.
        (
            "azure",
            "/openai/deployments/responses/chat/completions",
            ApiKind.OPENAI_CHAT_COMPLETIONS,
        ),
        ("anthropic", "/api/anthropic/v1/messages", ApiKind.ANTHROPIC_MESSAGES),
        # Operations on an object already answered (and counted), and token counting: no usage.
        ("openai", "/v1/responses/resp_68ab12cd/cancel", None),
        ("openai", "/v1/chat/completions/chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", None),
        ("openai", "/v1/responses/input_tokens", None),
        ("anthropic", "/v1/messages/count_tokens", None),
        ("anthropic", "/v1/messages/batches", None),
    ],
)
def test_the_api_kind_follows_the_path_segments(
    provider_type: str, path: str, kind: ApiKind | None
) -> None:
    assert ADAPTERS[provider_type].api_kind("POST", path) == kind


@pytest.mark.parametrize(
    ("provider_type", "path", "kind"),
    [
        ("openai", "/v1/realtime?model=gpt-realtime", ApiKind.OPENAI_REALTIME),
        (
            "azure",
            "/openai/realtime?api-version=2025-04-01-preview&deployment=rt",
            ApiKind.OPENAI_REALTIME,
        ),
        ("azure", "/openai/v1/realtime?model=gpt-realtime", ApiKind.OPENAI_REALTIME),
        ("openai", "/v1/realtime?intent=transcription", ApiKind.OPENAI_REALTIME_TRANSCRIPTION),
        ("openai", "/v1/responses", ApiKind.OPENAI_RESPONSES),
        (
            "google",
            "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
            ApiKind.GEMINI_LIVE,
        ),
        ("openai", "/v1/some-other-socket", None),
        ("anthropic", "/v1/realtime", None),
    ],
)
def test_a_websocket_session_speaks_the_api_of_its_upgrade_path(
    provider_type: str, path: str, kind: ApiKind | None
) -> None:
    adapter = ADAPTERS[provider_type]
    assert adapter.api_kind("GET", path, websocket=True) == kind
    assert adapter.api_kind("GET", path) is None  # the same path without an upgrade


# --- WebSocket sessions -------------------------------------------------------------------------

REALTIME_SESSION_CREATED = {
    "type": "session.created",
    "event_id": "event_1",
    "session": {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_1",
        "model": "gpt-realtime-2025-08-28",
        "audio": {"input": {"transcription": {"model": "whisper-1"}}},
    },
}
# The transcription of the user's audio is billed to the transcription model: not the session's.
REALTIME_TRANSCRIPTION = {
    "type": "conversation.item.input_audio_transcription.completed",
    "transcript": "hello",
    "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 3, "total_tokens": 17},
}
# The example.
REALTIME_RESPONSE_DONE = {
    "type": "response.done",
    "event_id": "event_9",
    "response": {
        "object": "realtime.response",
        "id": "resp_1",
        "status": "completed",
        "output": [],
        "usage": {
            "input_tokens": 132,
            "output_tokens": 121,
            "input_token_details": {"cached_tokens": 64},
        },
    },
}
REALTIME_AUDIO_DELTA = {"type": "response.output_audio.delta", "delta": "UklGRiQAAABXQVZF" * 64}

GEMINI_LIVE_SETUP = {
    "setup": {"model": "models/gemini-live-2.5-flash-preview", "generationConfig": {}}
}


def gemini_live_turn(prompt: int, cached: int, response: int, thoughts: int) -> dict[str, Any]:
    return {
        "serverContent": {"turnComplete": True},
        "usageMetadata": {
            "promptTokenCount": prompt,
            "cachedContentTokenCount": cached,
            "responseTokenCount": response,
            "thoughtsTokenCount": thoughts,
            "totalTokenCount": prompt + response + thoughts,
        },
    }


def session_usage(kind: ApiKind, messages: list[tuple[dict[str, Any], bool]]) -> Usage | None:
    total = None
    for message, from_client in messages:
        total = websocket_usage(total, json.dumps(message).encode(), kind, from_client)
    return total


WEBSOCKET_SESSIONS = {
    "openai-realtime": (
        ApiKind.OPENAI_REALTIME,
        [
            (REALTIME_SESSION_CREATED, False),
            ({"type": "session.update", "session": {"instructions": "be brief"}}, True),
            (REALTIME_TRANSCRIPTION, False),
            (REALTIME_AUDIO_DELTA, False),
            (REALTIME_RESPONSE_DONE, False),
        ],
        Usage(68, 121, 64, None, "gpt-realtime-2025-08-28"),
    ),
    # A transcription-only session bills each transcribed item, to the transcription model.
    "openai-realtime-transcription": (
        ApiKind.OPENAI_REALTIME_TRANSCRIPTION,
        [
            (
                {
                    "type": "session.created",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
                    },
                },
                False,
            ),
            (REALTIME_TRANSCRIPTION, False),
            (REALTIME_TRANSCRIPTION, False),
            ({**REALTIME_TRANSCRIPTION, "usage": {"type": "duration", "seconds": 3}}, False),
        ],
        Usage(28, 6, model="gpt-4o-transcribe"),
    ),
    "responses-over-websocket": (
        ApiKind.OPENAI_RESPONSES,
        [
            ({"type": "response.create", "model": "gpt-5-codex", "input": []}, True),
            (
                {"type": "response.created", "response": {"model": "gpt-5-codex", "usage": None}},
                False,
            ),
            (
                {
                    "type": "response.completed",
                    "response": {
                        "model": "gpt-5-codex",
                        "usage": {
                            "input_tokens": 300,
                            "input_tokens_details": {"cached_tokens": 256},
                            "output_tokens": 20,
                            "output_tokens_details": {"reasoning_tokens": 8},
                        },
                    },
                },
                False,
            ),
        ]
        * 2,
        Usage(88, 40, 512, None, "gpt-5-codex", reasoning_output_tokens=16),
    ),
    # usageMetadata is per turn (pydantic/pydantic-ai#7269 probed it), so turns add up.
    "gemini-live": (
        ApiKind.GEMINI_LIVE,
        [
            (GEMINI_LIVE_SETUP, True),
            ({"setupComplete": {}}, False),
            ({"serverContent": {"modelTurn": {"parts": [{"text": "hi"}]}}}, False),
            (gemini_live_turn(143, 0, 19, 5), False),
            ({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "more"}]}]}}, True),
            (gemini_live_turn(181, 128, 24, 0), False),
        ],
        Usage(196, 48, 128, None, "gemini-live-2.5-flash-preview", reasoning_output_tokens=5),
    ),
}


@pytest.mark.parametrize(
    ("kind", "messages", "expected"),
    [pytest.param(*session, id=name) for name, session in WEBSOCKET_SESSIONS.items()],
)
def test_a_websocket_session_sums_its_usage_by_the_rule_of_its_api(
    kind: ApiKind, messages: list[tuple[dict[str, Any], bool]], expected: Usage
) -> None:
    assert session_usage(kind, messages) == expected


def test_realtime_usage_is_not_read_as_responses_usage() -> None:
    """The fault of issue 10: Realtime's ``input_token_details`` read as Responses'
    ``input_tokens_details`` recorded 132 fresh tokens and no cache reads."""
    done = [(REALTIME_RESPONSE_DONE, False)]
    assert session_usage(ApiKind.OPENAI_RESPONSES, done) == Usage(132, 121)
    assert session_usage(ApiKind.OPENAI_REALTIME, done) == Usage(68, 121, 64)


def test_a_session_of_an_unknown_api_records_no_usage() -> None:
    assert session_usage(None, [(REALTIME_RESPONSE_DONE, False)]) is None  # type: ignore[arg-type]


def upgrade_context(provider_type: str, url: str) -> RequestContext:
    """A WebSocket upgrade request's head, read as the recording addon reads it."""
    connect = ConnectInfo(url.split("/")[2], 443, intercept=True, identity="alice")
    adapter = ADAPTERS[provider_type]
    ctx = RequestContext("r-1", connect, routed(provider_type, keys=(KEY,)), adapter)
    request = client_request("GET", url, headers={"upgrade": "websocket", "connection": "Upgrade"})
    request.data.content = None  # the head: no body has arrived
    read_api_kind(ctx, request)
    read_request_model(ctx, request)
    return ctx


def test_a_realtime_upgrade_names_its_api_and_its_model_in_the_url() -> None:
    ctx = upgrade_context("openai", "https://api.openai.com/v1/realtime?model=gpt-realtime")
    assert ctx.recording.api_kind is ApiKind.OPENAI_REALTIME
    assert ctx.recording.request_model == "gpt-realtime"


def test_a_gemini_live_upgrade_takes_its_model_from_the_setup_message() -> None:
    url = (
        "https://generativelanguage.googleapis.com/ws/"
        "google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    )
    ctx = upgrade_context("google", url)
    assert (ctx.recording.api_kind, ctx.recording.request_model) == (ApiKind.GEMINI_LIVE, None)
    _, messages, expected = WEBSOCKET_SESSIONS["gemini-live"]
    assert session_usage(ApiKind.GEMINI_LIVE, messages) == expected


def test_session_sums_keep_reasoning_apart() -> None:
    total = sum_usage(Usage(1, 2, reasoning_output_tokens=1), Usage(1, 3))
    assert total == Usage(2, 5, reasoning_output_tokens=1)


# --- a Realtime session through the recording addon, as the issue reported it --------------------


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    await store.close()
    yield path


async def realtime_record(database: Path, path: str, messages: list[dict[str, Any]]) -> Any:
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow(path, upgrade="websocket", connection="Upgrade")
    flow.request.method, flow.request.content = "GET", b""
    with taddons.context(*proxy.addons):
        proxy.hook("requestheaders", flow)
        proxy.hook("request", flow)
        flow.response = upstream(101, b"")
        flow.websocket = websocket.WebSocketData()
        proxy.hook("responseheaders", flow)
        proxy.hook("response", flow)
        for message in messages:
            content = json.dumps(message).encode()
            flow.websocket.messages.append(websocket.WebSocketMessage(1, False, content))
            proxy.hook("websocket_message", flow)
        proxy.hook("websocket_end", flow)
    ctx = request_context(flow)
    assert ctx is not None
    (record,) = await proxy.records()
    return record, ctx.recording.usage


async def test_a_realtime_session_is_recorded_by_the_rule_with_its_model(database: Path) -> None:
    record, usage = await realtime_record(
        database,
        "/v1/realtime?model=gpt-realtime",
        [REALTIME_SESSION_CREATED, REALTIME_TRANSCRIPTION, REALTIME_RESPONSE_DONE],
    )
    tokens = ("input_tokens", "cache_read_input_tokens", "output_tokens")
    assert [record[name] for name in tokens] == [68, 64, 121]
    assert record["model"] == "gpt-realtime-2025-08-28"  # the session's own, over the URL's
    assert usage.reasoning_output_tokens is None  # Realtime reports none


async def test_a_realtime_session_without_session_created_takes_the_urls_model(
    database: Path,
) -> None:
    record, _ = await realtime_record(
        database, "/v1/realtime?model=gpt-realtime", [REALTIME_RESPONSE_DONE]
    )
    assert (record["model"], record["input_tokens"], record["cache_read_input_tokens"]) == (
        "gpt-realtime",
        68,
        64,
    )
