"""Chain outbound connections through the corporate proxy (``upstream_proxy``, section 5).

Where each kind of connection goes when a corporate proxy is set:

- MITM'd requests and pass-through requests: the ``request`` hook, which runs after the adapter
  rewrote the request to its provider upstream, puts the proxy on the flow's server connection as
  its ``via``. mitmproxy then sends ``CONNECT upstream:port`` to the proxy and speaks TLS inside.
- Tunneled CONNECTs: mitmproxy dials a CONNECT target itself and ignores ``via``, so the client-
  facing HTTP layer is replaced by one that opens the tunnel through the proxy *before* answering
  the client. A proxy that refuses (407, 403, 502) or cannot be reached gives the client a
  ``502 Bad Gateway`` on its CONNECT, not a 200 followed by a closed connection.
- Plain-HTTP proxy requests: sent to the proxy in absolute form (``GET http://host/path``), the
  way proxies expect plain HTTP; many refuse ``CONNECT`` to port 80.

Destinations matching ``upstream_no_proxy`` are dialled directly. The credentials from the URL
go into ``Proxy-Authorization`` on every CONNECT and request sent to the proxy, never into a log.
The destination guard still checks the destinations clients choose (``addons/destinations.py``).

mitmproxy is pinned to 12.3.x: the layer classes below follow that version's HTTP layer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import certifi
from mitmproxy import connection, http, tls
from mitmproxy.addons.tlsconfig import DEFAULT_HOSTFLAGS
from mitmproxy.net import tls as net_tls
from mitmproxy.net.server_spec import ServerSpec
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.http import (
    DropStream,
    GetHttpConnection,
    HttpLayer,
    HTTPMode,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    SendHttp,
)
from mitmproxy.proxy.layers.http._hooks import HttpConnectedHook
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy
from mitmproxy.proxy.utils import expect
from OpenSSL import SSL

from aibridgeproxyd.ca import certificate_blocks
from aibridgeproxyd.destinations import literal_ip
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.mitm.client_bounds import BoundedHttpLayer, BoundedHttpStream
from aibridgeproxyd.upstream_proxy import NoProxy, UpstreamProxy

from .intercept import connection_established

log = logging.getLogger("aibridgeproxyd.upstream_proxy")


class UpstreamProxyError(ValueError):
    """The upstream proxy settings cannot be used; the message names the config key."""


# --- TLS to an https:// proxy ---------------------------------------------------------------


def proxy_tls_context(ca_file: Path | None) -> SSL.Context:
    """Verifies the proxy against the default bundle plus ``upstream_proxy_ca``, and against
    nothing else: ``upstream_ca_file`` is for the upstreams, not for the proxy."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(net_tls.DEFAULT_OPTIONS)
    context.set_verify(SSL.VERIFY_PEER)
    context.load_verify_locations(certifi.where())
    if ca_file is not None:
        try:
            pem = ca_file.read_bytes()
        except OSError as exc:
            raise UpstreamProxyError(
                f"cannot read upstream_proxy_ca {ca_file}: {exc.strerror or exc}"
            ) from None
        if not certificate_blocks(pem):
            raise UpstreamProxyError(f"upstream_proxy_ca {ca_file} holds no PEM certificate")
        context.load_verify_locations(str(ca_file))
    return context


def proxy_tls_connection(context: SSL.Context, host: str) -> SSL.Connection:
    """A client TLS connection that checks the proxy's certificate names ``host``, as mitmproxy's
    TlsConfig does for upstreams (pyOpenSSL has no public API for the name check)."""
    ssl_conn = SSL.Connection(context)
    param = SSL._lib.SSL_get0_param(ssl_conn._ssl)
    SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, DEFAULT_HOSTFLAGS)
    ip = literal_ip(host)
    if ip is None:
        name = host.encode("idna")
        ssl_conn.set_tlsext_host_name(name)
        ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:  # RFC 6066: no SNI for an address
        packed = ip.packed
        ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    SSL._openssl_assert(ok == 1)
    # CONNECT to a TLS-wrapped proxy is HTTP/1.1 only in mitmproxy.
    ssl_conn.set_alpn_protos([b"http/1.1"])
    ssl_conn.set_connect_state()
    return ssl_conn


# --- the client-facing HTTP layer -----------------------------------------------------------


