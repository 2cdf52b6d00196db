"""Client classification, table-driven, with User-Agent strings seen in public sources.

Where each string comes from is in the ``source`` of the rule it exercises
(``aibridgeproxyd/clients.py``); most are the seed's own test table
(coder/coder ``aibridge/client_test.go``).
"""

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
    RULES,
    UNKNOWN,
    ZED,
    classify_client,
)
from aibridgeproxyd.header_fields import header, header_values

CASES = [
    # Claude Code
    ("claude-cli/2.0.67 (external, cli)", {}, CLAUDE_CODE),
    ("claude-cli/1.0.113 (external, cli)", {"x-app": "cli"}, CLAUDE_CODE),
    ("claude-cli/2.1.2 (external, sdk-cli)", {}, CLAUDE_CODE),
    ("claude-code/1.0.60 (external, cli)", {}, CLAUDE_CODE),
    # Codex: CLI, exec, VS Code extension, and a generic SDK User-Agent with the originator.
    (
        "codex_cli_rs/0.87.0 (Mac OS 26.2.0; arm64) ghostty/1.3.0-main_250877ef",
        {"originator": "codex_cli_rs"},
        CODEX,
    ),
    ("codex_cli_rs/0.38.0 (Ubuntu 24.04.2 LTS; x86_64) WindowsTerminal", {}, CODEX),
    ("codex_exec/0.128.0 (Ubuntu 24.4.0; x86_64) unknown (codex_exec; 0.128.0)", {}, CODEX),
    (
        "codex_vscode/0.128.0-alpha.1 (Windows 10.0.26200; x86_64) unknown (VS Code; 26.429.30905)",
        {"originator": "codex_vscode"},
        CODEX,
    ),
    ("codex-tui/0.130.0 (Mac OS 15.7.3; arm64) ghostty/1.3.1", {"originator": "codex-tui"}, CODEX),
    ("openai-python/2.0", {"originator": "codex_vscode"}, CODEX),
    # Zed
    ("Zed/0.219.4+stable.119.abc123 (macos; aarch64)", {}, ZED),
    ("Zed/0.210.0 (linux; x86_64)", {}, ZED),
    # GitHub Copilot
    (
        "GitHubCopilotChat/0.37.2026011603",
        {"editor-version": "vscode/1.108.2", "copilot-integration-id": "vscode-chat"},
        COPILOT_VSCODE,
    ),
    ("GitHubCopilotChat/0.26.7", {}, COPILOT_VSCODE),
    ("copilot/0.0.403 (client/cli linux v24.11.1)", {}, COPILOT_CLI),
    ("copilot/0.0.363 (linux v22.15.0)", {}, COPILOT_CLI),
    # Kilo Code: its own User-Agent, the originator, or its OpenRouter attribution headers on
    # builds that inherit an OpenCode or AI SDK User-Agent.
    ("kilo-code/5.1.0 (darwin 25.2.0; arm64) node/22.21.1", {}, KILO_CODE),
    (
        "Kilo-Code/4.116.1",
        {"x-title": "Kilo Code", "http-referer": "https://kilocode.ai"},
        KILO_CODE,
    ),
    ("", {"originator": "kilo-code"}, KILO_CODE),
    ("opencode/7.8.3 (darwin 25.0.0; arm64)", {"x-title": "Kilo Code"}, KILO_CODE),
    ("OpenAI/JS 5.0.0", {"x-kilocode-version": "4.116.1"}, KILO_CODE),
    # Coder Agents
    ("coder-agents/v2.24.0 (linux/amd64)", {}, CODER_AGENTS),
    ("coder-agents/v0.0.0-devel (darwin/arm64)", {}, CODER_AGENTS),
    # Mux
    (
        "mux/0.19.0-next.2.gcceff159 ai-sdk/openai/3.0.36 ai-sdk/provider-utils/4.0.15 "
        "runtime/node.js/22",
        {},
        MUX,
    ),
    # Cursor
    ("connect-es/1.6.1", {"x-cursor-client-version": "0.50.0"}, CURSOR),
    ("", {"X-Cursor-Client-Version": "abc123"}, CURSOR),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Cursor/1.7.33 Chrome/138.0.7204.251 Electron/37.7.0 Safari/537.36",
        {},
        CURSOR,
    ),
    # Unknown: generic SDKs, look-alikes, nothing at all.
    ("ccclaude-cli/calude-with-wrong-prefix", {}, UNKNOWN),
    ("not-codex_cli_rs/1.0", {}, UNKNOWN),
    ("https://example.com/codex", {}, UNKNOWN),
    ("openai-python/1.54.0", {}, UNKNOWN),
    ("AsyncOpenAI/Python 1.54.0", {}, UNKNOWN),
    ("Anthropic/Python 0.40.0", {}, UNKNOWN),
    ("curl/8.5.0", {}, UNKNOWN),
    ("python-httpx/0.28.1", {}, UNKNOWN),
    ("google-genai-sdk/1.72.0 gl-go/go1.28", {}, UNKNOWN),
    ("copilot-language-server/1.300.0", {}, UNKNOWN),
    ("Zedd/1.0", {}, UNKNOWN),
    ("node", {"x-title": "cli"}, UNKNOWN),
    ("", {}, UNKNOWN),
    # Headers third-party tools copy to reach the Copilot API do not make them Copilot.
    ("Claw'd/1.0.0", {"copilot-integration-id": "copilot-developer-cli"}, UNKNOWN),
    ("my-agent/1.0", {"editor-plugin-version": "copilot-chat/0.26.7"}, UNKNOWN),
    # An empty or whitespace-only fallback header is not a signal.
    ("OpenAI/JS 5.20.1", {"x-cursor-client-version": "  "}, UNKNOWN),
]


