"""Tool calls and thoughts read from provider responses as they pass, without keeping the body.

A ``ContentTap`` is fed every chunk of a response on its way to the client, like
``usage.UsageTap`` (and through the same ``usage.BodyDecoder`` when the chunks are still
compressed). It collects what contract section 10.1 records besides usage:

- **tool calls** (``model.ToolCall``): the provider's call id, the tool's name, and its input as
  JSON text, assembled from streamed argument deltas and cut at ``record_max_bytes`` UTF-8 bytes;
  at most ``MAX_TOOL_CALLS`` per response;
- **thoughts**: the model's thinking or reasoning-summary text, each cut at ``record_max_bytes``;
  at most ``MAX_THOUGHTS`` per response. Encrypted thinking is never kept: an Anthropic
  ``redacted_thinking`` block is recorded as ``REDACTED_THINKING``.

Model output text is never collected.

The framing is read from the first non-blank byte of the (decoded) body: ``{`` is one JSON body,
``[`` a JSON-array stream (Gemini's ``streamGenerateContent`` without ``alt=sse``: each element
read as soon as it is complete), anything else Server-Sent Events
(https://html.spec.whatwg.org/multipage/server-sent-events.html): an event's ``data:`` lines are
joined with "\n" and the event read as one JSON value at its blank line (when that is not JSON,
each line is read alone, for servers that part events with single newlines); lines end with LF,
CRLF or CR, as the stream's first line ending says (a stream that mixes them after an LF is read
by its LFs only). WebSocket messages are one event each (``feed_message``).

Cost and memory, whatever the chunking. Only events that can carry a tool call or a thought are
JSON-parsed: each format names a few trigger substrings (``_Format.triggers``), searched once per
chunk across its complete lines, so a text delta, the bulk of a stream, costs a ``bytes.rfind``
and two or three ``bytes.find`` when its chunk holds whole events; lines cut by a chunk's end are
split and read line by line. A JSON-array element that starts and ends in a chunk is found by
the C JSON scanner; one spanning chunks is followed brace by brace (``_ArrayElements``, strings
stepped over whole), so each byte is scanned at most twice and each element parsed once more if
it has a trigger, never again from its start. A tool call's argument pieces after its first are
not parsed whole: the first teaches the tap the bytes around the piece (a ``_DeltaFrame``, one
per tap, no longer than an event), and an event that is those bytes around another JSON string
has only that string parsed (OpenAI chat, Anthropic). Between chunks the tap keeps the
unfinished last SSE line and the data of the unfinished event, each up to ``line_cap`` bytes (a
longer line is skipped to its end, a longer event dropped, and ``problem`` says so), or the
unfinished element of a JSON array (same cap), in one ``bytearray`` (however small the chunks,
not an object each), and what it records, each piece cut when it is kept: texts and inputs at
``record_max_bytes``
(kept as UTF-8 in one buffer each), call ids and names at ``MAX_NAME_CHARS``, handles (block,
output and summary indexes, item ids) at ``MAX_NAME_CHARS`` or ``MAX_INDEX``. A single JSON body
is the exception: it cannot be split into events without parsing it, so it is kept up to
``body_cap`` bytes and read when it ends; past that nothing of it is recorded (``problem`` says
so). Such a body streams only when the upstream sends no ``Content-Length`` for a non-streamed
answer.

Fields, per API (checked against each provider's API reference):

- OpenAI Chat Completions (https://platform.openai.com/docs/api-reference/chat): a body's
  ``choices[].message.tool_calls[]`` (``id``, ``function.name``, ``function.arguments``); a
  stream's ``choices[].delta.tool_calls[]``, matched by ``index``, with ``id`` and
  ``function.name`` on the first delta and ``function.arguments`` pieces after; a custom tool's
  call carries ``custom`` (``name``, ``input``) in place of ``function``. Thoughts from
  OpenAI-compatible servers: ``reasoning_content`` (DeepSeek, vLLM before 0.10, SGLang) or
  ``reasoning`` (vLLM, OpenRouter), on ``message`` or ``delta``
  (https://api-docs.deepseek.com/guides/reasoning_model, https://docs.vllm.ai/en/latest/features/
  reasoning_outputs.html, https://openrouter.ai/docs/use-cases/reasoning-tokens).
- OpenAI Responses (https://platform.openai.com/docs/api-reference/responses and
  .../responses-streaming), also over WebSocket (Codex) and the same events in Realtime
  (https://platform.openai.com/docs/api-reference/realtime-server-events): ``output[]`` items
  ``function_call`` (``call_id``, ``name``, ``arguments``), ``custom_tool_call`` (``call_id``,
  ``name``, ``input``) and ``reasoning`` (``summary[].text``); streamed
  ``response.output_item.added`` / ``.done`` (``item``), ``response.function_call_arguments.delta``
  / ``.done`` (``item_id``, ``delta`` / ``arguments``), ``response.custom_tool_call_input.delta`` /
  ``.done`` (``delta`` / ``input``), ``response.reasoning_summary_text.delta`` / ``.done``
  (``item_id``, ``summary_index``, ``delta`` / ``text``).
- Anthropic Messages (https://docs.anthropic.com/en/api/messages,
  https://platform.claude.com/docs/en/api/messages-streaming), and Bedrock, whose event stream
  the adapter turns into Anthropic SSE before any tap sees it: ``content[]`` blocks ``tool_use``
  (also ``server_tool_use``, ``mcp_tool_use``: ``id``, ``name``, ``input`` object, recorded as
  JSON text), ``thinking`` (``thinking``) and ``redacted_thinking``; streamed
  ``content_block_start`` (``index``, ``content_block``) and ``content_block_delta``
  (``input_json_delta.partial_json``, ``thinking_delta.thinking``; ``signature_delta`` ignored).
- Gemini (https://ai.google.dev/api/generate-content, https://ai.google.dev/gemini-api/docs/
  thinking): ``candidates[].content.parts[]`` with ``functionCall`` (``id`` optional, ``name``,
  ``args`` object, recorded as JSON text) and parts with ``thought: true`` (their ``text``, the
  thought summary); the same per chunk when streamed. Gemini Live
  (https://ai.google.dev/api/live): ``toolCall.functionCalls[]`` and ``serverContent.modelTurn``
  parts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from aibridgeproxyd.model import ToolCall
from aibridgeproxyd.usage import ApiKind, BodyDecoder

MAX_TOOL_CALLS = 128
MAX_THOUGHTS = 128
# What an Anthropic ``redacted_thinking`` block is recorded as: its data is encrypted, never kept.
REDACTED_THINKING = "[redacted thinking]"
# Call ids and tool names are short; anything longer is cut at this many characters.
MAX_NAME_CHARS = 256
# A larger position in a handle (a block or summary index) is not believed.
MAX_INDEX = 1 << 31
# The unfinished SSE line kept between chunks, and a JSON body kept until it ends, are bounded by
# these (bytes) or by a multiple of ``record_max_bytes``, whichever is larger.
MIN_LINE_CAP = 1024 * 1024
MIN_BODY_CAP = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ContentSwitches:
    """What a tap collects (config ``record_tool_calls``, ``record_thoughts``) and where each
    input or thought is cut (``record_max_bytes``, UTF-8 bytes)."""

    tool_calls: bool = True
    thoughts: bool = True
    max_bytes: int = 32 * 1024

    @property
    def any(self) -> bool:
        """Whether there is anything to collect at all."""
        return self.tool_calls or self.thoughts


@dataclass(frozen=True, slots=True)
class ResponseContent:
    """The tool calls and thoughts of one response (or WebSocket session), in order of first
    appearance; empty when none or switched off."""

    tool_calls: tuple[ToolCall, ...] = ()
    thoughts: tuple[str, ...] = ()


# --- bounded collection --------------------------------------------------------------------------


class _Text:
    """Text that grows from pieces but keeps only its first ``limit`` UTF-8 bytes (plus at most
    one byte, cut when read), as UTF-8 in one growing buffer: each piece is copied once, however
    small the pieces (a lone surrogate, which UTF-8 cannot carry, becomes ``?``)."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()

    def __bool__(self) -> bool:
        return bool(self._buffer)

    def add(self, piece: Any) -> None:
        room = self._limit + 1 - len(self._buffer)
        if not isinstance(piece, str) or not piece or room <= 0:
            return
        # At most ``room`` characters: never more than ``room`` bytes are needed from a piece.
        self._buffer += piece[:room].encode("utf-8", "replace")[:room]

    def set(self, whole: Any) -> None:
        """Replace what was assembled with the whole text (a ``.done`` event's)."""
        if isinstance(whole, str) and whole:
            self._buffer = bytearray()
            self.add(whole)

    def text(self) -> str:
        # Only the cut can end inside a character: "ignore" drops its first bytes.
        return self._buffer[: self._limit].decode("utf-8", "ignore")


