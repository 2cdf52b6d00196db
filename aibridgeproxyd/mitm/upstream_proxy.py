"""The client-facing HTTP layer used when a corporate proxy is set (``upstream_proxy``).

mitmproxy dials a CONNECT target itself and ignores the server connection's ``via``, and it
sends ``CONNECT`` to the proxy for plain-HTTP requests too (except in its own upstream mode).
This layer

- opens a tunnel through the proxy *before* answering the client's CONNECT, so a proxy that
  refuses (407, 403, 502) or cannot be reached gives the client a ``502 Bad Gateway``, not a
  200 followed by a closed connection;
- sends plain-HTTP requests to the proxy in absolute form (``GET http://host/path``), with the
  proxy's credentials, the way proxies expect plain HTTP (many refuse ``CONNECT`` to port 80);
- answers 502 for the proxy's 407 to such a request, and for a non-2xx page of its that quotes
  its credentials (``_HeldAnswer``), instead of relaying them to the client.

It extends the bounded layer (``aibridgeproxyd.mitm.client_bounds``). mitmproxy is pinned to
12.3.x; the overridden methods mirror that version (``tests/unit/test_mitm_digests.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mitmproxy.connection import Server
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    GetHttpConnection,
    HttpLayer,
    HTTPMode,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
    SendHttp,
)
from mitmproxy.proxy.layers.http._hooks import HttpConnectedHook
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy
from mitmproxy.proxy.utils import expect

from aibridgeproxyd.errors import SecretRedactor, proxy_refusal
from aibridgeproxyd.mitm.client_bounds import (
    BoundedHttpLayer,
    BoundedHttpStream,
    dial_time_left,
    dialled_connection,
)
from aibridgeproxyd.mitm.framing import peer_address
from aibridgeproxyd.mitm.proxy_answer import bound_proxy_answer, credential_forms
from aibridgeproxyd.mitm.responses import bad_gateway, connection_established

log = logging.getLogger("aibridgeproxyd.upstream_proxy")

# Bytes of a non-2xx answer to a plain-HTTP request sent to the proxy that are held back and
# searched for the proxy's credentials (``_HeldAnswer``); past them the answer is relayed.
MAX_HELD_ANSWER = 64 * 1024
_RESPONSE_EVENTS = (
    ResponseHeaders,
    ResponseData,
    ResponseTrailers,
    ResponseEndOfMessage,
    ResponseProtocolError,
)


@dataclass
class _HeldAnswer:
    """A non-2xx answer to a plain-HTTP request sent to the corporate proxy, held back until
    it is known not to quote the proxy's credentials. The proxy relays the destination's
    answers on the same connection, so its own error page cannot be told from them otherwise;
    only the proxy was given the credentials, so an answer that quotes them is the proxy's."""

    status: int
    redactor: SecretRedactor
    held: list[events.Event] = field(default_factory=list)
    seen: bytearray = field(default_factory=bytearray)  # its head and body so far
    ended: bool = False

    def hold(self, event: events.Event) -> None:
        self.held.append(event)
        if isinstance(event, ResponseHeaders):
            response = event.response
            self.seen += response.data.reason + b"\n" + bytes(response.headers)
            self.ended = event.end_stream
        elif isinstance(event, ResponseData):
            self.seen += event.data
        else:
            self.ended = not isinstance(event, ResponseTrailers)

    @property
    def quotes_credentials(self) -> bool:
        return self.redactor.finds(bytes(self.seen))

    @property
    def decided(self) -> bool:
        """Seen whole, or too long to hold: relayed as it is unless it quotes the credentials."""
        return self.ended or len(self.seen) > MAX_HELD_ANSWER


class _OpenThenRelay(layers.TCPLayer):
    """The innermost layer of a tunnel through the proxy. It asks for the connection to the
    CONNECT target, which the layers above it turn into TLS to the proxy (https) and a CONNECT;
    it records how that went for the stream; then it relays bytes both ways, like the
    ``TCPLayer(ignore=True)`` every other tunnel gets."""

    def __init__(self, context: Context) -> None:
        super().__init__(context, ignore=True)
        self.finished = False
        self.error: str | None = None

    @expect(events.Start)
    def start(self, _: events.Event) -> layer.CommandGenerator[None]:
        err = yield commands.OpenConnection(self.context.server)
        self.finished, self.error = True, err
        self._handle_event = self.done if err else self.relay_messages

    _handle_event = start


