"""Token usage read from provider responses as they pass, without keeping the body.

A ``UsageTap`` is fed every chunk of a response on its way to the client. It never holds the
body: it looks for the few JSON keys that carry usage (``"usage"``, ``"usageMetadata"``, Bedrock's
``"amazon-bedrock-invocationMetrics"``) and the model name, and parses only the small object that
follows each one. Between chunks it keeps at most a partial key (a few dozen bytes) or one
unfinished usage object (bounded by ``MAX_VALUE_BYTES``), so memory and per-chunk work do not grow
with the length of the stream. The same scan reads SSE streams, single JSON bodies and Gemini's
JSON-array streams alike, because it does not depend on the framing around the JSON.

Why scanning by key is safe: inside a JSON string every ``"`` is escaped, so the bytes
``"usage"`` followed by ``:`` can only be an object key, never model output or a tool argument.

Token semantics, the same for every provider (docs/monitoring.md, "Interception records";
contract section 10.1), so that cost is one formula (``input * price_in + cache_read *
price_cache_read + cache_creation * price_cache_write + output * price_out``) and
``input + cache_read + cache_creation`` is the whole prompt the provider billed:

- ``input_tokens``: prompt tokens that were neither read from nor written to a cache.
  OpenAI (chat, Responses, Realtime), OpenAI-compatible gateways and Gemini count cached tokens
  inside the prompt total, so they are subtracted here, once; Anthropic's ``input_tokens``
  already excludes them.
- ``cache_read_input_tokens``: prompt tokens served from a cache (OpenAI
  ``prompt_tokens_details.cached_tokens`` / ``input_tokens_details.cached_tokens`` /
  Realtime ``input_token_details.cached_tokens``, Anthropic ``cache_read_input_tokens``, Gemini
  ``cachedContentTokenCount``).
- ``cache_creation_input_tokens``: prompt tokens written to a cache (Anthropic
  ``cache_creation_input_tokens``; OpenRouter ``prompt_tokens_details.cache_write_tokens`` and
  ``input_tokens_details.cache_write_tokens``; LiteLLM-style gateways
  ``prompt_tokens_details.cache_creation_tokens`` and the top-level
  ``cache_creation_input_tokens``, two names for the same tokens).
- ``output_tokens``: every generated token that is billed as output, reasoning included. OpenAI's
  ``completion_tokens`` / ``output_tokens`` already include reasoning tokens; Gemini reports
  thinking apart (``thoughtsTokenCount``), so it is added to ``candidatesTokenCount``.
- ``reasoning_output_tokens``: the part of ``output_tokens`` that was reasoning (OpenAI
  ``completion_tokens_details.reasoning_tokens`` / ``output_tokens_details.reasoning_tokens``,
  Gemini ``thoughtsTokenCount``). A breakdown, never added to the others: Anthropic, Bedrock
  and Realtime report none.

Gemini's ``toolUsePromptTokenCount`` (tool results fed back to the model, e.g. search grounding)
is counted as input: Gemini's own total is prompt + candidates + tool-use prompt + thoughts.

``None`` means the provider reported nothing for that count (a chat stream without
``stream_options.include_usage``, a stream cut before its usage event, an OpenAI answer that
names no cache writes): never 0.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aibridgeproxyd.model import ApiFormat

# A usage object is a few hundred bytes. One that has not closed after this many bytes is not
# one we can read, and is dropped rather than buffered further.
MAX_VALUE_BYTES = 64 * 1024
_WINDOWS = (1024, 8 * 1024, MAX_VALUE_BYTES)
# Chunks smaller than this are joined to the bytes kept from the previous chunk before scanning.
_JOIN_BELOW = 4096
# Decompressed output is handed to the scanner in pieces of at most this size.
_DECOMPRESSED_PIECE = 64 * 1024
# A response may decode to at most this many times its compressed size, plus
# ``_DECODED_ALLOWANCE``: gzip cannot exceed about 1032:1, and an SSE stream, flushed event by
# event, stays far below. A zstd or brotli bomb goes past it at once (a 64 KiB read of zstd
# decodes to 2 GiB: seconds of the event loop), and the taps stop reading it.
MAX_DECODING_RATIO = 1024
_DECODED_ALLOWANCE = 1024 * 1024
_MAX_MODEL_CHARS = 200
_WHITESPACE = frozenset(b" \t\r\n")
_COLON = ord(":")
_JSON = json.JSONDecoder()


class ApiKind(StrEnum):
    """The provider API a request speaks, as far as usage is concerned."""

    OPENAI_CHAT_COMPLETIONS = "openai.chat_completions"
    OPENAI_COMPLETIONS = "openai.completions"
    # Also Responses over WebSocket (Codex): the same events, one per message.
    OPENAI_RESPONSES = "openai.responses"
    OPENAI_EMBEDDINGS = "openai.embeddings"
    OPENAI_REALTIME = "openai.realtime"  # WebSocket only: usage in ``response.done``
    # A Realtime session opened with ``?intent=transcription``: usage per transcribed item.
    OPENAI_REALTIME_TRANSCRIPTION = "openai.realtime_transcription"
    # Also Bedrock after the adapter turned its event stream back into Anthropic SSE.
    ANTHROPIC_MESSAGES = "anthropic.messages"
    GEMINI_GENERATE_CONTENT = "gemini.generate_content"
    GEMINI_LIVE = "gemini.live"  # WebSocket ``BidiGenerateContent``: ``usageMetadata`` per turn


# Label values of the tokens counter, in the order of Usage's fields.
TOKEN_TYPES = ("input", "output", "cache_read", "cache_creation", "reasoning_output")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one response, None where the upstream reported none, and the model it
    reported."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    model: str | None = None
    # Last, so that positional construction of the fields above keeps its meaning.
    reasoning_output_tokens: int | None = None

    @property
    def reported(self) -> bool:
        """True when the response carried any token count."""
        return any(count is not None for count in self._counts())

    def tokens_by_type(self) -> dict[str, int]:
        """Reported counts keyed by ``TOKEN_TYPES`` (the ``type`` label of the tokens counter)."""
        return {
            token_type: count
            for token_type, count in zip(TOKEN_TYPES, self._counts(), strict=True)
            if count is not None
        }

    def _counts(self) -> tuple[int | None, ...]:
        return (
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
            self.reasoning_output_tokens,
        )


# --- which API a request speaks ------------------------------------------------------------------

_GEMINI_GENERATE = re.compile(r":(?:stream)?[gG]enerate[cC]ontent$")
# Gemini Live: /ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent
# (also v1alpha, and ...BidiGenerateContentConstrained with an ephemeral token).
_GEMINI_LIVE = re.compile(r"\.GenerativeService\.BidiGenerateContent\w*$")
# The path segments that name each OpenAI-format API, wherever they sit in the path (behind a
# version, a gateway prefix or an Azure deployment). Longest first: /chat/completions must not
# be taken for legacy /completions.
_OPENAI_ROOTS = (
    (("chat", "completions"), ApiKind.OPENAI_CHAT_COMPLETIONS),
    (("completions",), ApiKind.OPENAI_COMPLETIONS),
    (("responses",), ApiKind.OPENAI_RESPONSES),
    (("embeddings",), ApiKind.OPENAI_EMBEDDINGS),
)
_ANTHROPIC_ROOT = (("v1", "messages"), ApiKind.ANTHROPIC_MESSAGES)
# Operations under an API root whose answers report no billed generation: token counting
# (Anthropic ``/v1/messages/count_tokens``, OpenAI ``/responses/input_tokens``) and batches,
# whose results are fetched later.
_UNBILLED_OPERATIONS = frozenset({"count_tokens", "input_tokens", "batches"})
# An operation is a lowercase word (``compact``); an object id (``resp_68ab…``,
# ``chatcmpl-B9…``) is not.
_OPERATION = re.compile(r"[a-z_]+")


def _segments(path: str) -> list[str]:
    return [segment for segment in path.partition("?")[0].split("/") if segment]


def _under_root(
    segments: list[str], roots: Collection[tuple[tuple[str, ...], ApiKind]]
) -> tuple[ApiKind, list[str]] | None:
    """The API whose root is the last one in ``segments`` (a deployment named ``responses`` in
    front of ``/chat/completions`` is not the API), and the segments after it."""
    for end in range(len(segments), 0, -1):
        for root, kind in roots:
            if tuple(segments[end - len(root) : end]) == root:
                return kind, segments[end:]
    return None


def _creates_billed_work(rest: list[str]) -> bool:
    """Whether a POST to ``<api root>/<rest>`` makes the model generate: the root itself, or an
    operation such as ``/responses/compact``. Not one on an existing object
    (``/responses/{id}/cancel``, ``/chat/completions/{id}``, whose answer repeats usage already
    counted), nor token counting or batches."""
    if not rest:
        return True
    operation = rest[0]
    return _OPERATION.fullmatch(operation) is not None and operation not in _UNBILLED_OPERATIONS


def api_kind_for(method: str, path: str, formats: Collection[ApiFormat]) -> ApiKind | None:
    """The API of a request whose response reports usage, or None (models lists, token counting,
    ``GET /responses/{id}``, which would count a response twice, ...).

    Classified by path segments, not by an exact suffix: anything under an API's root is that
    API (``/v1/responses`` and ``/v1/responses/compact`` alike), except operations on an existing
    object and token counting (``_creates_billed_work``). ``formats`` are the wire formats the
    provider's clients may speak (an adapter's ``usage_formats``); Anthropic Messages is
    recognised first, then Gemini, then OpenAI. ``path`` is the path the client sent (query
    string allowed), before the adapter maps it: Bedrock's upstream path no longer says
    ``/v1/messages``. Only POST creates billable work.
    """
    if method.upper() != "POST":
        return None
    segments = _segments(path)
    roots: list[tuple[tuple[str, ...], ApiKind]] = []
    if ApiFormat.ANTHROPIC in formats:
        roots.append(_ANTHROPIC_ROOT)
    if ApiFormat.GEMINI in formats and segments and _GEMINI_GENERATE.search(segments[-1]):
        return ApiKind.GEMINI_GENERATE_CONTENT
    if ApiFormat.OPENAI in formats:
        roots.extend(_OPENAI_ROOTS)
    found = _under_root(segments, roots)
    if found is None:
        return None
    kind, rest = found
    return kind if _creates_billed_work(rest) else None


def websocket_api_kind_for(path: str, formats: Collection[ApiFormat]) -> ApiKind | None:
    """The API of a WebSocket session (the upgrade request's ``path``), or None: OpenAI Realtime
    (``/v1/realtime``, Azure ``/openai/realtime``), Responses over WebSocket (``/v1/responses``,
    Codex) and Gemini Live (``…GenerativeService.BidiGenerateContent``). Each reports usage in
    its own shape, so a session of an unknown API records none rather than a wrong count."""
    segments = _segments(path)
    if ApiFormat.GEMINI in formats and segments and _GEMINI_LIVE.search(segments[-1]):
        return ApiKind.GEMINI_LIVE
    if ApiFormat.OPENAI not in formats:
        return None
    if "realtime" in segments:
        query = path.partition("?")[2]
        if re.search(r"(?:^|&)intent=transcription(?:&|$)", query):
            return ApiKind.OPENAI_REALTIME_TRANSCRIPTION
        return ApiKind.OPENAI_REALTIME
    if "responses" in segments:
        return ApiKind.OPENAI_RESPONSES
    return None


# --- turning provider usage objects into Usage ----------------------------------------------------


class _Tally:
    """Usage as it builds up over a stream. Later reports win field by field, because every
    provider's later events carry cumulative (or final) counts."""

    __slots__ = ("cache_creation", "cache_read", "input", "model", "output", "reasoning")

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.cache_read: int | None = None
        self.cache_creation: int | None = None
        self.reasoning: int | None = None
        self.model: str | None = None

    def update(
        self,
        input: int | None = None,
        output: int | None = None,
        cache_read: int | None = None,
        cache_creation: int | None = None,
        reasoning: int | None = None,
    ) -> None:
        if input is not None:
            self.input = input
        if output is not None:
            self.output = output
        if cache_read is not None:
            self.cache_read = cache_read
        if cache_creation is not None:
            self.cache_creation = cache_creation
        if reasoning is not None:
            self.reasoning = reasoning

    def fill(self, **counts: int | None) -> None:
        """Set only the fields nothing has reported yet."""
        for name, value in counts.items():
            if value is not None and getattr(self, name) is None:
                setattr(self, name, value)

    def usage(self) -> Usage:
        return Usage(
            self.input,
            self.output,
            self.cache_read,
            self.cache_creation,
            self.model,
            reasoning_output_tokens=self.reasoning,
        )


# No response is billed a trillion tokens: a larger count is not a count we can trust, and
# could not be stored or priced.
MAX_TOKEN_COUNT = 10**12


def _count(value: Any) -> int | None:
    """A token count, or None for anything that is not an integer from 0 to
    ``MAX_TOKEN_COUNT``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        return None
    return value


def _details(usage: dict[str, Any], name: str) -> dict[str, Any]:
    value = usage.get(name)
    return value if isinstance(value, dict) else {}


def _one_count(*values: Any) -> int | None:
    """One quantity reported under several names: the largest of the counts among ``values``
    (a gateway may fill one name with a placeholder 0), None when none is a count."""
    counts = [count for value in values if (count := _count(value)) is not None]
    return max(counts) if counts else None


def _fresh_input(prompt: int, cache_read: int | None, cache_creation: int | None) -> int:
    """The uncached part of a prompt total that includes the cache reads and writes (OpenAI,
    LiteLLM, OpenRouter, Gemini). A total smaller than its cached parts cannot include them:
    some OpenAI-compatible servers (older LiteLLM) report the fresh tokens alone there."""
    cached = (cache_read or 0) + (cache_creation or 0)
    return prompt - cached if prompt >= cached else prompt


def _output_with_reasoning(
    output: int | None, reasoning: int | None, prompt: int, total: int | None
) -> int | None:
    """Output tokens, reasoning included as OpenAI reports them. Some OpenAI-compatible servers
    (Gemini translations) report reasoning on top of ``completion_tokens`` instead: their
    ``total_tokens`` then adds it again, or the output is smaller than its own reasoning."""
    if output is None or not reasoning:
        return output
    if output < reasoning or total == prompt + output + reasoning:
        return output + reasoning
    return output


def _tally_openai(
    tally: _Tally,
    usage: dict[str, Any],
    prompt: int,
    cache_read: int | None,
    cache_creation: int | None,
    output_key: str,
) -> None:
    """The part chat completions and Responses share: output under ``output_key`` with its
    ``<output_key>_details.reasoning_tokens``, and the fresh input left of ``prompt``."""
    reasoning = _count(_details(usage, f"{output_key}_details").get("reasoning_tokens"))
    output = _output_with_reasoning(
        _count(usage.get(output_key)), reasoning, prompt, _count(usage.get("total_tokens"))
    )
    tally.update(
        _fresh_input(prompt, cache_read, cache_creation),
        output,
        cache_read,
        cache_creation,
        reasoning,
    )


def _openai_chat_usage(usage: dict[str, Any], tally: _Tally) -> None:
    """Chat completions, legacy completions and embeddings (OpenAI API reference, "The chat
    completion object", ``usage``): ``prompt_tokens`` includes the cache reads
    (``prompt_tokens_details.cached_tokens``) and, at gateways that report them, the cache
    writes: OpenRouter ``prompt_tokens_details.cache_write_tokens``; LiteLLM
    ``prompt_tokens_details.cache_creation_tokens`` and top-level ``cache_creation_input_tokens``
    (the same tokens twice, counted once), with reads also as ``cache_read_input_tokens``.
    ``completion_tokens`` include ``completion_tokens_details.reasoning_tokens``."""
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        return
    details = _details(usage, "prompt_tokens_details")
    cache_read = _one_count(details.get("cached_tokens"), usage.get("cache_read_input_tokens"))
    cache_creation = _one_count(
        details.get("cache_write_tokens"),
        details.get("cache_creation_tokens"),
        usage.get("cache_creation_input_tokens"),
    )
    _tally_openai(tally, usage, prompt, cache_read, cache_creation, "completion_tokens")


def _openai_responses_usage(usage: dict[str, Any], tally: _Tally) -> None:
    """Responses API on every path and transport (OpenAI API reference, "The response object",
    ``usage``): ``input_tokens`` includes ``input_tokens_details.cached_tokens`` and, where a
    gateway reports them (OpenRouter, Azure AI Foundry), ``cache_write_tokens``;
    ``output_tokens`` include ``output_tokens_details.reasoning_tokens``."""
    prompt = _count(usage.get("input_tokens"))
    if prompt is None:
        return
    details = _details(usage, "input_tokens_details")
    cache_read = _count(details.get("cached_tokens"))
    cache_creation = _count(details.get("cache_write_tokens"))
    _tally_openai(tally, usage, prompt, cache_read, cache_creation, "output_tokens")


def _openai_realtime_usage(usage: dict[str, Any], tally: _Tally) -> None:
    """Realtime ``response.done`` → ``response.usage`` (OpenAI API reference, Realtime server
    events): ``input_tokens`` includes ``input_token_details.cached_tokens`` (note: ``token``,
    not ``tokens``). The input-audio transcription's usage
    (``conversation.item.input_audio_transcription.completed``) is billed to the transcription
    model, not the session's: it says ``"type": "tokens"`` or ``"duration"``, and is skipped."""
    if "type" in usage:
        return
    prompt = _count(usage.get("input_tokens"))
    if prompt is None:
        return
    cache_read = _count(_details(usage, "input_token_details").get("cached_tokens"))
    tally.update(
        _fresh_input(prompt, cache_read, None), _count(usage.get("output_tokens")), cache_read
    )


def _openai_transcription_usage(usage: dict[str, Any], tally: _Tally) -> None:
    """A Realtime transcription session bills each transcribed item:
    ``conversation.item.input_audio_transcription.completed`` → ``usage`` of ``"type":
    "tokens"`` (``input_tokens``, ``output_tokens``; no cache). ``"type": "duration"`` usage
    (whisper-1, billed by the second) has no token counts."""
    if usage.get("type") != "tokens":
        return
    tally.update(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")))


def _anthropic_usage(usage: dict[str, Any], tally: _Tally) -> None:
    """``message_start`` (message.usage), ``message_delta`` (usage, cumulative; newer API versions
    also repeat the input and cache counts there) and a whole message all land here (Anthropic
    API reference, Messages and "Streaming messages"). ``input_tokens`` already excludes the
    cache reads and writes; no reasoning count is reported (thinking is billed as output)."""
    tally.update(
        _count(usage.get("input_tokens")),
        _count(usage.get("output_tokens")),
        _count(usage.get("cache_read_input_tokens")),
        _count(usage.get("cache_creation_input_tokens")),
    )


def _bedrock_invocation_metrics(metrics: dict[str, Any], tally: _Tally) -> None:
    """Bedrock adds these to the last stream event. The Anthropic usage events are the primary
    source; the metrics only fill what they left unreported."""
    tally.fill(
        input=_count(metrics.get("inputTokenCount")),
        output=_count(metrics.get("outputTokenCount")),
        cache_read=_count(metrics.get("cacheReadInputTokenCount")),
        cache_creation=_count(metrics.get("cacheWriteInputTokenCount")),
    )


def _gemini_usage(usage: dict[str, Any], tally: _Tally) -> None:
    """``usageMetadata`` (Gemini API reference, ``UsageMetadata``): ``promptTokenCount`` includes
    ``cachedContentTokenCount``; tool-use prompt and thinking tokens (``thoughtsTokenCount``)
    come on top of the prompt and of the candidates. Gemini Live names the candidates
    ``responseTokenCount``. Gemini has no cache writes to report."""
    prompt = _count(usage.get("promptTokenCount"))
    if prompt is None:
        return
    cache_read = _count(usage.get("cachedContentTokenCount"))
    tool_prompt = _count(usage.get("toolUsePromptTokenCount")) or 0
    candidates = _one_count(usage.get("candidatesTokenCount"), usage.get("responseTokenCount"))
    thoughts = _count(usage.get("thoughtsTokenCount"))
    output = None
    if candidates is not None or thoughts is not None:
        output = (candidates or 0) + (thoughts or 0)
    fresh = _fresh_input(prompt, cache_read, None) + tool_prompt
    tally.update(fresh, output, cache_read, None, thoughts)


_Handler = Callable[[dict[str, Any], _Tally], None]


@dataclass(frozen=True)
class _Format:
    usage_keys: dict[bytes, _Handler]  # quoted JSON key -> what to do with its object
    model_key: bytes


_OPENAI_CHAT = _Format({b'"usage"': _openai_chat_usage}, b'"model"')
_GEMINI = _Format({b'"usageMetadata"': _gemini_usage}, b'"modelVersion"')
_FORMATS: dict[ApiKind, _Format] = {
    ApiKind.OPENAI_CHAT_COMPLETIONS: _OPENAI_CHAT,
    ApiKind.OPENAI_COMPLETIONS: _OPENAI_CHAT,
    ApiKind.OPENAI_EMBEDDINGS: _OPENAI_CHAT,
    ApiKind.OPENAI_RESPONSES: _Format({b'"usage"': _openai_responses_usage}, b'"model"'),
    # The first model named in a session is ``session.created``'s ``session.model``.
    ApiKind.OPENAI_REALTIME: _Format({b'"usage"': _openai_realtime_usage}, b'"model"'),
    # The first model named is the transcription model, in ``session.created``.
    ApiKind.OPENAI_REALTIME_TRANSCRIPTION: _Format(
        {b'"usage"': _openai_transcription_usage}, b'"model"'
    ),
    ApiKind.ANTHROPIC_MESSAGES: _Format(
        {
            b'"usage"': _anthropic_usage,
            b'"amazon-bedrock-invocationMetrics"': _bedrock_invocation_metrics,
        },
        b'"model"',
    ),
    ApiKind.GEMINI_GENERATE_CONTENT: _GEMINI,
    ApiKind.GEMINI_LIVE: _GEMINI,
}
# A Gemini Live session names its model only in the client's first message,
# ``{"setup": {"model": "models/<name>", ...}}``.
_GEMINI_LIVE_SETUP = _Format({}, b'"model"')


# --- the scan ------------------------------------------------------------------------------------


class _NeedMore(Exception):
    """The value after a key has not fully arrived yet."""


class _KeyScanner:
    """Finds ``"<key>": <value>`` for a few keys in a byte stream and parses only the values."""

    __slots__ = (
        "_all_keys",
        "_format",
        "_pending",
        "_pending_is_value",
        "_tail",
        "_tally",
        "_usage_keys",
    )

    def __init__(self, fmt: _Format, tally: _Tally) -> None:
        self._format = fmt
        self._tally = tally
        # Between chunks: the last few bytes (a key may be split across two chunks), or the
        # start of a value that has not fully arrived.
        self._pending = b""
        self._pending_is_value = False
        self._tail = max(len(key) for key in (*fmt.usage_keys, fmt.model_key)) - 1
        self._usage_keys = tuple(fmt.usage_keys)
        self._all_keys = (*fmt.usage_keys, fmt.model_key)

    @property
    def buffered_bytes(self) -> int:
        return len(self._pending)

    def feed(self, chunk: bytes) -> None:
        pending = self._pending
        # A large chunk is scanned in place: it is joined to the kept bytes only when they hold
        # an unfinished value or the start of a key, which is rare. Joining a small one costs less
        # than checking the seam.
        if pending and (
            self._pending_is_value or len(chunk) < _JOIN_BELOW or self._key_at_seam(pending, chunk)
        ):
            data = pending + chunk
        else:
            data = chunk
        self._pending = b""
        self._pending_is_value = False
        for key in self._active_keys():  # most chunks name no key: a search each, no generator
            if key in data:
                break
        else:
            self._pending = data[-self._tail :]
            return
        position = 0
        for start, key in self._keys(data):
            if start < position:
                continue  # inside a value already parsed
            try:
                position = self._take_value(data, start, key)
            except _NeedMore:
                self._pending = data[start:]
                self._pending_is_value = True
                return
        self._pending = data[max(position, len(data) - self._tail) :]

    def finish(self) -> None:
        # Leftovers are a partial key or an unfinished value: neither can complete now.
        self._pending = b""
        self._pending_is_value = False

    def _active_keys(self) -> tuple[bytes, ...]:
        return self._all_keys if self._tally.model is None else self._usage_keys

    def _key_at_seam(self, pending: bytes, chunk: bytes) -> bool:
        """Does a key start in the kept tail and end in the new chunk? Keys already handled never
        stay in the tail, so any key found starting there is new."""
        seam = pending + chunk[: self._tail]
        return any(0 <= seam.find(key) < len(pending) for key in self._active_keys())

    def _keys(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Every key occurrence in ``data``, in order. Each key is searched once per position, so a
        chunk full of keys is still one pass per key type."""
        found = {key: data.find(key) for key in self._active_keys()}
        while True:
            live = [(start, key) for key, start in found.items() if start >= 0]
            if not live:
                return
            start, key = min(live)
            yield start, key
            if key == self._format.model_key and self._tally.model is not None:
                del found[key]  # the first model name is the response's own
            else:
                found[key] = data.find(key, start + len(key))

    def _take_value(self, data: bytes, start: int, key: bytes) -> int:
        """Parse the value after the key at ``start``; return where scanning resumes."""
        end = len(data)
        index = _skip_whitespace(data, start + len(key))
        if index == end:
            return self._need_more(data, start)
        if data[index] != _COLON:
            return start + len(key)  # a string value that happens to equal the key
        index = _skip_whitespace(data, index + 1)
        if index == end:
            return self._need_more(data, start)
        if data.startswith(b"null", index):
            return index + 4  # chat chunks say "usage": null until the last one
        # Decode a small window first and widen it only if the value is longer, so a chunk
        # holding many events costs about its own size, not events x MAX_VALUE_BYTES.
        for window in _WINDOWS:
            window_end = min(end, index + window)
            # latin-1 maps each byte to one character: offsets in the text are offsets in data.
            try:
                value, consumed = _JSON.raw_decode(data[index:window_end].decode("latin-1"))
            except RecursionError:
                # Nested deeper than any usage object: not one, nor a key inside it.
                return window_end
            except ValueError:
                if window_end == end:
                    return self._need_more(data, start)
                continue
            self._use(key, value)
            return index + consumed
        # Not JSON we can read within the limit: skipped with the keys inside it. Resuming at
        # the next key read a window per key: 450 KB of '{"usage":' took 85 s of CPU.
        return window_end

    def _need_more(self, data: bytes, start: int) -> int:
        if len(data) - start < MAX_VALUE_BYTES:
            raise _NeedMore
        return start + 1  # grew past any plausible usage object: give up on this one

    def _use(self, key: bytes, value: Any) -> None:
        if key == self._format.model_key:
            if isinstance(value, str) and value and self._tally.model is None:
                # Undo the latin-1 decoding of UTF-8 bytes.
                model = value.encode("latin-1", "replace").decode("utf-8", "replace")
                self._tally.model = model[:_MAX_MODEL_CHARS]
            return
        if isinstance(value, dict):
            self._format.usage_keys[key](value, self._tally)


def _skip_whitespace(data: bytes, index: int) -> int:
    end = len(data)
    while index < end and data[index] in _WHITESPACE:
        index += 1
    return index


# --- content-encoding ----------------------------------------------------------------------------


class DecodingRatioExceeded(ValueError):
    """A compressed body decodes to more than ``MAX_DECODING_RATIO`` times its size."""


class BodyDecoder:
    """Incremental decompression of one Content-Encoding, in bounded pieces (shared by every tap
    that reads a still-compressed response: this one and ``response_content.ContentTap``).
    Raises ValueError for an encoding it does not know, and ``decode`` raises
    ``DecodingRatioExceeded`` once the output passes ``MAX_DECODING_RATIO`` times the input
    (plus 1 MiB): memory is one piece, and the work per compressed byte is bounded too."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._encoded = 0
        self._decoded = 0
        self._zlib: Any = None
        self._brotli: Any = None
        self._zstd: Any = None
        self._deflate_head = b""
        if encoding == "gzip" or encoding == "x-gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._zlib = None  # zlib-wrapped or raw: decided by the first bytes
        elif encoding == "br":
            import brotli  # mitmproxy depends on it

            self._brotli = brotli.Decompressor()
        elif encoding == "zstd":
            try:
                from compression import zstd
            except ImportError:
                from backports import zstd
            self._zstd = zstd.ZstdDecompressor()
        else:
            raise ValueError(f"unsupported content-encoding {encoding!r}")

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        self._encoded += len(chunk)
        for piece in self._pieces(chunk):
            self._decoded += len(piece)
            if self._decoded > self._encoded * MAX_DECODING_RATIO + _DECODED_ALLOWANCE:
                raise DecodingRatioExceeded(
                    f"{self.encoding} body decodes to over {MAX_DECODING_RATIO} times its size"
                )
            yield piece

    def _pieces(self, chunk: bytes) -> Iterator[bytes]:
        if self.encoding == "deflate" and self._zlib is None:
            # RFC 9110 deflate is zlib-wrapped, but some servers send raw deflate: the first two
            # bytes tell (a zlib header is a multiple of 31).
            chunk = self._deflate_head + chunk
            if len(chunk) < 2:
                self._deflate_head = chunk
                return
            self._deflate_head = b""
            wrapped = (chunk[0] * 256 + chunk[1]) % 31 == 0 and chunk[0] & 0x0F == 8
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        if self._zlib is not None:
            data = chunk
            while data:
                piece = self._zlib.decompress(data, _DECOMPRESSED_PIECE)
                if piece:
                    yield piece
                data = self._zlib.unconsumed_tail
        elif self._brotli is not None:
            if chunk:
                # Bounded like the others: a small chunk may decode to gigabytes (a bomb).
                piece = self._brotli.process(chunk, output_buffer_limit=_DECOMPRESSED_PIECE)
                while True:
                    if piece:
                        yield piece
                    if self._brotli.can_accept_more_data():
                        break
                    piece = self._brotli.process(b"", output_buffer_limit=_DECOMPRESSED_PIECE)
        elif self._zstd is not None:
            piece = self._zstd.decompress(chunk, _DECOMPRESSED_PIECE)
            while True:
                if piece:
                    yield piece
                if self._zstd.needs_input or self._zstd.eof:
                    break
                piece = self._zstd.decompress(b"", _DECOMPRESSED_PIECE)

    def flush(self) -> bytes:
        return self._zlib.flush() if self._zlib is not None else b""


# --- the tap -------------------------------------------------------------------------------------


class UsageTap:
    """Reads usage from one response as its chunks pass. Never raises and never blocks: a chunk it
    cannot read only leaves the usage unknown (``problem`` says why)."""

    __slots__ = ("_decoder", "_finished", "_scanner", "_tally", "problem")

    def __init__(self, api_kind: ApiKind, content_encoding: str | None = None) -> None:
        self._tally = _Tally()
        self._scanner = _KeyScanner(_FORMATS[api_kind], self._tally)
        self._finished = False
        self.problem: str | None = None
        self._decoder: BodyDecoder | None = None
        encoding = (content_encoding or "").strip().lower()
        if encoding and encoding != "identity":
            try:
                self._decoder = BodyDecoder(encoding)
            except (ValueError, ImportError) as exc:
                self._fail(str(exc))

    @property
    def usage(self) -> Usage:
        return self._tally.usage()

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between chunks: a partial key or one unfinished usage object."""
        return self._scanner.buffered_bytes

    def feed(self, chunk: bytes) -> None:
        if self._finished or not chunk:
            return
        try:
            if self._decoder is None:
                self._scanner.feed(chunk)
            else:
                for piece in self._decoder.decode(chunk):
                    self._scanner.feed(piece)
        except Exception as exc:  # a tap must never break the proxied response
            self._fail(f"cannot read usage: {exc}")

    def finish(self) -> None:
        """The response ended (completely or not). Further chunks are ignored."""
        if self._finished:
            return
        try:
            if self._decoder is not None:
                self._scanner.feed(self._decoder.flush())
            self._scanner.finish()
        except Exception as exc:
            self._fail(f"cannot read usage: {exc}")
        self._finished = True

    def _fail(self, problem: str) -> None:
        self.problem = self.problem or problem
        self._finished = True


def usage_tap_for(api_kind: ApiKind, content_encoding: str | None = None) -> UsageTap:
    """A tap for a streamed response of ``api_kind``: SSE, a JSON body or a JSON-array stream.
    ``content_encoding`` is the response's Content-Encoding header, since streamed chunks reach
    the proxy still compressed."""
    return UsageTap(api_kind, content_encoding)


def usage_from_json(api_kind: ApiKind, body: bytes, content_encoding: str | None = None) -> Usage:
    """Usage of a whole response body, e.g. a small response mitmproxy buffered, still encoded
    per ``content_encoding`` (decoded piece by piece, never whole: a small body may decode to
    gigabytes). Same rules as the streaming tap, so a body read either way gives the same
    numbers."""
    tap = UsageTap(api_kind, content_encoding)
    tap.feed(body)
    tap.finish()
    return tap.usage


def usage_from_websocket_message(api_kind: ApiKind, message: bytes, from_client: bool) -> Usage:
    """The usage and model one whole WebSocket message names, in a session of ``api_kind``
    (``websocket_api_kind_for``); a session's record sums them, one per response or turn:

    - Realtime: ``response.done`` carries ``response.usage`` (per response); the model is
      ``session.created``'s ``session.model``. In a transcription session
      (``?intent=transcription``) each transcribed item's usage instead;
    - Responses over WebSocket: the Responses stream events, one per message
      (``response.completed`` carries the usage);
    - Gemini Live: ``usageMetadata`` on the server message that ends a turn (per turn, not
      cumulative); the model only in the client's ``setup`` message.

    Messages that name neither usage nor a model (audio deltas, most of a session) cost one
    substring search each; mitmproxy already holds each message whole, nothing is kept."""
    if from_client:
        if api_kind is not ApiKind.GEMINI_LIVE or b'"setup"' not in message:
            return Usage()
        model = _scan_whole(_GEMINI_LIVE_SETUP, message).model
        return Usage(model=model.removeprefix("models/") if model else None)
    if b'"usage' not in message and b'"model' not in message:
        return Usage()
    return _scan_whole(_FORMATS[api_kind], message)


def _scan_whole(fmt: _Format, body: bytes) -> Usage:
    tally = _Tally()
    scanner = _KeyScanner(fmt, tally)
    try:
        scanner.feed(body)
    except Exception:  # like the tap: unreadable usage is unknown usage, never an error
        return Usage()
    return tally.usage()
