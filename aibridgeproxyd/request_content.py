"""What an interception records from its request body (docs/monitoring.md#prompts): the last
user prompt, the tool-call ids the request's last message answers (thread lineage), and Claude
Code's session id when no header carried it (``clients.SESSION_RULES`` reads the headers).

The body is parsed once, whole, and only when something is read from it: with prompts switched
off, only when a cheap substring check finds what a tool result or Claude Code's
``metadata.user_id`` would need. A body that is not JSON, is larger than ``MAX_PARSED_BODY``
decoded, or has an unexpected shape at any level gives an empty ``RequestContent``; nothing here
raises on any input.

**The prompt** is the text of the last user message that holds text the user (not a tool)
sent: its text parts joined with "\\n"; images, files, audio and tool results are skipped, and
so is a text part that is wholly a ``<system-reminder>`` (Claude Code adds them, with the
project's CLAUDE.md, beside the typed prompt). A user message of tool results only (Anthropic
``tool_result`` blocks, Gemini ``functionResponse`` parts) is not a prompt: the search goes on
to the user message before it, as it does past OpenAI's ``role: tool`` messages. So every
request of an agent's tool loop records the prompt that started the loop, as Coder's AI Gateway
records the last user prompt on each interception. The prompt is cut at ``max_bytes`` UTF-8
bytes, never inside a character.

Formats, by ``usage.ApiKind`` (field names checked against each provider's API reference):

- OpenAI chat completions (platform.openai.com/docs/api-reference/chat/create): ``messages[]``
  with ``role: user`` and ``content`` a string or parts (``{type: text, text}``); tool results
  are trailing ``role: tool`` messages with ``tool_call_id``;
- OpenAI legacy completions (api-reference/completions/create): ``prompt``, a string or a list
  of strings (the last one is the prompt; token arrays are not text);
- OpenAI Responses (api-reference/responses/create): ``input`` a string, or items: messages with
  ``role: user`` (``type: message`` optional) and ``content`` a string or ``input_text`` parts;
  tool results are the trailing ``function_call_output`` / ``custom_tool_call_output`` items,
  by ``call_id``;
- Anthropic Messages, also Bedrock's clients (docs.claude.com/en/api/messages): ``messages[]``
  with ``content`` a string or blocks (``text``, ``image``, ``tool_result`` with
  ``tool_use_id``); ``metadata.user_id`` carries Claude Code's session;
- Gemini generateContent (ai.google.dev/api/generate-content): ``contents[]`` with ``role:
  user`` (or none) and ``parts[].text``; tool results are ``functionResponse`` parts, whose
  ``id`` is optional (ai.google.dev/api/caching#FunctionResponse).

Realtime, Gemini Live and embeddings record nothing from the body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from aibridgeproxyd.clients import clean_session_id
from aibridgeproxyd.content_coding import UndecodableBody, decode_bounded
from aibridgeproxyd.usage import ApiKind
from aibridgeproxyd.utf8 import cut_utf8

# A body that decodes to more than this is not parsed: nothing is recorded from it.
# A body with more objects than this is not parsed: a long agent conversation holds a few
# thousand (messages, content blocks, tool definitions); 16 MiB of ``{}`` would be 5 million,
# about a second of event loop and half a gigabyte while parsed. Counting is one fast pass.
MAX_JSON_OBJECTS = 200_000
# Likewise values in arrays (16 MiB of ``1,`` is 8 million); prose has commas too, far fewer.
MAX_JSON_VALUES = 1_000_000
# Below this size a body parses in a few milliseconds whatever it holds: not counted.
_COUNT_ABOVE = 1024 * 1024
MAX_PARSED_BODY = 16 * 1024 * 1024
# At most this many tool-call ids are kept per request, each at most this long: the record's
# size stays bounded whatever the body holds.
MAX_TOOL_RESULT_IDS = 128
MAX_TOOL_CALL_ID_CHARS = 256

_REMINDER_OPEN, _REMINDER_CLOSE = "<system-reminder>", "</system-reminder>"
# Claude Code's legacy metadata.user_id: user_<hash>_account_<uuid>_session_<uuid>.
_LEGACY_SESSION = re.compile(r"_session_(.+)\Z")


@dataclass(frozen=True, slots=True)
class RequestContent:
    """What was read from one request body: the prompt (None when none, or not asked for), the
    tool-call ids its last message answers (in body order, unique), and the client session id
    the body carried (Claude Code's ``metadata.user_id``; None otherwise)."""

    prompt: str | None = None
    tool_result_ids: tuple[str, ...] = ()
    client_session_id: str | None = None


NOTHING = RequestContent()


@dataclass(frozen=True, slots=True)
class _Format:
    """How one API's body is read: the prompt, the tool results, and the substring without
    which the body holds no tool result (``marker``: with prompts off, a body without it is not
    parsed; None when the API has no tool results)."""

    prompt: Callable[[dict[str, Any], int], str | None]
    tool_result_ids: Callable[[dict[str, Any]], list[object]]
    marker: bytes | None


def request_content(
    api_kind: ApiKind | None,
    raw_body: bytes,
    content_encoding: str | None,
    prompt_max_bytes: int | None,
    session_in_body: bool = False,
) -> RequestContent:
    """The ``RequestContent`` of a request body as it arrived (``content_encoding`` undone,
    bounded). ``prompt_max_bytes``: the prompt's cut in UTF-8 bytes, or None when prompts are
    not recorded. ``session_in_body``: read Claude Code's session from ``metadata.user_id`` (an
    Anthropic body; for the client Claude Code only, and while no header gave one).

    Never raises: an unknown API, a body too large, not JSON or of an unexpected shape gives
    what could be read, or nothing."""
    reader = _FORMATS.get(api_kind) if api_kind is not None else None
    if reader is None or not raw_body:
        return NOTHING
    try:
        decoded = decode_bounded(raw_body, content_encoding, MAX_PARSED_BODY)
    except UndecodableBody:
        return NOTHING
    if not decoded.complete:
        return NOTHING
    limit = prompt_max_bytes if prompt_max_bytes is not None and prompt_max_bytes > 0 else None
    data = decoded.data
    session_in_body = session_in_body and api_kind is ApiKind.ANTHROPIC_MESSAGES
    if limit is None and not (
        (reader.marker is not None and reader.marker in data)
        or (session_in_body and b"user_id" in data)
    ):
        return NOTHING  # the cheap check: nothing to read, so no parse
    if len(data) > _COUNT_ABOVE and (
        data.count(b"{") > MAX_JSON_OBJECTS or data.count(b",") > MAX_JSON_VALUES
    ):
        return NOTHING  # parsing millions of values would hold the event loop for seconds
    body = _parse(data)
    if body is None:
        return NOTHING
    return RequestContent(
        reader.prompt(body, limit) if limit is not None else None,
        _unique_ids(reader.tool_result_ids(body)),
        _claude_code_session(body) if session_in_body else None,
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (not JSON, not an object, nested too deep).

    orjson parses a 200 KB Claude Code body in about half the time of ``json`` (0.19 against
    0.35 ms); ``json`` reads what orjson refuses and a client may still send: a lone surrogate
    escape (``"\\ud800"``, which JavaScript's ``JSON.stringify`` writes), a byte order mark."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return None
    return body if isinstance(body, dict) else None


def _joined(texts: Iterator[str], max_bytes: int) -> str | None:
    """The texts joined with "\\n" and cut at ``max_bytes``; None when there is none. Stops
    reading once the cut is certain (a character is at least one byte)."""
    parts: list[str] = []
    length = 0
    for text in texts:
        parts.append(text)
        length += len(text) + 1
        if length > max_bytes:
            break
    if not parts:
        return None
    return cut_utf8("\n".join(parts), max_bytes) or None


def _user_text(text: object) -> str | None:
    """A text the user sent: a string that is not blank."""
    if not isinstance(text, str) or not text.strip():
        return None
    return text


def _is_one_of(value: object, names: frozenset[str]) -> bool:
    """``value`` is one of ``names``; False for anything not a string (a list or an object in
    a ``type`` field is not hashable, and must not raise)."""
    return isinstance(value, str) and value in names


def _is_reminder(text: str) -> bool:
    """Wholly a ``<system-reminder>`` (Claude Code adds them beside what the user typed)."""
    stripped = text.strip()
    return stripped.startswith(_REMINDER_OPEN) and stripped.endswith(_REMINDER_CLOSE)


def _texts(content: object, part_types: frozenset[str]) -> list[str]:
    """The user texts of a message's ``content``: the string itself, or the ``text`` of each
    part whose ``type`` is one of ``part_types`` (a Gemini part has no type: empty set).
    ``<system-reminder>`` texts (and Gemini ``thought`` parts) are left out beside other text;
    a message of those alone
    is its own prompt unless it answers tool calls (then it is a tool-result turn, and the
    prompt is an earlier message), so no text can hide the last prompt by dressing as one."""
    if isinstance(content, str):
        text = _user_text(content)
        return [text] if text else []
    if not isinstance(content, list):
        return []
    texts: list[str] = []
    reminders: list[str] = []
    answers_tools = False
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "tool_result" or "functionResponse" in part:
            answers_tools = True
        if part_types and not _is_one_of(part.get("type"), part_types):
            continue  # not text
        if text := _user_text(part.get("text")):
            # A Gemini thought summary is not the user's words either, unless it is all there is.
            aside = _is_reminder(text) or part.get("thought") is True
            (reminders if aside else texts).append(text)
    return texts or ([] if answers_tools else reminders)


def _last_user_prompt(
    messages: object, is_user: Callable[[dict[str, Any]], bool], texts: Callable[[Any], list[str]]
) -> Iterator[str]:
    """The texts of the last message that ``is_user`` and has user text (``texts``)."""
    if not isinstance(messages, list):
        return iter(())
    for message in reversed(messages):
        if isinstance(message, dict) and is_user(message):
            found = texts(message)
            if found:
                return iter(found)
    return iter(())


def _unique_ids(ids: list[object]) -> tuple[str, ...]:
    """Tool-call ids in order, each once, bounded in number and length."""
    seen: dict[str, None] = {}
    for call_id in ids:
        if isinstance(call_id, str) and 0 < len(call_id) <= MAX_TOOL_CALL_ID_CHARS:
            seen.setdefault(call_id, None)
            if len(seen) == MAX_TOOL_RESULT_IDS:
                break
    return tuple(seen)


# --- OpenAI chat completions ------------------------------------------------------------------

_CHAT_TEXT = frozenset({"text"})


def _chat_prompt(body: dict[str, Any], max_bytes: int) -> str | None:
    found = _last_user_prompt(
        body.get("messages"),
        lambda message: message.get("role") == "user",
        lambda message: _texts(message.get("content"), _CHAT_TEXT),
    )
    return _joined(found, max_bytes)


def _chat_tool_result_ids(body: dict[str, Any]) -> list[object]:
    """The ``tool_call_id`` of each trailing ``role: tool`` message."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    ids: list[object] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        ids.append(message.get("tool_call_id"))  # its type is checked by _unique_ids
    return ids[::-1]


# --- OpenAI legacy completions ----------------------------------------------------------------


def _completions_prompt(body: dict[str, Any], max_bytes: int) -> str | None:
    prompt = body.get("prompt")
    if isinstance(prompt, list):  # a batch: the last string is the last prompt
        strings = [item for item in prompt if isinstance(item, str)]
        prompt = strings[-1] if strings else None
    return _joined(iter([prompt]), max_bytes) if isinstance(prompt, str) and prompt else None


# --- OpenAI Responses -------------------------------------------------------------------------

_RESPONSES_TEXT = frozenset({"input_text", "text"})
_RESPONSES_TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})


def _responses_prompt(body: dict[str, Any], max_bytes: int) -> str | None:
    items = body.get("input")
    if isinstance(items, str):
        return _joined(iter([items]), max_bytes) if items else None
    found = _last_user_prompt(
        items,
        lambda item: item.get("role") == "user" and item.get("type", "message") == "message",
        lambda item: _texts(item.get("content"), _RESPONSES_TEXT),
    )
    return _joined(found, max_bytes)


def _responses_tool_result_ids(body: dict[str, Any]) -> list[object]:
    """The ``call_id`` of each tool output item at the end of ``input``."""
    items = body.get("input")
    if not isinstance(items, list):
        return []
    ids: list[object] = []
    for item in reversed(items):
        if not isinstance(item, dict) or not _is_one_of(item.get("type"), _RESPONSES_TOOL_OUTPUTS):
            break
        ids.append(item.get("call_id"))
    return ids[::-1]


# --- Anthropic Messages -----------------------------------------------------------------------

_ANTHROPIC_TEXT = frozenset({"text"})


def _anthropic_prompt(body: dict[str, Any], max_bytes: int) -> str | None:
    found = _last_user_prompt(
        body.get("messages"),
        lambda message: message.get("role") == "user",
        lambda message: _texts(message.get("content"), _ANTHROPIC_TEXT),
    )
    return _joined(found, max_bytes)


def _last_message(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    messages = body.get(key)
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    return messages[-1]


def _anthropic_tool_result_ids(body: dict[str, Any]) -> list[object]:
    """The ``tool_use_id`` of each ``tool_result`` block of the last message, a user's."""
    last = _last_message(body, "messages")
    if last is None or last.get("role") != "user" or not isinstance(last.get("content"), list):
        return []
    return [
        block.get("tool_use_id")
        for block in last["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]


def _claude_code_session(body: dict[str, Any]) -> str | None:
    """Claude Code's session from ``metadata.user_id``: a JSON string with ``session_id``
    (current versions), else the ``_session_<uuid>`` suffix of the legacy form."""
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return None
    if user_id.lstrip().startswith("{"):
        inner = _parse(user_id.encode("utf-8", "replace"))
        return clean_session_id(inner.get("session_id")) if inner is not None else None
    match = _LEGACY_SESSION.search(user_id)
    return clean_session_id(match.group(1)) if match else None


# --- Gemini -----------------------------------------------------------------------------------


def _gemini_is_user(content: dict[str, Any]) -> bool:
    # The role may be left unset on a single turn: the user's (ai.google.dev/api/caching#Content).
    return content.get("role", "user") == "user"


def _gemini_prompt(body: dict[str, Any], max_bytes: int) -> str | None:
    found = _last_user_prompt(
        body.get("contents"),
        _gemini_is_user,
        lambda content: _texts(content.get("parts"), frozenset()),
    )
    return _joined(found, max_bytes)


def _gemini_tool_result_ids(body: dict[str, Any]) -> list[object]:
    """The ``functionResponse.id`` of each part of the last content, where present (older
    clients send them without ids, and ``role: function`` in place of ``user``)."""
    last = _last_message(body, "contents")
    if last is None or last.get("role", "user") not in ("user", "function"):
        return []
    parts = last.get("parts")
    if not isinstance(parts, list):
        return []
    responses = [part.get("functionResponse") for part in parts if isinstance(part, dict)]
    return [response.get("id") for response in responses if isinstance(response, dict)]


_FORMATS: dict[ApiKind, _Format] = {
    ApiKind.OPENAI_CHAT_COMPLETIONS: _Format(_chat_prompt, _chat_tool_result_ids, b"tool_call_id"),
    ApiKind.OPENAI_COMPLETIONS: _Format(_completions_prompt, lambda body: [], None),
    ApiKind.OPENAI_RESPONSES: _Format(
        _responses_prompt, _responses_tool_result_ids, b"_call_output"
    ),
    ApiKind.ANTHROPIC_MESSAGES: _Format(
        _anthropic_prompt, _anthropic_tool_result_ids, b"tool_result"
    ),
    ApiKind.GEMINI_GENERATE_CONTENT: _Format(
        _gemini_prompt, _gemini_tool_result_ids, b"functionResponse"
    ),
}
