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

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from aibridgeproxyd.header_fields import header_values

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
    found = header_values(headers, _HEADERS)
    return _classify(tuple(found.get(name, "")[:_MAX_VALUE_CHARS] for name in _HEADER_ORDER))


# The headers the rules read, in a fixed order: the key of ``_classify``'s cache.
_HEADER_ORDER = tuple(sorted(_HEADERS))


@functools.lru_cache(maxsize=1024)
def _classify(values: tuple[str, ...]) -> str:
    """The client for the values of ``_HEADER_ORDER`` (cut, not yet normalised). Cached: a
    client sends the same few values on every request (bounded: varied values only evict)."""
    normalised = {
        name: value.strip().lower() for name, value in zip(_HEADER_ORDER, values, strict=True)
    }
    for rule in RULES:
        if rule.matches(normalised[rule.header]):
            return rule.client
    return UNKNOWN


# --- Client session ids ---------------------------------------------------------------------
#
# ``client_session_id`` (docs/monitoring.md#client-sessions): the id a client sends to group the
# requests of one conversation. Read for the client ``classify_client`` named, through that
# client's own rules only, as Coder's AI Gateway does (coder/coder ``aibridge/client/session.go``):
# Copilot in VS Code also sends X-Client-Session-Id, which is not its session, and another
# client's or an Unknown client's headers are not trusted to mean a session. Claude Code's body
# fallback (``metadata.user_id``) is read with the request body (``request_content.py``).

# A session id longer than this, or holding a control character, is not recorded: an id that is
# cut could merge two sessions, and one with a control character is not an id.
SESSION_ID_MAX_CHARS = 128


@dataclass(frozen=True)
class SessionRule:
    """``client`` sends its session id in ``header`` (lower-case). A client's rules are tried in
    order; the first header present with a usable value wins."""

    client: str
    header: str
    source: str = ""


SESSION_RULES: tuple[SessionRule, ...] = (
    SessionRule(
        CLAUDE_CODE,
        "x-claude-code-session-id",
        source="Claude Code sends X-Claude-Code-Session-Id (its session UUID) on every Messages "
        "request; coder/coder aibridge/client/session.go",
    ),
    SessionRule(
        CODEX,
        "session-id",
        source="codex-rs sends the conversation id as 'session-id' (current versions); "
        "coder/coder aibridge/client/session.go tries it first",
    ),
    SessionRule(
        CODEX,
        "session_id",
        source="codex-rs 'session_id' header (older versions); CONTRACT 10.1",
    ),
    SessionRule(
        COPILOT_VSCODE,
        "x-interaction-id",
        source="VS Code Copilot Chat's X-Interaction-Id (it also sends X-Client-Session-Id); "
        "coder/coder aibridge/client/session.go",
    ),
    SessionRule(
        COPILOT_CLI,
        "x-client-session-id",
        source="Copilot CLI (npm @github/copilot) X-Client-Session-Id; coder/coder session.go",
    ),
    SessionRule(
        KILO_CODE,
        "x-kilocode-taskid",
        source="Kilo-Org/kilocode sends the task id as X-KiloCode-TaskId; coder/coder session.go",
    ),
    SessionRule(
        MUX,
        "x-mux-workspace-id",
        source="coder/mux MUX_WORKSPACE_ID_HEADER 'X-Mux-Workspace-Id'; coder/coder session.go",
    ),
    SessionRule(
        CODER_AGENTS,
        "x-coder-chat-id",
        source="Coder Agents' X-Coder-Chat-Id, the AI Gateway's session key (Coder's docs); "
        "coder/coder session.go",
    ),
)


def clean_session_id(value: object) -> str | None:
    """``value`` stripped, when it is a usable session id: a non-empty string of at most
    ``SESSION_ID_MAX_CHARS`` characters with no control character and no ``~`` (which the
    store uses to tell apart users sending the same id: ``<id>~<initiator>``); None
    otherwise."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > SESSION_ID_MAX_CHARS or not value.isprintable():
        return None
    if "~" in value:  # the store's mark of a session id another user used first
        return None
    return value


def session_id_from_headers(headers: Mapping[str, str], client: str) -> str | None:
    """The session id ``client`` (as ``classify_client`` named it) sent in its header
    (``SESSION_RULES``); None when it sent none or an unusable one, or has no rule. Header
    names are matched case-insensitively, as in ``classify_client``."""
    rules = _SESSION_RULES_BY_CLIENT.get(client, ())
    if not rules:
        return None
    values = header_values(headers, {rule.header for rule in rules})
    for rule in rules:
        if (session_id := clean_session_id(values.get(rule.header))) is not None:
            return session_id
    return None


_SESSION_RULES_BY_CLIENT = {
    client: tuple(rule for rule in SESSION_RULES if rule.client == client) for client in CLIENTS
}
