"""A fake AI provider upstream speaking the OpenAI and Anthropic wire formats.

Written from the public API docs, for end-to-end tests of the proxy:

    with FakeUpstream() as up:
        # configure a provider with base_url=up.base_url and the daemon with
        # upstream_ca_file=up.ca_pem_path, send traffic through the proxy, then:
        (request,) = up.requests
        assert request.headers["authorization"] == "Bearer sk-central"

Routing looks only at the end of the path, so any base_url path works (`/v1`, `/api/v1`, ...)
and the full path is recorded. Routes:

    POST .../chat/completions     chat.completion, or chat.completion.chunk SSE + [DONE]
    POST .../responses            response, or Responses API SSE events
    POST .../responses/compact    response.compaction (JSON only)
    POST .../embeddings           embedding list (float or base64)
    GET  .../models               model list (Anthropic shape when anthropic-version is sent)
    POST .../messages             Anthropic message, or the documented Messages SSE sequence
    POST .../messages/count_tokens
    GET  /bulk?bytes=N            N bytes, for throughput benchmarks
    WS   .../realtime?model=M     OpenAI Realtime: session.created, then one response (deltas,
                                  response.done with usage) per response.create

Per-request controls are `x-fake-*` request headers (see the HEADER_* constants); the matching
attributes on FakeUpstream are the defaults. Forced failures can also be set per API key.
Request bodies are read with their Content-Encoding undone (gzip, deflate, br, zstd).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from . import tool_content
from .tls import (
    DEFAULT_HOSTNAMES,
    LOOPBACK,
    BackgroundServer,
    Receive,
    RecordedRequest,
    RequestLog,
    Scope,
    Send,
    ServedFake,
    TlsIdentity,
    bulk_size,
    read_request,
    send_bulk,
    send_json,
)

# Request headers a test (or an SDK's extra_headers) sends to steer one response.
HEADER_EVENTS = "x-fake-events"  # number of text deltas (and of output tokens)
HEADER_DELAY_MS = "x-fake-delay-ms"  # pause between SSE events
HEADER_STREAM_ID = "x-fake-stream-id"  # name of the stream, for gates and abort checks
HEADER_GATE = "x-fake-gate"  # "1": each SSE event waits for FakeUpstream.release()
HEADER_STATUS = "x-fake-status"  # answer with this status and the provider's error body
HEADER_RETRY_AFTER = "x-fake-retry-after"  # Retry-After sent with a forced status
HEADER_RESPONSE_DELAY_MS = "x-fake-response-delay-ms"  # pause before the response headers
# Cut the connection after this many events. HTTP/1.1 only: on h2 hypercorn leaves the stream
# hanging instead of resetting it, so use FakeUpstream(http2=False) for upstream-death tests.
HEADER_DROP_AFTER = "x-fake-drop-after"
# A JSON object reported verbatim as the response's `usage`, in place of the fake's own, by chat
# completions (the final usage chunk when streamed), responses (`response.completed` when
# streamed), responses/compact and Realtime (`response.done`; send it on the upgrade request).
# For usage shapes of real servers: an OpenAI-compatible gateway's extras, a reasoning count.
HEADER_USAGE = "x-fake-usage"
# "1": answer chat, responses and messages with a tool call and/or the model's thinking
# (tests.fakes.tool_content).
HEADER_TOOL_CALL = tool_content.HEADER_TOOL_CALL
HEADER_THINKING = tool_content.HEADER_THINKING

# Usage every response reports. Output tokens equal the number of text deltas.
INPUT_TOKENS = 11
CACHED_INPUT_TOKENS = 3  # OpenAI prompt_tokens_details.cached_tokens, Anthropic cache reads
CACHE_CREATION_INPUT_TOKENS = 2  # Anthropic only
DEFAULT_EVENTS = 3
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"
DEFAULT_REALTIME_MODEL = "gpt-realtime"

ApiFlavour = Literal["openai", "anthropic"]
StreamOutcome = Literal["pending", "open", "completed", "aborted", "dropped"]


def text_deltas(events: int) -> list[str]:
    """The text pieces a response is made of; their concatenation is the full reply."""
    return [f"word{i} " for i in range(events)]


def reply_text(events: int = DEFAULT_EVENTS) -> str:
    return "".join(text_deltas(events))


def presented_key(headers: httpx.Headers) -> str | None:
    """The API key a client presented, in any of the providers' header styles."""
    authorization = headers.get("authorization", "")
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer" and credential:
        return credential.strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        if value := headers.get(name):
            return value
    return None


