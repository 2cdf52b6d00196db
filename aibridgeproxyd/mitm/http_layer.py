"""mitmproxy's HTTP layer, extended for what an AI proxy needs and addons cannot express.

mitmproxy streams a request to exactly one upstream response and renders its own HTML error page
when the upstream cannot be reached. An AI proxy must instead

- answer a dial failure in the provider's JSON error shape, without internal detail;
- re-send a request when an addon asks for it after seeing the response headers: key failover
  on 401/429. The error response is discarded, never shown to the client;
- re-send once when a *reused* upstream connection dies before any response header arrived
  (an HTTP/1.1 keep-alive close racing our request), so
  connection turnover never becomes a client-visible 502;
- answer 502 instead of an upstream's ``101`` that is no WebSocket handshake a client would
  accept (``aibridgeproxyd.websocket_handshake``): mitmproxy would relay it as it stands.

The error answers and key failover are described in
docs/providers.md#keys-byok-and-the-proxys-own-errors.

Request heads and bodies are bounded by the base classes (``aibridgeproxyd.mitm.client_bounds``).
Only buffered request bodies are re-sent; a streamed request body is never replayed. The
classes are installed for MITM'd connections by the intercept addon's ``next_layer`` hook.
mitmproxy is pinned to 12.3.x; the overridden methods mirror that version.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import h2.connection
from mitmproxy import http
from mitmproxy.connection import Connection, ConnectionState, Server
from mitmproxy.flow import Error
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    GetHttpConnection,
    GetHttpConnectionCompleted,
    Http1Client,
    Http2Server,
    HttpStream,
    RegisterHttpConnection,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
    SendHttp,
)
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook, HttpResponseHeadersHook
from mitmproxy.proxy.utils import expect

from aibridgeproxyd.destinations import DestinationRefusal
from aibridgeproxyd.errors import (
    error_response,
    upstream_failure,
)
from aibridgeproxyd.interception.recording import redactor_for
from aibridgeproxyd.interception.state import mark_proxy_answer, request_context, stamp_request_id
from aibridgeproxyd.mitm.client_bounds import (
    BoundedHttpLayer,
    BoundedHttpStream,
    UpstreamDeadlinePassed,
    dial_time_left,
    dialled_connection,
)
from aibridgeproxyd.mitm.connections import forget_transport
from aibridgeproxyd.mitm.memory_budget import ResponseBackpressure
from aibridgeproxyd.mitm.responses import forbidden
from aibridgeproxyd.mitm.stream_bounds import BoundedHttp2Server, StreamBounds
from aibridgeproxyd.websocket_handshake import switch_problem

log = logging.getLogger("aibridgeproxyd.upstream")

# Set in flow.metadata by an addon's responseheaders hook, after it changed flow.request
# (e.g. injected the next key): discard this response and send the request again.
RESEND = "aibridgeproxyd.resend"
# Set in flow.metadata (by close_client_after_response): close the client connection once this
# flow's response has been sent.
CLOSE_CLIENT = "aibridgeproxyd.close_client"
# How often a request is re-sent after its reused connection died before answering.
TRANSPORT_RETRIES = 1
# mitmproxy's errors for a request head it refused.
_REQUEST_HEAD_ERRORS = frozenset(
    {ErrorCode.REQUEST_VALIDATION_FAILED, ErrorCode.GENERIC_CLIENT_ERROR}
)


class ClientWentAway(str):
    """The reply a stream gets instead of an upstream connection when its client reset it (or
    closed the connection) while it waited for one; the text is the client's reason."""


class RefusedDial(str):
    """The reply a stream gets for a dial the destination guard refused: mitmproxy's error text
    (``Connection killed: ...``, for the logs), carrying the guard's ``refusal``."""

    refusal: DestinationRefusal

    def __new__(cls, text: str, refusal: DestinationRefusal) -> RefusedDial:
        self = super().__new__(cls, text)
        self.refusal = refusal
        return self


# Events on a stream that show the upstream exchange is progressing (upstream_idle_timeout).
_UPSTREAM_PROGRESS = (
    ResponseHeaders,
    ResponseData,
    ResponseTrailers,
    RequestData,
    RequestEndOfMessage,
)


