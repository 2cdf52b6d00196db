"""End to end: sessions and threads (CONTRACT 10.1, issue 10 section 3) through the real daemon
with the official SDKs, in request sequences shaped like each client's real traffic:

- Claude Code (``anthropic``, its User-Agent, ``X-Claude-Code-Session-Id``, ``metadata.user_id``):
  turn 1 is answered with a ``tool_use``; turn 2 sends the conversation back with the
  ``tool_result`` for that id, as the SDK parsed it;
- Codex (``openai`` Responses, its User-Agent): a ``function_call`` answered by a
  ``function_call_output`` with its ``call_id``, without and with the ``session_id`` header;
- GitHub Copilot in VS Code (``openai`` chat streamed, ``X-Interaction-Id``): ``tool_calls``
  answered by a ``tool`` message with its ``tool_call_id``.

The upstream is ``FakeUpstream``; ``x-fake-tool-call: 1`` makes it answer with a tool call
(tests.fakes.tool_content). Sessions and threads are read back with ``sessions list``,
``sessions show ID`` and ``interceptions list``; each test waits for its own records (the
writer flushes every 0.5 s), found by the ``x-aibridge-request-id`` response header.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from tests.fakes import tool_content
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess

pytestmark = pytest.mark.usefixtures("clean_upstream")

REQUEST_ID_HEADER = "x-aibridge-request-id"
ASK_TOOL = {tool_content.HEADER_TOOL_CALL: "1"}
CLAUDE_CODE_UA = "claude-cli/2.0.67 (external, cli)"
CODEX_UA = "codex_cli_rs/0.87.0 (Mac OS 26.2.0; arm64) ghostty/1.3.0"
COPILOT_UA = "GitHubCopilotChat/0.37.2026011603"
# What Copilot Chat in VS Code sends on every request (as the public copilot-api proxies copy
# it; X-Interaction-Id and X-Initiator vary per request); clients.py reads only the UA.
COPILOT_HEADERS = {
    "User-Agent": COPILOT_UA,
    "Copilot-Integration-Id": "vscode-chat",
    "Editor-Version": "vscode/1.107.0",
    "Editor-Plugin-Version": "copilot-chat/0.37.2026011603",
}
CLAUDE_MODEL = "claude-sonnet-4-6"
# USD per million tokens, stored with ``prices set`` so the Claude model is priced whatever
# genai-prices knows: input, output, cache read, cache write.
CLAUDE_RATES = (Decimal(3), Decimal(15), Decimal("0.3"), Decimal("3.75"))
REMINDER = "<system-reminder>\n# claudeMd\nUse pytest.\n</system-reminder>"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOL_ANTHROPIC = {"name": tool_content.TOOL_NAME, "input_schema": WEATHER_SCHEMA}
TOOL_RESPONSES = {"type": "function", "name": tool_content.TOOL_NAME, "parameters": WEATHER_SCHEMA}
TOOL_CHAT = {
    "type": "function",
    "function": {"name": tool_content.TOOL_NAME, "parameters": WEATHER_SCHEMA},
}


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        rates = [str(rate) for rate in CLAUDE_RATES]
        options = ("--input", "--output", "--cache-read", "--cache-write")
        flags = [part for pair in zip(options, rates, strict=True) for part in pair]
        d.cli("prices", "set", CLAUDE_MODEL, *flags, check=True)
        d.reload_and_wait()
        yield d


# --- reading back --------------------------------------------------------------------------------


def cli_json(daemon: DaemonProcess, *args: str) -> Any:
    return json.loads(daemon.cli(*args, check=True).stdout)


def records(daemon: DaemonProcess, *request_ids: str) -> list[dict[str, Any]]:
    """The records of ``request_ids``, in that order, once all are stored."""

    def found() -> list[dict[str, Any]] | None:
        by_id = {r["id"]: r for r in cli_json(daemon, "interceptions", "list", "--limit", "1000")}
        return [by_id[i] for i in request_ids] if all(i in by_id for i in request_ids) else None

    return daemon.wait_for(found, message=f"records {request_ids}")


def session(daemon: DaemonProcess, session_id: str) -> dict[str, Any]:
    """``sessions show ID`` (its records are already stored: call ``records`` first)."""
    return dict(cli_json(daemon, "sessions", "show", session_id))


def listed_session(daemon: DaemonProcess, session_id: str) -> dict[str, Any]:
    """The session as ``sessions list --session-id ID`` shows it: the only one listed."""
    listed = cli_json(daemon, "sessions", "list", "--session-id", session_id)
    assert listed["count"] == 1
    (summary,) = listed["sessions"]
    return dict(summary)


def lineage(record: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    return record["session_id"], record["thread_parent_id"], record["thread_root_id"]


TOKEN_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens")


def summed_tokens(*usages: Any) -> dict[str, int]:
    """The SDK's usage objects summed, key by key, over the keys every API here reports."""
    return {key: sum(getattr(usage, key) for usage in usages) for key in TOKEN_KEYS}


