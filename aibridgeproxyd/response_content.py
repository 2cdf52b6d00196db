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
read as soon as it is complete), anything else Server-Sent Events, one JSON event per ``data:``
line. WebSocket messages are one event each
(``feed_message``).

Cost and memory. Only events that can carry a tool call or a thought are JSON-parsed: each format
names a few trigger substrings (``_Format.triggers``), searched once per chunk across its
complete lines, so a text delta, the bulk of a stream, costs a ``bytes.rfind`` and two or three
``bytes.find``. Between chunks the tap keeps the unfinished last SSE line, up to ``line_cap``
bytes (a longer line is skipped to its end and noted in ``problem``), or the unfinished element
of a JSON array (same cap), and what it records, each piece bounded. A single JSON body is the
exception: it cannot be split into events without parsing it, so it is kept up to ``body_cap``
bytes and read when it ends; past that nothing of it is recorded (``problem`` says so). Such a
body streams only when the upstream sends no ``Content-Length`` for a non-streamed answer.

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
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from aibridgeproxyd.model import ToolCall
from aibridgeproxyd.usage import ApiKind, BodyDecoder
from aibridgeproxyd.utf8 import cut_utf8

MAX_TOOL_CALLS = 128
MAX_THOUGHTS = 128
# What an Anthropic ``redacted_thinking`` block is recorded as: its data is encrypted, never kept.
REDACTED_THINKING = "[redacted thinking]"
# Call ids and tool names are short; anything longer is cut at this many characters.
MAX_NAME_CHARS = 256
# The unfinished SSE line kept between chunks, and a JSON body kept until it ends, are bounded by
# these (bytes) or by a multiple of ``record_max_bytes``, whichever is larger.
MIN_LINE_CAP = 1024 * 1024
# A growing text is joined into one string once it holds this many pieces.
_JOIN_PIECES = 64
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
    one piece's worth, cut when read)."""

    __slots__ = ("_limit", "_pieces", "_size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pieces: list[str] = []
        self._size = 0  # UTF-8 bytes held

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def add(self, piece: Any) -> None:
        if not isinstance(piece, str) or not piece or self._size > self._limit:
            return
        piece = piece[: self._limit + 1]  # at least limit + 1 bytes: enough to cut from
        pieces = self._pieces
        pieces.append(piece)
        self._size += len(piece) if piece.isascii() else len(piece.encode("utf-8", "replace"))
        if len(pieces) >= _JOIN_PIECES:
            # Streams send arguments a few characters per delta: thousands of small strings
            # would cost far more memory than their text. Joined now and then, amortised.
            self._pieces = ["".join(pieces)]

    def set(self, whole: Any) -> None:
        """Replace what was assembled with the whole text (a ``.done`` event's)."""
        if isinstance(whole, str) and whole:
            self._pieces, self._size = [], 0
            self.add(whole)

    def text(self) -> str:
        return cut_utf8("".join(self._pieces), self._limit)


class _Call:
    __slots__ = ("call_id", "initial", "input", "name")

    def __init__(self, limit: int) -> None:
        self.call_id: str | None = None
        self.name = ""
        self.input = _Text(limit)
        self.initial = ""  # the input a streamed block started with, if no delta follows

    def record(self, limit: int) -> ToolCall:
        text = self.input.text() if self.input else cut_utf8(self.initial, limit)
        return ToolCall(self.call_id, self.name, text)


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
        limit = self.switches.max_bytes
        calls = tuple(
            call.record(limit) for call in self._calls.values() if call.name or call.call_id
        )
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
    return value if isinstance(value, int | str) and not isinstance(value, bool) else default


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
    """One ``chat.completion.chunk``: tool-call and reasoning deltas per choice."""
    for position, choice in _dicts(event.get("choices")):
        index = _index(choice.get("index"), position)
        delta = _dict(choice.get("delta"))
        for slot, tool_call in _dicts(delta.get("tool_calls")):
            function = _chat_function(tool_call)
            key = ("chat", index, _index(tool_call.get("index"), slot))
            call = out.call(key, tool_call.get("id"), function.get("name"))
            if call is not None:
                call.input.add(function.get("arguments", function.get("input")))
        if out.switches.thoughts and (reasoning := _chat_reasoning(delta)):
            _add(out.thought(("chat", index)), reasoning)


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
    return item_id if isinstance(item_id, str) and item_id else ("output", output_index)


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
    if kind in _ANTHROPIC_TOOL_BLOCKS:
        call = out.call(key, block.get("id"), block.get("name"))
        if call is not None:
            call.initial = _json_text(block.get("input"))
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
                call.initial = _json_text(function_call.get("args", {}))
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


_CHAT = _Format((b'"tool_calls', b'"reasoning'), _chat_event, _chat_body)
# ``_call"``: "function_call" / "custom_tool_call" items (not ``parallel_tool_calls``);
# ``_call_``: their argument / input events. Reasoning summaries come as their own events.
_RESPONSES = _Format(
    (b'_call"', b"_call_", b".reasoning_summary_text."), _responses_event, _responses_body
)
_GEMINI = _Format((b'"functionCall', b'"thought"'), _gemini_event, _gemini_event)
_FORMATS: dict[ApiKind, _Format] = {
    ApiKind.OPENAI_CHAT_COMPLETIONS: _CHAT,
    ApiKind.OPENAI_RESPONSES: _RESPONSES,
    ApiKind.OPENAI_REALTIME: _RESPONSES,
    ApiKind.ANTHROPIC_MESSAGES: _Format(
        (b'tool_use"', b"thinking", b'"input_json_delta"'), _anthropic_event, _anthropic_body
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
_JSON_DECODER = json.JSONDecoder()
_ARRAY_GAP = frozenset(b" \t\r\n,[")


class ContentTap:
    """Collects the tool calls and thoughts of one response as its chunks pass (``feed``), or of
    a WebSocket session message by message (``feed_message``). Never raises: what it cannot read
    is not recorded, and ``problem`` says why."""

    __slots__ = (
        "_body_cap",
        "_decoder",
        "_finished",
        "_format",
        "_line_cap",
        "_mode",
        "_out",
        "_partial",
        "_partial_size",
        "_skipping",
    )

    def __init__(
        self, api_kind: ApiKind, switches: ContentSwitches, content_encoding: str | None = None
    ) -> None:
        self._format = _FORMATS.get(api_kind)
        self._out = _Collector(switches)
        self._finished = self._format is None or not switches.any
        self._line_cap = max(MIN_LINE_CAP, 4 * switches.max_bytes)
        self._body_cap = max(MIN_BODY_CAP, 8 * switches.max_bytes)
        self._mode: str | None = None
        self._partial: list[bytes] = []  # the unfinished last line, or the JSON body so far
        self._partial_size = 0
        self._skipping = False  # inside an SSE line too long to keep, until its end
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
        """Bytes held between chunks: the unfinished SSE line, or the JSON body so far."""
        return self._partial_size

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
        """One whole WebSocket message from the server: one event."""
        if self._finished or self._format is None:
            return
        data = message.encode("utf-8", "replace") if isinstance(message, str) else message
        if any(trigger in data for trigger in self._format.triggers):
            self._parse(data, self._format.event)

    def finish(self) -> None:
        """The response ended (completely or not): read what is held. Further chunks are
        ignored."""
        if self._finished:
            return
        try:
            if self._decoder is not None:
                self._feed_plain(self._decoder.flush())
            held, self._partial, self._partial_size = b"".join(self._partial), [], 0
            if self._mode == _BODY:
                self._read_body(held)
            elif self._mode == _ARRAY:
                self._read_elements(held, final=True)
            elif held and not self._skipping:
                self._read_lines(held)  # a last line without its newline
        except Exception as exc:
            self._fail(f"cannot read tool calls or thoughts: {exc}")
        self._finished = True

    def _fail(self, problem: str) -> None:
        self._out.note(problem)
        self._partial, self._partial_size = [], 0
        self._finished = True

    def _feed_plain(self, data: bytes) -> None:
        if self._mode is None:
            start = data.lstrip()[:1]
            if not start:
                return
            self._mode = _BODY if start == b"{" else _ARRAY if start == b"[" else _SSE
        if self._mode == _SSE:
            self._feed_sse(data)
        elif self._mode == _BODY:
            self._hold_body(data)
        else:
            self._feed_array(data)

    def _feed_array(self, data: bytes) -> None:
        """A JSON-array stream: each element is read as soon as it is complete (an element can
        only end in a chunk holding a ``}``); only the unfinished one is held, up to
        ``line_cap``."""
        self._partial.append(data)
        self._partial_size += len(data)
        if b"}" in data:
            held = b"".join(self._partial)
            self._partial, self._partial_size = [], 0
            rest = self._read_elements(held, final=False)
            self._partial, self._partial_size = ([rest], len(rest)) if rest else ([], 0)
        if self._partial_size > self._line_cap:
            self._fail(f"a JSON-array element over {self._line_cap} bytes: the rest is not read")

    def _read_elements(self, data: bytes, final: bool) -> bytes:
        """Read every complete element of ``data`` (the array's bytes from where the last read
        stopped); return the bytes of the unfinished one."""
        assert self._format is not None
        position, end = 0, len(data)
        while True:
            while position < end and data[position] in _ARRAY_GAP:
                position += 1
            if position == end or data[position] != 0x7B:  # "{": else "]", the array's end
                return b""
            try:
                # latin-1: one character per byte, so the end found is a byte offset.
                _, length = _JSON_DECODER.raw_decode(data[position:].decode("latin-1"))
            except (ValueError, RecursionError):
                if final:
                    return b""
                return data[position:]
            element = data[position : position + length]
            position += length
            if any(trigger in element for trigger in self._format.triggers):
                self._parse(element, self._format.event)

    def _hold_body(self, data: bytes) -> None:
        self._partial_size += len(data)
        if self._partial_size > self._body_cap:
            self._fail(f"a JSON body over {self._body_cap} bytes: its content is not recorded")
        else:
            self._partial.append(data)

    def _feed_sse(self, data: bytes) -> None:
        """Complete lines are searched for triggers in place (no copy) unless a line was held;
        the unfinished last line is held for the next chunk."""
        end = data.rfind(b"\n")
        if end < 0:
            self._hold_line(data)
            return
        lines, stop = data, end
        if self._partial:
            lines = b"".join(self._partial) + data[:end]
            self._partial, self._partial_size, stop = [], 0, len(lines)
        start = 0
        if self._skipping:  # the first line is the end of one too long to keep
            self._skipping = False
            start = lines.find(b"\n", 0, stop) + 1 or stop
        self._hold_line(data[end + 1 :])
        assert self._format is not None
        for trigger in self._format.triggers:
            if lines.find(trigger, start, stop) >= 0:
                self._read_lines(lines[start:stop])
                return

    def _hold_line(self, rest: bytes) -> None:
        if not rest or self._skipping:
            return
        self._partial_size += len(rest)
        if self._partial_size > self._line_cap:
            self._partial, self._partial_size = [], 0
            self._skipping = True
            self._out.note(f"an SSE line over {self._line_cap} bytes was skipped")
        else:
            self._partial.append(rest)

    def _read_lines(self, lines: bytes) -> None:
        assert self._format is not None
        triggers = self._format.triggers
        for line in lines.split(b"\n"):
            if line.startswith(b"data:") and any(trigger in line for trigger in triggers):
                self._parse(line[5:], self._format.event)

    def _read_body(self, body: bytes) -> None:
        assert self._format is not None
        if not any(trigger in body for trigger in self._format.triggers):
            return
        try:
            value = _loads(body)
        except (ValueError, RecursionError):
            self._out.note("the JSON body is not readable JSON")
            return
        if isinstance(value, dict):
            self._handle(value, self._format.body)

    def _parse(self, data: bytes, handler: _Handler) -> None:
        try:
            value = _loads(data)
        except (ValueError, RecursionError):
            return  # ``[DONE]``, a keep-alive, a broken event: nothing to record
        if isinstance(value, dict):
            self._handle(value, handler)

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
    api_kind: ApiKind | None, switches: ContentSwitches, body: bytes
) -> ResponseContent:
    """The tool calls and thoughts of a whole (decoded) body that mitmproxy buffered. Same rules
    as the streaming tap."""
    tap = content_tap_for(api_kind, switches)
    if tap is None:
        return ResponseContent()
    tap.feed(body)
    tap.finish()
    return tap.content


def _loads(data: bytes) -> Any:
    """``json.loads(data)``, by orjson where it gives the same value (an event in a fifth of the
    time: the tap parses every event that may carry a tool call or a thought). What orjson
    refuses (a lone surrogate escape, NaN, a UTF-16 body) is read by ``json`` as before, and so
    is any text with a run of 20 digits: orjson reads an integer over 64 bits as a float."""
    if _TWENTY_DIGITS not in data.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


# Every digit read as "0", so that a run of 20 digits is one substring search (a regular
# expression costs more than the orjson parse saves).
_DIGITS_AS_ZERO = bytes(ord("0") if 0x30 <= byte <= 0x39 else byte for byte in range(256))
_TWENTY_DIGITS = b"0" * 20
