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

import logging
import time

from mitmproxy import http
from mitmproxy.net.http import status_codes
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
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.utils import expect

from aibridgeproxyd.client_bounds import BoundedHttpLayer, BoundedHttpStream
from aibridgeproxyd.connections import request_context
from aibridgeproxyd.errors import error_body

log = logging.getLogger("aibridgeproxyd.upstream")

# Set in flow.metadata by an addon's responseheaders hook, after it changed flow.request
# (e.g. injected the next key): discard this response and send the request again.
RESEND = "aibridgeproxyd.resend"
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

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self._resend_wakeup:
            self._resend_wakeup = None
            yield from self._send_again()
        else:
            yield from super()._handle_event(event)

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
        status = 504 if "timed out" in err.lower() else 502
        if ctx is not None:
            reason = "timed out" if status == 504 else "could not be reached"
            message = f"The upstream of provider '{ctx.provider.name}' {reason}."
            code = "upstream_timeout" if status == 504 else "upstream_unreachable"
            body = error_body(ctx.adapter.error_format(self.flow.request), status, message, code)
            response = http.Response.make(status, body, {"Content-Type": "application/json"})
            log.warning(
                "upstream %s: %s",
                reason,
                err,
                extra={
                    "connect_id": ctx.connect.connect_id,
                    "request_id": ctx.request_id,
                    "provider": ctx.provider.name,
                },
            )
        elif BLOCKED_MARKER in err:
            response = http.Response.make(403, b"Forbidden", {"Content-Type": "text/plain"})
        else:
            # mitmproxy's page would name the address and the OS error.
            response = http.Response.make(
                status, status_codes.RESPONSES[status].encode(), {"Content-Type": "text/plain"}
            )
            log.info("dial failed for a pass-through request: %s", err)
        self.flow.response = response
        # The same path mitmproxy takes for a response an addon set in the request hook.
        response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        yield from self.send_response()

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


def _idle_http1(handler: layer.Layer) -> bool:
    client = handler.context.layers[-1]
    return (
        isinstance(client, Http1Client)
        and client.stream_id is None
        and client.state == client.read_headers
    )


# Offered to every upstream, whatever the client negotiated (see AIBridgeHttpLayer).
UPSTREAM_ALPN = (b"http/1.1",)


__all__ = ["RESEND", "AIBridgeHttpLayer", "AIBridgeHttpStream", "as_http1"]