def picked(usage: dict[str, Any]) -> dict[str, Any]:
    return {key: usage[key] for key in TOKEN_KEYS}


# --- Claude Code ---------------------------------------------------------------------------------


class ClaudeCode:
    """One Claude Code conversation in session ``session_id``: each call of ``turn`` sends the
    whole conversation, as Claude Code does, and returns ``(request_id, message)``."""

    def __init__(self, daemon: DaemonProcess, token: str, session_id: str, prompt: str) -> None:
        self.client = daemon.anthropic_client(token, default_headers={"User-Agent": CLAUDE_CODE_UA})
        self.session_id = session_id
        self.prompt = prompt
        content = [{"type": "text", "text": REMINDER}, {"type": "text", "text": prompt}]
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": content}]

    def turn(self, **headers: str) -> tuple[str, Any]:
        user_id = json.dumps({"device_id": "45aa15c8", "session_id": self.session_id})
        with self.client.messages.stream(
            model=CLAUDE_MODEL,
            max_tokens=1024,
            system=[{"type": "text", "text": "You are Claude Code."}],
            messages=self.messages,  # type: ignore[arg-type]
            tools=[TOOL_ANTHROPIC],  # type: ignore[list-item]
            metadata={"user_id": user_id},
            extra_headers={"X-Claude-Code-Session-Id": self.session_id, **headers},
        ) as stream:
            message = stream.get_final_message()
            request_id = stream.response.headers[REQUEST_ID_HEADER]
        return request_id, message

    def tool_round(self) -> tuple[tuple[str, str], Any, Any]:
        """Turn 1 answered with a tool_use, turn 2 carrying its tool_result: the two request ids,
        the tool_use block as the SDK parsed it, and the two messages."""
        first_id, first = self.turn(**ASK_TOOL)
        tool_use = next(block for block in first.content if block.type == "tool_use")
        self.messages += [
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "18"}],
            },
        ]
        second_id, second = self.turn()
        return (first_id, second_id), tool_use, (first, second)


def claude_cost_micros(usage: Any) -> int:
    """The cost of one message's usage at ``CLAUDE_RATES`` (Anthropic's input_tokens exclude the
    cache reads and writes)."""
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    )
    usd = sum((Decimal(n) * rate for n, rate in zip(counts, CLAUDE_RATES, strict=True)), Decimal())
    return int(usd.to_integral_value(rounding=ROUND_HALF_UP))  # USD per million tokens → micros


def test_a_claude_code_tool_round_is_one_session_with_one_thread_of_two_interceptions(
    daemon: DaemonProcess, token: str
) -> None:
    session_id = str(uuid.uuid4())
    prompt = "What is the weather in Paris? ✓"
    (first_id, second_id), tool_use, messages = ClaudeCode(
        daemon, token, session_id, prompt
    ).tool_round()
    first, second = records(daemon, first_id, second_id)
    assert lineage(first) == (session_id, None, first_id)
    assert lineage(second) == (session_id, first_id, first_id)
    # Turn 2 carries only a tool result: its prompt is still the typed one.
    assert [r["prompts"] for r in (first, second)] == [[prompt], [prompt]]
    assert {r["client"] for r in (first, second)} == {"Claude Code"}
    call = {
        "tool_call_id": tool_use.id,
        "tool": tool_use.name,
        "input": tool_content.TOOL_ARGUMENTS,
    }
    assert (first["tool_calls"], second["tool_calls"]) == ([call], [])
    assert json.loads(call["input"]) == tool_use.input  # what the SDK received

    summary = listed_session(daemon, session_id)
    shown = session(daemon, session_id)
    usages = [message.usage for message in messages]
    costs = [claude_cost_micros(usage) for usage in usages]
    assert [first["cost_micros"], second["cost_micros"]] == costs
    assert (summary["threads"], len(shown["threads"])) == (1, 1)
    for view in (summary, shown):
        assert (view["id"], view["client"]) == (session_id, "Claude Code")
        assert view["last_prompt"] == prompt
        assert picked(view["token_usage_summary"]) == summed_tokens(*usages)
        assert view["cost_micros"] == sum(costs)
    (thread,) = shown["threads"]
    assert (thread["id"], thread["prompt"]) == (first_id, prompt)
    assert [i["id"] for i in thread["interceptions"]] == [first_id, second_id]
    assert [i["tool_calls"] for i in thread["interceptions"]] == [[call], []]
    assert picked(thread["token_usage"]) == summed_tokens(*usages)