class _OpenThenRelay(layers.TCPLayer):
    """The innermost layer of a tunnel through the proxy. It asks for the connection to the
    CONNECT target, which the layers above it turn into TLS to the proxy (https) and a CONNECT;
    it records how that went for the stream; then it relays bytes both ways, like the
    ``TCPLayer(ignore=True)`` every other tunnel gets."""

    def __init__(self, context) -> None:
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
    once the proxy has opened the tunnel; a plain-HTTP request goes to the proxy in absolute form."""

    def __init__(self, context, stream_id: int, authorization: str | None) -> None:
        super().__init__(context, stream_id)
        self._authorization = authorization
        self._relay: _OpenThenRelay | None = None
        self._early_data: list[bytes] = []

    # --- CONNECT ---

    def handle_connect_regular(self) -> layer.CommandGenerator[None]:
        if self.flow.response is not None or self.context.server.via is None:
            yield from super().handle_connect_regular()
            return
        # The same stack mitmproxy's upstream mode builds, with our relay at the bottom.
        stack = HttpUpstreamProxy.make(self.context, send_connect=True)
        self._relay = _OpenThenRelay(self.context)
        stack /= self._relay
        self.child_layer = stack[0]
        self._handle_event = self._opening_tunnel
        yield from self._to_tunnel(events.Start())

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
        self.flow.response = http.Response.make(502, b"Bad Gateway", {"Content-Type": "text/plain"})
        self._handle_event = self.state_errored
        yield from self.handle_connect_finish()

    # --- plain HTTP ---

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        if self.flow.server_conn.via is not None and self.flow.request.scheme == "http":
            # The layer opens no CONNECT for it (see _ChainedHttpLayer.get_connection).
            request = self.flow.request
            host = f"[{request.host}]" if ":" in request.host else request.host
            request.authority = f"{host}:{request.port}"
            if self._authorization:
                request.headers["Proxy-Authorization"] = self._authorization
        return (yield from super().make_server_connection())


class _ChainedHttpLayer(BoundedHttpLayer):
    """The client-facing HTTP layer of a proxy connection, when a corporate proxy is set
    (bounded like the one the client limits addon installs otherwise)."""

    def __init__(self, context, mode: HTTPMode, authorization: str | None) -> None:
        super().__init__(context, mode)
        self._authorization = authorization

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        ctx = self.context.fork()
        self.streams[stream_id] = _ChainedStream(ctx, stream_id, self._authorization)
        yield from self.event_to_child(self.streams[stream_id], events.Start())

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


# --- the addon ------------------------------------------------------------------------------


class ChainUpstreamProxy:
    def __init__(
        self,
        proxy: UpstreamProxy,
        no_proxy: NoProxy,
        connections: ConnectionTable,
        proxy_ca_file: Path | None = None,
    ) -> None:
        self.proxy = proxy
        self.no_proxy = no_proxy
        self.connections = connections
        if proxy.scheme == "https":
            self.tls_context: SSL.Context | None = proxy_tls_context(proxy_ca_file)
        else:
            self.tls_context = None
            if proxy_ca_file is not None:
                log.warning(
                    "upstream_proxy_ca is ignored: upstream proxy %s is not https", self.proxy
                )

    def _via(self, host: str) -> ServerSpec | None:
        return None if self.no_proxy.matches(host) else self.proxy.via

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Swap in our client-facing HTTP layer (below the listener's TLS layer, if any)."""
        parent: object = None
        proposed = nextlayer.layer
        while proposed is not None and not isinstance(proposed, HttpLayer):
            parent, proposed = proposed, getattr(proposed, "child_layer", None)
        # MITM'd connections have their own (transparent-mode) layer: leave it alone.
        if type(proposed) is not HttpLayer or proposed.mode is not HTTPMode.regular:
            return
        context = proposed.context
        context.layers.remove(proposed)
        replacement = _ChainedHttpLayer(context, HTTPMode.regular, self.proxy.authorization)
        if parent is None:
            nextlayer.layer = replacement
        else:
            parent.child_layer = replacement  # type: ignore[attr-defined]

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A CONNECT already answered is refused, or MITM'd (never dialled): nothing to chain.
        if flow.response is None:
            flow.server_conn.via = self._via(flow.request.host)

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """Every CONNECT mitmproxy sends to the proxy, for tunnels and upstream connections."""
        if self.proxy.authorization:
            flow.request.headers["Proxy-Authorization"] = self.proxy.authorization

    def request(self, flow: http.HTTPFlow) -> None:
        """Runs after the adapter's rewrite, so the destination is the one actually dialled."""
        if flow.response is not None:
            return
        via = self._via(flow.request.host)
        if flow.server_conn.via != via:
            # A connection spec of this flow's own: the server connection a flow starts with
            # is shared by every request on its client connection.
            flow.server_conn = connection.Server(address=flow.server_conn.address, via=via)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        conn = tls_start.conn
        if (
            self.tls_context is None
            or not isinstance(conn, connection.Server)
            or conn is tls_start.context.server  # the destination, inside the tunnel
            or conn.address != self.proxy.address
        ):
            return
        # TlsConfig, earlier in the chain, prepared TLS as for an upstream. The proxy is
        # verified against its own trust store instead.
        tls_start.ssl_conn = proxy_tls_connection(self.tls_context, self.proxy.host)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        if flow.server_conn.via is None or not flow.server_conn.error:
            return
        info = self.connections.get(flow.client_conn)
        log.warning(
            "upstream proxy did not open a tunnel to %s:%s: %s",
            flow.request.host,
            flow.request.port,
            flow.server_conn.error,
            extra={
                "connect_id": info.connect_id if info else "",
                "upstream_proxy": str(self.proxy),
            },
        )
