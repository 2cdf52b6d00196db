"""Chain outbound connections through the corporate proxy (``upstream_proxy``,
docs/upstream-proxy.md).

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

The layers that do this live in ``aibridgeproxyd.mitm.upstream_proxy``, the TLS to an
``https://`` proxy in ``aibridgeproxyd.mitm.tls``; this addon decides where each connection goes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mitmproxy import connection, http, tls
from mitmproxy.net.server_spec import ServerSpec
from OpenSSL import SSL

from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.mitm.client_bounds import DIAL_STOPPED, DIAL_TIMED_OUT
from aibridgeproxyd.mitm.hooks import NextLayer
from aibridgeproxyd.mitm.tls import proxy_tls_connection, proxy_tls_context
from aibridgeproxyd.mitm.upstream_proxy import install_chained_http_layer
from aibridgeproxyd.upstream_proxy import NoProxy, UpstreamProxy

log = logging.getLogger("aibridgeproxyd.upstream_proxy")

__all__ = ["ChainUpstreamProxy"]


class ChainUpstreamProxy:
    """Sends outbound connections through the corporate proxy: sets ``via`` (``http_connect``,
    ``request``), adds its credentials (``http_connect_upstream``) and its TLS
    (``tls_start_server``)."""

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

    def next_layer(self, nextlayer: NextLayer) -> None:
        """The listener's HTTP layer opens tunnels through the proxy before answering."""
        install_chained_http_layer(nextlayer, self.proxy.authorization)

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
            _tunnel_failure(flow),
            extra={
                "connect_id": info.connect_id if info else "",
                "upstream_proxy": str(self.proxy),
            },
        )


def _tunnel_failure(flow: http.HTTPFlow) -> str | None:
    """Why the proxy opened no tunnel: a dial closed at upstream_connect_timeout fails as
    "connection closed", which would hide that it was a timeout."""
    if flow.metadata.get(DIAL_STOPPED):
        return "the proxy is stopping"
    timeout = flow.metadata.get(DIAL_TIMED_OUT)
    return f"no answer within {timeout:g}s: timed out" if timeout else flow.server_conn.error
