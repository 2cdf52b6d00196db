"""Which client application sent a request, from its User-Agent and a few related headers.

Best effort, like the seed's ``GuessClient`` (coder/coder ``aibridge/client.go``): not every
client names itself. The answer is always one of ``CLIENTS``, a closed set, so interception
records can be grouped by client without an unbounded set of raw User-Agent strings.

Rules are data (``RULES``), tried in order; the first match wins. User-Agent prefixes come first,
because a client that names itself there is sure of its identity; the other headers are
fallbacks for clients whose User-Agent is a generic SDK one. Each rule cites where its pattern
was seen; ``tests/unit/test_clients.py`` checks every rule against those real strings.

Deliberately not used: ``Copilot-Integration-Id`` and ``Editor-Version`` /
``Editor-Plugin-Version``. Many third-party tools copy the Copilot values to reach the Copilot
API, so those headers would put their traffic under GitHub Copilot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CLAUDE_CODE = "Claude Code"
CODEX = "Codex"
ZED = "Zed"
COPILOT_VSCODE = "GitHub Copilot (VS Code)"
COPILOT_CLI = "GitHub Copilot (CLI)"
KILO_CODE = "Kilo Code"
CODER_AGENTS = "Coder Agents"
MUX = "Mux"
CURSOR = "Cursor"
UNKNOWN = "Unknown"

CLIENTS = (
    CLAUDE_CODE,
    CODEX,
    ZED,
    COPILOT_VSCODE,
    COPILOT_CLI,
    KILO_CODE,
    CODER_AGENTS,
    MUX,
    CURSOR,
    UNKNOWN,
)

# Header values longer than this are cut before matching: a prefix is all a rule needs.
_MAX_VALUE_CHARS = 256


@dataclass(frozen=True)
class ClientRule:
    """``header`` (lower-case) matches when its value, stripped and lower-cased, starts with one of
    ``prefixes``, contains one of ``contains``, equals one of ``equals``, or, with ``present``, is
    merely non-empty."""

    client: str
    header: str
    prefixes: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    equals: tuple[str, ...] = ()
    present: bool = False
    source: str = ""

    def matches(self, value: str) -> bool:
        if not value:
            return False
        return (
            self.present
            or value.startswith(self.prefixes)
            or any(part in value for part in self.contains)
            or value in self.equals
        )


RULES: tuple[ClientRule, ...] = (
    # --- User-Agent prefixes: the client names itself.
    ClientRule(
        MUX,
        "user-agent",
        prefixes=("mux/",),
        source="coder/coder aibridge/client_test.go: 'mux/0.19.0-next.2.gcceff159 "
        "ai-sdk/openai/3.0.36 ai-sdk/provider-utils/4.0.15 runtime/node.js/22'; coder/aibridge#193",
    ),
    ClientRule(
        CLAUDE_CODE,
        "user-agent",
        prefixes=("claude-cli/", "claude-code/"),
        source="coder/aibridge#20 and client_test.go: 'claude-cli/2.0.67 (external, cli)'; SDK "
        "builds say '(external, sdk-cli)' or '(external, sdk-ts)' in the same product token",
    ),
    ClientRule(
        CODEX,
        "user-agent",
        prefixes=("codex_", "codex-", "codex/"),
        source="openai/codex codex-rs default_client.rs get_codex_user_agent: "
        "'{originator}/{version} ({os} {os_version}; {arch}) {terminal}', originator "
        "codex_cli_rs (also codex-tui, codex_vscode, codex_exec, codex_app); client_test.go: "
        "'codex_cli_rs/0.87.0 (Mac OS 26.2.0; arm64) ghostty/1.3.0-main_250877ef'",
    ),
    ClientRule(
        ZED,
        "user-agent",
        prefixes=("zed/",),
        source='zed-industries/zed sets format!("Zed/{} ({}; {})", version, OS, ARCH) on every '
        "request; client_test.go: 'Zed/0.219.4+stable.119.abc123 (macos; aarch64)'",
    ),
    ClientRule(
        COPILOT_VSCODE,
        "user-agent",
        prefixes=("githubcopilotchat/",),
        source=(
            "VS Code Copilot Chat extension; client_test.go: 'GitHubCopilotChat/0.37.2026011603'"
        ),
    ),
    ClientRule(
        COPILOT_CLI,
        "user-agent",
        prefixes=("copilot/",),
        source="Copilot CLI (npm @github/copilot); client_test.go: "
        "'copilot/0.0.403 (client/cli linux v24.11.1)'",
    ),
    ClientRule(
        KILO_CODE,
        "user-agent",
        prefixes=("kilo-code/",),
        source="Kilo-Org/kilocode DEFAULT_HEADERS 'User-Agent: Kilo-Code/${version}'; "
        "client_test.go: 'kilo-code/5.1.0 (darwin 25.2.0; arm64) node/22.21.1'",
    ),
    ClientRule(
        CODER_AGENTS,
        "user-agent",
        prefixes=("coder-agents/",),
        source="coder/aibridge#212 (prefix set by coder/coder#22965); client_test.go: "
        "'coder-agents/v2.24.0 (linux/amd64)'",
    ),
    # --- Other headers, for clients whose User-Agent is a generic one.
    ClientRule(
        CURSOR,
        "x-cursor-client-version",
        present=True,
        source="seed GuessClient; client_test.go: UA 'connect-es/1.6.1' with "
        "'X-Cursor-Client-Version: 0.50.0'",
    ),
    ClientRule(
        CODEX,
        "originator",
        prefixes=("codex_", "codex-"),
        source="codex-rs create_client sends an 'originator' header (codex_cli_rs, codex-tui, "
        "codex_vscode, codex_exec) on every request",
    ),
    ClientRule(
        KILO_CODE,
        "originator",
        equals=("kilo-code",),
        source="seed GuessClient; client_test.go: 'Originator: kilo-code'",
    ),
    ClientRule(
        KILO_CODE,
        "x-title",
        equals=("kilo code",),
        source="Kilo-Org/kilocode DEFAULT_HEADERS 'X-Title: Kilo Code' (also on builds whose "
        "User-Agent is an OpenCode or AI SDK one)",
    ),
    ClientRule(
        KILO_CODE,
        "x-kilocode-version",
        present=True,
        source="Kilo-Org/kilocode DEFAULT_HEADERS 'X-KiloCode-Version: ${version}'",
    ),
    # Last: the Electron User-Agent names the app as a product token in the middle.
    ClientRule(
        CURSOR,
        "user-agent",
        prefixes=("cursor/",),
        contains=(" cursor/",),
        source="Cursor's Electron User-Agent: 'Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) "
        "AppleWebKit/537.36 (KHTML, like Gecko) Cursor/1.7.33 Chrome/138.0.7204.251 "
        "Electron/37.7.0 Safari/537.36'",
    ),
)

_HEADERS = frozenset(rule.header for rule in RULES)


def classify_client(headers: Mapping[str, str]) -> str:
    """The client that sent a request with these headers: one of ``CLIENTS``.

    ``headers`` may be mitmproxy's ``Headers`` or any mapping; names are matched
    case-insensitively. A pure function of the headers: it never changes them.
    """
    values: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _HEADERS and lowered not in values:
            values[lowered] = str(value)[:_MAX_VALUE_CHARS].strip().lower()
    for rule in RULES:
        if rule.matches(values.get(rule.header, "")):
            return rule.client
    return UNKNOWN
