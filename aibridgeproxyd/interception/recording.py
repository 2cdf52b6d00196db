"""Record assembly for one intercepted request (docs/monitoring.md, "Interception records"):
its token usage, the upstream error body as it is logged, and the ``InterceptionRecord``.

``addons/interceptions.py`` calls these from its hooks; nothing here waits or writes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from mitmproxy import http

from aibridgeproxyd.clients import CLAUDE_CODE, session_id_from_headers
from aibridgeproxyd.credentials import CredentialMode, mask_secret
from aibridgeproxyd.errors import SecretRedactor, redaction_secrets
from aibridgeproxyd.header_fields import header
from aibridgeproxyd.interception.state import RecordingState, RequestContext
from aibridgeproxyd.interception.writer import rfc3339_ms
from aibridgeproxyd.model import InterceptionRecord, ToolCall
from aibridgeproxyd.request_content import request_content
from aibridgeproxyd.response_content import (
    ContentSwitches,
    ResponseContent,
    content_from_body,
    content_tap_for,
)
from aibridgeproxyd.usage import (
    ApiKind,
    Usage,
    usage_from_json,
    usage_from_websocket_message,
    usage_tap_for,
)
from aibridgeproxyd.utf8 import cut_utf8

log = logging.getLogger("aibridgeproxyd.interceptions")

# Upstream error bodies are logged up to this many bytes (after redaction).
ERROR_BODY_LOG_LIMIT = 16 * 1024
# The error code of an answer the proxy made itself when whoever made it named none.
PROXY_REFUSAL = "proxy_refusal"
# Recorded text (prompt, tool inputs, thoughts) is read this many bytes past record_max_bytes,
# so that a secret straddling the cut is redacted whole (``redact_recorded_text``).
REDACTION_MARGIN = 4096
# A record keeps at most this many characters of the request's User-Agent.
USER_AGENT_LIMIT = 256
# Bytes of a streamed answer's sent chunks held for the taps before they read them together.
TAP_BATCH_BYTES = 4 * 1024


def read_user_agent(ctx: RequestContext, request: http.Request) -> None:
    """Record the request's User-Agent, cut at ``USER_AGENT_LIMIT`` characters; None when it
    sent none."""
    user_agent = header(request.headers, "user-agent")
    # With a margin: cut to USER_AGENT_LIMIT after redaction (``redact_recorded_text``).
    limit = USER_AGENT_LIMIT + REDACTION_MARGIN
    ctx.recording.user_agent = None if user_agent is None else user_agent[:limit]


def credential_hint(ctx: RequestContext) -> str | None:
    """The masked credential the request went upstream with: the central key last used (after
    any failover), or the client's own key in BYOK (``routing.byok_hint``, masked when it was
    read). None when signed, or refused before a credential was chosen."""
    routing = ctx.routing
    if routing.credential_mode is CredentialMode.BYOK:
        return routing.byok_hint
    if routing.credential_mode is CredentialMode.CENTRAL and routing.key_index is not None:
        return mask_secret(ctx.provider.keys[routing.key_index])
    return None


def read_request_model(ctx: RequestContext, request: http.Request) -> None:
    """Record the model ``request`` asks for (``adapter.request_model``), the one writer of
    ``recording.request_model``. Called twice: on the head, where a path names it (Gemini, an
    Azure deployment), so that a request refused before its body still has it; and, while it is
    still unknown, on the whole request before the adapter's rewrite (``route_request``), which
    may move it out of the body (Bedrock)."""
    recording = ctx.recording
    recording.request_model = recording.request_model or ctx.adapter.request_model(request)


def read_client_session(ctx: RequestContext, request: http.Request) -> None:
    """Record the client's session id from its header (``clients.session_id_from_headers``, for
    the client already classified), on the head, so that a request refused before its body has
    it too. Claude Code's body fallback is read with the body (``read_request_content``)."""
    recording = ctx.recording
    recording.client_session_id = session_id_from_headers(request.headers, recording.client)


def read_request_content(ctx: RequestContext, request: http.Request) -> None:
    """Record what the whole request says (``request_content``): the prompt (when
    ``recording.prompt_max_bytes`` is set), the tool-call ids its last message answers, and the
    body's session id while no header gave one. Called before the adapter's rewrite
    (``routing.route_request``), which may change the body and drop headers (Bedrock).

    Never raises: it runs inside a check, where an exception would refuse the request, so a
    fault here is logged and the request is recorded without its content."""
    recording = ctx.recording
    try:
        content = request_content(
            recording.api_kind,
            request.raw_content or b"",
            header(request.headers, "content-encoding"),
            recording.prompt_max_bytes,
            session_in_body=recording.client == CLAUDE_CODE and not recording.client_session_id,
        )
    except Exception as exc:  # recording never fails a request
        # The exception's type only: its message could quote the body, a prompt or a secret.
        log.warning("request content not recorded: %s", type(exc).__name__, extra=ctx.log_ids())
        return
    recording.prompt = content.prompt
    recording.tool_result_ids = content.tool_result_ids
    recording.client_session_id = recording.client_session_id or content.client_session_id


