"""Bounds on what a client can make the proxy hold: request heads and request bodies.

mitmproxy buffers a request head until its blank line arrives, however long that takes, and
reads a whole request body before it answers a response an addon set on the head. These layers
bound both, for every request the proxy reads from a client: the CONNECT and plain-HTTP proxy
requests on the listener (the outer, regular-mode HTTP layer) and every request inside a MITM'd
tunnel, HTTP/1.1 or HTTP/2.

- A request head larger than ``max_request_head`` bytes is answered 431 and the connection is
  closed; nothing of it is parsed. HTTP/2 header blocks are bounded by hyper-h2's
  ``max_header_list_size`` (decoded size), set to the same value: a larger block ends the
  connection with a GOAWAY.
- A request body larger than ``max_request_body`` bytes is answered 413: at once, before any of
  the body is read and instead of ``100 Continue``, when the length is declared; as soon as the
  limit is crossed when it is not (chunked, or HTTP/2 without ``content-length``).
- Any answer an addon sets on the head (407, 403, 413) goes out before the body is read.

After such an early answer an HTTP/1.1 connection is closed (the unread body makes it unusable);
an HTTP/2 stream is dropped and the rest of its body discarded as it arrives.

The upstream's time is bounded too, for plain-HTTP proxy requests as for MITM'd ones
(``stream_bounds``): no response headers ``upstream_response_timeout`` after the whole request
went upstream is a 504 (plain text on the listener), and an upstream silent for
``upstream_idle_timeout`` once it started answering breaks the answer off (a 504 while nothing
of it went to the client). The layer checks in rounds, on a wakeup that runs only while a
request waits on an upstream (``BoundedHttpLayer._check_upstream_deadlines``).

The limits are mitmproxy options (``load_options``), so every layer reads them from its context.
mitmproxy is pinned to 12.3.x; the overridden methods mirror that version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.connection import Connection, Server
from mitmproxy.flow import Error
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import ClientTLSLayer
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    GetHttpConnection,
    HttpLayer,
    HTTPMode,
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
    SendHttp,
)
from mitmproxy.proxy.layers.http._events import HttpEvent
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook, HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.layers.websocket import WebsocketLayer
from mitmproxy.proxy.tunnel import TunnelLayer
from mitmproxy.proxy.utils import expect

from aibridgeproxyd.errors import error_response
from aibridgeproxyd.interception.state import mark_proxy_answer, request_context
from aibridgeproxyd.mitm.body_chunks import coalesce_chunks
from aibridgeproxyd.mitm.framing import HEAD_END, FramingHttp1Server, peer_address
from aibridgeproxyd.mitm.memory_budget import (
    BUDGET,
    H2_INITIAL_WINDOW,
    ConnectionBytes,
    Reservation,
)
from aibridgeproxyd.mitm.proxy_answer import bound_proxy_answer
from aibridgeproxyd.mitm.responses import http1_bytes
from aibridgeproxyd.mitm.stream_bounds import (
    DEFAULT_BOUNDS,
    StreamBounds,
    limit_websocket_messages,
)
from aibridgeproxyd.model import ApiFormat
from aibridgeproxyd.websocket_handshake import switch_problem

log = logging.getLogger("aibridgeproxyd.limits")

# mitmproxy option names (declared by the client limits addon, set from the config keys).
MAX_REQUEST_HEAD = "max_request_head"
MAX_REQUEST_BODY = "max_request_body"
DEFAULT_MAX_REQUEST_HEAD = 64 * 1024
DEFAULT_MAX_REQUEST_BODY = 64 * 1024 * 1024
UPSTREAM_CONNECT_TIMEOUT = "upstream_connect_timeout"
DEFAULT_UPSTREAM_CONNECT_TIMEOUT = 30.0
MAX_WEBSOCKET_MESSAGE = "max_websocket_message"
DEFAULT_MAX_WEBSOCKET_MESSAGE = 16 * 1024 * 1024
# flow.metadata key of a CONNECT whose dial was cut off at upstream_connect_timeout: seconds.
DIAL_TIMED_OUT = "aibridgeproxyd.dial_timed_out"
# flow.metadata key of a CONNECT whose dial a stopping proxy failed (``dialing_tunnels``): True.
DIAL_STOPPED = "aibridgeproxyd.dial_stopped"


def load_options(loader: Any) -> None:
    """Declare the limit options on a mitmproxy ``Loader`` (called from an addon's ``load``)."""
    loader.add_option(
        MAX_REQUEST_HEAD,
        int,
        DEFAULT_MAX_REQUEST_HEAD,
        "Largest request head (request line plus headers) read from a client, in bytes.",
    )
    loader.add_option(
        MAX_REQUEST_BODY,
        int,
        DEFAULT_MAX_REQUEST_BODY,
        "Largest request body read from a client, in bytes.",
    )
    loader.add_option(
        MAX_WEBSOCKET_MESSAGE,
        int,
        DEFAULT_MAX_WEBSOCKET_MESSAGE,
        "Largest WebSocket message, either direction, in bytes.",
    )
    loader.add_option(
        UPSTREAM_CONNECT_TIMEOUT,
        float,
        DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        "Longest dial of a tunnel, in seconds (through a corporate proxy: until it answers).",
    )


def _option(context: Context, name: str, default: int) -> int:
    # Layers built without the addon (unit tests of mitmproxy alone) keep the safe default.
    return int(getattr(context.options, name, default))


def _connect_timeout(context: Context) -> float:
    # upstream_connect_timeout, in seconds (the default without the addon, as ``_option``).
    options = context.options
    return float(getattr(options, UPSTREAM_CONNECT_TIMEOUT, DEFAULT_UPSTREAM_CONNECT_TIMEOUT))


class ConnectDeadline(commands.RequestWakeup):
    """The wakeup that checks a tunnel's dial (``BoundedHttpStream.handle_connect_regular``),
    ``delay`` seconds on; ``timeout``: the ``upstream_connect_timeout`` it is held to."""

    def __init__(self, delay: float, timeout: float) -> None:
        super().__init__(delay)
        self.timeout = timeout


class PlainDialDeadline(commands.RequestWakeup):
    """The wakeup that checks the dial of ``connection``, opened for plain-HTTP proxy requests
    (``BoundedHttpLayer.get_connection``), ``delay`` seconds on."""

    def __init__(self, delay: float, timeout: float, connection: Connection) -> None:
        super().__init__(delay)
        self.timeout = timeout
        self.connection = connection


class UpstreamDeadlineCheck(commands.RequestWakeup):
    """The wakeup of the layer's next round of upstream deadline checks
    (``BoundedHttpLayer._check_upstream_deadlines``); one at a time per client connection."""


@dataclass
class UpstreamDeadlinePassed(events.Event):
    """Sent by the layer's deadline check to a stream whose upstream exceeded
    ``upstream_response_timeout`` or ``upstream_idle_timeout``."""


def dial_timed_out(timeout: float) -> str:
    """The error of a dial closed at ``upstream_connect_timeout`` (``timeout`` seconds)."""
    return f"no connection within {timeout:g}s: timed out"


def dial_time_left(dialled: Connection, timeout: float) -> float:
    """Seconds left before the dial of ``dialled`` has run ``timeout`` seconds since its TCP
    connect began (0 once it has). A connect not begun yet (waiting for one of mitmproxy's
    per-address slots, or in the server_connect hook) has the whole ``timeout`` left."""
    started = dialled.timestamp_start
    return timeout if started is None else max(0.0, started + timeout - time.time())


def _dial_time_left(server: Server, timeout: float) -> float | None:
    """``dial_time_left`` for a TCP connect alone: None once there is nothing to bound
    (connected, failed or closed)."""
    if server.timestamp_tcp_setup is not None or server.error is not None:
        return None
    return dial_time_left(server, timeout)


def upstream_deadline_message(phase: str, bounds: StreamBounds) -> str:
    """What a stream past its upstream deadline in ``phase`` (``upstream_phase``) is told, for
    the log and the flow's error: the time and the option's name."""
    if phase == "response_headers":
        return (
            f"no response headers within {bounds.upstream_response_timeout:g}s "
            "(upstream_response_timeout)"
        )
    return (
        f"the upstream sent nothing for {bounds.upstream_idle_timeout:g}s (upstream_idle_timeout)"
    )


def dialled_connection(connection: Connection, handler: layer.Layer | None) -> Connection:
    """The connection the proxy server dials to open ``connection``: itself, or through a
    corporate proxy (``upstream_proxy``) the connection to that proxy, held by the tunnel layer
    of ``handler``'s stack. The target's own ``timestamp_start`` is then set only once the proxy
    answers the CONNECT, and closing the target closes nothing while its tunnel opens."""
    outer = handler
    while outer is not None:
        if isinstance(outer, TunnelLayer) and outer.tunnel_connection is not connection:
            return outer.tunnel_connection
        outer = getattr(outer, "child_layer", None)
    return connection


class BoundedHttp1Server(FramingHttp1Server):
    """mitmproxy's HTTP/1 server connection with its receive buffer bounded (and the strict
    request framing of ``aibridgeproxyd.mitm.framing``).

    The buffer holds the head being read, and bytes a client pipelines while its previous
    request is answered; both are refused beyond ``max_request_head``."""

    def __init__(self, context: Context, error_format: ApiFormat | None = None) -> None:
        super().__init__(context)
        self.error_format = error_format
        self.max_request_head = _option(context, MAX_REQUEST_HEAD, DEFAULT_MAX_REQUEST_HEAD)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Not a generator itself: every response chunk sent passes here. Only received bytes
        # grow the buffer, so only they are checked (while waiting, growth past the limit is
        # refused; a send that ends a response leaves at most that much for the next request).
        if isinstance(event, events.DataReceived):
            return self._received_bounded(event)
        return super()._handle_event(event)

    def _received_bounded(self, event: events.DataReceived) -> layer.CommandGenerator[None]:
        if event.data:
            buffered = len(self.buf) + len(event.data)
            if buffered > self.max_request_head:
                if self.state == self.read_headers and not self._head_ends_within_limit(event.data):
                    yield from self._refuse_oversized_head(buffered)
                    return
                if self.state == self.wait:
                    yield from self._refuse_pipelined_bytes(buffered)
                    return
        yield from super()._handle_event(event)
        if self.state == self.read_body and len(self.buf) > self.max_request_head:
            # A body reader consumes what arrives at once, except a chunk-size line or trailer
            # section that never ends.
            log.info(
                "connection closed: chunk header or trailers over %d bytes (max_request_head)",
                self.max_request_head,
                extra={"client": peer_address(self.conn)},
            )
            yield from self._close_bounded()

    def _head_ends_within_limit(self, data: bytes) -> bool:
        """Whether the head's blank line lies within the first ``max_request_head`` bytes.
        Only called once the buffer is past the limit, so the copy is at most 128 KiB."""
        pending = (bytes(self.buf) + data)[: self.max_request_head]
        return HEAD_END.search(pending.lstrip(b"\r\n")) is not None

    def _refuse_oversized_head(self, buffered: int) -> layer.CommandGenerator[None]:
        message = (
            f"The request head exceeds this proxy's limit of {self.max_request_head} bytes "
            f"(max_request_head)."
        )
        log.info(
            "request head refused: no end of head within %d bytes (max_request_head)",
            self.max_request_head,
            extra={"client": peer_address(self.conn)},
        )
        code = "request_header_fields_too_large"
        response = error_response(
            self.error_format,
            431,
            message,
            code,
            {"Connection": "close"},
            should_retry_header=False,
        )
        yield commands.SendData(self.conn, http1_bytes(response))
        yield from self._close_bounded()

    def _refuse_pipelined_bytes(self, buffered: int) -> layer.CommandGenerator[None]:
        # The previous request is still being answered; a client that keeps sending meanwhile
        # would grow the buffer without bound. There is no response slot to refuse it in.
        log.info(
            "connection closed: %d bytes sent ahead while a request was in flight "
            "(over max_request_head)",
            buffered,
            extra={"client": peer_address(self.conn)},
        )
        yield from self._close_bounded()

    def _close_bounded(self) -> layer.CommandGenerator[None]:
        self.buf.maybe_extract_at_most(len(self.buf))
        self.state = self.done
        yield commands.CloseConnection(self.conn)


def limit_header_list(connection: Http2Server) -> None:
    """Bound the decoded header list of an HTTP/2 client connection by ``max_request_head``.

    hyper-h2 enforces ``max_header_list_size`` while decoding and raises a protocol error (the
    connection ends with GOAWAY). The compressed block is bounded by the frame size (128 KiB)
    times hyper-h2's 64 CONTINUATION frames. Works on any Http2Server subclass, so another
    extension of the connection layer keeps the bound."""
    limit = _option(connection.context, MAX_REQUEST_HEAD, DEFAULT_MAX_REQUEST_HEAD)
    connection.h2_conn.decoder.max_header_list_size = limit


class HeaderLimitedHttp2Server(Http2Server):
    """mitmproxy's HTTP/2 server connection with the header list bounded and the bound
    advertised in our SETTINGS (``limit_header_list``)."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        limit = _option(context, MAX_REQUEST_HEAD, DEFAULT_MAX_REQUEST_HEAD)
        self.h2_conn.local_settings.max_header_list_size = limit
        self.h2_conn.local_settings.initial_window_size = H2_INITIAL_WINDOW
        # hyper-h2 pitfall (as in mitmproxy): acknowledge, or the old value is advertised.
        self.h2_conn.local_settings.acknowledge()
        limit_header_list(self)


class BoundedHttpStream(HttpStream):
    """mitmproxy's HTTP stream, with request bodies bounded and early answers sent early.

    The request body bytes it buffers are held against the process budget and its client
    connection's (``aibridgeproxyd.mitm.memory_budget``), until the flow ends."""

    # Set by the layer (BoundedHttpLayer.attach_stream); a stream without one counts alone.
    connection_bytes: ConnectionBytes | None = None
    _reservation: Reservation | None = None
    # The layer's bounds (BoundedHttpLayer.attach_stream): the upstream deadlines.
    stream_bounds: StreamBounds = DEFAULT_BOUNDS
    # time.monotonic() of the last progress with the upstream; None until a connection is held.
    _upstream_progress_at: float | None = None

    @expect(events.Start, HttpEvent)
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from self.bounded_events(event)
        self._release_when_flow_ended()

    def handle_connect_regular(self) -> layer.CommandGenerator[None]:
        """mitmproxy's CONNECT handling, with the dial of a tunnel bounded: a TCP connect not
        over ``upstream_connect_timeout`` after it began is closed (``BoundedHttpLayer``),
        and the CONNECT answered 504 (the destinations addon), not left to the system's two
        minutes of retries."""
        if self.flow.response is None and self.context.options.connection_strategy == "eager":
            yield self.dial_deadline()
        yield from super().handle_connect_regular()

    def dial_deadline(self) -> ConnectDeadline:
        """The wakeup that checks this CONNECT's dial ``upstream_connect_timeout`` seconds on."""
        timeout = _connect_timeout(self.context)
        return ConnectDeadline(timeout, timeout)

    def dialing_tunnel(self) -> Server | None:
        """The connection this CONNECT's dial waits on while the stream waits on it (after the
        http_connect hook, before any answer), else None."""
        paused = self._paused  # Layer._paused: the command the stream waits on
        if paused is None or not isinstance(paused.command, commands.OpenConnection):
            return None
        dial = self.tunnel_dial(0.0)
        return None if dial is None else dial[0]

    def tunnel_dial(self, timeout: float) -> tuple[Server, float] | None:
        """The connection this CONNECT's dial waits on (the target's), and the seconds left
        before its TCP connect has taken ``timeout`` (0 once it has); None once there is
        nothing to bound (connected, failed or closed)."""
        left = _dial_time_left(self.context.server, timeout)
        return None if left is None else (self.context.server, left)

    def flow_done(self) -> layer.CommandGenerator[None]:
        """mitmproxy's, with the messages of a WebSocket that starts here bounded by
        ``max_websocket_message`` either way (a larger one closes the session with 1009)."""
        yield from super().flow_done()
        if isinstance(self.child_layer, WebsocketLayer):
            limit = self.max_websocket_message()
            limit_websocket_messages(self.child_layer, limit, self.websocket_log_extra())

    def max_websocket_message(self) -> int:
        """The largest WebSocket message this stream's session may carry, in bytes."""
        return _option(self.context, MAX_WEBSOCKET_MESSAGE, DEFAULT_MAX_WEBSOCKET_MESSAGE)

    def websocket_log_extra(self) -> Mapping[str, Any]:
        """The fields of the log line of a WebSocket message over the limit."""
        return {"client": peer_address(self.context.client)}

    # --- upstream deadlines (stream_bounds) ---

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        """mitmproxy's, with the upstream deadlines counted from the moment the connection is
        held: the request goes upstream in the same turn (its body was read whole before)."""
        if not (yield from super().make_server_connection()):
            return False
        self._upstream_progress_at = time.monotonic()
        return True

    def upstream_phase(self) -> str | None:
        """What this stream waits for from its upstream: ``"response_headers"`` once the whole
        request went upstream, ``"idle"`` (more of the answer) while it reads the answer, else
        None (no upstream yet, a WebSocket or tunnel relay, done or failed)."""
        if (
            self._upstream_progress_at is None
            or self.child_layer is not None
            or self.client_state == self.state_errored
        ):
            return None
        if self.server_state == self.state_wait_for_response_headers:
            return "response_headers" if self.client_state == self.state_done else None
        return "idle" if self.reading_answer() else None

    def reading_answer(self) -> bool:
        """Whether the stream reads its upstream's answer body (streamed or buffered)."""
        return self.server_state in (
            self.state_stream_response_body,
            self.state_consume_response_body,
        )

    def upstream_deadline_passed(self, now: float) -> str | None:
        """The ``upstream_phase`` whose deadline this stream has passed at ``now``
        (time.monotonic()): ``upstream_response_timeout`` since the request went upstream,
        ``upstream_idle_timeout`` since the last progress of the answer; else None."""
        phase = self.upstream_phase()
        since = self._upstream_progress_at
        if phase is None or since is None:
            return None
        bounds = self.stream_bounds
        if phase == "response_headers":
            limit = bounds.upstream_response_timeout
        else:
            limit = bounds.upstream_idle_timeout
        return phase if now - since >= limit else None

    def watch_upstream(self, now: float) -> None:
        """At a round of the layer's deadline check (``now``), before
        ``upstream_deadline_passed``: note the answer's progress without a check on every
        event. The stream's next event takes a detour (``_upstream_event``) that undoes
        itself; found undone at a round, something arrived since the last one, which while
        the answer is read counts as progress at ``now`` (silence is noticed at most a round
        late, never early). Layer.handle_event calls the instance's ``_handle_event``."""
        if self.upstream_phase() is None or "_handle_event" in vars(self):
            return  # nothing awaited, or nothing arrived since the last round
        if self.reading_answer():
            self._upstream_progress_at = now
        self._handle_event = self._upstream_event

    def _upstream_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The stream's ``_handle_event`` while ``watch_upstream`` watches: the class's is put
        back, and takes ``event``, unless it is the layer's word that a deadline passed."""
        del self._handle_event
        if type(event) is UpstreamDeadlinePassed:
            return self._upstream_deadline_event()
        return self._handle_event(event)

    def _upstream_deadline_event(self) -> layer.CommandGenerator[None]:
        yield from self._on_upstream_deadline()
        self._release_when_flow_ended()

    def _on_upstream_deadline(self) -> layer.CommandGenerator[None]:
        """The upstream connection is closed (it may still answer, to nobody). Before response
        headers went to the client, it gets ``upstream_timeout_answer`` (504); after, the
        stream is broken off (HTTP/2 RST_STREAM, HTTP/1.1 connection closed)."""
        # Checked again: the event may have waited in the queue while the stream was paused.
        phase = self.upstream_deadline_passed(time.monotonic())
        if phase is None:
            return
        message = upstream_deadline_message(phase, self.stream_bounds)
        self.log_upstream_timeout(message)
        yield SendHttp(
            RequestProtocolError(self.stream_id, message, ErrorCode.KILL), self.context.server
        )
        if (
            self.server_state != self.state_stream_response_body
            and self.client_state == self.state_done
        ):
            yield from self._answer_upstream_timeout(message)
        else:
            # Response headers already went to the client: all that is left is to break the
            # stream (HTTP/2 RST_STREAM, HTTP/1.1 connection closed) so it sees the failure.
            yield from HttpStream.handle_protocol_error(
                self,
                ResponseProtocolError(self.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR),
            )

    def log_upstream_timeout(self, message: str) -> None:
        """The warning for an upstream deadline passed (``message`` says which): the client and
        the destination, never the request's path."""
        log.warning(
            "upstream timed out: %s; closing the upstream connection",
            message,
            extra={
                "client": peer_address(self.context.client),
                "host": self.flow.request.host,
                "port": self.flow.request.port,
            },
        )

    def upstream_timeout_answer(self, message: str) -> http.Response:
        """The 504 for an upstream deadline passed before the answer went to the client: plain
        text on the proxy's listener, like the 504 of a dial cut off at its deadline, saying
        which deadline passed (``message``) as the MITM'd answer does."""
        return error_response(
            None, 504, f"The destination did not answer in time: {message}.", "upstream_timeout"
        )

    def _answer_upstream_timeout(self, message: str) -> layer.CommandGenerator[None]:
        """Send ``upstream_timeout_answer``; the flow ends with the error hook, so the record
        and metrics count it as an error, not as an upstream answer."""
        self.client_state = self.server_state = self.state_errored
        self.flow.live = False
        response = self.upstream_timeout_answer(message)
        self.flow.response = response
        self.flow.error = Error(f"upstream timeout: {message}")
        yield SendHttp(
            ResponseHeaders(self.stream_id, response, end_stream=False), self.context.client
        )
        yield SendHttp(
            ResponseData(self.stream_id, response.raw_content or b""), self.context.client
        )
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        yield HttpErrorHook(self.flow)
        yield DropStream(self.stream_id)

    def bounded_events(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The commands answering ``event`` (mitmproxy's, with the request head bounded),
        without the release of the budget at the flow's end that ``_handle_event`` adds. Not a
        generator itself: every chunk of a streamed response passes here."""
        if (
            isinstance(event, RequestHeaders)
            and self.client_state == self.state_wait_for_request_headers
        ):
            return self._read_request_head_bounded(event)
        if isinstance(event, ResponseHeaders) and event.response.status_code == 101:
            problem = self._plain_switch_problem(event.response)
            if problem is not None:
                return self._refuse_plain_switch(problem)
        return super()._handle_event(event)

    def _plain_switch_problem(self, response: http.Response) -> str | None:
        # The listener's plain-HTTP requests; a MITM'd stream checks its own (http_layer).
        if self.server_state != self.state_wait_for_response_headers:
            return None
        if not outer_http_layer(self.mode):
            return None
        return switch_problem(self.flow.request, response)

    def _refuse_plain_switch(self, problem: str) -> layer.CommandGenerator[None]:
        """Answer 502 instead of a destination's 101 that is no WebSocket handshake to relay
        (``websocket_handshake.switch_problem``): mitmproxy would relay any other upgrade as
        raw TCP kept in memory, and raise on permessage-deflate parameters it cannot take. The
        destination's connection has switched protocols: it is closed unread."""
        log.info(
            "answer refused: %s",
            problem,
            extra={"client": peer_address(self.context.client)},
        )
        yield SendHttp(
            RequestProtocolError(self.stream_id, problem, ErrorCode.KILL), self.context.server
        )
        yield from self.handle_protocol_error(
            ResponseProtocolError(self.stream_id, problem, ErrorCode.GENERIC_SERVER_ERROR)
        )

    def _read_request_head_bounded(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        """mitmproxy's head handling (which runs the requestheaders hook), then the bounds.

        mitmproxy would send ``100 Continue`` right after the hook and read the whole body
        before sending a response an addon set: the expectation is taken off the request here
        and only met once the request is known to be accepted."""
        expects_continue = (
            not event.end_stream
            # get_all: Headers.get raises and catches a KeyError inside when it is absent
            and ", ".join(event.request.headers.get_all("expect")).lower() == "100-continue"
        )
        if expects_continue:
            event.request.headers.pop("expect")
        yield from super()._handle_event(event)
        if self.client_state == self.state_consume_request_body and not event.end_stream:
            if self.flow.response is None:
                declared = _declared_length(self.flow.request)
                limit = self._max_request_body()
                if declared is not None and declared > limit:
                    self._set_body_too_large(f"The request body ({declared} bytes)", limit)
                self._refuse_declared_over_budget(declared)
            if self.flow.response is not None:
                yield from self._answer_before_body()
                return
        if expects_continue and self.client_state in (
            self.state_consume_request_body,
            self.state_stream_request_body,
        ):
            continue_response = http.Response.make(100)
            continue_response.headers.clear()
            yield SendHttp(ResponseHeaders(self.stream_id, continue_response), self.context.client)

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData):
            limit = self._max_request_body()
            if len(self.request_body_buf) + len(event.data) > limit:
                self.request_body_buf.clear()
                self._set_body_too_large("The request body", limit)
                yield from self._answer_before_body()
                return
            if not self._reserve_request_bytes(len(event.data)):
                yield from self._answer_before_body()
                return
        yield from super().state_consume_request_body(event)

    # --- the memory budget (aibridgeproxyd.mitm.memory_budget) ---

    def _reserve_request_bytes(self, size: int) -> bool:
        """Hold ``size`` more body bytes against the budgets; on refusal the buffered body is
        dropped, the budget given back and a 503 set as the flow's response."""
        if self._reservation is None:
            self._reservation = Reservation(BUDGET, self.connection_bytes or ConnectionBytes())
            self._reservation.attach(self)
        refused_by = self._reservation.grow(size, self._max_request_body())
        if refused_by is None:
            return True
        self.request_body_buf.clear()
        self._reservation.release()
        self._set_over_budget(refused_by)
        return False

    def _refuse_declared_over_budget(self, declared: int | None) -> None:
        """A declared body that cannot fit the budgets now is refused (503) on its head, before
        any of it is read; the bytes are taken as they arrive, so this only answers early."""
        if declared is None or self.flow.response is not None:
            return
        connection = self.connection_bytes
        if connection is not None and connection.used + declared > self._max_request_body():
            self._set_over_budget("connection")
        elif BUDGET.used + declared > BUDGET.limit:
            self._set_over_budget("max_buffered_bytes")

    def _set_over_budget(self, refused_by: str) -> None:
        if refused_by == "connection":
            message = (
                "This connection already has the proxy's limit of request body bytes in flight "
                f"({self._max_request_body()} bytes, max_request_body); retry."
            )
        else:
            message = (
                "The proxy holds its limit of buffered request bytes (max_buffered_bytes); retry."
            )
        ctx = request_context(self.flow)
        api_format = ctx.adapter.error_format(self.flow.request) if ctx is not None else None
        code = "proxy_overloaded"
        # A 503 is retryable: no X-Should-Retry, in the client format or as plain text.
        self.flow.response = error_response(api_format, 503, message, code)
        mark_proxy_answer(self.flow, code)
        log.warning(
            "request body refused: %s reached",
            "the connection's request bytes (max_request_body)"
            if refused_by == "connection"
            else f"max_buffered_bytes ({BUDGET.limit} bytes)",
            extra={"request_id": ctx.request_id} if ctx is not None else {},
        )

    def _release_when_flow_ended(self) -> None:
        reservation = self._reservation
        if reservation is not None and reservation.held and not self.flow.live:
            reservation.release()

    def _max_request_body(self) -> int:
        return _option(self.context, MAX_REQUEST_BODY, DEFAULT_MAX_REQUEST_BODY)

    def _set_body_too_large(self, what: str, limit: int) -> None:
        message = f"{what} exceeds this proxy's limit of {limit} bytes (max_request_body)."
        ctx = request_context(self.flow)
        api_format = ctx.adapter.error_format(self.flow.request) if ctx is not None else None
        # Without X-Should-Retry (which error_response would add): the SDKs do not retry a 413.
        self.flow.response = error_response(
            api_format, 413, message, "request_too_large", should_retry_header=False
        )
        mark_proxy_answer(self.flow, "request_too_large")
        log.info(
            "request body refused: over max_request_body (%d bytes)",
            limit,
            extra={"request_id": ctx.request_id} if ctx is not None else {},
        )

    def _answer_before_body(self) -> layer.CommandGenerator[None]:
        """Send the response set on this request now, without reading (more of) its body.

        The same hooks run as for a response an addon sets in the request hook. HTTP/1.1: the
        connection closes after the answer. HTTP/2: the stream is dropped, and the body's
        remaining DATA frames are discarded as they arrive."""
        assert self.flow.response is not None
        self.client_state = self.state_discard_request_body
        http1_client = not (self.flow.request.is_http2 or self.flow.request.is_http3)
        if http1_client:
            self.flow.response.headers["Connection"] = "close"
        self.flow.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        yield from self.send_response()
        self.flow.live = False
        yield DropStream(self.stream_id)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        if http1_client:
            yield commands.CloseConnection(self.context.client)

    def state_discard_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The answer is out; what is left of the body is dropped unread."""
        if not isinstance(event, RequestData | RequestTrailers | RequestEndOfMessage):
            yield from self.state_errored(event)


def _declared_length(request: http.Request) -> int | None:
    """The ``content-length`` a request declares, or None (chunked, absent or malformed: the
    body is then counted as it arrives)."""
    value = request.headers.get("content-length", "").strip()
    # isdigit() alone admits digits such as "²" that int() refuses.
    return int(value) if value.isascii() and value.isdigit() else None


class BoundedHttpLayer(HttpLayer):
    """mitmproxy's HTTP layer with the bounded connection and stream classes.

    ``error_format`` is the client format of a MITM'd host (set by the client limits addon), so
    a 431 there is JSON in the provider's shape; on the proxy's own listener it stays None."""

    error_format: ApiFormat | None = None
    # The limits its streams are held to (upstream deadlines): set by the client limits addon
    # on the listener's layer (``bound_client_layers``), by the intercept addon on a MITM'd one.
    stream_bounds: StreamBounds = DEFAULT_BOUNDS
    # The pending wakeup of the upstream deadline check, while a request waits on an upstream.
    _deadline_check: UpstreamDeadlineCheck | None = None

    # Set once a child layer raised: logged once, the client connection closed.
    _failed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        try:
            yield from self._handle_event_bounded(event)
        except Exception:
            # Fail closed. mitmproxy only logs a layer that raises ("mitmproxy has crashed!")
            # and leaves the client connection open, with no timer of ours running on it any
            # more: a client could hold a slot for ever. Close it; later events (the close
            # itself) still reach the streams, so every flow ends.
            if not self._failed:
                self._failed = True
                log.error(
                    "HTTP layer failed; closing the client connection",
                    exc_info=True,
                    extra={"client": peer_address(self.context.client)},
                )
                yield commands.CloseConnection(self.context.client)

    def _handle_event_bounded(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Not a generator itself: every event of the connection passes here, and returning
        # mitmproxy's generator saves a frame per command.
        if not isinstance(event, events.Start):
            if type(event) is events.Wakeup:
                return self._wakeup(event)
            return super()._handle_event(event)
        return self._start_bounded(event)

    def _wakeup(self, event: events.Wakeup) -> layer.CommandGenerator[None]:
        """A wakeup: one of this layer's deadlines, else a stream's (mitmproxy's routing, which
        also takes a MITM'd connection's wakeups to its own layer, inside a stream of this
        one: by identity, not by type, the deadline check is this layer's)."""
        command = event.command
        if command is self._deadline_check:
            return self._check_upstream_deadlines()
        if type(command) is ConnectDeadline:
            # The stream waits on its dial, so it would get this only once the dial ended.
            return self._check_tunnel_dial(command)
        if type(command) is PlainDialDeadline:
            return self._check_plain_dial(command)
        return super()._handle_event(event)

    def _schedule_deadline_check(self) -> layer.CommandGenerator[None]:
        """Start the rounds of upstream deadline checks, unless they run. One wakeup per client
        connection, not one per stream: a pending wakeup cannot be cancelled and keeps what it
        points to alive until it fires."""
        if self._deadline_check is None:
            self._deadline_check = UpstreamDeadlineCheck(self.stream_bounds.deadline_check_interval)
            yield self._deadline_check

    def _check_upstream_deadlines(self) -> layer.CommandGenerator[None]:
        """A round: each stream past an upstream deadline gets ``UpstreamDeadlinePassed``; the
        next round is scheduled while a dial or a stream may still wait on an upstream."""
        self._deadline_check = None
        now = time.monotonic()
        for stream in list(self.streams.values()):
            if not isinstance(stream, BoundedHttpStream) or stream._paused is not None:
                continue  # a paused stream is checked at the next round
            stream.watch_upstream(now)
            if stream.upstream_deadline_passed(now):
                yield from self.event_to_child(stream, UpstreamDeadlinePassed())
        # A dial whose streams all left (an HTTP/2 client reset them) is still closed in time.
        if self.waiting_for_establishment or any(
            stream.child_layer is None for stream in self.streams.values()
        ):
            yield from self._schedule_deadline_check()

    def _check_tunnel_dial(self, deadline: ConnectDeadline) -> layer.CommandGenerator[None]:
        """At a tunnel dial's deadline: close its connection if its TCP connect has taken
        ``upstream_connect_timeout`` (the dial fails, and the CONNECT is answered 504), else
        check again when it would have, while the client is still there."""
        stream = self.command_sources.pop(deadline, None)
        if not isinstance(stream, BoundedHttpStream):
            return
        dial = stream.tunnel_dial(deadline.timeout)
        if dial is None or not self.context.client.connected:
            return
        server, left = dial
        if left > 0:
            again = ConnectDeadline(left, deadline.timeout)
            self.command_sources[again] = stream
            yield again
            return
        stream.flow.metadata[DIAL_TIMED_OUT] = deadline.timeout
        yield commands.CloseConnection(server)

    def _check_plain_dial(self, deadline: PlainDialDeadline) -> layer.CommandGenerator[None]:
        """At the deadline of a plain-HTTP request's dial: close what it dials (through a
        corporate proxy, the proxy connection) once it has taken ``upstream_connect_timeout``
        since its connect began, else check again when it would have. The requests waiting on
        it are answered 504 (``register_connection``)."""
        connection = deadline.connection
        if connection not in self.waiting_for_establishment or not self.context.client.connected:
            return
        dialled = dialled_connection(connection, self.connections.get(connection))
        if dialled.error is not None:
            return  # failed already: its failure is on its way
        left = dial_time_left(dialled, deadline.timeout)
        if left > 0:
            yield PlainDialDeadline(left, deadline.timeout, connection)
            return
        self._timed_out_dials()[connection] = deadline.timeout
        yield commands.CloseConnection(dialled)

    def _timed_out_dials(self) -> dict[Connection, float]:
        # Connections whose dial _check_plain_dial closed, with the timeout they outlasted.
        if not hasattr(self, "_closed_at_deadline"):
            self._closed_at_deadline: dict[Connection, float] = {}
        return self._closed_at_deadline

    def register_connection(self, command: RegisterHttpConnection) -> layer.CommandGenerator[None]:
        """mitmproxy's, with the failure of a dial closed at its deadline told as a timeout.

        An upstream connection that opened has its HTTP client now (mitmproxy's ``HttpClient``
        makes it just before this command), and has read nothing yet: an HTTP/1 client becomes
        a ``CoalescingHttp1Client`` here, so its chunks that arrive together go on as one and its
        head, chunk-size lines and trailers are bounded (mitmproxy buffers each until it ends).
        For MITM'd upstreams and plain-HTTP proxy requests' destinations alike, and once per
        connection instead of a check on every event."""
        timeout = self._timed_out_dials().pop(command.connection, None)
        if timeout is not None and command.err:
            command = RegisterHttpConnection(command.connection, dial_timed_out(timeout))
        elif not command.err and (handler := self.connections.get(command.connection)):
            coalesce_chunks(handler)
        yield from super().register_connection(command)

    def _start_bounded(self, event: events.Start) -> layer.CommandGenerator[None]:
        if self.context.client not in self.connections:
            # mitmproxy keeps a connection layer already registered for the client.
            alpn = self.context.client.alpn
            if alpn == b"h2":
                self.connections[self.context.client] = HeaderLimitedHttp2Server(
                    self.context.fork()
                )
            # No ALPN negotiated is b"" (mitmproxy), not None: HTTP/1 all the same.
            elif not alpn or alpn.startswith(b"http/1"):
                self.connections[self.context.client] = BoundedHttp1Server(
                    self.context.fork(), self.error_format
                )
        yield from super()._handle_event(event)
        client_layer = self.connections.get(self.context.client)
        if isinstance(client_layer, Http2Server):
            # Also when a subclass put its own HTTP/2 connection layer in place.
            limit_header_list(client_layer)

    def get_connection(
        self, event: GetHttpConnection, *, reuse: bool = True
    ) -> layer.CommandGenerator[None]:
        """mitmproxy's, with a corporate proxy's answer to the CONNECT of a connection it opens
        bounded (``BoundedHttpUpstreamProxy``), and on the proxy's own listener (plain-HTTP proxy
        requests) the dial held to ``upstream_connect_timeout`` (``_check_plain_dial``)."""
        before = set(self.connections)
        yield from super().get_connection(event, reuse=reuse)
        for connection in self.connections.keys() - before:  # none for a reused connection
            bound_proxy_answer(self.connections[connection])
            if outer_http_layer(self.mode) and connection in self.waiting_for_establishment:
                timeout = _connect_timeout(self.context)
                yield PlainDialDeadline(timeout, timeout, connection)
        # A request waits on an upstream now: its deadlines are checked until it is answered.
        yield from self._schedule_deadline_check()

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        context = self.context.fork()
        self.streams[stream_id] = stream = BoundedHttpStream(context, stream_id)
        self.attach_stream(stream)
        yield from self.event_to_child(self.streams[stream_id], events.Start())

    def attach_stream(self, stream: BoundedHttpStream) -> None:
        """Count ``stream``'s buffered request bytes with the other streams of this connection,
        and hold it to this layer's ``stream_bounds``."""
        if not hasattr(self, "_connection_bytes"):
            self._connection_bytes = ConnectionBytes()
        stream.connection_bytes = self._connection_bytes
        stream.stream_bounds = self.stream_bounds


class BoundedClientTLSLayer(ClientTLSLayer):
    """mitmproxy's client TLS layer with the ClientHello bounded by ``max_request_head``.

    Until the ClientHello is complete mitmproxy keeps every byte and parses them all again on
    each arrival; a client may announce a 16 MiB ClientHello and trickle it. Real ones are a
    few KiB. Past the limit the handshake fails and the connection is closed."""

    def receive_handshake_data(
        self, data: bytes
    ) -> layer.CommandGenerator[tuple[bool, str | None]]:
        if not self.client_hello_parsed:
            limit = _option(self.context, MAX_REQUEST_HEAD, DEFAULT_MAX_REQUEST_HEAD)
            if len(self.recv_buffer) + len(data) > limit:
                self.recv_buffer.clear()
                log.info(
                    "TLS ClientHello refused: larger than %d bytes (max_request_head)",
                    limit,
                    extra={"client": peer_address(self.conn)},
                )
                return False, f"ClientHello larger than {limit} bytes (max_request_head)"
        return (yield from super().receive_handshake_data(data))


def dialing_tunnels(context: Context) -> list[tuple[BoundedHttpStream, Server]]:
    """The CONNECTs of a client connection (``context``: its proxy server handler's) whose
    tunnel is still being dialed, each with the connection its dial waits on."""
    found: list[tuple[BoundedHttpStream, Server]] = []
    for http_layer in context.layers:  # the listener's stack: TLS, then the HTTP layer
        if not isinstance(http_layer, BoundedHttpLayer) or not outer_http_layer(http_layer.mode):
            continue
        for stream in http_layer.streams.values():
            if not isinstance(stream, BoundedHttpStream):
                continue
            dialled = stream.dialing_tunnel()
            if dialled is not None:
                found.append((stream, dialled))
    return found


def outer_http_layer(mode: HTTPMode) -> bool:
    """Whether an HTTP layer of this mode reads the proxy's own listener (CONNECT, absolute-form
    requests), as opposed to requests inside a tunnel."""
    return mode in (HTTPMode.regular, HTTPMode.upstream)


__all__ = [
    "MAX_REQUEST_BODY",
    "MAX_REQUEST_HEAD",
    "BoundedClientTLSLayer",
    "BoundedHttp1Server",
    "BoundedHttpLayer",
    "BoundedHttpStream",
    "HeaderLimitedHttp2Server",
    "UpstreamDeadlinePassed",
    "dialing_tunnels",
    "limit_header_list",
    "load_options",
    "outer_http_layer",
]