def test_two_conversations_in_one_claude_code_session_are_two_threads(
    daemon: DaemonProcess, token: str
) -> None:
    session_id = str(uuid.uuid4())
    prompts = ("Fix the failing test", "Now write the changelog entry")
    rounds = [ClaudeCode(daemon, token, session_id, p).tool_round()[0] for p in prompts]
    stored = records(daemon, *(i for ids in rounds for i in ids))
    assert [lineage(r) for r in stored] == [
        (session_id, None, rounds[0][0]),
        (session_id, rounds[0][0], rounds[0][0]),
        (session_id, None, rounds[1][0]),
        (session_id, rounds[1][0], rounds[1][0]),
    ]
    assert listed_session(daemon, session_id)["threads"] == 2
    shown = session(daemon, session_id)
    assert shown["last_prompt"] == prompts[1]
    threads = [
        (t["id"], t["prompt"], [i["id"] for i in t["interceptions"]]) for t in shown["threads"]
    ]
    assert threads == [(ids[0], p, list(ids)) for ids, p in zip(rounds, prompts, strict=True)]


def test_interceptions_list_by_session_id_returns_exactly_that_sessions_records(
    daemon: DaemonProcess, token: str
) -> None:
    session_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    ids, _, _ = ClaudeCode(daemon, token, session_id, "Rename the module").tool_round()
    other, _ = ClaudeCode(daemon, token, other_id, "Something else").turn()
    records(daemon, *ids, other)
    listed = cli_json(daemon, "interceptions", "list", "--session-id", session_id)
    assert sorted(r["id"] for r in listed) == sorted(ids)
    assert {r["session_id"] for r in listed} == {session_id}
    (alone,) = cli_json(daemon, "interceptions", "list", "--session-id", other_id)
    assert alone["id"] == other


# --- Codex ---------------------------------------------------------------------------------------


def codex_turn(
    daemon: DaemonProcess, token: str, items: list[dict[str, Any]], **headers: str
) -> tuple[str, Any]:
    """A streamed Responses request as Codex sends it; its request id and final response."""
    client = daemon.openai_client(token, default_headers={"User-Agent": CODEX_UA})
    raw = client.responses.with_raw_response.create(
        model="gpt-5-codex",
        input=items,  # type: ignore[arg-type]
        tools=[TOOL_RESPONSES],  # type: ignore[list-item]
        stream=True,
        extra_headers={"originator": "codex_cli_rs", **headers},
    )
    (completed,) = [e for e in raw.parse() if e.type == "response.completed"]
    return raw.headers[REQUEST_ID_HEADER], completed.response


def codex_tool_round(daemon: DaemonProcess, token: str, **headers: str) -> tuple[str, str]:
    """Turn 1 answered with a function_call, turn 2 sending its function_call_output."""
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "add x"}]},
    ]
    first_id, response = codex_turn(daemon, token, items, **headers, **ASK_TOOL)
    (call,) = [item for item in response.output if item.type == "function_call"]
    items += [
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "ok"},
    ]
    second_id, _ = codex_turn(daemon, token, items, **headers)
    return first_id, second_id