class _Call:
    __slots__ = ("call_id", "initial", "input", "name")

    def __init__(self, limit: int) -> None:
        self.call_id: str | None = None
        self.name = ""
        self.input = _Text(limit)
        # The input a streamed block started with, if no delta follows: cut when kept.
        self.initial = _Text(limit)

    def record(self) -> ToolCall:
        text = self.input if self.input else self.initial
        return ToolCall(self.call_id, self.name, text.text())


class _Collector:
    """What one response recorded so far, keyed by each format's own handle for a call or a
    thought (a block index, an item id), in first-seen order."""

    __slots__ = ("_calls", "_thoughts", "problem", "serial", "switches", "turns")

    def __init__(self, switches: ContentSwitches) -> None:
        self.switches = switches
        self._calls: dict[Hashable, _Call] = {}
        self._thoughts: dict[Hashable, _Text] = {}
        self.serial = 0  # a counter for formats whose calls have no handle (Gemini)
        self.turns = 0  # Gemini Live: turns completed, one thought per turn
        self.problem: str | None = None

    def note(self, problem: str) -> None:
        self.problem = self.problem or problem

    def call(self, key: Hashable, call_id: Any = None, name: Any = None) -> _Call | None:
        """The call ``key`` (new if unseen), its id and name filled in when given; None when tool
        calls are off or ``MAX_TOOL_CALLS`` are already recorded."""
        if not self.switches.tool_calls:
            return None
        call = self._calls.get(key)
        if call is None:
            if len(self._calls) >= MAX_TOOL_CALLS:
                self.note(f"more than {MAX_TOOL_CALLS} tool calls: the rest are not recorded")
                return None
            call = self._calls[key] = _Call(self.switches.max_bytes)
        if isinstance(call_id, str) and call_id:
            call.call_id = call_id[:MAX_NAME_CHARS]
        if isinstance(name, str) and name:
            call.name = name[:MAX_NAME_CHARS]
        return call

    def thought(self, key: Hashable) -> _Text | None:
        """The thought ``key`` (new if unseen); None when thoughts are off or ``MAX_THOUGHTS``
        are already recorded."""
        if not self.switches.thoughts:
            return None
        text = self._thoughts.get(key)
        if text is None:
            if len(self._thoughts) >= MAX_THOUGHTS:
                self.note(f"more than {MAX_THOUGHTS} thoughts: the rest are not recorded")
                return None
            text = self._thoughts[key] = _Text(self.switches.max_bytes)
        return text

    def content(self) -> ResponseContent:
        calls = tuple(call.record() for call in self._calls.values() if call.name or call.call_id)
        thoughts = tuple(text for thought in self._thoughts.values() if (text := thought.text()))
        return ResponseContent(calls, thoughts)


