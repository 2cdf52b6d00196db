"""Fake answers that carry a tool call and the model's thinking, in each API format, streamed and
not: what ``aibridgeproxyd.response_content`` records. Written from the providers' API
references (the same ones that module cites):

- OpenAI chat: ``message.tool_calls`` / streamed ``delta.tool_calls`` (id and name on the first
  delta, ``function.arguments`` pieces after); thinking as ``reasoning_content`` (DeepSeek,
  vLLM), which OpenAI itself never sends;
- OpenAI Responses: a ``reasoning`` item with a summary, then a ``function_call`` item; streamed
  with ``response.reasoning_summary_text.delta`` and ``response.function_call_arguments.delta``;
- Anthropic Messages: a ``thinking`` block (with its ``signature``) and a ``tool_use`` block;
  streamed with ``thinking_delta``, ``signature_delta`` and ``input_json_delta``;
- Gemini: a ``thought: true`` part and a ``functionCall`` part.

A request asks for them with ``x-fake-tool-call: 1`` and/or ``x-fake-thinking: 1``
(``FakeUpstream`` and ``FakeGemini``). The text reply of the ordinary fakes comes after.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

HEADER_TOOL_CALL = "x-fake-tool-call"
HEADER_THINKING = "x-fake-thinking"

TOOL_CALL_ID = "call_fake_weather_1"
TOOL_NAME = "get_weather"
# Streamed in these pieces; their concatenation is the arguments' JSON text.
ARGUMENT_PIECES = ('{"city": "Pa', 'ris", "unit', '": "celsius"}')
TOOL_ARGUMENTS = "".join(ARGUMENT_PIECES)
THOUGHT_PIECES = ("The user asks about Paris. ", "I should call get_weather", " in celsius.")
THOUGHT = "".join(THOUGHT_PIECES)
SIGNATURE = "c2lnbmF0dXJlLW9mLXRoZS10aGlua2luZw=="  # opaque, like Anthropic's
REPLY = "Let me look that up."


@dataclass(frozen=True)
class FakeContent:
    """What a fake answer carries besides text."""

    tool_call: bool = False
    thinking: bool = False

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> FakeContent | None:
        def on(name: str) -> bool:
            return headers.get(name, "").lower() in ("1", "true", "yes")

        content = cls(on(HEADER_TOOL_CALL), on(HEADER_THINKING))
        return content if content.tool_call or content.thinking else None


def _sse(data: Any, event: str | None = None) -> bytes:
    line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
    return ((f"event: {event}\n" if event else "") + line).encode()


# --- OpenAI chat ---------------------------------------------------------------------------------


def chat_completions(
    payload: dict[str, Any], seq: int, content: FakeContent, usage: dict[str, Any]
) -> dict[str, Any] | list[bytes]:
    """A chat.completion (or its chunk stream) with reasoning_content and one tool call."""
    base = {"id": f"chatcmpl-fake-{seq}", "created": int(time.time())}
    base["model"] = payload.get("model", "gpt-4o-mini")
    finish = "tool_calls" if content.tool_call else "stop"
    if not payload.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": REPLY, "refusal": None}
        if content.thinking:
            message["reasoning_content"] = THOUGHT
        if content.tool_call:
            function = {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS}
            message["tool_calls"] = [{"id": TOOL_CALL_ID, "type": "function", "function": function}]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "object": "chat.completion.chunk", "choices": [choice]})

    frames = [chunk({"role": "assistant", "content": ""})]
    if content.thinking:
        frames += [chunk({"reasoning_content": piece}) for piece in THOUGHT_PIECES]
    frames.append(chunk({"content": REPLY}))
    if content.tool_call:
        first = {"name": TOOL_NAME, "arguments": ""}
        call = {"index": 0, "id": TOOL_CALL_ID, "type": "function", "function": first}
        frames.append(chunk({"tool_calls": [call]}))
        frames += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in ARGUMENT_PIECES
        ]
    frames.append(chunk({}, finish))
    if (payload.get("stream_options") or {}).get("include_usage"):
        usage_chunk = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
        frames.append(_sse({**base, **usage_chunk}))
    return [*frames, _sse("[DONE]")]


# --- OpenAI Responses ----------------------------------------------------------------------------


def _responses_items(seq: int, content: FakeContent) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if content.thinking:
        summary = [{"type": "summary_text", "text": THOUGHT}]
        items.append({"id": f"rs_fake_{seq}", "type": "reasoning", "summary": summary})
    text = {"type": "output_text", "text": REPLY, "annotations": []}
    message = {"id": f"msg_fake_{seq}", "type": "message", "status": "completed"}
    items.append({**message, "role": "assistant", "content": [text]})
    if content.tool_call:
        call = {"id": f"fc_fake_{seq}", "type": "function_call", "status": "completed"}
        items.append({**call, "call_id": TOOL_CALL_ID, "name": TOOL_NAME})
        items[-1]["arguments"] = TOOL_ARGUMENTS
    return items


def responses(
    payload: dict[str, Any], seq: int, content: FakeContent, usage: dict[str, Any]
) -> dict[str, Any] | list[bytes]:
    """A response object with a reasoning item and a function_call item, or its event stream."""
    final = {
        "id": f"resp_fake_{seq}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": payload.get("model", "gpt-4o-mini"),
        "output": _responses_items(seq, content),
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }
    if not payload.get("stream"):
        return final
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**final, "status": "in_progress", "output": []}}
    ]
    for index, item in enumerate(final["output"]):
        events += _responses_item_events(index, item)
    events.append({"type": "response.completed", "response": final})
    return [
        _sse({**event, "sequence_number": number}, event=event["type"])
        for number, event in enumerate(events)
    ]


def _responses_item_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    where = {"item_id": item["id"], "output_index": index}
    kind = item["type"]
    start = {**item, "status": "in_progress"}
    if kind == "reasoning":
        start["summary"] = []
        deltas = [
            {"type": "response.reasoning_summary_text.delta", **where, "summary_index": 0}
            | {"delta": piece}
            for piece in THOUGHT_PIECES
        ]
        done = {"type": "response.reasoning_summary_text.done", **where, "summary_index": 0}
        deltas.append(done | {"text": THOUGHT})
    elif kind == "function_call":
        start["arguments"] = ""
        deltas = [
            {"type": "response.function_call_arguments.delta", **where, "delta": piece}
            for piece in ARGUMENT_PIECES
        ]
        done = {"type": "response.function_call_arguments.done", **where}
        deltas.append(done | {"arguments": TOOL_ARGUMENTS})
    else:
        part = item["content"][0]
        start["content"] = []
        deltas = [{"type": "response.output_text.delta", **where, "content_index": 0}]
        deltas[0] |= {"delta": part["text"], "logprobs": []}
    added = {"type": "response.output_item.added", "output_index": index, "item": start}
    return [
        added,
        *deltas,
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


# --- Anthropic Messages --------------------------------------------------------------------------


def _anthropic_blocks(seq: int, content: FakeContent) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if content.thinking:
        blocks.append({"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE})
    blocks.append({"type": "text", "text": REPLY})
    if content.tool_call:
        tool = {"type": "tool_use", "id": f"toolu_fake_{seq}", "name": TOOL_NAME}
        blocks.append({**tool, "input": json.loads(TOOL_ARGUMENTS)})
    return blocks


def anthropic_tool_id(seq: int) -> str:
    """The id of the tool_use block of answer ``seq`` (Anthropic ids start with ``toolu_``)."""
    return f"toolu_fake_{seq}"


def messages(
    payload: dict[str, Any], seq: int, content: FakeContent, usage: dict[str, Any]
) -> dict[str, Any] | list[bytes]:
    """A message with a thinking block and a tool_use block, or its documented event stream."""
    message = {
        "id": f"msg_fake_{seq}",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model", "claude-sonnet-4-5"),
        "content": _anthropic_blocks(seq, content),
        "stop_reason": "tool_use" if content.tool_call else "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    if not payload.get("stream"):
        return message
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        events += _anthropic_block_events(index, block)
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    events.append({"type": "message_delta", "delta": delta, "usage": {"output_tokens": 9}})
    events.append({"type": "message_stop"})
    return [_sse(event, event=event["type"]) for event in events]


def _anthropic_block_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
    def delta(body: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": body}

    kind = block["type"]
    if kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [delta({"type": "thinking_delta", "thinking": piece}) for piece in THOUGHT_PIECES]
        deltas.append(delta({"type": "signature_delta", "signature": SIGNATURE}))
    elif kind == "tool_use":
        start = {**block, "input": {}}
        deltas = [delta({"type": "input_json_delta", "partial_json": p}) for p in ARGUMENT_PIECES]
    else:
        start = {"type": "text", "text": ""}
        deltas = [delta({"type": "text_delta", "text": block["text"]})]
    begin = {"type": "content_block_start", "index": index, "content_block": start}
    return [begin, *deltas, {"type": "content_block_stop", "index": index}]


# --- Gemini --------------------------------------------------------------------------------------


def gemini_chunks(model: str, content: FakeContent, usage: dict[str, Any]) -> list[dict[str, Any]]:
    """GenerateContentResponse chunks of a stream: thought pieces, the text, the function call.
    Joined by ``gemini_body`` into the one response a non-streamed call gets."""
    parts: list[dict[str, Any]] = []
    if content.thinking:
        parts += [{"text": piece, "thought": True} for piece in THOUGHT_PIECES]
    parts.append({"text": REPLY})
    if content.tool_call:
        call = {"id": TOOL_CALL_ID, "name": TOOL_NAME, "args": json.loads(TOOL_ARGUMENTS)}
        parts.append({"functionCall": call, "thoughtSignature": SIGNATURE})
    chunks = []
    for number, part in enumerate(parts):
        candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
        if number == len(parts) - 1:
            candidate["finishReason"] = "STOP"
        chunks.append({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})
    return chunks


def gemini_body(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed answer: every chunk's parts in one candidate, thought pieces joined."""
    parts: list[dict[str, Any]] = []
    for chunk in chunks:
        part = chunk["candidates"][0]["content"]["parts"][0]
        if parts and part.get("thought") and parts[-1].get("thought"):
            parts[-1] = {**parts[-1], "text": parts[-1]["text"] + part["text"]}
        else:
            parts.append(part)
    last = chunks[-1]
    candidate = {**last["candidates"][0], "content": {"parts": parts, "role": "model"}}
    return {**last, "candidates": [candidate]}