class _ChainedStream(BoundedHttpStream):
    """A stream of the client-facing layer: a CONNECT that goes through the proxy is answered
    once the proxy has opened the tunnel; a plain-HTTP request goes to the proxy in absolute
    form."""

    def __init__(self, context: Context, stream_id: int, authorization: str | None) -> None:
        super().__init__(context, stream_id)
        self._authorization = authorization
        self._relay: _OpenThenRelay | None = None
        self._early_data: list[bytes] = []
        self._held: _HeldAnswer | None = None

    # --- CONNECT ---

    def handle_connect_regular(self) -> layer.CommandGenerator[None]:
        if self.flow.response is not None or self.context.server.via is None:
            yield from super().handle_connect_regular()
            return
        # Held to upstream_connect_timeout from the dial of the proxy to its answer.
        yield self.dial_deadline()
        # The same stack mitmproxy's upstream mode builds, with our relay at the bottom.
        stack = HttpUpstreamProxy.make(self.context, send_connect=True)
        bound_proxy_answer(stack[0])
        self._relay = _OpenThenRelay(self.context)
        stack /= self._relay
        self.child_layer = stack[0]
        self._handle_event = self._opening_tunnel
        yield from self._to_tunnel(events.Start())

    def dialing_tunnel(self) -> Server | None:
        """Through the proxy: its connection, until the proxy has answered the CONNECT."""
        if self._relay is None:
            return super().dialing_tunnel()
        dial = self.tunnel_dial(0.0)
        return None if dial is None else dial[0]

    def tunnel_dial(self, timeout: float) -> tuple[Server, float] | None:
        """Through the proxy: its connection, and the seconds left before ``timeout`` has
        passed since its connect began, until the proxy has answered the CONNECT (a proxy that
        accepts and never answers is bounded too)."""
        if self._relay is None:
            return super().tunnel_dial(timeout)
        proxy = dialled_connection(self.context.server, self.child_layer)
        if self._relay.finished or not isinstance(proxy, Server) or proxy.error is not None:
            return None
        return proxy, dial_time_left(proxy, timeout)

    def _opening_tunnel(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestProtocolError):
            # The client left before its CONNECT was answered. Its connection handler closes
            # the proxy connection with every other transport of that client.
            self.flow.live = False
            self._handle_event = self.state_errored
            yield DropStream(self.stream_id)
            return
        # The client sends nothing else before its answer: these are the proxy connection's
        # events and the replies to the tunnel layers' commands.
        yield from self._to_tunnel(event)

    def _to_tunnel(self, event: events.Event) -> layer.CommandGenerator[None]:
        assert self.child_layer is not None and self._relay is not None
        for command in self.child_layer.handle_event(event):
            if isinstance(command, commands.SendData) and command.connection == self.context.client:
                # The target spoke in the same packet as the proxy's 200: the client gets these
                # bytes after its own 200.
                self._early_data.append(command.data)
            else:
                yield command
        if self._relay.finished:
            if self._relay.error is None:
                yield from self._tunnel_open()
            else:
                yield from self._tunnel_failed(self._relay.error)

    def _tunnel_open(self) -> layer.CommandGenerator[None]:
        # mitmproxy's handle_connect_finish for a 2xx, minus starting the child layer, which is
        # running already (starting it again would send a second CONNECT to the proxy).
        self.flow.response = connection_established(self.flow)
        yield HttpConnectedHook(self.flow)
        self._handle_event = self.passthrough
        yield SendHttp(
            ResponseHeaders(self.stream_id, self.flow.response, True), self.context.client
        )
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        for data in self._early_data:
            yield SendHttp(ResponseData(self.stream_id, data), self.context.client)
        self._early_data.clear()

    def _tunnel_failed(self, err: str) -> layer.CommandGenerator[None]:
        # Recorded like a failed direct dial; the addon's http_connect_error logs it.
        self.context.server.error = err
        self.flow.response = bad_gateway()
        self._handle_event = self.state_errored
        yield from self.handle_connect_finish()

    # --- plain HTTP ---

    def bounded_events(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The stream's answer to ``event``. The proxy's 407 to a plain-HTTP request, or a
        non-2xx answer of it that quotes its credentials, ends the stream as a failed dial
        (``_refused_by_proxy``). Not a generator itself: every chunk of a streamed response
        passes here."""
        if isinstance(event, ResponseHeaders) and self._proxy_wants_credentials(event):
            return self._refused_by_proxy(407)
        if isinstance(event, _RESPONSE_EVENTS) and (
            self._held is not None or self._may_be_proxy_page(event)
        ):
            return self._hold_answer(event)
        return super().bounded_events(event)

    def _proxy_wants_credentials(self, event: ResponseHeaders) -> bool:
        # Only a proxy answers 407 (RFC 9110 15.5.8): ours, or one it chains to.
        return event.response.status_code == 407 and self._waits_for_proxy_answer()

    def _waits_for_proxy_answer(self) -> bool:
        """A plain-HTTP request sent to the proxy whose answer has not begun."""
        return (
            self.flow.server_conn.via is not None
            and self.flow.request.scheme == "http"
            and self.server_state == self.state_wait_for_response_headers
        )

    def _may_be_proxy_page(self, event: events.Event) -> bool:
        if not isinstance(event, ResponseHeaders) or not self._authorization:
            return False
        return event.response.status_code >= 300 and self._waits_for_proxy_answer()

    def _hold_answer(self, event: events.Event) -> layer.CommandGenerator[None]:
        """Hold ``event`` of a possible proxy page (``_HeldAnswer``) until it is decided: a
        502 if it quotes the credentials, else the held events as they came."""
        if self._held is None:
            assert isinstance(event, ResponseHeaders)
            forms = credential_forms(self._authorization or "")
            self._held = _HeldAnswer(event.response.status_code, SecretRedactor(forms))
        held = self._held
        held.hold(event)
        if held.quotes_credentials:
            self._held = None
            return self._refused_by_proxy(held.status)
        if not held.decided:
            return _no_commands()
        self._held = None
        return self._release(held.held)

    def _release(self, held: list[events.Event]) -> layer.CommandGenerator[None]:
        for event in held:
            yield from super().bounded_events(event)

    def _refused_by_proxy(self, status: int) -> layer.CommandGenerator[None]:
        """The client gets our 502 naming the proxy's status, as for a tunnel the proxy
        refuses: not a 407 challenge, read as ours, for credentials the client cannot fix; nor
        a page that quotes the request and so the proxy's credentials. The proxy connection is
        closed unread."""
        destination = f"{self.flow.request.host}:{self.flow.request.port}"
        hint = " (check upstream_proxy's credentials)" if status == 407 else ""
        log.warning(
            "upstream proxy refused a plain-HTTP request to %s: %d%s",
            destination,
            status,
            hint,
            extra={"client": peer_address(self.context.client)},
        )
        yield commands.CloseConnection(self.context.server)
        yield from self.handle_protocol_error(
            ResponseProtocolError(
                self.stream_id, proxy_refusal("request", status), ErrorCode.CONNECT_FAILED
            )
        )

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        if self.flow.server_conn.via is not None and self.flow.request.scheme == "http":
            # The layer opens no CONNECT for it (see _ChainedHttpLayer.get_connection).
            request = self.flow.request
            host = f"[{request.host}]" if ":" in request.host else request.host
            request.authority = f"{host}:{request.port}"
            if self._authorization:
                request.headers["Proxy-Authorization"] = self._authorization
        return (yield from super().make_server_connection())


def _no_commands() -> layer.CommandGenerator[None]:
    yield from ()


class _ChainedHttpLayer(BoundedHttpLayer):
    """The client-facing HTTP layer of a proxy connection, when a corporate proxy is set
    (bounded like the one the client limits addon installs otherwise)."""

    def __init__(self, context: Context, mode: HTTPMode, authorization: str | None) -> None:
        super().__init__(context, mode)
        self._authorization = authorization

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        context = self.context.fork()
        self.streams[stream_id] = stream = _ChainedStream(context, stream_id, self._authorization)
        self.attach_stream(stream)
        yield from self.event_to_child(stream, events.Start())

    def get_connection(
        self, event: GetHttpConnection, *, reuse: bool = True
    ) -> layer.CommandGenerator[None]:
        before = set(self.connections)
        yield from super().get_connection(event, reuse=reuse)
        if event.via is None or event.tls:
            return
        # Plain HTTP through the proxy: mitmproxy sends CONNECT first except in its own upstream
        # mode. The new tunnel layer has not used `send_connect` yet: its handshake starts only
        # once the connection to the proxy is open, in a later event.
        for new_connection in set(self.connections) - before:
            tunnel: object = self.connections[new_connection]
            while tunnel is not None and not isinstance(tunnel, HttpUpstreamProxy):
                tunnel = getattr(tunnel, "child_layer", None)
            if isinstance(tunnel, HttpUpstreamProxy):
                tunnel.send_connect = False


def install_chained_http_layer(nextlayer: layer.NextLayer, authorization: str | None) -> None:
    """Swap in the chained client-facing HTTP layer for the listener's ``HttpLayer`` (below the
    listener's TLS layer, if any), sending ``authorization`` as ``Proxy-Authorization`` on
    plain-HTTP requests. A MITM'd connection's own (transparent-mode) layer is left alone."""
    parent: object = None
    proposed = nextlayer.layer
    while proposed is not None and not isinstance(proposed, HttpLayer):
        parent, proposed = proposed, getattr(proposed, "child_layer", None)
    if type(proposed) is not HttpLayer or proposed.mode is not HTTPMode.regular:
        return
    context = proposed.context
    context.layers.remove(proposed)
    replacement = _ChainedHttpLayer(context, HTTPMode.regular, authorization)
    if parent is None:
        nextlayer.layer = replacement
    else:
        parent.child_layer = replacement  # type: ignore[attr-defined]


__all__ = ["install_chained_http_layer"]
