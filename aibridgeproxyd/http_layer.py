"""mitmproxy's HTTP layer, extended for what an AI proxy needs and addons cannot express.

mitmproxy streams a request to exactly one upstream response and renders its own HTML error page
when the upstream cannot be reached. An AI proxy must instead

- answer a dial failure in the provider's JSON error shape (section 6.6), without internal
  detail;
- re-send a request when an addon asks for it after seeing the response headers: key failover
  on 401/429 (section 6.5). The error response is discarded, never shown to the client;
- re-send once when a *reused* upstream connection dies before any response header arrived
  (an HTTP/1.1 keep-alive close racing our request), so
  connection turnover never becomes a client-visible 502.

Request heads and bodies are bounded by the base classes (``aibridgeproxyd.client_bounds``).
Only buffered request bodies are re-sent; a streamed request body is never replayed. The
classes are installed for MITM'd connections by the intercept addon's ``next_layer`` hook.
mitmproxy is pinned to 12.3.x; the overridden methods mirror that version.
"""

from __future__ import annotations

import json
import logging
import re
import time

from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    GetHttpConnection,
    GetHttpConnectionCompleted,
    Http1Client,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
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

from aibridgeproxyd.client_bounds import BoundedHttpLayer, BoundedHttpStream
from aibridgeproxyd.connections import refuse, request_context
from aibridgeproxyd.errors import (
    REQUEST_ID_HEADER,
    SHOULD_RETRY_HEADER,
    SecretRedactor,
    anthropic_error_type,
    error_response,
    reason_phrase,
    redaction_secrets,
    upstream_failure,
)

log = logging.getLogger("aibridgeproxyd.upstream")

# Set in flow.metadata by an addon's responseheaders hook, after it changed flow.request
# (e.g. injected the next key): discard this response and send the request again.
RESEND = "aibridgeproxyd.resend"
# Set in flow.metadata (by close_client_after_response): close the client connection once this
# flow's response has been sent.
CLOSE_CLIENT = "aibridgeproxyd.close_client"
# How often a request is re-sent after its reused connection died before answering.
TRANSPORT_RETRIES = 1
# The destination guard's refusal reason, matched to answer 403 instead of 502.
BLOCKED_MARKER = "private or reserved"