def test_a_codex_tool_round_without_a_session_header_is_a_session_named_by_its_root(
    daemon: DaemonProcess, token: str
) -> None:
    first_id, second_id = codex_tool_round(daemon, token)
    first, second = records(daemon, first_id, second_id)
    assert (first["client"], first["client_session_id"]) == ("Codex", None)
    assert lineage(first) == (first_id, None, first_id)
    assert lineage(second) == (first_id, first_id, first_id)
    assert [r["prompts"] for r in (first, second)] == [["add x"], ["add x"]]
    shown = session(daemon, first_id)
    assert shown["client"] == "Codex"
    (thread,) = shown["threads"]
    assert [i["id"] for i in thread["interceptions"]] == [first_id, second_id]
    assert picked(shown["token_usage_summary"]) == {
        key: first[key] + second[key] for key in TOKEN_KEYS
    }


@pytest.mark.parametrize("header", ["session_id", "session-id"])
def test_a_codex_tool_round_with_its_session_id_header_is_that_session(
    daemon: DaemonProcess, token: str, header: str
) -> None:
    # Older Codex versions send session_id, current ones session-id (aibridgeproxyd.clients).
    session_id = str(uuid.uuid4())
    first_id, second_id = codex_tool_round(daemon, token, **{header: session_id})
    first, second = records(daemon, first_id, second_id)
    assert lineage(first) == (session_id, None, first_id)
    assert lineage(second) == (session_id, first_id, first_id)
    summary = listed_session(daemon, session_id)
    assert (summary["client"], summary["threads"], summary["last_prompt"]) == ("Codex", 1, "add x")


# --- GitHub Copilot in VS Code -------------------------------------------------------------------


def copilot_turn(
    daemon: DaemonProcess, token: str, messages: list[dict[str, Any]], **headers: str
) -> tuple[str, list[Any]]:
    """A streamed chat completion as Copilot Chat sends it; its request id and the tool calls
    the SDK assembled from the deltas, as ``(id, name, arguments)``."""
    client = daemon.openai_client(token, default_headers=COPILOT_HEADERS)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=messages,  # type: ignore[arg-type]
        tools=[TOOL_CHAT],  # type: ignore[list-item]
        stream=True,
        extra_headers=headers,  # type: ignore[arg-type]
    )
    calls: list[list[str]] = []
    for chunk in raw.parse():
        for call in (d for c in chunk.choices for d in c.delta.tool_calls or []):
            if call.id:
                calls.append([call.id, call.function.name or "", ""])  # type: ignore[union-attr]
            calls[-1][2] += (call.function.arguments or "") if call.function else ""
    return raw.headers[REQUEST_ID_HEADER], calls


def test_a_copilot_tool_message_continues_the_thread_of_its_streamed_tool_call(
    daemon: DaemonProcess, token: str
) -> None:
    interaction = str(uuid.uuid4())
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    first_id, calls = copilot_turn(
        daemon,
        token,
        messages,
        **{"X-Interaction-Id": interaction, "X-Initiator": "user", **ASK_TOOL},
    )
    ((call_id, name, arguments),) = calls
    assert (name, arguments) == (tool_content.TOOL_NAME, tool_content.TOOL_ARGUMENTS)
    function = {"name": name, "arguments": arguments}
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "18"},
    ]
    # The tool loop's request: the same interaction, initiated by the agent.
    agent_turn = {"X-Interaction-Id": interaction, "X-Initiator": "agent"}
    second_id, _ = copilot_turn(daemon, token, messages, **agent_turn)
    first, second = records(daemon, first_id, second_id)
    assert {r["client"] for r in (first, second)} == {"GitHub Copilot (VS Code)"}
    assert lineage(first) == (interaction, None, first_id)
    assert lineage(second) == (interaction, first_id, first_id)
    assert first["tool_calls"] == [{"tool_call_id": call_id, "tool": name, "input": arguments}]
    summary = listed_session(daemon, interaction)
    assert (summary["threads"], summary["last_prompt"]) == (1, "Weather in Paris?")


def test_a_tool_result_answering_another_users_call_id_starts_a_thread_of_its_own(
    daemon: DaemonProcess, token: str
) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    alices_id, ((call_id, name, arguments),) = copilot_turn(daemon, token, messages, **ASK_TOOL)
    function = {"name": name, "arguments": arguments}
    messages += [
        {
            "role": "assistant",
            "tool_calls": [{"id": call_id, "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "18"},
    ]
    bobs_id, _ = copilot_turn(daemon, daemon.create_token("bob"), messages)
    alices, bobs = records(daemon, alices_id, bobs_id)
    assert (alices["initiator"], bobs["initiator"]) == ("alice", "bob")
    assert lineage(bobs) == (bobs_id, None, bobs_id)