# --- test controls -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A forced error response. `body` None means the provider's own error shape."""

    status: int
    retry_after: str | None = None
    body: Any = None


class StreamState:
    """One streamed response: its gate, when each event left, and how it ended.

    Safe to use from any thread. A test may call release() before the request even arrives.
    """

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.request: RecordedRequest | None = None
        self.gated = False
        self._outcome: StreamOutcome = "pending"
        self._sent_at: list[float] = []
        self._released = 0
        self._gate_open = False
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def outcome(self) -> StreamOutcome:
        with self._changed:
            return self._outcome

    @property
    def sent(self) -> int:
        """How many SSE events the upstream has handed to the server so far."""
        with self._changed:
            return len(self._sent_at)

    @property
    def sent_at(self) -> list[float]:
        """time.monotonic() just before each event was written, for latency benchmarks."""
        with self._changed:
            return list(self._sent_at)

    def release(self, count: int = 1) -> None:
        """Let `count` more events through the gate."""
        with self._changed:
            self._released += count
        self._wake()

    def open_gate(self) -> None:
        """Let every remaining event through."""
        with self._changed:
            self._gate_open = True
        self._wake()

    def wait_finished(self, timeout: float = 5.0) -> StreamOutcome:
        """Block until the stream completed, was aborted by the client or dropped; raise on timeout."""
        finished = ("completed", "aborted", "dropped")
        with self._changed:
            if not self._changed.wait_for(lambda: self._outcome in finished, timeout):
                raise TimeoutError(
                    f"stream {self.stream_id!r} still {self._outcome} after {timeout}s"
                )
            return self._outcome

    # The methods below run on the server's event loop.

    def _set_outcome(self, outcome: StreamOutcome) -> None:
        with self._changed:
            self._outcome = outcome
            self._changed.notify_all()

    def _mark_sent(self) -> None:
        with self._changed:
            self._sent_at.append(time.monotonic())
            self._changed.notify_all()

    async def _wait_turn(self) -> None:
        if self._wakeup is None:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
        while True:
            with self._changed:
                if self._gate_open or self._released > len(self._sent_at):
                    return
                # Cleared under the lock: a release() after this point schedules a fresh set().
                self._wakeup.clear()
            await self._wakeup.wait()

    def _wake(self) -> None:
        with self._changed:
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            loop.call_soon_threadsafe(wakeup.set)


@dataclass(frozen=True)
class _Controls:
    events: int
    delay: float
    gated: bool
    stream_id: str | None
    response_delay: float
    drop_after: int | None
    usage: dict[str, Any] | None


class _DroppedByTest(Exception):
    """Raised inside the app to make hypercorn cut the connection mid-stream."""


