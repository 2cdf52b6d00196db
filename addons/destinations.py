"""Destination checks on every dial a client can cause (section 8).

``server_connect`` resolves the host exactly as it is about to be dialled, refuses
private/reserved addresses in any spelling (``aibridgeproxyd.destinations``), and pins the dial to
the exact address it checked, so DNS rebinding cannot slip past. Refusals become 403 with the
reason in the body (``Forbidden: private or reserved destination``, ``Forbidden: port not
allowed``), other dial failures 502 ``Bad Gateway``; no internal detail reaches the client. Each
refusal is logged once.

Exempt, as operator configuration: the corporate proxy (``upstream_proxy``), and a provider's
upstream (its ``base_url``) *when the proxy dials it on that provider's behalf*, i.e. for a
request inside a MITM'd connection, which route.py always either routes through an adapter or
refuses. A client's own tunnel or plain-HTTP request to the same address is checked like any
other.

Plain-HTTP proxy requests (absolute-form, or origin-form with a ``Host``) to a host an enabled
provider claims are never forwarded: that host is reached only through CONNECT, where it is
intercepted. After proxy authentication (407 without a valid token) they get 400 in the client
format, telling the client to use the proxy as an HTTPS proxy.

A destination reached through the corporate proxy (its server connection has a ``via``) is
dialled by that proxy, so there is no dial of ours to pin: it is resolved and checked when the
decision is made (``http_connect``, ``request``), and refused if *any* of its addresses is
blocked. The proxy resolves it again, which leaves a short DNS-rebinding window.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.destinations import DestinationPolicy, dial_address
from aibridgeproxyd.errors import error_response
from aibridgeproxyd.interception.state import ConnectionTable, request_context
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.destinations")

# Refusal reasons: the text after "Forbidden: " in the 403 body, and server.error on a refused
# dial (http_layer.py matches "private or reserved" in it).
BLOCKED = "private or reserved destination"
PORT_NOT_ALLOWED = "port not allowed"
UNRESOLVED = "destination host could not be resolved"


def bad_gateway() -> http.Response:
    return http.Response.make(502, b"Bad Gateway", {"Content-Type": "text/plain"})


def forbidden(reason: str) -> http.Response:
    """403 saying why, short and without detail: ``Forbidden: port not allowed``."""
    return http.Response.make(403, f"Forbidden: {reason}".encode(), {"Content-Type": "text/plain"})


PROVIDER_MISCONFIGURED = "provider misconfigured"


def misconfigured(
    host: str, provider_name: str, connect_id: str, metrics: Metrics
) -> http.Response:
    """503 for a host of a provider row that cannot be read (``Snapshot.closed_hosts``): the
    row may be an enabled provider, so its hosts are neither tunneled (which would open them
    without a proxy token) nor routed (its keys and settings are unknown). Logged (info) and
    counted as ``blocked_connections_total{reason="provider_misconfigured"}``. The body is
    short and names no provider: the client may hold no token."""
    # Info, like every other refusal: the row's status is already logged once at warning on
    # each change, and a client retrying in a loop must not flood the log.
    log.info(
        "request to %s refused: provider %r claims it but its row cannot be read; "
        "see `providers list`",
        host,
        provider_name,
        extra={"connect_id": connect_id, "host": host, "provider": provider_name},
    )
    metrics.blocked_connections.labels("provider_misconfigured").inc()
    return http.Response.make(
        503,
        f"Service Unavailable: {PROVIDER_MISCONFIGURED}; ask an operator to fix it".encode(),
        {"Content-Type": "text/plain"},
    )


def use_connect(flow: http.HTTPFlow, provider_type: str) -> http.Response:
    """400 in the client format for a plain-HTTP request to a provider host."""
    host = flow.request.pretty_host
    message = (
        f"{host} is reached through this proxy only as an HTTPS proxy (CONNECT, e.g. "
        f"HTTPS_PROXY), not with plain-HTTP proxy requests; send the request to https://{host}/ "
        "with the proxy configured for HTTPS."
    )
    adapter = ADAPTERS[provider_type]
    return error_response(adapter.error_format(flow.request), 400, message, "use_connect")


class DestinationGuard:
    def __init__(
        self,
        holder: SnapshotHolder,
        connections: ConnectionTable,
        policy: DestinationPolicy,
        allowed_ports: tuple[int, ...],
        metrics: Metrics,
        upstream_proxy_address: tuple[str, int] | None = None,
    ) -> None:
        self.metrics = metrics
        self.holder = holder
        self.connections = connections
        self.policy = policy
        self.allowed_ports = frozenset(allowed_ports)
        self.upstream_proxy_address = upstream_proxy_address

    async def _check(
        self, host: str, port: int, *, for_provider: bool, connect_id: str = ""
    ) -> tuple[str | None, str | None]:
        """(numeric address to dial, refusal reason). ``for_provider``: the proxy dials on a
        provider's behalf, so that provider's upstream is exempt. No address is pinned for an
        exempt upstream."""
        if (
            for_provider
            and (host.lower().rstrip("."), port) in self.holder.current.upstream_addresses
        ):
            return None, None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            verdict = self.policy.judge(list(dict.fromkeys(dial_address(i[4]) for i in infos)))
        except Exception:  # an unresolvable or unparseable name: never dialled (fails closed)
            return None, UNRESOLVED
        if verdict.blocked is not None:
            log.info(
                "destination refused: %s",
                BLOCKED,
                extra={
                    "connect_id": connect_id,
                    "host": host,
                    "port": port,
                    "resolved_ip": verdict.blocked,
                },
            )
            self.metrics.blocked_connections.labels("private_destination").inc()
            return None, BLOCKED
        if verdict.dial is None:
            return None, UNRESOLVED
        return verdict.dial, None

    def _connect_id(self, client: connection.Client) -> str:
        info = self.connections.get(client)
        return info.connect_id if info is not None else ""

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is None or data.server.via is not None:
            return
        info = self.connections.get(data.client)
        # The destination of a client's own tunnel, as opposed to a connection the proxy opens
        # for itself (to the corporate proxy, or to a provider's upstream). A plain-HTTP
        # request's destination was checked in requestheaders, whatever it is.
        client_chosen = (
            info is not None
            and not info.intercept
            and data.server.address == (info.host, info.port)
        )
        if data.server.address == self.upstream_proxy_address and not client_chosen:
            return
        host, port = data.server.address
        address, refusal = await self._check(
            host,
            port,
            for_provider=info is not None and info.intercept,
            connect_id=info.connect_id if info is not None else "",
        )
        if refusal:
            data.server.error = refusal
        elif address is not None:
            data.server.address = (address, port)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A tunnel through the corporate proxy: checked now, as the proxy makes the dial."""
        if flow.response is None and flow.server_conn.via is not None:
            await self._refuse_blocked(flow, for_provider=False)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 names the address and the OS error; clients get neither.
        if flow.response is not None and flow.response.status_code == 502:
            if flow.server_conn.error == BLOCKED:
                flow.response = forbidden(BLOCKED)
            else:
                # The client learns nothing of why; the operator debugging "git fails through
                # the proxy" must find it here.
                log.info(
                    "tunnel to %s:%s failed: %s",
                    flow.request.host,
                    flow.request.port,
                    flow.server_conn.error or "dial failed",
                    extra={"connect_id": self._connect_id(flow.client_conn)},
                )
                flow.response = bad_gateway()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxy requests follow the same port and address rules as tunnels, and
        are decided on their head, before any body is read."""
        if flow.response is not None or not self.connections.is_proxy_request(flow):
            return
        provider = self.holder.current.provider_for_host(flow.request.host)
        if provider is not None:
            log.info(
                "plain-HTTP request to provider host %s refused: clients must use CONNECT",
                flow.request.pretty_host,
                extra={"provider": provider.name},
            )
            flow.response = use_connect(flow, provider.type)
            return
        closed_by = self.holder.current.closed_provider_for_host(flow.request.host)
        if closed_by is not None:
            connect_id = self._connect_id(flow.client_conn)
            flow.response = misconfigured(flow.request.host, closed_by, connect_id, self.metrics)
            return
        if flow.request.port not in self.allowed_ports:
            log.info(
                "request refused: %s",
                PORT_NOT_ALLOWED,
                extra={"host": flow.request.host, "port": flow.request.port},
            )
            self.metrics.blocked_connections.labels("port_not_allowed").inc()
            flow.response = forbidden(PORT_NOT_ALLOWED)
            return
        await self._refuse_blocked(flow, for_provider=False)

    async def request(self, flow: http.HTTPFlow) -> None:
        """A MITM'd request going through the corporate proxy is checked now, after the
        adapter's rewrite, as the proxy makes the dial."""
        if flow.response is not None or self.connections.is_proxy_request(flow):
            return
        if flow.server_conn.via is not None:
            await self._refuse_blocked(flow, for_provider=request_context(flow) is not None)

    async def _refuse_blocked(self, flow: http.HTTPFlow, *, for_provider: bool) -> None:
        _, refusal = await self._check(
            flow.request.host,
            flow.request.port,
            for_provider=for_provider,
            connect_id=self._connect_id(flow.client_conn),
        )
        if refusal == BLOCKED:
            flow.response = forbidden(BLOCKED)
        elif refusal:
            flow.response = bad_gateway()