class AIBridgeHttpStream(BoundedHttpStream):
    """One request/response exchange on a MITM'd connection: bounded like every stream, plus
    error answers in the client format, resend on key failover and upstream deadlines."""

    def __init__(self, context: Context, stream_id: int) -> None:
        super().__init__(context, stream_id)
        self._transport_retries_left = TRANSPORT_RETRIES
        self._connection_reused = False
        self._resend_wakeup: commands.RequestWakeup | None = None
        # Whether response headers went to the client: after that, an error can only cut it off.
        self._client_got_headers = False
        self._failure: http.Response | None = None  # the answer for mitmproxy's error, once made
        # What reads each chunk of the answer once sent (the recording's taps), or None.
        self._chunk_tap: Callable[[bytes], None] | None = None
        # mitmproxy's option (its proxy server addon adds it), read once per stream rather than
        # once per chunk (_stream_chunk).
        self._store_streamed_bodies = bool(getattr(context.options, "store_streamed_bodies", False))

    # --- connecting ---

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        asked = time.time()
        connection, err = yield GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if isinstance(err, ClientWentAway):
            yield from self._end_abandoned_flow(err)
            return False
        if err:
            if self.client_state == self.state_done:
                yield from self._answer_dial_failure(err)
            else:  # a streamed request body is still arriving: mitmproxy's own handling
                yield from self.handle_protocol_error(
                    ResponseProtocolError(self.stream_id, err, ErrorCode.CONNECT_FAILED)
                )
            return False
        # A connection set up before it was asked for has carried a request already: one from
        # the pool, or, when the request goes out again after a failover answer, the one that
        # answered. Its peer may close it before reading this request (transport retry).
        self._connection_reused = (connection.timestamp_tcp_setup or 0) < asked
        self.context.server = self.flow.server_conn = connection
        self._upstream_progress_at = time.monotonic()
        return True

    def _answer_dial_failure(self, err: str) -> layer.CommandGenerator[None]:
        ctx = request_context(self.flow)
        if (
            ctx is None
            and isinstance(err, RefusedDial)
            and err.refusal is DestinationRefusal.BLOCKED
        ):
            response = forbidden(err.refusal)
        else:
            response = self._failure_response(err, ErrorCode.CONNECT_FAILED)
        self.flow.response = response
        # The same path mitmproxy takes for a response an addon set in the request hook.
        response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        yield from self.send_response()

    # --- closing the client connection after a response ---

    def send_response(self, already_streamed: bool = False) -> layer.CommandGenerator[None]:
        yield from super().send_response(already_streamed)
        if self.flow.metadata.get(CLOSE_CLIENT) and self.context.client.alpn == b"h2":
            # HTTP/1.1 closes on the response's `Connection: close`; HTTP/2 has no such header,
            # so the connection is closed once this stream's response is on its way.
            yield commands.CloseConnection(self.context.client)

    # --- mitmproxy's own error answers, in the client's format ---

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Every command of the stream passes here (``_filtered``). Not a generator itself:
        a chunk of a streamed answer, the event a stream gets most, takes a shorter way
        (``_stream_chunk``)."""
        if type(event) is ResponseData and self.server_state == self.state_stream_response_body:
            return self._stream_chunk(event)
        return self._filtered(event)

    def _stream_chunk(self, event: ResponseData) -> layer.CommandGenerator[None]:
        """One chunk of a streamed answer: mitmproxy's ``state_stream_response_body`` for
        ``ResponseData`` (copied: pinned in tests/unit/test_mitm_digests.py), with what
        ``_filtered`` does to its commands. An empty chunk is not sent (to an HTTP/1 client in
        chunked encoding it would end the body), and a chunk sent goes to the recording's taps
        once it is on its way. ``store_streamed_bodies`` is the option's value when the stream
        began. A chunk never ends the flow, so nothing is released here."""
        if self._upstream_progress_at is not None:
            self._upstream_progress_at = time.monotonic()
        response = self.flow.response
        assert response is not None
        if callable(response.stream):
            chunks = response.stream(event.data)
            if isinstance(chunks, bytes):
                chunks = [chunks]
        else:
            chunks = [event.data]
        for chunk in chunks:
            if self._store_streamed_bodies:
                self.response_body_buf += chunk
            if chunk:
                yield SendHttp(ResponseData(self.stream_id, chunk), self.context.client)
                if self._chunk_tap is not None:
                    self._chunk_tap(chunk)

    def _filtered(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The commands answering ``event``, each seen on its way, so every error answer
        mitmproxy would render as its HTML page (dial, TLS, a broken or unparseable upstream
        answer, a request it cannot parse, body limits) is swapped for ``_failure_response``,
        whichever of mitmproxy's many error paths produced it."""
        if isinstance(event, UpstreamDeadlinePassed):
            yield from self._on_upstream_deadline()
            self._release_when_flow_ended()
            return
        if self._upstream_progress_at is not None and isinstance(event, _UPSTREAM_PROGRESS):
            self._upstream_progress_at = time.monotonic()
        if isinstance(event, events.Wakeup) and event.command is self._resend_wakeup:
            self._resend_wakeup = None
            if not self._can_resend():  # not if the client reset the stream meanwhile
                return
            commands_ = self._send_again()
        else:
            # Our own release follows below, on every path: BoundedHttpStream's is skipped.
            commands_ = self.bounded_events(event)
        reply = None
        while True:
            try:
                command = commands_.send(reply)
            except StopIteration:
                # Also after the paths that bypass BoundedHttpStream._handle_event (resend).
                self._release_when_flow_ended()
                return
            if isinstance(command, SendHttp) and command.connection is self.context.client:
                sent = command.event
                if isinstance(sent, ResponseData):
                    # A stream transform that has nothing to send yet (half an event-stream
                    # frame, bytes held back by the redaction) returns b"". To an HTTP/1 client
                    # in chunked encoding, an empty chunk is the end of the body: not sent.
                    # A chunk sent is read by the recording's taps only once it is on its way
                    # (the command runs before this generator resumes): they never delay it.
                    reply = None
                    if sent.data:
                        reply = yield command
                        if self._chunk_tap is not None:
                            self._chunk_tap(sent.data)
                    continue
                if isinstance(sent, ResponseHeaders) and sent.response.status_code >= 200:
                    # A 100 Continue is not the answer: an error after it still gets JSON.
                    self._client_got_headers = True
                    self._chunk_tap = _chunk_tap(self.flow)
                elif isinstance(sent, ResponseProtocolError) and self._answers_error(sent):
                    yield from self._send_failure(sent)
                    reply = None
                    continue
            elif isinstance(command, HttpErrorHook) and self.flow.error is not None:
                # The message may quote what the upstream sent, and the upstream may have quoted
                # the request: it goes to the record and the logs with no secret in it.
                self.flow.error.msg = self._redacted(self.flow.error.msg)
            reply = yield command

    def _answers_error(self, event: ResponseProtocolError) -> bool:
        """mitmproxy would send its error page here: nothing of a response has gone to the
        client yet, and the error has an HTTP status (a kill or a client abort has none)."""
        return (
            not self._client_got_headers
            and event.code.http_status_code() is not None
            and bool(self.context.client.state & ConnectionState.CAN_WRITE)
        )

    def _send_failure(self, event: ResponseProtocolError) -> layer.CommandGenerator[None]:
        response = self._failure or self._failure_response(event.message, event.code)
        response.timestamp_start = response.timestamp_end = time.time()
        self._client_got_headers = True
        # A request refused for its head: what follows it on an HTTP/1 connection cannot be
        # framed, so nothing more is read from it (see aibridgeproxyd.mitm.framing).
        close_http1 = event.code in _REQUEST_HEAD_ERRORS and self.context.client.alpn != b"h2"
        if close_http1:
            response.headers["Connection"] = "close"
        yield SendHttp(ResponseHeaders(self.stream_id, response, False), self.context.client)
        yield SendHttp(
            ResponseData(self.stream_id, response.raw_content or b""), self.context.client
        )
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        if close_http1:
            yield commands.CloseConnection(self.context.client)

    def _failure_response(self, detail: str, code: ErrorCode) -> http.Response:
        """The answer for mitmproxy's error ``detail`` (logged here, never sent): the provider's
        JSON error shape, or a bare status line for a request no adapter routes."""
        status = code.http_status_code() or 502
        failure = upstream_failure(
            detail,
            connect_failed=code is ErrorCode.CONNECT_FAILED,
            client_error=status if status < 500 else None,
        )
        ctx = request_context(self.flow)
        if ctx is None:
            log.info("request failed (%s) for a pass-through request: %s", failure.code, detail)
            return http.Response.make(
                failure.status,
                status_codes.RESPONSES.get(failure.status, "Error").encode(),
                {"Content-Type": "text/plain"},
            )
        ids = {
            "connect_id": ctx.connect.connect_id,
            "request_id": ctx.request_id,
            "provider": ctx.provider.name,
        }
        detail = self._redacted(detail)
        mark_proxy_answer(self.flow, failure.code)
        if failure.status >= 500:
            message = f"The upstream of provider '{ctx.provider.name}' {failure.message}."
            log.warning("upstream %s: %s", failure.message, detail, extra=ids)
        else:
            message = failure.message
            log.info("request refused (%s): %s", failure.code, detail, extra=ids)
        response = error_response(
            ctx.adapter.error_format(self.flow.request), failure.status, message, failure.code
        )
        stamp_request_id(response, ctx)
        return response

    def _redacted(self, text: str) -> str:
        ctx = request_context(self.flow)
        if ctx is None:
            return text
        return redactor_for(self.flow, ctx).redact_text(text)

    # --- resending ---

    def _can_resend(self) -> bool:
        request = self.flow.request
        return (
            self.client_state == self.state_done
            and not request.stream
            and request.raw_content is not None
        )

    @expect(ResponseHeaders)
    def state_wait_for_response_headers(
        self, event: ResponseHeaders
    ) -> layer.CommandGenerator[None]:
        # Mirrors HttpStream.state_wait_for_response_headers, plus the RESEND branch and the
        # check of a 101.
        if event.response.status_code == 101 and (yield from self._refuse_switch(event.response)):
            return
        self.flow.response = event.response
        if not event.end_stream and (yield from self.check_body_size(False)):
            return
        if (yield from self.check_invalid(False)):
            return
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        if self.flow.metadata.pop(RESEND, False) and self._can_resend():
            if event.end_stream:
                yield from self._resend()
            else:
                self.server_state = self.state_discard_response
        elif self.flow.response.stream and not event.end_stream:
            yield from self.start_response_stream()
        else:
            self.server_state = self.state_consume_response_body

    def _refuse_switch(self, response: http.Response) -> layer.CommandGenerator[bool]:
        """Answer 502 instead of an upstream's 101 that is no WebSocket handshake to relay
        (``websocket_handshake.switch_problem``), and close that upstream connection: it has
        switched protocols, nothing more is read from it. False when the 101 is relayed."""
        problem = switch_problem(self.flow.request, response)
        if problem is None:
            return False
        yield SendHttp(
            RequestProtocolError(self.stream_id, problem, ErrorCode.KILL), self.context.server
        )
        self._transport_retries_left = 0  # the upstream answered: not a connection to retry
        yield from self.handle_protocol_error(
            ResponseProtocolError(self.stream_id, problem, ErrorCode.GENERIC_SERVER_ERROR)
        )
        return True

    @expect(ResponseData, ResponseTrailers, ResponseEndOfMessage)
    def state_discard_response(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Read a response the client will never see (a 401/429 before failover) to its end,
        so its connection stays usable, then send the request again."""
        if isinstance(event, ResponseEndOfMessage):
            yield from self._resend()

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and self._can_resend():
            if self.server_state == self.state_discard_response:
                # The discarded response broke off; the request goes out again all the same.
                yield from self._resend()
                return
            if (
                self.server_state == self.state_wait_for_response_headers
                and event.code is not ErrorCode.CONNECT_FAILED
                and self._connection_reused
                and self._transport_retries_left > 0
            ):
                self._transport_retries_left -= 1
                ctx = request_context(self.flow)
                log.info(
                    "reused upstream connection failed before answering (%s); "
                    "sending the request again",
                    event.message,
                    extra={"request_id": ctx.request_id} if ctx else {},
                )
                yield from self._resend()
                return
        if (
            isinstance(event, ResponseProtocolError)
            and self.client_state != self.state_errored
            and self._answers_error(event)
        ):
            # Set before the error hook, so the metrics and the record count the status the
            # client gets (mitmproxy's own page would not be counted at all).
            self.flow.response = self._failure = self._failure_response(event.message, event.code)
        yield from super().handle_protocol_error(event)

    def _resend(self) -> layer.CommandGenerator[None]:
        """Send the request again, on the next turn of the event loop: this runs inside the
        upstream connection's own event handling, which must finish (and, for HTTP/1.1, reset
        the connection for its next request) before that connection sees a new request."""
        self.flow.response = None
        self.response_body_buf.clear()
        self.server_state = self.state_wait_for_response_headers
        self._resend_wakeup = commands.RequestWakeup(0)
        yield self._resend_wakeup

    def _send_again(self) -> layer.CommandGenerator[None]:
        if not (yield from self.make_server_connection()):
            return
        request = self.flow.request
        content = request.raw_content
        yield SendHttp(
            RequestHeaders(self.stream_id, request, not (content or request.trailers)),
            self.context.server,
        )
        if content:
            yield SendHttp(RequestData(self.stream_id, content), self.context.server)
        if request.trailers:
            yield SendHttp(RequestTrailers(self.stream_id, request.trailers), self.context.server)
        yield SendHttp(RequestEndOfMessage(self.stream_id), self.context.server)

    # --- streams the client abandons (stream_bounds) ---

    def _end_abandoned_flow(self, reason: ClientWentAway) -> layer.CommandGenerator[None]:
        """End the flow of a stream whose client reset it, or went away, while it waited for an
        upstream connection: the error hook, once, and nothing sent anywhere (the layer has
        already withdrawn its connection request)."""
        self.client_state = self.server_state = self.state_errored
        self.flow.live = False
        self.flow.error = Error(str(reason))
        yield HttpErrorHook(self.flow)
        yield DropStream(self.stream_id)

    # --- upstream time (stream_bounds; the deadlines are BoundedHttpStream's) ---

    def upstream_phase(self) -> str | None:
        """``BoundedHttpStream``'s, except while a request waits to be sent again (resend)."""
        return None if self._resend_wakeup is not None else super().upstream_phase()

    def reading_answer(self) -> bool:
        """Also while a response the client never sees is read to its end (failover)."""
        return super().reading_answer() or self.server_state == self.state_discard_response

    def watch_upstream(self, now: float) -> None:
        """Nothing: the progress of a MITM'd upstream is noted as each event arrives
        (``_filtered``, ``_stream_chunk``)."""

    def log_upstream_timeout(self, message: str) -> None:
        """The warning, with the connect and request ids and the provider."""
        ctx = request_context(self.flow)
        log.warning(
            "upstream timed out: %s; closing the upstream connection",
            message,
            extra=(
                {
                    "connect_id": ctx.connect.connect_id,
                    "request_id": ctx.request_id,
                    "provider": ctx.provider.name,
                }
                if ctx
                else {}
            ),
        )

    def upstream_timeout_answer(self, message: str) -> http.Response:
        """504 ``upstream_timeout`` in the client format (docs/providers.md, "Keys, BYOK and the
        proxy's own errors"); a bare 504 for a request no adapter routes."""
        ctx = request_context(self.flow)
        if ctx is None:
            return http.Response.make(
                504, status_codes.RESPONSES[504].encode(), {"Content-Type": "text/plain"}
            )
        text = f"The upstream of provider '{ctx.provider.name}' timed out: {message}."
        api_format = ctx.adapter.error_format(self.flow.request)
        response = error_response(api_format, 504, text, "upstream_timeout")
        stamp_request_id(response, ctx)
        mark_proxy_answer(self.flow, "upstream_timeout")
        return response

    # --- WebSocket (stream_bounds) ---

    def max_websocket_message(self) -> int:
        """The limit of this stream's WebSocket messages (``BoundedHttpStream.flow_done``)."""
        return self.stream_bounds.max_websocket_message

    def websocket_log_extra(self) -> Mapping[str, Any]:
        """A session over the limit is logged with its connect and request ids."""
        ctx = request_context(self.flow)
        return {"connect_id": ctx.connect.connect_id, "request_id": ctx.request_id} if ctx else {}

    def passthrough(self, event: events.Event) -> layer.CommandGenerator[None]:
        # A deadline check queued before the stream became a WebSocket relay is not for it.
        if isinstance(event, UpstreamDeadlinePassed):
            return
        yield from super().passthrough(event)