class _HideDeliberateDrops(logging.Filter):
    """Keeps hypercorn from printing a traceback for a drop the test asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _DroppedByTest))


def _hide_deliberate_drops() -> None:
    logger = logging.getLogger("hypercorn.error")
    if not any(isinstance(f, _HideDeliberateDrops) for f in logger.filters):
        logger.addFilter(_HideDeliberateDrops())


# --- the fake ----------------------------------------------------------------------------------


class FakeUpstream(ServedFake):
    """A TLS (h2 + HTTP/1.1) fake of the OpenAI and Anthropic APIs on 127.0.0.1:<free port>."""

    def __init__(
        self,
        *,
        path_prefix: str = "/v1",
        http2: bool = True,
        hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
    ) -> None:
        # Defaults for requests that do not carry the matching x-fake-* header.
        self.stream_events = DEFAULT_EVENTS
        self.event_delay = 0.0
        self.response_delay = 0.0
        self.gate_all_streams = False

        self.path_prefix = path_prefix.rstrip("/")
        self._directory = Path(tempfile.mkdtemp(prefix="fake-upstream-"))
        self.identity = TlsIdentity.create(self._directory, hostnames)
        self._log = RequestLog()
        self._lock = threading.Lock()
        self._streams: dict[str, StreamState] = {}
        self._key_failures: dict[str, Failure] = {}
        self._failure_for_all: Failure | None = None
        self._ids = itertools.count(1)
        self._server = BackgroundServer(
            self._app, identity=self.identity, http2=http2, name="fake-upstream"
        )
        _hide_deliberate_drops()

    # -- lifecycle

    # -- where it is

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def origin(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        """The origin plus `path_prefix`, what a provider's base_url should be."""
        return self.origin + self.path_prefix

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def ca_pem_path(self) -> Path:
        return self.identity.ca_pem_path

    # -- what it saw

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._log.snapshot()

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return self._log.wait_for(count, timeout)

    @property
    def streams(self) -> list[StreamState]:
        with self._lock:
            return list(self._streams.values())

    def stream(self, stream_id: str) -> StreamState:
        """The state of a stream, created on first use so a test can prepare it early.

        A stream id names one response: use a fresh id per streamed request.
        """
        with self._lock:
            state = self._streams.get(stream_id)
            if state is None:
                state = self._streams[stream_id] = StreamState(stream_id)
            return state

    @property
    def aborted_streams(self) -> list[str]:
        """Ids of streams whose client went away before the last event was sent."""
        return [s.stream_id for s in self.streams if s.outcome == "aborted"]

    @property
    def completed_streams(self) -> list[str]:
        return [s.stream_id for s in self.streams if s.outcome == "completed"]

    def reset(self) -> None:
        """Forget requests, streams and forced failures."""
        self._log.clear()
        with self._lock:
            self._streams.clear()
            self._key_failures.clear()
            self._failure_for_all = None

    # -- gates

    def gate(self, stream_id: str) -> StreamState:
        """Gate the stream named `stream_id`: each event waits for release()."""
        state = self.stream(stream_id)
        state.gated = True
        return state

    def release(self, stream_id: str, count: int = 1) -> None:
        self.stream(stream_id).release(count)

    # -- forced failures

    def fail_key(
        self, key: str, status: int, *, retry_after: int | str | None = None, body: Any = None
    ) -> None:
        """Answer every request presenting `key` with `status` (e.g. 401, 429)."""
        with self._lock:
            self._key_failures[key] = Failure(status, _optional_str(retry_after), body)

    def fail_all(
        self, status: int, *, retry_after: int | str | None = None, body: Any = None
    ) -> None:
        with self._lock:
            self._failure_for_all = Failure(status, _optional_str(retry_after), body)

    def clear_failures(self) -> None:
        with self._lock:
            self._key_failures.clear()
            self._failure_for_all = None

    # -- the ASGI app

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        request = await read_request(scope, receive)
        self._log.append(request)
        controls = self._controls(request.headers)
        if controls.response_delay:
            await asyncio.sleep(controls.response_delay)

        path = request.path_only
        flavour: ApiFlavour = (
            "anthropic"
            if "anthropic-version" in request.headers or "/messages" in path
            else "openai"
        )
        failure = self._failure(request)
        if failure is not None:
            await self._send_failure(send, flavour, failure)
            return
        if request.method == "GET" and path == "/bulk":
            await send_bulk(send, bulk_size(request))
            return
        if request.method == "GET" and path.endswith("/models"):
            await send_json(send, 200, _models(flavour), _request_id_headers(flavour))
            return

        handler = _POST_ROUTES.get(_route_suffix(path)) if request.method == "POST" else None
        if handler is None:
            message = f"fake upstream: no route for {request.method} {path}"
            await send_json(send, 404, _error_body(flavour, 404, message))
            return
        try:
            payload = request.json() if request.body else {}
        except ValueError:
            await send_json(send, 400, _error_body(flavour, 400, "body is not valid JSON"))
            return
        seq = next(self._ids)
        reply = handler(payload, controls.events, seq, controls.usage)
        reply = _with_tool_content(path, payload, request.headers, controls, seq, reply)
        if isinstance(reply, list):
            await self._send_stream(send, receive, request, controls, reply, flavour)
        else:
            await send_json(send, 200, reply, _request_id_headers(flavour))

    def _controls(self, headers: httpx.Headers) -> _Controls:
        gate_header = headers.get(HEADER_GATE, "")
        return _Controls(
            events=int(headers.get(HEADER_EVENTS, self.stream_events)),
            delay=_millis(headers.get(HEADER_DELAY_MS), self.event_delay),
            gated=self.gate_all_streams or gate_header.lower() in ("1", "true", "yes"),
            stream_id=headers.get(HEADER_STREAM_ID),
            response_delay=_millis(headers.get(HEADER_RESPONSE_DELAY_MS), self.response_delay),
            drop_after=int(headers[HEADER_DROP_AFTER]) if HEADER_DROP_AFTER in headers else None,
            usage=json.loads(headers[HEADER_USAGE]) if HEADER_USAGE in headers else None,
        )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket upgrade: recorded like a request (GET, no body), then the Realtime
        session if the path ends in /realtime, else closed with 1008 (policy violation)."""
        request = websocket_request(scope)
        self._log.append(request)
        if (await receive())["type"] != "websocket.connect":
            return
        if not request.path_only.endswith("/realtime"):
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        model = (request.query.get("model") or [DEFAULT_REALTIME_MODEL])[0]
        await realtime_session(receive, send, model, self._controls(request.headers))

    def _failure(self, request: RecordedRequest) -> Failure | None:
        if HEADER_STATUS in request.headers:
            status = int(request.headers[HEADER_STATUS])
            return Failure(status, request.headers.get(HEADER_RETRY_AFTER))
        key = presented_key(request.headers)
        with self._lock:
            if key is not None and key in self._key_failures:
                return self._key_failures[key]
            return self._failure_for_all

    async def _send_failure(self, send: Send, flavour: ApiFlavour, failure: Failure) -> None:
        headers = _request_id_headers(flavour)
        if failure.retry_after is not None:
            headers.append(("retry-after", failure.retry_after))
        body = failure.body
        if body is None:
            message = f"fake upstream: forced status {failure.status}"
            body = _error_body(flavour, failure.status, message)
        await send_json(send, failure.status, body, headers)

    async def _send_stream(
        self,
        send: Send,
        receive: Receive,
        request: RecordedRequest,
        controls: _Controls,
        frames: list[bytes],
        flavour: ApiFlavour,
    ) -> None:
        state = self.stream(controls.stream_id or f"stream-{next(self._ids)}")
        state.request = request
        state.gated = state.gated or controls.gated
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *((k.encode(), v.encode()) for k, v in _request_id_headers(flavour)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        state._set_outcome("open")

        # The client's disconnect arrives through receive(), so watch it while sending.
        pump = asyncio.create_task(self._pump(send, frames, state, controls))
        disconnect = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the server cancels this request on stop
            for task in (pump, disconnect):
                task.cancel()
            await asyncio.gather(pump, disconnect, return_exceptions=True)
        if pump not in done:
            state._set_outcome("aborted")
        elif isinstance(pump.exception(), _DroppedByTest):
            state._set_outcome("dropped")
            raise _DroppedByTest(f"dropped stream {state.stream_id!r} as the test asked")
        else:
            pump.result()
            state._set_outcome("completed")

    async def _pump(
        self, send: Send, frames: list[bytes], state: StreamState, controls: _Controls
    ) -> None:
        for index, frame in enumerate(frames):
            if controls.drop_after is not None and index >= controls.drop_after:
                raise _DroppedByTest()
            if state.gated:
                await state._wait_turn()
            elif controls.delay and index > 0:
                await asyncio.sleep(controls.delay)  # pacing, not synchronisation
            # Counted before the write, so a client that has read event k always sees sent >= k.
            state._mark_sent()
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _optional_str(value: int | str | None) -> str | None:
    return None if value is None else str(value)


def _millis(header: str | None, default_seconds: float) -> float:
    return default_seconds if header is None else float(header) / 1000


def websocket_request(scope: Scope) -> RecordedRequest:
    """A WebSocket upgrade as received: GET, the raw path with its query, the headers."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    path = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    headers = httpx.Headers(
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
    )
    return RecordedRequest("GET", path, headers, b"", scope.get("http_version", "1.1"))


