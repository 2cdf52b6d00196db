"""End to end, the tool calls and thoughts of a response (CONTRACT 10.1, issue 10 section 2):
through the real daemon with the official SDKs, every tool call's id, name and input (assembled
from streamed argument deltas) and every thought are recorded exactly; ``record_tool_calls:
false`` and ``record_thoughts: false`` record none.

The upstream is ``FakeUpstream``: ``x-fake-tool-call`` / ``x-fake-thinking`` make it answer with a
tool call and thinking in the API's own format (tests.fakes.tool_content): OpenAI chat
(``delta.tool_calls``, ``reasoning_content``), Responses (``function_call`` item, reasoning
summary), Anthropic (``tool_use`` with ``input_json_delta``, ``thinking``).

The record's ``tool_calls`` and ``thoughts`` are read back with ``interceptions list``; the SDK
checks also show that the client gets the tool call untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes import tool_content
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess

pytestmark = pytest.mark.usefixtures("clean_upstream")

REQUEST_ID_HEADER = "x-aibridge-request-id"
ASK = {tool_content.HEADER_TOOL_CALL: "1", tool_content.HEADER_THINKING: "1"}
CALL = (tool_content.TOOL_CALL_ID, tool_content.TOOL_NAME, tool_content.TOOL_ARGUMENTS)
TOOLS_CHAT = [
    {
        "type": "function",
        "function": {
            "name": tool_content.TOOL_NAME,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_ANTHROPIC = {
    "name": tool_content.TOOL_NAME,
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _daemon(upstream: FakeUpstream, **settings: Any) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, **settings}) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        d.reload_and_wait()
        yield d


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    yield from _daemon(upstream)


@pytest.fixture(scope="module")
def daemon_off(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    yield from _daemon(upstream, record_tool_calls=False, record_thoughts=False)


def record_with_id(daemon: DaemonProcess, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        listed = json.loads(daemon.cli("interceptions", "list", check=True).stdout)
        return next((r for r in listed if r["id"] == request_id), None)

    return daemon.wait_for(find, message=f"record {request_id}")


def recorded(daemon: DaemonProcess, request_id: str) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The record's tool calls as ``(id, tool, input)`` and its thoughts' text."""
    record = record_with_id(daemon, request_id)
    calls = [(c["tool_call_id"], c["tool"], c["input"]) for c in record["tool_calls"]]
    return calls, list(record["thoughts"])


def chat_stream(daemon: DaemonProcess, token: str) -> str:
    """A streamed chat completion with tools; checks what the SDK assembled; its request id."""
    client = daemon.openai_client(token)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        tools=TOOLS_CHAT,
        stream=True,
        extra_headers=ASK,  # type: ignore[arg-type]
    )
    arguments, names = "", []
    for chunk in raw.parse():
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                names += [call.function.name] if call.function and call.function.name else []
                arguments += (call.function.arguments or "") if call.function else ""
    assert (names, arguments) == ([tool_content.TOOL_NAME], tool_content.TOOL_ARGUMENTS)
    return raw.headers[REQUEST_ID_HEADER]


def anthropic_stream(daemon: DaemonProcess, token: str) -> tuple[str, str]:
    """A streamed message with thinking and a tool; checks what the SDK assembled; the request
    id and the tool_use block's id."""
    client = daemon.anthropic_client(token)
    with client.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=2048,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[TOOL_ANTHROPIC],  # type: ignore[list-item]
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_headers=ASK,
    ) as stream:
        message = stream.get_final_message()
        request_id = stream.response.headers[REQUEST_ID_HEADER]
    kinds = [block.type for block in message.content]
    assert kinds == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == tool_content.THOUGHT  # type: ignore[union-attr]
    assert message.content[2].input == json.loads(tool_content.TOOL_ARGUMENTS)  # type: ignore[union-attr]
    return request_id, message.content[2].id  # type: ignore[union-attr]


def test_chat_streamed_tool_call_arguments_and_reasoning_are_recorded_exactly(
    daemon: DaemonProcess, token: str
) -> None:
    request_id = chat_stream(daemon, token)
    assert recorded(daemon, request_id) == ([CALL], [tool_content.THOUGHT])


def test_a_buffered_chat_answers_tool_call_is_recorded(daemon: DaemonProcess, token: str) -> None:
    client = daemon.openai_client(token)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        tools=TOOLS_CHAT,
        extra_headers=ASK,  # type: ignore[arg-type]
    )
    (call,) = raw.parse().choices[0].message.tool_calls or []
    assert call.function.arguments == tool_content.TOOL_ARGUMENTS  # type: ignore[union-attr]
    assert recorded(daemon, raw.headers[REQUEST_ID_HEADER]) == ([CALL], [tool_content.THOUGHT])


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "json"])
def test_responses_function_call_and_reasoning_summary_are_recorded(
    daemon: DaemonProcess, token: str, stream: bool
) -> None:
    client = daemon.openai_client(token)
    tools = [{"type": "function", "name": tool_content.TOOL_NAME, "parameters": {"type": "object"}}]
    raw = client.responses.with_raw_response.create(
        model="o4-mini",
        input="Weather in Paris?",
        tools=tools,
        stream=stream,
        extra_headers=ASK,  # type: ignore[arg-type]
    )
    parsed: Any = raw.parse()
    if stream:
        events = list(parsed)
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert "".join(deltas) == tool_content.TOOL_ARGUMENTS
        parsed = events[-1].response
    (call,) = [item for item in parsed.output if item.type == "function_call"]
    assert (call.call_id, call.name, call.arguments) == CALL
    assert recorded(daemon, raw.headers[REQUEST_ID_HEADER]) == ([CALL], [tool_content.THOUGHT])


def test_anthropic_tool_use_from_input_json_deltas_and_thinking_are_recorded(
    daemon: DaemonProcess, token: str
) -> None:
    request_id, tool_use_id = anthropic_stream(daemon, token)
    # Exactly the concatenated partial_json, as the upstream streamed it.
    call = (tool_use_id, tool_content.TOOL_NAME, tool_content.TOOL_ARGUMENTS)
    assert recorded(daemon, request_id) == ([call], [tool_content.THOUGHT])


def test_a_buffered_anthropic_message_records_its_tool_use_input_as_json_text(
    daemon: DaemonProcess, token: str
) -> None:
    client = daemon.anthropic_client(token)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-6",
        max_tokens=2048,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[TOOL_ANTHROPIC],  # type: ignore[list-item]
        extra_headers=ASK,
    )
    message = raw.parse()
    tool_use = message.content[-1]
    assert tool_use.type == "tool_use"
    calls, thoughts = recorded(daemon, raw.headers[REQUEST_ID_HEADER])
    assert [(c[0], c[1], json.loads(c[2])) for c in calls] == [
        (tool_use.id, tool_content.TOOL_NAME, json.loads(tool_content.TOOL_ARGUMENTS))
    ]
    assert thoughts == [tool_content.THOUGHT]


def test_switched_off_tool_calls_and_thoughts_record_none(
    daemon_off: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon_off.create_token("switched-off")
    for request_id in (chat_stream(daemon_off, token), anthropic_stream(daemon_off, token)[0]):
        assert recorded(daemon_off, request_id) == ([], [])
