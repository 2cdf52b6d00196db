"""Client session ids from headers (``clients.SESSION_RULES``), table-driven per client: each
client is read through its own rule only, as Coder's AI Gateway does (coder/coder
``aibridge/client/session_test.go``), and a value is kept only when it is a usable id."""

from __future__ import annotations

import pytest
from mitmproxy import http

from aibridgeproxyd.clients import (
    CLAUDE_CODE,
    CLIENTS,
    CODER_AGENTS,
    CODEX,
    COPILOT_CLI,
    COPILOT_VSCODE,
    CURSOR,
    KILO_CODE,
    MUX,
    SESSION_ID_MAX_CHARS,
    SESSION_RULES,
    UNKNOWN,
    ZED,
    clean_session_id,
    session_id_from_headers,
)

CASES = [
    # (case, client, headers, session id)
    ("claude_code", CLAUDE_CODE, {"X-Claude-Code-Session-Id": "aabb-ccdd"}, "aabb-ccdd"),
    ("claude_code_blank_header", CLAUDE_CODE, {"X-Claude-Code-Session-Id": "   "}, None),
    ("codex_session_id", CODEX, {"session_id": "codex-session-123"}, "codex-session-123"),
    ("codex_session_dash_id", CODEX, {"session-id": "codex-session-456"}, "codex-session-456"),
    (
        "codex_dashed_header_first",
        CODEX,
        {"session_id": "codex-session-old", "session-id": "codex-session-new"},
        "codex-session-new",
    ),
    ("codex_padded", CODEX, {"session_id": "  codex-session-123  "}, "codex-session-123"),
    (
        "copilot_vscode_interaction_not_client_session",
        COPILOT_VSCODE,
        {"X-Client-Session-Id": "vscode-window", "X-Interaction-Id": "interaction-xyz"},
        "interaction-xyz",
    ),
    ("copilot_vscode_only_client_session", COPILOT_VSCODE, {"X-Client-Session-Id": "w"}, None),
    ("copilot_cli", COPILOT_CLI, {"X-Client-Session-Id": "cli-sess-456"}, "cli-sess-456"),
    ("kilo_code", KILO_CODE, {"X-KILOCODE-TASKID": "task-789"}, "task-789"),
    ("kilo_code_mixed_case", KILO_CODE, {"X-KiloCode-TaskId": "task-790"}, "task-790"),
    ("mux", MUX, {"X-Mux-Workspace-Id": "ws-abc-123"}, "ws-abc-123"),
    (
        "coder_agents",
        CODER_AGENTS,
        {"X-Coder-Chat-Id": "a1b2c3d4-e5f6-7890-abcd-ef1234567890"},
        "a1b2c3d4-e5f6-7890-abcd-ef1234567890",
    ),
    # Another client's header means nothing: not that client's session.
    ("zed_with_codex_header", ZED, {"session_id": "zed-session"}, None),
    ("cursor", CURSOR, {"X-Claude-Code-Session-Id": "x"}, None),
    ("unknown_with_claude_header", UNKNOWN, {"X-Claude-Code-Session-Id": "x"}, None),
    ("codex_with_claude_header", CODEX, {"X-Claude-Code-Session-Id": "x"}, None),
    ("no_header", CLAUDE_CODE, {}, None),
    ("too_long", MUX, {"X-Mux-Workspace-Id": "w" * (SESSION_ID_MAX_CHARS + 1)}, None),
    ("longest", MUX, {"X-Mux-Workspace-Id": "w" * SESSION_ID_MAX_CHARS}, "w" * 128),
    ("control_character", MUX, {"X-Mux-Workspace-Id": "ws\x01abc"}, None),
    ("tab_inside", MUX, {"X-Mux-Workspace-Id": "ws\tabc"}, None),
]


@pytest.mark.parametrize(
    ("client", "headers", "session_id"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_client_is_read_through_its_own_header_only(
    client: str, headers: dict[str, str], session_id: str | None
) -> None:
    request = http.Request.make("POST", "https://api.example.com/v1/x", b"", headers)
    assert session_id_from_headers(request.headers, client) == session_id
    # A plain mapping, any case, reads the same.
    assert session_id_from_headers(headers, client) == session_id


def test_every_rule_names_a_known_client_a_lower_case_header_and_its_source() -> None:
    for rule in SESSION_RULES:
        assert rule.client in CLIENTS and rule.client != UNKNOWN
        assert rule.header == rule.header.lower() and rule.source


@pytest.mark.parametrize("value", [None, 7, b"abc", "", " ", "a\nb", "a\x7fb", "x" * 129])
def test_unusable_values_are_no_session_id(value: object) -> None:
    assert clean_session_id(value) is None


def test_a_session_id_with_a_tilde_is_not_recorded() -> None:
    # "~" marks a session id another user used first (<id>~<initiator>): a client sending one
    # could otherwise pre-claim another user's derived session.
    assert clean_session_id("s1~bob") is None
    assert clean_session_id("0199a1b2-c3d4-7e5f") == "0199a1b2-c3d4-7e5f"