def _route_suffix(path: str) -> str:
    for suffix in _POST_ROUTES:
        if path.endswith(suffix):
            return suffix
    return ""


def _request_id_headers(flavour: ApiFlavour) -> list[tuple[str, str]]:
    name = "request-id" if flavour == "anthropic" else "x-request-id"
    return [(name, f"req_fake_{time.monotonic_ns()}")]


# --- wire formats ------------------------------------------------------------------------------

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _error_body(flavour: ApiFlavour, status: int, message: str) -> dict[str, Any]:
    if flavour == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind, code = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _sse(data: Any, event: str | None = None) -> bytes:
    line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
    return ((f"event: {event}\n" if event else "") + line).encode()


def _chat_usage(events: int) -> dict[str, Any]:
    return {
        "prompt_tokens": INPUT_TOKENS,
        "completion_tokens": events,
        "total_tokens": INPUT_TOKENS + events,
        "prompt_tokens_details": {"cached_tokens": CACHED_INPUT_TOKENS},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


Usage = dict[str, Any] | None  # a usage object that replaces the fake's own (HEADER_USAGE)


def chat_completions(
    payload: dict[str, Any], events: int, seq: int, usage: Usage = None
) -> dict[str, Any] | list[bytes]:
    """POST /chat/completions: a chat.completion, or its chunk stream when stream is true.
    Streamed usage comes last, in a chunk with empty `choices`, only when
    `stream_options.include_usage` is set (OpenAI chat streaming reference; LiteLLM's proxy
    does the same)."""
    reported = _chat_usage(events) if usage is None else usage
    model = payload.get("model", DEFAULT_OPENAI_MODEL)
    base = {
        "id": f"chatcmpl-fake-{seq}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    if not payload.get("stream"):
        message = {"role": "assistant", "content": reply_text(events), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return {
            **base,
            "object": "chat.completion",
            "choices": [choice],
            "usage": reported,
        }

    include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})

    frames = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    frames += [chunk({"content": text}, None) for text in text_deltas(events)]
    frames.append(chunk({}, "stop"))
    if include_usage:
        usage_chunk = {"object": "chat.completion.chunk", "choices": [], "usage": reported}
        frames.append(_sse({**base, **usage_chunk}))
    frames.append(_sse("[DONE]"))
    return frames


def responses(
    payload: dict[str, Any], events: int, seq: int, usage: Usage = None
) -> dict[str, Any] | list[bytes]:
    """POST /responses: a response object, or the Responses API event stream."""
    model = payload.get("model", DEFAULT_OPENAI_MODEL)
    text = reply_text(events)
    item_id = f"msg_fake_{seq}"
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    if usage is None:
        usage = _responses_usage(events)
    final = {
        "id": f"resp_fake_{seq}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [item],
        "usage": usage,
        "error": None,
        "incomplete_details": None,
        "instructions": payload.get("instructions"),
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
    }
    if not payload.get("stream"):
        return final

    in_progress = {**final, "status": "in_progress", "output": [], "usage": None}
    pending_item = {**item, "status": "in_progress", "content": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events_out: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": in_progress}),
        ("response.in_progress", {"response": in_progress}),
        ("response.output_item.added", {"output_index": 0, "item": pending_item}),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
        *(
            ("response.output_text.delta", {**where, "delta": d, "logprobs": []})
            for d in text_deltas(events)
        ),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": final}),
    ]
    return [
        _sse({"type": name, "sequence_number": number, **body}, event=name)
        for number, (name, body) in enumerate(events_out)
    ]


def _responses_usage(events: int) -> dict[str, Any]:
    return {
        "input_tokens": INPUT_TOKENS,
        "input_tokens_details": {"cached_tokens": CACHED_INPUT_TOKENS},
        "output_tokens": events,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": INPUT_TOKENS + events,
    }


def responses_compact(
    payload: dict[str, Any], events: int, seq: int, usage: Usage = None
) -> dict[str, Any]:
    """POST /responses/compact: a `response.compaction` object (OpenAI API reference, "Compact a
    response"): `output` is the request's user messages followed by one `compaction` item, and
    `usage` is a Responses usage object. It never streams and names no model."""
    raw_input = payload.get("input") or []
    items = [{"role": "user", "content": raw_input}] if isinstance(raw_input, str) else raw_input
    user_messages = [
        {
            "id": f"msg_fake_{seq}_{index}",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_text", "text": item.get("content")}]
            if isinstance(item.get("content"), str)
            else item.get("content", []),
        }
        for index, item in enumerate(items)
        if isinstance(item, dict) and item.get("role") == "user"
    ]
    compaction = {
        "id": f"cmp_fake_{seq}",
        "type": "compaction",
        "encrypted_content": base64.b64encode(f"compacted {seq}".encode()).decode(),
    }
    return {
        "id": f"resp_fake_compact_{seq}",
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [*user_messages, compaction],
        "usage": _responses_usage(events) if usage is None else usage,
    }


def embeddings(
    payload: dict[str, Any], events: int, seq: int, usage: Usage = None
) -> dict[str, Any]:
    """POST /embeddings. The OpenAI SDK asks for base64 unless told otherwise. `usage` unused."""
    raw_input = payload.get("input", "")
    inputs = (
        [raw_input]
        if isinstance(raw_input, str) or (raw_input and isinstance(raw_input[0], int))
        else raw_input
    )
    dimensions = int(payload.get("dimensions", 8))
    data = []
    for index in range(len(inputs)):
        vector = [round(0.1 * (index + 1) + 0.01 * j, 6) for j in range(dimensions)]
        encoded: Any = vector
        if payload.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": payload.get("model", "text-embedding-3-small"),
        "usage": {"prompt_tokens": INPUT_TOKENS, "total_tokens": INPUT_TOKENS},
    }