def _dial_outlasted(dialled: Connection, bounds: StreamBounds) -> bool:
    """Whether the TCP connect of ``dialled`` (a connection the proxy server dials: see
    ``dialled_connection``) began ``upstream_connect_timeout`` ago or more
    (``timestamp_start``, Unix seconds, is set when it begins)."""
    begun = dialled.timestamp_start is not None
    return begun and dial_time_left(dialled, bounds.upstream_connect_timeout) <= 0


def _chunk_tap(flow: http.HTTPFlow) -> Callable[[bytes], None] | None:
    """What reads each chunk of ``flow``'s answer once sent: the recording's taps of a streamed
    answer (``interception.recording.tap_usage``, run in the responseheaders hook), or None."""
    ctx = request_context(flow)
    return ctx.recording.chunk_tap if ctx is not None else None


def close_client_after_response(flow: http.HTTPFlow) -> None:
    """Close the client connection once ``flow.response`` (set by an addon) has been sent."""
    flow.metadata[CLOSE_CLIENT] = True
    if flow.response is not None and not (flow.request.is_http2 or flow.request.is_http3):
        flow.response.headers["Connection"] = "close"


def as_http1(request: http.Request) -> None:
    """Turn an HTTP/2 request into the HTTP/1.1 request sent upstream (``:authority`` becomes
    ``Host``). mitmproxy would convert a copy on the wire, but then treat the upstream
    connection as single-use; converted here, the connection is kept alive and pooled."""
    if not (request.is_http2 or request.is_http3):
        return
    authority = request.authority
    request.http_version = "HTTP/1.1"
    if "host" not in request.headers and authority:
        request.headers.insert(0, "Host", authority)
    request.authority = ""
    cookies = request.headers.get_all("cookie")
    if len(cookies) > 1:
        request.headers["cookie"] = "; ".join(cookies)
    # HTTP/2 frames the body itself and may omit content-length; HTTP/1.1 may not. The body is
    # buffered by now (this runs in the request hook), so its length is known.
    body = request.raw_content
    if (
        body
        and "content-length" not in request.headers
        and "transfer-encoding" not in request.headers
    ):
        request.headers["content-length"] = str(len(body))