class AIBridgeHttpStream(BoundedHttpStream):
    def __init__(self, context, stream_id: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context, stream_id)
        self._transport_retries_left = TRANSPORT_RETRIES
        self._connection_reused = False
        self._resend_wakeup: commands.RequestWakeup | None = None
        # Whether response headers went to the client: after that, an error can only cut it off.
        self._client_got_headers = False
        self._failure: http.Response | None = None  # the answer for mitmproxy's error, once made

    # --- connecting ---

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        connection, err = yield GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if err:
            if self.client_state == self.state_done:
                yield from self._answer_dial_failure(err)
            else:  # a streamed request body is still arriving: mitmproxy's own handling
                yield from self.handle_protocol_error(
                    ResponseProtocolError(self.stream_id, err, ErrorCode.CONNECT_FAILED)
                )
            return False
        # A connection set up before this request started was reused from the pool.
        self._connection_reused = (connection.timestamp_tcp_setup or 0) < (
            self.flow.request.timestamp_start or 0
        )
        self.context.server = self.flow.server_conn = connection
        return True

    def _answer_dial_failure(self, err: str) -> layer.CommandGenerator[None]:
        ctx = request_context(self.flow)
        if ctx is None and BLOCKED_MARKER in err:
            response = http.Response.make(
                403, b"Forbidden: private or reserved destination", {"Content-Type": "text/plain"}
            )
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
        """Every command of the stream passes here, so every error answer mitmproxy would
        render as its HTML page (dial, TLS, a broken or unparseable upstream answer, a request
        it cannot parse, body limits) is swapped for ``_failure_response``, whichever of
        mitmproxy's many error paths produced it."""
        if isinstance(event, events.Wakeup) and event.command is self._resend_wakeup:
            self._resend_wakeup = None
            commands_ = self._send_again()
        else:
            commands_ = super()._handle_event(event)
        reply = None
        while True:
            try:
                command = commands_.send(reply)
            except StopIteration:
                return
            if isinstance(command, SendHttp) and command.connection is self.context.client:
                if isinstance(command.event, ResponseHeaders):
                    self._client_got_headers = True
                elif isinstance(command.event, ResponseData) and not command.event.data:
                    # A stream transform that has nothing to send yet (half an event-stream
                    # frame, bytes held back by the redaction) returns b"". To an HTTP/1 client
                    # in chunked encoding, an empty chunk is the end of the body.
                    reply = None
                    continue
                elif isinstance(command.event, ResponseProtocolError) and self._answers_error(
                    command.event
                ):
                    yield from self._send_failure(command.event)
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
        yield SendHttp(ResponseHeaders(self.stream_id, response, False), self.context.client)
        yield SendHttp(
            ResponseData(self.stream_id, response.raw_content or b""), self.context.client
        )
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)

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
        refuse(self.flow, failure.code)
        if failure.status >= 500:
            message = f"The upstream of provider '{ctx.provider.name}' {failure.message}."
            log.warning("upstream %s: %s", failure.message, detail, extra=ids)
        else:
            message = failure.message
            log.info("request refused (%s): %s", failure.code, detail, extra=ids)
        response = error_response(
            ctx.adapter.error_format(self.flow.request), failure.status, message, failure.code
        )
        response.headers[REQUEST_ID_HEADER] = ctx.request_id
        return response

    def _redacted(self, text: str) -> str:
        ctx = request_context(self.flow)
        if ctx is None:
            return text
        secrets = redaction_secrets(
            ctx.adapter.secrets(ctx.provider), self.flow.request.headers, ctx.connect.proxy_token
        )
        return SecretRedactor(secrets).redact_text(text)

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
        # Mirrors HttpStream.state_wait_for_response_headers, plus the RESEND branch.
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

    @expect(ResponseData, ResponseTrailers, ResponseEndOfMessage)
    def state_discard_response(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Read a response the client will never see (a 401/429 before failover) to its end,
        so its connection stays usable, then send the request again."""
        if isinstance(event, ResponseEndOfMessage):
            yield from self._resend()

    def handle_protocol_error(self, event):  # type: ignore[no-untyped-def]
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
                    "reused upstream connection failed before answering (%s); sending the request again",
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
    therefore spread over a pool of HTTP/1.1 connections, and an idle one is reused."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Every command of the connection passes here: see _without_error_page.
        commands_ = super()._handle_event(event)
        reply = None
        while True:
            try:
                command = commands_.send(reply)
            except StopIteration:
                return
            if isinstance(command, commands.SendData) and command.connection is self.context.client:
                command.data = _without_error_page(command.data)
            reply = yield command

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        ctx = self.context.fork()
        self.streams[stream_id] = AIBridgeHttpStream(ctx, stream_id)
        yield from self.event_to_child(self.streams[stream_id], events.Start())

    def get_connection(
        self, event: GetHttpConnection, *, reuse: bool = True
    ) -> layer.CommandGenerator[None]:
        # mitmproxy never hands an HTTP/1.1 upstream connection to a stream of an HTTP/2 client,
        # since another stream may be using it. An idle one is safe: the stream sends its request
        # at once, in this same turn of the event loop, before any other stream asks.
        if reuse and self.context.client.alpn == b"h2":
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
        yield from super().get_connection(event, reuse=reuse)


# The head of mitmproxy's HTML error page (``_http1.make_error_response``), which the HTTP/1
# connection layer sends itself, before any stream exists, for a request head it cannot parse.
_ERROR_PAGE_HEAD = re.compile(
    rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\nServer: mitmproxy [^\r\n]*\r\n"
    rb"Connection: close\r\nContent-Type: text/html\r\n"
)
_CONNECTION_ERRORS = {
    400: ("invalid_request", "The request is not valid HTTP."),
    413: ("request_too_large", "The request is too large for this proxy."),
    431: ("request_header_fields_too_large", "The request head is too large for this proxy."),
}


def _without_error_page(data: bytes) -> bytes:
    """mitmproxy's error page for a request it could not even parse becomes a JSON error
    without its parser text. No provider is known yet, so the body fits both the Anthropic and
    the OpenAI shape (``type``/``error.type``/``error.message``/``error.code``)."""
    match = _ERROR_PAGE_HEAD.match(data)
    if match is None:
        return data
    status = int(match.group(1))
    code, message = _CONNECTION_ERRORS.get(status, ("invalid_request", reason_phrase(status)))
    body = json.dumps(
        {
            "type": "error",
            "error": {"type": anthropic_error_type(status), "message": message, "code": code},
        }
    ).encode()
    response = http.Response.make(
        status,
        body,
        {"Content-Type": "application/json", "Connection": "close", SHOULD_RETRY_HEADER: "false"},
    )
    return http1.assemble_response(response)


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
]
