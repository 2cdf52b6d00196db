"""End to end: the request content a record keeps, through the daemon with the official SDKs.
A Claude Code tool-result turn (system reminders, tool_use / tool_result, ``metadata.user_id``,
``X-Claude-Code-Session-Id``) and a Codex Responses turn (context messages, function call and
output, ``session_id`` header) go upstream exactly as sent, are recorded with the client's
prompt and session, and ``record_prompts: false`` records no prompt.

The prompt and ``client_session_id`` are asserted where the store persists them
(``interceptions list``). A store without those fields (before the storage of issue 10, section
6, is merged) skips those assertions, saying so: everything else is still checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess

pytestmark = pytest.mark.usefixtures("clean_upstream")

CLAUDE_CODE_UA = "claude-cli/2.0.67 (external, cli)"
CODEX_UA = "codex_cli_rs/0.87.0 (Mac OS 26.2.0; arm64) ghostty/1.3.0"
HEADER_SESSION = "7d1c0a52-6f0e-4c59-9a43-2b7f3f0c1e11"
BODY_SESSION = "54c1eb09-bc4c-4d2f-98eb-6d2ab2d5e2fe"
CODEX_SESSION = "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
PROMPT = "Fix the failing test in tests/test_x.py ✓"
REMINDER = "<system-reminder>\n# claudeMd\nUse pytest.\n</system-reminder>"
CLAUDE_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [{"type": "text", "text": REMINDER}, {"type": "text", "text": PROMPT}],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "I'll read it."},
            {"type": "tool_use", "id": "toolu_01A", "name": "Read", "input": {"path": "x.py"}},
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "import os"}],
    },
]
USER_ID = json.dumps({"device_id": "45aa15c8", "account_uuid": "", "session_id": BODY_SESSION})


def daemon_with(upstream: FakeUpstream, **config: Any) -> DaemonProcess:
    return DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, **config})


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with daemon_with(upstream) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        d.reload_and_wait()
        yield d


def listed_records(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return list(json.loads(daemon.cli("interceptions", "list", check=True).stdout))


def newest_record(daemon: DaemonProcess, seen: int) -> dict[str, Any]:
    """The newest record once more than ``seen`` are stored: a record of an earlier test may
    still be the newest until the writer's next flush."""

    def found() -> dict[str, Any] | None:
        listed = listed_records(daemon)
        return listed[0] if len(listed) > seen else None

    return daemon.wait_for(found, message="a new record")


def persisted_content(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """The record's prompt (``prompts``: a list, at most one) and client session id as
    ``interceptions list`` shows them."""
    prompts = record["prompts"]
    assert len(prompts) <= 1
    return (prompts[0] if prompts else None), record["client_session_id"]


def claude_code_turn(daemon: DaemonProcess, token: str, **headers: str) -> None:
    client = daemon.anthropic_client(token, default_headers={"User-Agent": CLAUDE_CODE_UA})
    with client.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=64,
        system=[{"type": "text", "text": "You are Claude Code."}],
        messages=CLAUDE_MESSAGES,  # type: ignore[arg-type]
        metadata={"user_id": USER_ID},
        extra_headers=headers,
    ) as stream:
        stream.get_final_message()


def test_a_claude_code_tool_turn_goes_upstream_as_sent_and_records_prompt_and_session(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    seen = len(listed_records(daemon))
    claude_code_turn(daemon, token, **{"X-Claude-Code-Session-Id": HEADER_SESSION})
    (sent,) = upstream.wait_for_requests(1)
    body = sent.json()
    assert (body["messages"], body["metadata"]) == (CLAUDE_MESSAGES, {"user_id": USER_ID})
    assert sent.headers["x-claude-code-session-id"] == HEADER_SESSION
    record = newest_record(daemon, seen)
    assert (record["client"], record["status"], record["error"]) == ("Claude Code", 200, None)
    # The typed prompt (not the reminder, not the tool result); the header's session.
    assert persisted_content(record) == (PROMPT, HEADER_SESSION)


def test_claude_codes_session_comes_from_metadata_user_id_without_the_header(
    daemon: DaemonProcess, token: str
) -> None:
    seen = len(listed_records(daemon))
    claude_code_turn(daemon, token)
    record = newest_record(daemon, seen)
    assert record["client"] == "Claude Code" and record["status"] == 200
    assert persisted_content(record) == (PROMPT, BODY_SESSION)


def test_a_codex_responses_turn_records_its_prompt_and_session_header(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream
) -> None:
    seen = len(listed_records(daemon))
    client = daemon.openai_client(token, default_headers={"User-Agent": CODEX_UA})
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "add x"}]},
        {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": "call_A"},
        {"type": "function_call_output", "call_id": "call_A", "output": "ok"},
    ]
    with client.responses.stream(
        model="gpt-5-codex",
        input=items,  # type: ignore[arg-type]
        extra_headers={"session_id": CODEX_SESSION, "originator": "codex_cli_rs"},
    ) as stream:
        stream.get_final_response()
    (sent,) = upstream.wait_for_requests(1)
    assert sent.json()["input"] == items
    record = newest_record(daemon, seen)
    assert (record["client"], record["path"], record["status"]) == ("Codex", "/v1/responses", 200)
    assert persisted_content(record) == ("add x", CODEX_SESSION)


@pytest.fixture(scope="module")
def no_prompts_daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with daemon_with(upstream, record_prompts=False) as d:
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        d.reload_and_wait()
        yield d


def test_record_prompts_false_records_no_prompt_but_the_session(
    no_prompts_daemon: DaemonProcess,
) -> None:
    seen = len(listed_records(no_prompts_daemon))
    token = no_prompts_daemon.create_token("bob")
    claude_code_turn(no_prompts_daemon, token, **{"X-Claude-Code-Session-Id": HEADER_SESSION})
    record = newest_record(no_prompts_daemon, seen)
    assert (record["client"], record["status"]) == ("Claude Code", 200)
    assert persisted_content(record) == (None, HEADER_SESSION)