def messages(
    payload: dict[str, Any], events: int, seq: int, usage: Usage = None
) -> dict[str, Any] | list[bytes]:
    """POST /messages: an Anthropic message, or the documented Messages SSE sequence.
    `usage` unused: Anthropic splits usage over two events."""
    model = payload.get("model", DEFAULT_ANTHROPIC_MODEL)
    usage = {
        "input_tokens": INPUT_TOKENS,
        "cache_creation_input_tokens": CACHE_CREATION_INPUT_TOKENS,
        "cache_read_input_tokens": CACHED_INPUT_TOKENS,
        "output_tokens": events,
    }
    message = {
        "id": f"msg_fake_{seq}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply_text(events)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    if not payload.get("stream"):
        return message

    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    sequence: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
        *(
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": d}})
            for d in text_deltas(events)
        ),
        ("content_block_stop", {"index": 0}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": events},
            },
        ),
        ("message_stop", {}),
    ]
    return [_sse({"type": name, **body}, event=name) for name, body in sequence]


def count_tokens(
    payload: dict[str, Any], events: int, seq: int, usage: Usage = None
) -> dict[str, Any]:
    return {"input_tokens": INPUT_TOKENS}


def _models(flavour: ApiFlavour) -> dict[str, Any]:
    if flavour == "anthropic":
        ids = [DEFAULT_ANTHROPIC_MODEL, "claude-haiku-4-5"]
        created_at = "2025-01-01T00:00:00Z"
        models = [
            {"type": "model", "id": i, "display_name": i, "created_at": created_at} for i in ids
        ]
        return {"data": models, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
    ids = [DEFAULT_OPENAI_MODEL, "gpt-4o", "text-embedding-3-small"]
    return {
        "object": "list",
        "data": [
            {"id": i, "object": "model", "created": 1700000000, "owned_by": "fake"} for i in ids
        ],
    }


# Longest suffix first, so /messages/count_tokens is not taken for /messages.
def _anthropic_usage(events: int) -> dict[str, Any]:
    return {
        "input_tokens": INPUT_TOKENS,
        "cache_creation_input_tokens": CACHE_CREATION_INPUT_TOKENS,
        "cache_read_input_tokens": CACHED_INPUT_TOKENS,
        "output_tokens": events,
    }


# The answers with a tool call and thinking (tests.fakes.tool_content), by route, with the usage
# each reports.
_CONTENT_ROUTES = {
    "/chat/completions": (tool_content.chat_completions, _chat_usage),
    "/responses": (tool_content.responses, _responses_usage),
    "/messages": (tool_content.messages, _anthropic_usage),
}


def _with_tool_content(
    path: str,
    payload: dict[str, Any],
    headers: httpx.Headers,
    controls: _Controls,
    seq: int,
    reply: dict[str, Any] | list[bytes],
) -> dict[str, Any] | list[bytes]:
    """``reply``, or in its place the same API's answer with a tool call and thinking when the
    request asks for them (``x-fake-tool-call``, ``x-fake-thinking``)."""
    content = tool_content.FakeContent.from_headers(headers)
    route = _CONTENT_ROUTES.get(_route_suffix(path))
    if content is None or route is None:
        return reply
    make, usage = route
    return make(payload, seq, content, controls.usage or usage(controls.events))


_POST_ROUTES: dict[
    str, Callable[[dict[str, Any], int, int, Usage], dict[str, Any] | list[bytes]]
] = {
    "/messages/count_tokens": count_tokens,
    "/chat/completions": chat_completions,
    "/responses/compact": responses_compact,
    "/responses": responses,
    "/embeddings": embeddings,
    "/messages": messages,
}


# --- OpenAI Realtime over WebSocket ----------------------------------------------------------
# Written from the Realtime API reference (server events `session.created`, `response.created`,
# `response.output_text.delta`, `response.done`, `error`; client event `response.create`), as
# the openai package's generated types spell them (openai/types/realtime/).


def _realtime_usage(events: int) -> dict[str, Any]:
    """`response.usage`: input counts cached tokens inside `input_tokens`
    (`input_token_details.cached_tokens` is a subset), output counts text and audio."""
    return {
        "total_tokens": INPUT_TOKENS + events,
        "input_tokens": INPUT_TOKENS,
        "output_tokens": events,
        "input_token_details": {
            "text_tokens": INPUT_TOKENS,
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens": CACHED_INPUT_TOKENS,
            "cached_tokens_details": {
                "text_tokens": CACHED_INPUT_TOKENS,
                "audio_tokens": 0,
                "image_tokens": 0,
            },
        },
        "output_token_details": {"text_tokens": events, "audio_tokens": 0},
    }


async def realtime_session(receive: Receive, send: Send, model: str, controls: _Controls) -> None:
    """One Realtime session on an accepted WebSocket: `session.created` naming `model` (the
    `?model=` of the upgrade), then for each `response.create` a text response whose
    `response.done` carries usage (`controls.usage` verbatim when given). Other client events
    get an `error` event. Ends when the client closes."""
    ids = itertools.count(1)

    async def emit(event_type: str, **body: Any) -> None:
        event = {"type": event_type, "event_id": f"event_fake_{next(ids)}", **body}
        await send({"type": "websocket.send", "text": json.dumps(event)})

    session = {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_fake_1",
        "model": model,
        "output_modalities": ["text"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
    }
    await emit("session.created", session=session)
    responses_made = 0
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            client_event = json.loads(message.get("text") or message.get("bytes") or b"")
        except ValueError:
            client_event = None
        event_type = client_event.get("type") if isinstance(client_event, dict) else None
        if event_type != "response.create":
            error = {
                "type": "invalid_request_error",
                "code": "unknown_event",
                "message": f"fake upstream: unsupported client event {event_type!r}",
                "param": None,
                "event_id": None,
            }
            await emit("error", error=error)
            continue
        responses_made += 1
        await _realtime_response(emit, responses_made, controls)


async def _realtime_response(emit: Callable[..., Any], seq: int, controls: _Controls) -> None:
    response_id, item_id = f"resp_fake_rt_{seq}", f"item_fake_rt_{seq}"
    response = {
        "id": response_id,
        "object": "realtime.response",
        "status": "in_progress",
        "status_details": None,
        "output": [],
        "conversation_id": "conv_fake_1",
        "output_modalities": ["text"],
        "max_output_tokens": "inf",
        "metadata": None,
        "usage": None,
    }
    await emit("response.created", response=response)
    where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
    for delta in text_deltas(controls.events):
        await emit("response.output_text.delta", **where, delta=delta)
    item = {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": reply_text(controls.events)}],
    }
    usage = _realtime_usage(controls.events) if controls.usage is None else controls.usage
    done = {**response, "status": "completed", "output": [item], "usage": usage}
    await emit("response.done", response=done)