class AIBridgeHttpLayer(BoundedHttpLayer):
    """Upstream connections always speak HTTP/1.1 (see ``UPSTREAM_ALPN``): an HTTP/2 upstream
    that sends GOAWAY kills every stream in flight on it (hyper-h2 closes the whole connection
    state), streams mid-answer included, which no retry can save. Requests of HTTP/2 clients are
    therefore spread over a pool of HTTP/1.1 connections, and an idle one is reused.

    It also applies the connection's ``stream_bounds`` (see ``aibridgeproxyd.mitm.stream_bounds``):
    HTTP/2 concurrency and reset budget, WebSocket message size, upstream deadlines, and it ends
    the flow of every stream its client abandons, whatever stage the stream is at."""

    # Set by the intercept addon when it installs the layer (and stream_bounds, the base's).
    connect_id: str = ""

    def _handle_event_bounded(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Inside BoundedHttpLayer._handle_event's guard (an exception closes the client). Not a
        # generator itself: for an HTTP/1 client it returns mitmproxy's, one frame fewer for
        # every event and every command of the connection. The upstream deadline check's
        # wakeup is the base's (BoundedHttpLayer._wakeup).
        # mitmproxy's HTML error pages never come from here: the bounded HTTP/1 server layer
        # (aibridgeproxyd.mitm.framing) answers every request it cannot parse itself.
        if self.context.client.alpn != b"h2":
            return super()._handle_event_bounded(event)
        return self._handle_http2_event(event)

    def _handle_http2_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        """An event of an HTTP/2 client's connection: its streams share the pool of upstream
        connections, and a client that does not read pauses its upstreams (backpressure)."""
        if isinstance(event, events.Start):
            # HttpLayer keeps a client connection layer that is already there.
            self.connections[self.context.client] = BoundedHttp2Server(
                self.context.fork(), self.stream_bounds, self.connect_id
            )
        yield from super()._handle_event_bounded(event)
        if isinstance(event, events.DataReceived) and event.connection in self.connections:
            yield from self._offer_idle_connection(event.connection)
        self._apply_backpressure(event)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        context = self.context.fork()
        stream = self.streams[stream_id] = AIBridgeHttpStream(context, stream_id)
        self.attach_stream(stream)
        yield from self.event_to_child(stream, events.Start())
        yield from self._schedule_deadline_check()

    def event_to_child(
        self, child: layer.Layer | HttpStream, event: events.Event
    ) -> layer.CommandGenerator[None]:
        # Not a generator itself: every event of every stream passes here, and returning
        # mitmproxy's generator saves a frame per command (a streamed response's chunks).
        if isinstance(event, RequestProtocolError) and isinstance(child, AIBridgeHttpStream):
            return self._withdraw_then_deliver(child, event)
        return super().event_to_child(child, event)

    def _withdraw_then_deliver(
        self, child: AIBridgeHttpStream, event: RequestProtocolError
    ) -> layer.CommandGenerator[None]:
        yield from self._withdraw_connection_request(child, event)
        yield from super().event_to_child(child, event)

    def register_connection(self, command: RegisterHttpConnection) -> layer.CommandGenerator[None]:
        if command.connection not in self.waiting_for_establishment:
            return  # a dial this layer cancelled and forgot (_cancel_queued_dial)
        refusal = command.connection.error
        if command.err and isinstance(refusal, DestinationRefusal):
            # The server_connect hook refused the dial: its reason travels as a value.
            command = RegisterHttpConnection(command.connection, RefusedDial(command.err, refusal))
        elif command.err and _dial_outlasted(
            dialled_connection(command.connection, self.connections.get(command.connection)),
            self.stream_bounds,
        ):
            # Closed by _close_stalled_dials (or it failed that late anyway): a timeout.
            timeout = self.stream_bounds.upstream_connect_timeout
            err = f"no upstream connection within {timeout:g}s: timed out ({command.err})"
            command = RegisterHttpConnection(command.connection, err)
        yield from super().register_connection(command)

    # --- streams the client abandons (stream_bounds) ---

    def _withdraw_connection_request(
        self, stream: AIBridgeHttpStream, event: RequestProtocolError
    ) -> layer.CommandGenerator[None]:
        """The client reset ``stream`` or went away. A stream paused on GetHttpConnection would
        only see that once a connection is ready, which may be never (mitmproxy queues dials
        beyond its per-address limit, and a dial cancelled while queued never reports back):
        take its request off the queue and resume it at once with ``ClientWentAway``, which
        ends its flow. A queued dial nobody else waits for is cancelled before it connects."""
        # Layer._paused (private) is the only record of the command a stream waits on.
        paused = stream._paused
        if paused is None or not isinstance(paused.command, GetHttpConnection):
            return
        request = paused.command
        found = next(
            (
                (connection, waiting, position)
                for connection, waiting in self.waiting_for_establishment.items()
                # By identity: GetHttpConnection compares equal for equal addresses.
                for position, queued in enumerate(waiting)
                if queued is request
            ),
            None,
        )
        if found is None:
            return
        connection, waiting, position = found
        del waiting[position]
        self.command_sources.pop(request, None)
        if not waiting and _queued_dial(connection):
            yield from self._cancel_queued_dial(connection)
        yield from super().event_to_child(
            stream, GetHttpConnectionCompleted(request, (None, ClientWentAway(event.message)))
        )

    def _cancel_queued_dial(self, connection: Connection) -> layer.CommandGenerator[None]:
        """Cancel a dial that has not started connecting (it still waits for a connection slot
        or in the server_connect hook), and forget it: cancelled there, it never reports back."""
        dial = self.connections.pop(connection, None)
        self.waiting_for_establishment.pop(connection, None)
        for command, source in list(self.command_sources.items()):
            if source is dial:
                del self.command_sources[command]
        yield commands.CloseConnection(connection)  # the proxy server cancels the dial's task
        forget_transport(self.context.client, connection)

    def _offer_idle_connection(self, connection: Connection) -> layer.CommandGenerator[None]:
        """Hand an upstream connection that just became idle to a stream whose dial still waits
        for a connection slot. mitmproxy holds a slot for a connection's whole life, idle in the
        pool included, so without this the streams of an HTTP/2 client beyond the per-address
        limit wait until an idle connection happens to close (the upstream's keep-alive
        timeout, often minutes)."""
        if self.context.client.alpn != b"h2" or connection in self.waiting_for_establishment:
            return
        handler = self.connections.get(connection)
        if (
            handler is None
            or not connection.connected
            or connection.error
            or connection.alpn == b"h2"
            or not _idle_http1(handler)
        ):
            return
        for pending, waiting in self.waiting_for_establishment.items():
            if not _queued_dial(pending):
                continue
            for position, request in enumerate(waiting):
                if request.connection_spec_matches(connection):
                    del waiting[position]
                    if not waiting:
                        yield from self._cancel_queued_dial(pending)
                    stream = self.command_sources.pop(request)
                    yield from self.event_to_child(
                        stream, GetHttpConnectionCompleted(request, (connection, None))
                    )
                    return

    # --- streams the client stopped reading (the stall watch) ---

    def unread_response_streams(self) -> list[tuple[int, http.HTTPFlow]]:
        """``(stream id, flow)`` of each stream whose response the HTTP/2 client is not taking:
        response bytes wait for its flow-control window while the stream relays the upstream's
        body. Always empty for an HTTP/1.1 client, whose socket stops the relay by itself."""
        client_layer = self.connections.get(self.context.client)
        if not isinstance(client_layer, Http2Server):
            return []
        buffers = client_layer.h2_conn.stream_buffers
        return [
            (stream_id, stream.flow)
            for stream_id, stream in list(self.streams.items())
            if buffers.get(stream_id) and stream.server_state == stream.state_stream_response_body
        ]

    # --- HTTP/2 response backpressure (memory_budget) ---

    def _apply_backpressure(self, event: events.Event) -> None:
        """Stop reading the upstream of an HTTP/2 stream whose client does not take its response
        (see ``memory_budget.ResponseBackpressure``); only streams that are still reading a
        response may stay paused, so a connection going back to the pool is always resumed."""
        if self.context.client.alpn != b"h2":
            return
        client_layer = self.connections.get(self.context.client)
        backpressure = getattr(self, "_backpressure", None)
        if client_layer is None or not hasattr(client_layer, "h2_conn"):
            return
        if not (self.context.client.state & ConnectionState.CAN_WRITE) or (
            client_layer.h2_conn.state_machine.state is h2.connection.ConnectionState.CLOSED
        ):
            # Nothing more goes to this client: what its buffers hold is garbage now.
            if backpressure is not None:
                backpressure.close()
                self._backpressure = ResponseBackpressure.CLOSED
            return
        if backpressure is ResponseBackpressure.CLOSED:
            return
        if backpressure is None:
            if not client_layer.h2_conn.stream_buffers:
                return  # nothing waits for the client: the common case costs one lookup
            backpressure = self._backpressure = ResponseBackpressure(self.context.client)
            # Also given back if the layer is dropped without a last event.
            weakref.finalize(self, backpressure.close)
        reading: dict[int, Connection | None] = {}
        for stream_id, stream in self.streams.items():
            server = stream.context.server
            if (
                isinstance(stream, AIBridgeHttpStream)
                and stream.client_state != stream.state_errored
                and stream.server_state
                in (stream.state_stream_response_body, stream.state_consume_response_body)
                and server.connected
            ):
                reading[stream_id] = server
            else:
                reading[stream_id] = None
        backpressure.update(client_layer.h2_conn, reading)

    # --- upstream time (stream_bounds; the rounds of checks are BoundedHttpLayer's) ---

    def _check_upstream_deadlines(self) -> layer.CommandGenerator[None]:
        """The base's round, with an upstream the proxy stopped reading (its HTTP/2 client is
        slow: ``_apply_backpressure``) not counted as silent, and the stalled dials closed."""
        backpressure = getattr(self, "_backpressure", None)
        if backpressure is not None and backpressure.paused:
            now = time.monotonic()
            for stream in self.streams.values():
                if isinstance(stream, AIBridgeHttpStream) and stream.context.server in (
                    backpressure.paused
                ):
                    stream._upstream_progress_at = now
        yield from super()._check_upstream_deadlines()
        yield from self._close_stalled_dials()

    def _close_stalled_dials(self) -> layer.CommandGenerator[None]:
        """Close every upstream connection still being opened ``upstream_connect_timeout``
        after its TCP connect began: a connect that is never answered (the system gives up
        only after about two minutes), or a TLS handshake that never ends (which would hold
        the waiting requests for ever: none was sent, so ``upstream_response_timeout`` never
        started). The dial fails, and the requests waiting on it are answered 504
        (``register_connection`` labels the failure a timeout). Through a corporate proxy the
        connection dialled and closed is the proxy's (``dialled_connection``).

        A connect is cancelled only once it has begun (mitmproxy sets ``timestamp_start`` inside
        the ``try`` that turns the cancellation into a failed dial): a dial still waiting for one
        of mitmproxy's per-address slots, or in the server_connect hook, is left alone, since
        cancelling it there would end the dial without an answer to the requests."""
        for connection in list(self.waiting_for_establishment):
            handler = self.connections.get(connection)
            dialled = dialled_connection(connection, handler)
            if not isinstance(dialled, Server):
                continue
            # Closed once: a connect cancelled has its error, a handshake cut its socket closed.
            connecting = dialled.timestamp_tcp_setup is None and dialled.error is None
            if (connecting or dialled.connected) and _dial_outlasted(dialled, self.stream_bounds):
                yield commands.CloseConnection(dialled)

    def get_connection(
        self, event: GetHttpConnection, *, reuse: bool = True
    ) -> layer.CommandGenerator[None]:
        # mitmproxy never hands an HTTP/1.1 upstream connection to a stream of an HTTP/2 client,
        # since another stream may be using it. An idle one is safe: the stream sends its request
        # at once, in this same turn of the event loop, before any other stream asks.
        # Also when mitmproxy asks for a new connection (reuse=False), which it does for every
        # stream but the first that waited for the same HTTP/1.1 connection.
        if self.context.client.alpn == b"h2":
            for connection, handler in self.connections.items():
                if (
                    event.connection_spec_matches(connection)
                    and connection.connected
                    and connection.alpn != b"h2"
                    and connection not in self.waiting_for_establishment
                    and not connection.error
                    and _idle_http1(handler)
                ):
                    stream = self.command_sources.pop(event)
                    yield from self.event_to_child(
                        stream, GetHttpConnectionCompleted(event, (connection, None))
                    )
                    return
        if reuse and _failed_dial_matches(self.connections, event):
            # mitmproxy keeps a failed dial among its connections and answers its error to
            # every later request for that address on this client connection, without dialling
            # again: one refused connection would fail all retries until the client reconnects.
            reuse = False
        yield from super().get_connection(event, reuse=reuse)


def unread_streams_of(layer: object) -> list[tuple[int, http.HTTPFlow]]:
    """``AIBridgeHttpLayer.unread_response_streams`` of a connection's HTTP layer
    (``ConnectInfo.http_layer``); none for any other layer."""
    return layer.unread_response_streams() if isinstance(layer, AIBridgeHttpLayer) else []


def _failed_dial_matches(connections: Iterable[Connection], request: GetHttpConnection) -> bool:
    return any(
        connection.error and request.connection_spec_matches(connection)
        for connection in connections
    )


def _queued_dial(connection: Connection) -> bool:
    """A dial that has not started connecting: it waits for a connection slot (or in the
    server_connect hook). Through an upstream proxy the dial is the proxy's connection, which
    this layer does not see: such dials are never treated as queued."""
    return (
        isinstance(connection, Server)
        and connection.via is None
        and connection.timestamp_start is None
    )


def _idle_http1(handler: layer.Layer) -> bool:
    client = handler.context.layers[-1]
    return (
        isinstance(client, Http1Client)
        and client.stream_id is None
        and client.state == client.read_headers
    )


# Offered to every upstream, whatever the client negotiated (see AIBridgeHttpLayer).
UPSTREAM_ALPN = (b"http/1.1",)


__all__ = [
    "CLOSE_CLIENT",
    "RESEND",
    "AIBridgeHttpLayer",
    "AIBridgeHttpStream",
    "as_http1",
    "close_client_after_response",
    "unread_streams_of",
]