def read_api_kind(ctx: RequestContext, request: http.Request) -> None:
    """Record the API whose usage the response (or the WebSocket session ``request`` upgrades
    to) reports, from the request's head (``adapter.api_kind``)."""
    upgrade = (header(request.headers, "upgrade") or "").strip().lower() == "websocket"
    ctx.recording.api_kind = ctx.adapter.api_kind(request.method, request.path, websocket=upgrade)


def sum_usage(total: Usage | None, more: Usage) -> Usage:
    """``total`` plus ``more``, per token type; a count absent on one side is the other's (None
    only when absent on both). The model is the first one named."""
    if total is None:
        return more

    def add(a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else a + b

    return Usage(
        input_tokens=add(total.input_tokens, more.input_tokens),
        output_tokens=add(total.output_tokens, more.output_tokens),
        cache_read_input_tokens=add(total.cache_read_input_tokens, more.cache_read_input_tokens),
        cache_creation_input_tokens=add(
            total.cache_creation_input_tokens, more.cache_creation_input_tokens
        ),
        model=total.model or more.model,
        reasoning_output_tokens=add(total.reasoning_output_tokens, more.reasoning_output_tokens),
    )


def websocket_usage(
    total: Usage | None, message: bytes, api_kind: ApiKind | None, from_client: bool = False
) -> Usage | None:
    """A WebSocket session's usage after one message: Realtime, Responses over WebSocket (Codex)
    and Gemini Live report usage per response or turn, each in its API's shape
    (``usage.usage_from_websocket_message``), and the session's record sums them; the model is
    the first one named. A message that names nothing, or a session of no known API
    (``api_kind`` None), leaves ``total`` as it is."""
    if api_kind is None:
        return total
    more = usage_from_websocket_message(api_kind, message, from_client)
    if not more.reported and more.model is None:
        return total
    return sum_usage(total, more)


def tap_usage(
    response: http.Response,
    recording: RecordingState,
    transformed: bool,
    content: ContentSwitches | None = None,
) -> None:
    """Read the usage of a streamed 2xx answer as it passes: a tap (``recording.usage_tap``)
    fed every chunk the client gets, and, when ``content`` switches any on, the tool calls and
    thoughts (``recording.content_tap``). ``transformed``: the adapter rewrites the body, which
    then reaches the client uncompressed (Bedrock's event stream becomes Anthropic SSE). Buffered
    answers are read whole (``finished_usage``, ``finished_content``).

    The taps are not a stream transform: ``recording.chunk_tap`` is what the stream layer
    (``mitm.http_layer.AIBridgeHttpStream``) hands each chunk to once it is on its way to the
    client, so reading it never delays it."""
    if not response.stream or recording.api_kind is None:
        return
    if not 200 <= response.status_code < 300:
        return
    encoding = None if transformed else header(response.headers, "content-encoding")
    recording.usage_tap = usage_tap_for(recording.api_kind, encoding)
    feed: Callable[[bytes], None] = recording.usage_tap.feed
    if content is not None:
        recording.content_tap = content_tap_for(recording.api_kind, content, encoding)
    if recording.content_tap is not None:
        feed = _feed_both(feed, recording.content_tap.feed)
    batch = TapBatch(feed)
    recording.chunk_tap, recording.flush_taps = batch.add, batch.flush


def _feed_both(
    first: Callable[[bytes], None], second: Callable[[bytes], None]
) -> Callable[[bytes], None]:
    def feed(chunk: bytes) -> None:
        first(chunk)
        second(chunk)

    return feed


class TapBatch:
    """The chunks of a streamed answer, once sent to the client, handed to the taps (``feed``)
    together: one piece per ``TAP_BATCH_BYTES`` (at the latest by ``flush``, before the taps'
    results are read), not one per chunk. A paced stream sends each event as its own chunk,
    and the stream waits between events, so each tap run starts in a cold cache: one run over
    many events costs a fraction of one per event. The taps read any chunking (what they
    record is the same); the batch holds at most ``TAP_BATCH_BYTES`` and one chunk."""

    __slots__ = ("_chunks", "_feed", "_size")

    def __init__(self, feed: Callable[[bytes], None]) -> None:
        self._feed = feed
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        """One chunk sent to the client (bytes)."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size >= TAP_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the taps what the batch holds."""
        chunks = self._chunks
        if chunks:
            self._chunks, self._size = [], 0
            self._feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def websocket_content(
    recording: RecordingState, message: bytes, from_client: bool, switches: ContentSwitches
) -> None:
    """Read one WebSocket message for tool calls and thoughts (Responses over WebSocket,
    Realtime, Gemini Live: one event per server message); the session's tap is made by its
    first server message."""
    if from_client:
        return
    if recording.content_tap is None:
        recording.content_tap = content_tap_for(recording.api_kind, switches)
        if recording.content_tap is None:
            return
    recording.content_tap.feed_message(message)


def finished_content(
    flow: http.HTTPFlow, recording: RecordingState, switches: ContentSwitches
) -> ResponseContent:
    """The tool calls and thoughts of a finished exchange, like ``finished_usage``: a streamed
    answer's or a WebSocket session's tap (finished here), a buffered 2xx answer's body read
    whole, else none."""
    if recording.content_tap is not None:
        if recording.flush_taps is not None:
            recording.flush_taps()
        recording.content_tap.finish()
        return recording.content_tap.content
    response = flow.response
    if flow.websocket is not None or response is None or response.stream:
        return ResponseContent()
    if not 200 <= response.status_code < 300 or not switches.any:
        return ResponseContent()
    encoding = header(response.headers, "content-encoding")
    return content_from_body(recording.api_kind, switches, response.raw_content or b"", encoding)


def finished_usage(flow: http.HTTPFlow, recording: RecordingState) -> Usage:
    """The usage of a finished exchange: a WebSocket session's running sum, a streamed
    answer's tap (finished here), a buffered 2xx answer's body, else no usage."""
    if flow.websocket is not None:
        return recording.usage or Usage()
    if recording.usage_tap is not None:
        if recording.flush_taps is not None:
            recording.flush_taps()
        recording.usage_tap.finish()
        return recording.usage_tap.usage
    response = flow.response
    if (
        recording.api_kind is None
        or response is None
        or response.stream
        or not 200 <= response.status_code < 300
    ):
        return Usage()
    # Still encoded: the taps decode it piece by piece (mitmproxy's ``get_content`` would decode
    # it whole, and a few kilobytes of zstd can decode to gigabytes).
    encoding = header(response.headers, "content-encoding")
    return usage_from_json(recording.api_kind, response.raw_content or b"", encoding)


def collection_switches(switches: ContentSwitches) -> ContentSwitches:
    """What the readers collect for ``switches``: each text ``REDACTION_MARGIN`` bytes past
    ``record_max_bytes``, so that a secret the cut would split is still whole when
    ``redact_recorded_text`` looks for it."""
    return dataclasses.replace(switches, max_bytes=switches.max_bytes + REDACTION_MARGIN)


def redact_recorded_text(
    record: InterceptionRecord, flow: http.HTTPFlow, ctx: RequestContext, max_bytes: int
) -> InterceptionRecord:
    """The record with every secret the request knows (``redactor_for``: provider keys, the
    credentials it carried, the proxy token) replaced by ``***`` in the text a client or a
    model wrote into it: the prompt, tool inputs and thoughts (each then cut at ``max_bytes``
    UTF-8 bytes, ``record_max_bytes``: redacted before it is cut, so no part of a secret is
    left at the cut), the User-Agent and the client session id. A user who pastes a key into a
    prompt, or a token into a header, does not get it stored."""
    redactor: SecretRedactor | None = _record_redactor(flow, ctx)
    if redactor is not None and redactor.leaves_unchanged(_recorded_texts(record)):
        redactor = None  # the common case: only the cuts remain

    def redact(text: str) -> str:
        return redactor.redact_text(text) if redactor else text

    def clean(text: str) -> str:
        return cut_utf8(redact(text), max_bytes)

    def plain(text: str | None) -> str | None:
        return None if text is None else redact(text)

    prompt = None if record.prompt is None else clean(record.prompt)
    tool_calls = tuple(
        ToolCall(call.tool_call_id, call.tool, clean(call.input)) for call in record.tool_calls
    )
    thoughts = tuple(clean(thought) for thought in record.thoughts)
    user_agent = None if record.user_agent is None else redact(record.user_agent)[:USER_AGENT_LIMIT]
    client_session_id = plain(record.client_session_id)
    if (prompt, tool_calls, thoughts, user_agent, client_session_id) == (
        record.prompt,
        record.tool_calls,
        record.thoughts,
        record.user_agent,
        record.client_session_id,
    ):
        return record  # the common case: nothing to redact or cut, no copy of the record
    return dataclasses.replace(
        record,
        prompt=prompt,
        tool_calls=tool_calls,
        thoughts=thoughts,
        user_agent=user_agent,
        client_session_id=client_session_id,
    )


def _recorded_texts(record: InterceptionRecord) -> list[str]:
    """Every text of the record that ``redact_recorded_text`` redacts."""
    texts = [call.input for call in record.tool_calls]
    texts.extend(record.thoughts)
    for text in (record.prompt, record.user_agent, record.client_session_id):
        if text is not None:
            texts.append(text)
    return texts


def _record_redactor(flow: http.HTTPFlow, ctx: RequestContext) -> SecretRedactor:
    """``redactor_for``'s secrets, parsing the request's credential headers only in BYOK mode:
    otherwise they hold the injected central key (a provider secret) or nothing, and what the
    client sent is the proxy token, the placeholder or ``recording.client_credentials``."""
    if ctx.routing.credential_mode is CredentialMode.BYOK or ctx.routing.credential_mode is None:
        return redactor_for(flow, ctx)
    secrets = redaction_secrets(ctx.adapter.secrets(ctx.provider), None, ctx.connect.proxy_token)
    secrets.extend(ctx.recording.client_credentials)
    return SecretRedactor(secrets)


def redactor_for(flow: http.HTTPFlow, ctx: RequestContext) -> SecretRedactor:
    """The one redaction of error bodies and recorded text, for what clients get, what is logged
    and what is stored alike: the provider's secrets, the credentials the request carries now,
    the caller's proxy token, and the credentials the client sent before routing removed them
    (``recording.client_credentials``)."""
    secrets = redaction_secrets(
        ctx.adapter.secrets(ctx.provider), flow.request.headers, ctx.connect.proxy_token
    )
    # What the client sent and routing removed (a signed or central request loses them).
    secrets.extend(ctx.recording.client_credentials)
    return SecretRedactor(secrets)


def error_body_for_log(body: bytes, redactor: SecretRedactor) -> str:
    """An upstream error body as it is logged: every secret redacted (an upstream may echo a
    credential back), then cut at ``ERROR_BODY_LOG_LIMIT`` bytes. Redacted before it is cut,
    so no secret is left half-visible at the cut."""
    redacted = redactor.redact(body)
    text = redacted[:ERROR_BODY_LOG_LIMIT].decode("utf-8", "replace")
    if len(redacted) > ERROR_BODY_LOG_LIMIT:
        text += "...(truncated)"
    return text


def upstream_ttfb(ctx: RequestContext) -> float | None:
    """The request's time to first byte in seconds, for the record, the metrics and the trace:
    None on the proxy's own answer (``ctx.proxy_answer_code``), even when an upstream's headers had
    arrived before the proxy replaced them (keys exhausted, a timeout), since it describes no
    answer the client got; None too when no response header arrived."""
    return None if ctx.proxy_answer_code is not None else ctx.recording.ttfb


def build_record(
    ctx: RequestContext,
    response: http.Response | None,
    usage: Usage,
    error: str | None,
    ended: float,
    cost_micros: int | None = None,
    content: ResponseContent | None = None,
) -> InterceptionRecord:
    """The interception record of a finished request; ``ended`` in epoch seconds. A refusal
    (``ctx.proxy_answer_code``) is recorded with its code as the error and no TTFB, whatever
    ``error``. ``content``: the response's tool calls and thoughts (``finished_content``, which
    collects only what the switches keep on)."""
    content = content or ResponseContent()
    recording = ctx.recording
    ttfb = upstream_ttfb(ctx)
    return InterceptionRecord(
        request_id=ctx.request_id,
        connect_id=ctx.connect.connect_id,
        initiator=ctx.connect.identity,
        provider=ctx.provider.type,
        provider_type=ctx.provider.type,
        model=usage.model or recording.request_model,
        client=recording.client,
        method=recording.method,
        path=recording.path,
        status=response.status_code if response is not None else None,
        streamed=bool(response is not None and response.stream),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        reasoning_output_tokens=usage.reasoning_output_tokens,
        provider_name=ctx.provider.name,
        user_agent=recording.user_agent,
        credential_kind=ctx.routing.credential_mode and ctx.routing.credential_mode.value,
        credential_hint=credential_hint(ctx),
        started_at=rfc3339_ms(ctx.started),
        ended_at=rfc3339_ms(ended),
        ttfb_ms=round(ttfb * 1000, 3) if ttfb is not None else None,
        duration_ms=round((ended - ctx.started) * 1000, 3),
        error=ctx.proxy_answer_code if ctx.proxy_answer_code is not None else error,
        cost_micros=cost_micros,
        client_session_id=recording.client_session_id,
        prompt=recording.prompt,
        tool_result_ids=recording.tool_result_ids,
        tool_calls=content.tool_calls,
        thoughts=content.thoughts,
    )