@pytest.mark.parametrize(("user_agent", "extra", "client"), CASES)
def test_client_from_real_user_agents(user_agent: str, extra: dict[str, str], client: str) -> None:
    headers = {"User-Agent": user_agent, **extra} if user_agent else dict(extra)
    assert classify_client(headers) == client


@pytest.mark.parametrize(("user_agent", "extra", "client"), CASES)
def test_mitmproxy_headers_give_the_same_answer(
    user_agent: str, extra: dict[str, str], client: str
) -> None:
    fields = [(b"user-agent", user_agent.encode())] if user_agent else []
    fields += [(name.encode(), value.encode()) for name, value in extra.items()]
    headers = http.Headers(fields)
    before = headers.fields
    assert classify_client(headers) == client
    assert headers.fields == before


def test_every_client_is_reachable_and_every_rule_is_exercised() -> None:
    assert {client for _, _, client in CASES} == set(CLIENTS)
    for rule in RULES:
        assert rule.source, f"rule for {rule.client} on {rule.header} cites no source"
        assert rule.client in CLIENTS
    exercised = set()
    for user_agent, extra, _ in CASES:
        headers = {"user-agent": user_agent, **{k.lower(): v for k, v in extra.items()}}
        for rule in RULES:
            value = headers.get(rule.header, "").strip().lower()
            if rule.matches(value):
                exercised.add(rule)
                break
    assert exercised == set(RULES)


def test_header_names_match_case_insensitively() -> None:
    assert classify_client({"USER-AGENT": "Zed/0.210.0 (macos; aarch64)"}) == ZED
    assert classify_client({"Originator": "Kilo-Code"}) == KILO_CODE


def test_user_agent_wins_over_fallback_headers() -> None:
    headers = {"User-Agent": "claude-cli/2.0.67 (external, cli)", "x-cursor-client-version": "1"}
    assert classify_client(headers) == CLAUDE_CODE


def test_a_huge_user_agent_is_cut_not_scanned_whole() -> None:
    assert classify_client({"User-Agent": "codex_cli_rs/" + "x" * 1_000_000}) == CODEX
    assert classify_client({"User-Agent": "x" * 1_000_000 + " Cursor/1.0"}) == UNKNOWN


def test_mitmproxy_headers_are_read_as_their_items_give_them() -> None:
    """Headers are read by name (``header_values``), not through ``Headers.items()``, which
    looks every header up again: the same values, repeated headers joined, first spelling."""
    fields = [
        (b"Host", b"api.openai.com"),
        (b"X-Title", b"Kilo Code"),
        (b"user-agent", b"python-httpx/0.28.1"),
        (b"User-Agent", b"Zed/0.210.0"),
        (b"x-title", b"other"),
    ]
    headers = http.Headers(fields)
    wanted = {"user-agent", "x-title", "originator"}
    by_items = {}
    for name, value in headers.items():
        if name.lower() in wanted and name.lower() not in by_items:
            by_items[name.lower()] = value
    assert header_values(headers, wanted) == by_items
    assert by_items["user-agent"] == "python-httpx/0.28.1, Zed/0.210.0"
    assert classify_client(headers) == classify_client(dict(headers.items()))


def test_header_reads_like_headers_get_without_raising_for_an_absent_name() -> None:
    headers = http.Headers([(b"Upgrade", b"websocket"), (b"x-a", b"1"), (b"X-A", b"2")])
    for name in ("upgrade", "x-a", "content-encoding"):
        assert header(headers, name) == headers.get(name)
    assert header({"upgrade": "h2c"}, "upgrade") == "h2c"  # a plain mapping