def _dicts(value: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(position, item)`` for each object in a JSON array (anything else: nothing)."""
    if isinstance(value, list):
        for position, item in enumerate(value):
            if isinstance(item, dict):
                yield position, item


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _index(value: Any, default: int) -> Any:
    """A position (``index``, ``output_index``, ``summary_index``) as part of a handle: an int
    of at most ``MAX_INDEX``, or a string cut at ``MAX_NAME_CHARS``; anything else is
    ``default``. Handles are kept as long as their call or thought: each is bounded."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -MAX_INDEX <= value <= MAX_INDEX else default
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else default


def _json_text(value: Any) -> str:
    """A tool input object as JSON text (Anthropic ``input``, Gemini ``args``)."""
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def _add(text: _Text | None, piece: Any) -> None:
    if text is not None:
        text.add(piece)


def _set(text: _Text | None, whole: Any) -> None:
    if text is not None:
        text.set(whole)


# --- OpenAI Chat Completions ---------------------------------------------------------------------


def _chat_reasoning(message: dict[str, Any]) -> Any:
    """The reasoning text of a message or delta: ``reasoning_content`` where a server sends it
    (some send both names with the same text), else ``reasoning``."""
    text = message.get("reasoning_content")
    return text if isinstance(text, str) and text else message.get("reasoning")


def _chat_function(tool_call: dict[str, Any]) -> dict[str, Any]:
    """A tool call's ``function`` (``name``, ``arguments``), or a custom tool's ``custom``
    (``name``, ``input``)."""
    function = tool_call.get("function")
    return function if isinstance(function, dict) else _dict(tool_call.get("custom"))


def _chat_event(event: dict[str, Any], out: _Collector) -> None:
    """One ``chat.completion.chunk``: tool-call and reasoning deltas per choice. Written out
    (no ``_dicts``, no ``_dict``) because it runs for every argument delta of a stream."""
    choices = event.get("choices")
    if not isinstance(choices, list):
        return
    for position, choice in enumerate(choices):
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue  # no delta: no tool call, no reasoning
        index = _index(choice.get("index"), position)
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for slot, tool_call in enumerate(tool_calls):
                if isinstance(tool_call, dict):
                    key = ("chat", index, _index(tool_call.get("index"), slot))
                    _chat_delta_call(tool_call, key, out)
        # A delta of tool calls alone (most of a tool-calling stream) holds no reasoning.
        if (
            out.switches.thoughts
            and (tool_calls is None or len(delta) > 1)
            and (reasoning := _chat_reasoning(delta))
        ):
            _add(out.thought(("chat", index)), reasoning)


_ABSENT = object()


def _chat_delta_call(tool_call: dict[str, Any], key: Hashable, out: _Collector) -> None:
    """One streamed tool-call delta: the id and name on its first, argument pieces after."""
    function = _chat_function(tool_call)
    call = out.call(key, tool_call.get("id"), function.get("name"))
    if call is not None:
        arguments = function.get("arguments", _ABSENT)
        call.input.add(function.get("input") if arguments is _ABSENT else arguments)


def _chat_body(body: dict[str, Any], out: _Collector) -> None:
    """A ``chat.completion``: each choice's ``message.tool_calls`` and reasoning."""
    for position, choice in _dicts(body.get("choices")):
        index = _index(choice.get("index"), position)
        message = _dict(choice.get("message"))
        for slot, tool_call in _dicts(message.get("tool_calls")):
            function = _chat_function(tool_call)
            call = out.call(("chat", index, slot), tool_call.get("id"), function.get("name"))
            if call is not None:
                call.input.set(function.get("arguments", function.get("input")))
        if out.switches.thoughts and (reasoning := _chat_reasoning(message)):
            _set(out.thought(("chat", index)), reasoning)


# --- OpenAI Responses (and Realtime) -------------------------------------------------------------


def _item_key(item_id: Any, output_index: Any) -> Hashable:
    """An output item's handle: its id (unique across a WebSocket session's responses), else its
    position in the response."""
    if isinstance(item_id, str) and item_id:
        return item_id[:MAX_NAME_CHARS]
    return ("output", _index(output_index, -1))


def _responses_item(item: dict[str, Any], key: Hashable, out: _Collector) -> None:
    kind = item.get("type")
    if kind == "function_call" or kind == "custom_tool_call":
        call = out.call(key, item.get("call_id"), item.get("name"))
        if call is not None:
            call.input.set(item.get("arguments" if kind == "function_call" else "input"))
    elif kind == "reasoning":
        for index, part in _dicts(item.get("summary")):
            _set(out.thought((key, index)), part.get("text"))


def _responses_event(event: dict[str, Any], out: _Collector) -> None:
    """One Responses (or Realtime) stream event."""
    kind = event.get("type")
    if not isinstance(kind, str):
        return
    if kind.startswith("response.output_item."):
        item = _dict(event.get("item"))
        _responses_item(item, _item_key(item.get("id"), event.get("output_index")), out)
        return
    key = _item_key(event.get("item_id"), event.get("output_index"))
    if kind.startswith("response.reasoning_summary_text."):
        thought = out.thought((key, _index(event.get("summary_index"), 0)))
        if kind.endswith(".delta"):
            _add(thought, event.get("delta"))
        else:
            _set(thought, event.get("text"))
    elif kind.startswith(("response.function_call_arguments.", "response.custom_tool_call_input.")):
        call = out.call(key)
        if call is None:
            return
        if kind.endswith(".delta"):
            call.input.add(event.get("delta"))
        else:
            call.input.set(event.get("arguments", event.get("input")))


def _responses_body(body: dict[str, Any], out: _Collector) -> None:
    """A response object: its ``output`` items."""
    for position, item in _dicts(body.get("output")):
        _responses_item(item, _item_key(item.get("id"), position), out)


# --- Anthropic Messages (and Bedrock) ------------------------------------------------------------

_ANTHROPIC_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def _anthropic_block(block: dict[str, Any], key: Hashable, out: _Collector) -> None:
    """A content block, whole (a body's) or as it starts (``content_block_start``)."""
    kind = block.get("type")
    if isinstance(kind, str) and kind in _ANTHROPIC_TOOL_BLOCKS:  # a list is not hashable
        call = out.call(key, block.get("id"), block.get("name"))
        if call is not None:
            call.initial.set(_json_text(block.get("input")))
    elif kind == "thinking":
        _add(out.thought(key), block.get("thinking"))
    elif kind == "redacted_thinking":
        _set(out.thought(key), REDACTED_THINKING)


def _anthropic_event(event: dict[str, Any], out: _Collector) -> None:
    """One Messages stream event: a block's start, or a tool-input or thinking delta."""
    kind = event.get("type")
    key = ("block", _index(event.get("index"), 0))
    if kind == "content_block_start":
        _anthropic_block(_dict(event.get("content_block")), key, out)
    elif kind == "content_block_delta":
        delta = _dict(event.get("delta"))
        delta_type = delta.get("type")
        if delta_type == "input_json_delta":
            call = out.call(key)
            if call is not None:
                call.input.add(delta.get("partial_json"))
        elif delta_type == "thinking_delta":
            _add(out.thought(key), delta.get("thinking"))


def _anthropic_body(body: dict[str, Any], out: _Collector) -> None:
    """A message: its ``content`` blocks."""
    for index, block in _dicts(body.get("content")):
        _anthropic_block(block, ("block", index), out)


# --- Gemini --------------------------------------------------------------------------------------


def _gemini_parts(parts: Any, thought_key: Hashable, out: _Collector) -> None:
    for _, part in _dicts(parts):
        function_call = part.get("functionCall")
        if isinstance(function_call, dict):
            out.serial += 1
            name = function_call.get("name")
            call = out.call(("gemini", out.serial), function_call.get("id"), name)
            if call is not None:
                call.initial.set(_json_text(function_call.get("args", {})))
        elif part.get("thought") is True:
            _add(out.thought(thought_key), part.get("text"))


def _gemini_event(event: dict[str, Any], out: _Collector) -> None:
    """One ``GenerateContentResponse`` (a body, or one chunk of a stream): thought parts of a
    candidate are one thought, across chunks."""
    for position, candidate in _dicts(event.get("candidates")):
        index = _index(candidate.get("index"), position)
        _gemini_parts(_dict(candidate.get("content")).get("parts"), ("thought", index), out)


def _gemini_live_event(event: dict[str, Any], out: _Collector) -> None:
    """One Gemini Live server message: ``toolCall.functionCalls`` or a model turn's parts; a
    turn's thought parts are one thought."""
    calls = _dict(event.get("toolCall")).get("functionCalls")
    _gemini_parts([{"functionCall": call} for _, call in _dicts(calls)], None, out)
    server_content = _dict(event.get("serverContent"))
    turn = _dict(server_content.get("modelTurn"))
    _gemini_parts(turn.get("parts"), ("turn", out.turns), out)
    if server_content.get("turnComplete") is True:
        out.turns += 1


# --- tool-input deltas read without a parse --------------------------------------------------
#
# Most events of a tool-calling stream are argument pieces of one call, each the same bytes but
# for one JSON string (and, in OpenAI's chat chunks, an ``obfuscation`` member or the like after
# the choices). The first such event is parsed whole; from it the tap learns a ``_DeltaFrame``:
# the bytes before the string (``head``) and after it up to the end of the top-level member
# holding it (``rest``). An event made of ``head``, one JSON string, ``rest`` and a tail of other
# top-level members is valid JSON of the same shape with only that string changed, so the string
# alone is parsed: what a whole parse would record, at a fraction of its cost.


def _named(value: Any) -> bool:
    """Whether ``_Collector.call`` would take ``value`` as a call id or name."""
    return isinstance(value, str) and bool(value)


def _chat_delta_piece(event: dict[str, Any]) -> tuple[Hashable, str] | None:
    """``(handle, piece)`` when all ``_chat_event`` records of ``event`` is one argument piece
    added to the call ``handle`` (one choice, one tool call, no id, name or reasoning); else
    None."""
    choices = event.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if not isinstance(delta, dict) or _chat_reasoning(delta):
        return None
    tool_calls = delta.get("tool_calls")
    if not isinstance(tool_calls, list) or len(tool_calls) != 1:
        return None
    call = tool_calls[0]
    if not isinstance(call, dict):
        return None
    function = _chat_function(call)
    if _named(call.get("id")) or _named(function.get("name")):
        return None
    arguments = function.get("arguments", _ABSENT)
    piece = function.get("input") if arguments is _ABSENT else arguments
    if not isinstance(piece, str):
        return None
    return ("chat", _index(choice.get("index"), 0), _index(call.get("index"), 0)), piece


def _anthropic_delta_piece(event: dict[str, Any]) -> tuple[Hashable, str] | None:
    """As ``_chat_delta_piece``, for ``_anthropic_event``: an ``input_json_delta``."""
    if event.get("type") != "content_block_delta":
        return None
    delta = event.get("delta")
    if not isinstance(delta, dict) or delta.get("type") != "input_json_delta":
        return None
    piece = delta.get("partial_json")
    if not isinstance(piece, str):
        return None
    return ("block", _index(event.get("index"), 0)), piece


@dataclass(frozen=True, slots=True)
class _DeltaShape:
    """Where a format's tool-input pieces sit: ``piece`` tells an event that records nothing but
    one (``_chat_delta_piece``); ``key``: the quoted member name and colon before the piece's
    string; ``top_keys``: the top-level members the format's handler reads."""

    piece: Callable[[dict[str, Any]], tuple[Hashable, str] | None]
    key: bytes
    top_keys: frozenset[str]


# What stands for the piece when a frame is checked: no event holds it (NULs around).
_PLACEHOLDER = "\x00aibridgeproxyd piece\x00"
_PLACEHOLDER_JSON = b'"\\u0000aibridgeproxyd piece\\u0000"'
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_SPACE = b" \t\n\r"
# Frames learnt per response at most (one per tool call, as a rule): learning costs a few parses.
MAX_DELTA_FRAMES = 16


class _DeltaFrame:
    """The bytes one call's argument pieces share (see above); ``handle``: the call's; ``call``:
    that call's record once looked up (``_Collector.call``), so each piece goes straight to it."""

    __slots__ = ("call", "handle", "head", "rest", "top_keys")

    def __init__(
        self, handle: Hashable, head: bytes, rest: bytes, top_keys: frozenset[str]
    ) -> None:
        self.handle, self.head, self.rest, self.top_keys = handle, head, rest, top_keys
        self.call: _Call | None = None

    def piece(self, data: bytes | bytearray) -> str | None:
        """The piece of ``data`` when it is this frame around another JSON string (then a tail
        of other members), else None (``data`` is then parsed whole)."""
        head, rest = self.head, self.rest
        if not data.startswith(head):
            return None
        end = data.find(rest, len(head))
        if end < 0:
            return None
        try:
            # One JSON value: a string that ends where ``rest`` starts (a ``rest`` found inside
            # it leaves an unterminated string, refused).
            piece = orjson.loads(data[len(head) : end])
        except orjson.JSONDecodeError:
            return None
        if type(piece) is not str:
            return None
        tail = data[end + len(rest) :].strip(_JSON_SPACE)
        # The event closes here (checked inline: this runs for every piece), or goes on with
        # other members.
        return piece if tail == b"}" or self._tail_fits(tail) else None

    def _tail_fits(self, tail: bytes | bytearray) -> bool:
        """Whether ``tail`` (stripped, not ``}``) closes the event after more members that the
        handler does not read (one it reads, repeated, would win over the frame's)."""
        if tail[:1] != b",":
            return False
        try:
            members = orjson.loads(b"{" + tail[1:])
        except orjson.JSONDecodeError:
            return False
        return isinstance(members, dict) and bool(members) and self.top_keys.isdisjoint(members)


def _learn_frame(
    data: bytes | bytearray, handle: Hashable, shape: _DeltaShape
) -> _DeltaFrame | None:
    """The frame of ``data``, a piece of the call ``handle`` (``shape.piece`` of its parse), or
    None. The string after the first ``shape.key`` is taken for the piece, and the event cut
    after the first ``]`` or ``}`` that ends a top-level member; both are checked by parsing the
    event with a placeholder for the piece and nothing after that member: it must read as the
    placeholder, added to the same call."""
    at = data.find(shape.key)
    if at < 0:
        return None
    start = at + len(shape.key)
    while start < len(data) and data[start] in _JSON_SPACE:
        start += 1
    string = _JSON_STRING.match(data, start)
    if string is None:
        return None
    head, after = bytes(data[:start]), bytes(data[string.end() :])
    for end, byte in enumerate(after):
        if byte != 0x5D and byte != 0x7D:  # ] }
            continue
        try:
            value = orjson.loads(head + _PLACEHOLDER_JSON + after[: end + 1] + b"}")
        except orjson.JSONDecodeError:
            continue  # inside the member still: it cannot end here
        if isinstance(value, dict) and shape.piece(value) == (handle, _PLACEHOLDER):
            return _DeltaFrame(handle, head, after[: end + 1], shape.top_keys)
        return None
    return None


# --- formats -------------------------------------------------------------------------------------

_Handler = Callable[[dict[str, Any], _Collector], None]


@dataclass(frozen=True)
class _Format:
    # An event (or body) that contains none of these carries no tool call and no thought, and is
    # not parsed. Inside a JSON string every ``"`` is escaped, so a quoted trigger rarely
    # matches model text; when it does, the event is parsed for nothing.
    triggers: tuple[bytes, ...]
    event: _Handler  # one streamed event: an SSE data line, a WebSocket message
    body: _Handler  # one whole JSON body
    # Whether a number of an event can reach the record as written (a tool input object turned
    # back into JSON text: Anthropic, Gemini). Elsewhere only strings are recorded, and a
    # number is at most an index, which is not believed past ``MAX_INDEX`` either way.
    exact_numbers: bool = True
    # Where the format's streamed tool-input pieces sit, for reading them without a parse.
    deltas: _DeltaShape | None = None


_CHAT = _Format(
    (b'"tool_calls', b'"reasoning'),
    _chat_event,
    _chat_body,
    exact_numbers=False,
    deltas=_DeltaShape(_chat_delta_piece, b'"arguments":', frozenset({"choices"})),
)
# ``_call"``: "function_call" / "custom_tool_call" items (not ``parallel_tool_calls``);
# ``_call_``: their argument / input events. Reasoning summaries come as their own events.
_RESPONSES = _Format(
    (b'_call"', b"_call_", b".reasoning_summary_text."),
    _responses_event,
    _responses_body,
    exact_numbers=False,
)
_GEMINI = _Format((b'"functionCall', b'"thought"'), _gemini_event, _gemini_event)
_FORMATS: dict[ApiKind, _Format] = {
    ApiKind.OPENAI_CHAT_COMPLETIONS: _CHAT,
    ApiKind.OPENAI_RESPONSES: _RESPONSES,
    ApiKind.OPENAI_REALTIME: _RESPONSES,
    ApiKind.ANTHROPIC_MESSAGES: _Format(
        (b'tool_use"', b"thinking", b'"input_json_delta"'),
        _anthropic_event,
        _anthropic_body,
        deltas=_DeltaShape(
            _anthropic_delta_piece, b'"partial_json":', frozenset({"type", "index", "delta"})
        ),
    ),
    ApiKind.GEMINI_GENERATE_CONTENT: _GEMINI,
    ApiKind.GEMINI_LIVE: _Format(_GEMINI.triggers, _gemini_live_event, _gemini_live_event),
}


def records_content(api_kind: ApiKind | None) -> bool:
    """Whether responses of ``api_kind`` can carry tool calls or thoughts at all (not
    embeddings, legacy completions, transcription)."""
    return api_kind in _FORMATS


# --- the tap -------------------------------------------------------------------------------------

_SSE, _BODY, _ARRAY = "sse", "body", "array"
# A JSON string, stepped over whole (closed: group 1; cut by the chunk's end: group 2 when the
# chunk ends with the backslash of an escape, else no group), or a brace (groups 3 and 4): the
# tokens that tell where an element of a JSON array ends.
_ARRAY_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:(")|(\\)?\Z)|(\{)|(\})', re.S)
# The rest of a string that a chunk's end cut (same groups).
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*(?:(")|(\\)?\Z)', re.S)
_JSON_DECODER = json.JSONDecoder()


class _ArrayElements:
    """Where an object of a JSON array that spans chunks ends, found a chunk at a time: a
    regular expression steps from brace to brace and over whole strings (escapes included);
    between chunks only the brace depth and whether a string (or an escape) is open are kept,
    so each byte is looked at once whatever the chunking. It does not validate: the element's
    parse does."""

    __slots__ = ("depth", "escaped", "in_string")

    def __init__(self) -> None:
        self.depth = 0  # of braces; 0 between elements
        self.in_string = False
        self.escaped = False  # the last chunk ended with a backslash inside a string

    def close(self, data: bytes, position: int) -> int:
        """Where the element under way (or the one whose ``{`` is at ``position``) ends in
        ``data``: the offset past its ``}``, or -1 when it does not end in ``data``."""
        depth = self.depth
        if self.in_string:
            position = self._string_end(data)
        for token in _ARRAY_TOKEN.finditer(data, position):
            kind = token.lastindex
            if kind == 3:
                depth += 1
            elif kind == 4:
                depth -= 1
                if not depth:
                    self.depth = 0
                    return token.end()
            elif kind != 1:  # a string the chunk's end cut: the last token
                self.in_string, self.escaped = True, kind == 2
        self.depth = depth
        return -1

    def _string_end(self, data: bytes) -> int:
        """Where the string a previous chunk cut ends in ``data`` (``len(data)``: not in it)."""
        rest = _STRING_REST.match(data, 1 if self.escaped else 0)
        assert rest is not None  # it matches anything
        self.escaped = rest.lastindex == 2
        if rest.lastindex != 1:
            return len(data)
        self.in_string = False
        return rest.end()


def _cr_ends_lines(data: bytes) -> bool | None:
    """Whether a stream's lines end with CR (alone or in CRLF), from the first line ending in
    ``data``; None when no line ends in it."""
    cr, lf = data.find(b"\r"), data.find(b"\n")
    if cr < 0:
        return None if lf < 0 else False
    return lf < 0 or cr < lf


class ContentTap:
    """Collects the tool calls and thoughts of one response as its chunks pass (``feed``), or of
    a WebSocket session message by message (``feed_message``). Never raises: what it cannot read
    is not recorded, and ``problem`` says why."""

    __slots__ = (
        "_after_cr",
        "_body_cap",
        "_cr",
        "_decoder",
        "_elements",
        "_event",
        "_event_lines",
        "_finished",
        "_format",
        "_frame",
        "_frames_left",
        "_line_cap",
        "_mode",
        "_out",
        "_partial",
        "_skipping",
        "_triggers",
    )

    def __init__(
        self, api_kind: ApiKind, switches: ContentSwitches, content_encoding: str | None = None
    ) -> None:
        self._format = _FORMATS.get(api_kind)
        self._triggers = self._format.triggers if self._format else ()
        self._out = _Collector(switches)
        self._finished = self._format is None or not switches.any
        self._line_cap = max(MIN_LINE_CAP, 4 * switches.max_bytes)
        self._body_cap = max(MIN_BODY_CAP, 8 * switches.max_bytes)
        self._mode: str | None = None
        # The unfinished last line, the unfinished array element, or the JSON body so far.
        self._partial = bytearray()
        self._skipping = False  # inside an SSE line too long to keep, until its end
        # The data of the SSE event under way: its data lines joined with "\n" (SSE), and how many.
        self._event = bytearray()
        self._event_lines = 0
        self._cr: bool | None = None  # whether SSE lines end with CR (None: no line ended yet)
        self._after_cr = False  # the last chunk ended with a CR (of a CRLF, perhaps)
        self._elements: _ArrayElements | None = None
        # The tool-input frame of the call under way (``_DeltaFrame``), and how many more may be
        # learnt.
        self._frame: _DeltaFrame | None = None
        self._frames_left = MAX_DELTA_FRAMES
        self._decoder: BodyDecoder | None = None
        encoding = (content_encoding or "").strip().lower()
        if encoding and encoding != "identity" and not self._finished:
            try:
                self._decoder = BodyDecoder(encoding)
            except (ValueError, ImportError) as exc:
                self._fail(str(exc))

    @property
    def content(self) -> ResponseContent:
        """What was collected so far (all of it once ``finish`` was called)."""
        return self._out.content()

    @property
    def problem(self) -> str | None:
        """Why something was not recorded (a line or body over its cap, too many calls, an
        unreadable encoding), or None."""
        return self._out.problem

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between chunks: the unfinished SSE line and the data of the unfinished
        event, the unfinished array element, or the JSON body so far."""
        return len(self._partial) + len(self._event)

    def feed(self, chunk: bytes) -> None:
        """One chunk of the response as the client gets it (still compressed if it is)."""
        if self._finished or not chunk:
            return
        try:
            if self._decoder is None:
                self._feed_plain(chunk)
            else:
                for piece in self._decoder.decode(chunk):
                    self._feed_plain(piece)
        except Exception as exc:  # a tap must never break the proxied response
            self._fail(f"cannot read tool calls or thoughts: {exc}")

    def feed_message(self, message: bytes | str) -> None:
        """One whole WebSocket message from the server: one event. One over the cap of an SSE
        event is not read, as that event is not: parsed whole, a 16 MiB message of small
        JSON values held over 400 MiB of objects."""
        if self._finished or self._format is None:
            return
        data = message.encode("utf-8", "replace") if isinstance(message, str) else message
        if len(data) > self._line_cap:
            self._out.note(f"a WebSocket message over {self._line_cap} bytes was not read")
            return
        if any(trigger in data for trigger in self._format.triggers):
            self._parse(data, self._format.event)

    def finish(self) -> None:
        """The response ended (completely or not): read what is held (an SSE event without its
        blank line is read too; an unfinished array element is not). Further chunks are
        ignored."""
        if self._finished:
            return
        try:
            if self._decoder is not None:
                self._feed_plain(self._decoder.flush())
            held, self._partial = self._partial, bytearray()
            if self._mode == _BODY:
                self._read_body(held)
            elif self._mode == _SSE:
                if held and not self._skipping:
                    self._read_lines(held)  # a last line without its newline
                self._dispatch()
        except Exception as exc:
            self._fail(f"cannot read tool calls or thoughts: {exc}")
        self._finished = True

    def read_body(self, body: bytes) -> None:
        """A whole JSON body (its first byte ``{``, not compressed), instead of ``feed`` and
        ``finish``: read as they would read it, without holding a copy."""
        if self._finished:
            return
        self._finished = True
        if len(body) > self._body_cap:
            self._out.note(f"a JSON body over {self._body_cap} bytes: its content is not recorded")
            return
        try:
            self._read_body(body)
        except Exception as exc:
            self._out.note(f"cannot read tool calls or thoughts: {exc}")

    def _fail(self, problem: str) -> None:
        self._out.note(problem)
        self._partial, self._event, self._event_lines = bytearray(), bytearray(), 0
        self._finished = True

    def _feed_plain(self, data: bytes) -> None:
        if self._mode is None:
            start = data.lstrip()[:1]
            if not start:
                return
            self._mode = _BODY if start == b"{" else _ARRAY if start == b"[" else _SSE
            self._elements = _ArrayElements() if self._mode == _ARRAY else None
        if self._mode == _SSE:
            self._feed_sse(data)
        elif self._mode == _BODY:
            self._hold_body(data)
        else:
            self._feed_array(data)

    def _feed_array(self, data: bytes) -> None:
        """A JSON-array stream: each element is read once, when its last byte arrives. One that
        starts and ends in the chunk is found by the C JSON scanner (``raw_decode``); one that
        does not is then followed by ``_ArrayElements``, chunk by chunk, and held until it ends,
        up to ``line_cap``. Each byte is scanned at most twice, whatever the chunking."""
        assert self._elements is not None
        position = 0
        if self._elements.depth:  # an element begun in an earlier chunk
            position = self._elements.close(data, 0)
            if position < 0:
                self._hold_element(data, 0)
                return
            self._partial += memoryview(data)[:position]
            element, self._partial = self._partial, bytearray()
            self._read_element(element)
        text = ""
        while (start := data.find(b"{", position)) >= 0:
            # latin-1: one character per byte, so the end found is a byte offset.
            text = text or data.decode("latin-1")
            try:
                position = _JSON_DECODER.raw_decode(text, start)[1]
            except (ValueError, RecursionError):  # unfinished (or not JSON): followed
                position = self._elements.close(data, start)
                if position < 0:
                    self._hold_element(data, start)
                    return
            self._read_element(data[start:position])

    def _hold_element(self, data: bytes, start: int) -> None:
        if len(self._partial) + len(data) - start > self._line_cap:
            self._fail(f"a JSON-array element over {self._line_cap} bytes: the rest is not read")
        else:
            self._partial += memoryview(data)[start:]

    def _read_element(self, element: bytes | bytearray) -> None:
        assert self._format is not None
        if any(trigger in element for trigger in self._format.triggers):
            self._parse(element, self._format.event)

    def _hold_body(self, data: bytes) -> None:
        if len(self._partial) + len(data) > self._body_cap:
            self._fail(f"a JSON body over {self._body_cap} bytes: its content is not recorded")
        else:
            self._partial += data

    def _feed_sse(self, data: bytes) -> None:
        """The common case first: a chunk of whole events (its last complete line blank) and
        nothing held, whose lines are searched for triggers in place (no copy), and read only
        when one is there; a chunk of one event of one ``data:`` line (most events of a stream)
        is parsed as it is, without gathering its line. Each byte is searched, copied and split
        a bounded number of times, whatever the chunking."""
        if self._cr is not False:
            data = self._line_endings(data)
        end = data.rfind(b"\n")
        if (
            end > 0
            and data[end - 1] == 0x0A
            and not (self._partial or self._skipping or self._event_lines)
        ):
            if end + 1 < len(data):
                self._hold_line(memoryview(data)[end + 1 :])
            for trigger in self._triggers:
                if data.find(trigger, 0, end) >= 0:
                    self._read_events(data, end)
                    return
            return
        self._feed_lines(data, end)

    def _read_events(self, data: bytes, end: int) -> None:
        """The whole events of ``data[:end]`` (``end``: the LF of its last, blank, line), one of
        which holds a trigger. One ``data:`` line and its blank line is one event: what
        ``_read_lines`` and ``_dispatch`` would read, without gathering it (the trigger found
        is in it: ``data:`` holds none)."""
        one_line = data.startswith(b"data:") and data.find(b"\n", 5) == end - 1
        if one_line and end - 1 <= self._line_cap:  # a longer one is skipped, and said, there
            assert self._format is not None
            self._parse(data[5 : end - 1], self._format.event)
        else:
            self._read_lines(data[:end])

    def _feed_lines(self, data: bytes, end: int) -> None:
        """Any other chunk (``end``: its last LF, or -1): the held line is completed, the end of
        one too long to keep skipped, the unfinished last line held, and the complete lines read
        one by one (an event under way may have begun in an earlier chunk, or go on in the next
        one)."""
        if end < 0:
            self._hold_line(data)
            return
        lines: bytes | bytearray = data
        start, stop = 0, end
        if self._partial:
            self._partial += memoryview(data)[:end]
            lines, self._partial = self._partial, bytearray()
            stop = len(lines)
        if self._skipping:  # the first line is the end of one too long to keep
            self._skipping = False
            start = lines.find(b"\n", 0, stop) + 1 or stop + 1
        if end + 1 < len(data):
            self._hold_line(memoryview(data)[end + 1 :])
        if start <= stop:
            self._read_lines(lines[start:stop])

    def _line_endings(self, data: bytes) -> bytes:
        """``data`` with LF line endings, once the stream's first line ending said it uses CR
        (alone or in CRLF); as it is until a line ends."""
        if self._cr is None:
            self._cr = _cr_ends_lines(data)
        return self._lf(data) if self._cr else data

    def _lf(self, data: bytes) -> bytes:
        """``data`` with its CRLF and CR line endings made LF (a CRLF that a chunk's end cut
        too)."""
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _hold_line(self, rest: bytes | memoryview) -> None:
        if not rest or self._skipping:
            return
        if len(self._partial) + len(rest) > self._line_cap:
            self._partial, self._event, self._event_lines = bytearray(), bytearray(), 0
            self._skipping = True
            self._out.note(f"an SSE line over {self._line_cap} bytes was skipped")
        else:
            self._partial += rest

    def _read_lines(self, lines: bytes | bytearray) -> None:
        """Complete lines: ``data:`` lines are gathered into the event under way, which a blank
        line ends (other fields and comments are ignored)."""
        for line in lines.split(b"\n"):
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                if len(self._event) + len(line) > self._line_cap:
                    self._event, self._event_lines = bytearray(), 0
                    self._out.note(f"an SSE event over {self._line_cap} bytes was skipped")
                    continue
                if self._event_lines:
                    self._event += b"\n"
                self._event += memoryview(line)[5:]
                self._event_lines += 1

    def _dispatch(self) -> None:
        """Read the event under way: its data lines joined with "\\n" (SSE); when that is not
        JSON, each line alone (events a server did not part with a blank line)."""
        event, lines = self._event, self._event_lines
        if not lines:
            return
        self._event, self._event_lines = bytearray(), 0
        assert self._format is not None
        triggers, handler = self._format.triggers, self._format.event
        for trigger in triggers:  # a loop, not any(): this runs for every event
            if trigger in event:
                break
        else:
            return
        if not self._parse(event, handler) and lines > 1:
            for line in event.split(b"\n"):
                if any(trigger in line for trigger in triggers):
                    self._parse(line, handler)

    def _read_body(self, body: bytes | bytearray) -> None:
        assert self._format is not None
        if not any(trigger in body for trigger in self._format.triggers):
            return
        try:
            value = _loads(body, self._format.exact_numbers)
        except (ValueError, RecursionError):
            self._out.note("the JSON body is not readable JSON")
            return
        if isinstance(value, dict):
            self._handle(value, self._format.body)

    def _parse(self, data: bytes | bytearray, handler: _Handler) -> bool:
        """Parse one event and hand it to ``handler``; False when it is not JSON. A tool-input
        piece that fits the frame of its call is read without the parse (``_DeltaFrame``)."""
        assert self._format is not None
        frame = self._frame
        if frame is not None and (piece := frame.piece(data)) is not None:
            if frame.call is None:
                frame.call = self._out.call(frame.handle)
            if frame.call is not None:
                frame.call.input.add(piece)
            return True
        try:
            value = _loads(data, self._format.exact_numbers)
        except (ValueError, RecursionError):
            return False  # ``[DONE]``, a keep-alive, a broken event: nothing to record
        if isinstance(value, dict):
            self._handle(value, handler)
            if self._frames_left and self._format.deltas is not None:
                self._learn(data, value, self._format.deltas)
        return True

    def _learn(self, data: bytes | bytearray, value: dict[str, Any], shape: _DeltaShape) -> None:
        """Learn the frame of a tool-input piece that the frame held did not fit (a new call)."""
        try:
            found = shape.piece(value)
            if found is not None:
                self._frames_left -= 1
                self._frame = _learn_frame(data, found[0], shape)
        except Exception:  # a shortcut only: without a frame, events are parsed whole
            self._frame = None

    def _handle(self, value: dict[str, Any], handler: _Handler) -> None:
        try:
            handler(value, self._out)
        except Exception as exc:  # an event of a shape no reference describes
            self._out.note(f"an event could not be read: {type(exc).__name__}")


def content_tap_for(
    api_kind: ApiKind | None, switches: ContentSwitches, content_encoding: str | None = None
) -> ContentTap | None:
    """A tap for a response of ``api_kind`` (SSE, a JSON body or a JSON-array stream), or None
    when there is nothing to collect (both switches off, an API without tool calls or thoughts).
    ``content_encoding``: the response's Content-Encoding, as its streamed chunks still have
    it."""
    if api_kind is None or not switches.any or not records_content(api_kind):
        return None
    return ContentTap(api_kind, switches, content_encoding)


def content_from_body(
    api_kind: ApiKind | None,
    switches: ContentSwitches,
    body: bytes,
    content_encoding: str | None = None,
) -> ResponseContent:
    """The tool calls and thoughts of a whole body that mitmproxy buffered. Same rules as the
    streaming tap. A body still encoded per ``content_encoding`` is read as a stream is, piece
    by piece (``usage.BodyDecoder``): decoded whole, a few kilobytes could fill the memory."""
    if (content_encoding or "identity").strip().lower() != "identity":
        tap = content_tap_for(api_kind, switches, content_encoding)
        if tap is None:
            return ResponseContent()
        tap.feed(body)
        tap.finish()
        return tap.content
    tap = content_tap_for(api_kind, switches)
    if tap is None or not any(trigger in body for trigger in tap._triggers):
        # The tap parses only events (or a body) holding a trigger, each a substring of the
        # body: without one nothing is read (a chat answer without tool calls or reasoning).
        return ResponseContent()
    if body[:1] == b"{":
        tap.read_body(body)  # what feed and finish do with one JSON body, without a copy
    else:
        tap.feed(body)
        tap.finish()
    return tap.content


def _loads(data: bytes | bytearray, exact_numbers: bool = True) -> Any:
    """``json.loads(data)``, by orjson where it gives the same value (an event in a fifth of the
    time: the tap parses every event that may carry a tool call or a thought). What orjson
    refuses (a lone surrogate escape, NaN, a UTF-16 body) is read by ``json`` as before, and so
    is any text with a run of 20 digits when ``exact_numbers``: orjson reads an integer over 64
    bits as a float. Without ``exact_numbers`` (a format that records no number) such an integer
    may come back as a float, and the search for it (a third of an event's parse) is skipped."""
    if not exact_numbers or _TWENTY_DIGITS not in data.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


# Every digit read as "0", so that a run of 20 digits is one substring search (a regular
# expression costs more than the orjson parse saves).
_DIGITS_AS_ZERO = bytes(ord("0") if 0x30 <= byte <= 0x39 else byte for byte in range(256))
_TWENTY_DIGITS = b"0" * 20
