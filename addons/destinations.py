"""Destination checks on every dial a client can cause (section 8).

``server_connect`` resolves the host, refuses private/reserved addresses, and pins the dial to
the exact address it checked, so DNS rebinding cannot slip past. Provider upstreams (base_url)
and the corporate proxy (``upstream_proxy``) are operator configuration and exempt. Refusals
become 403 ``Forbidden``, other dial failures 502 ``Bad Gateway``; no internal detail reaches the
client.

A destination reached through the corporate proxy (its server connection has a ``via``) is
dialled by that proxy, so there is no dial of ours to pin: it is resolved and checked when the
decision is made (``http_connect``, ``request``), and refused if *any* of its addresses is
blocked. The proxy resolves it again, which leaves a short DNS-rebinding window.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from mitmproxy import http
from mitmproxy.proxy import server_hooks

from aibridgeproxyd.connections import ConnectionTable
from aibridgeproxyd.destinations import DestinationPolicy, literal_ip
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.destinations")

BLOCKED = "destination is a private or reserved address"
UNRESOLVED = "destination host could not be resolved"


def bad_gateway() -> http.Response:
    return http.Response.make(502, b"Bad Gateway", {"Content-Type": "text/plain"})


def forbidden() -> http.Response:
    return http.Response.make(403, b"Forbidden", {"Content-Type": "text/plain"})


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

    async def _check(self, host: str, port: int) -> tuple[str | None, str | None]:
        """(address to dial, refusal reason). The address is None when no pinning is needed."""
        if (host.lower(), port) in self.holder.current.upstream_addresses:
            return None, None
        ip = literal_ip(host)
        if ip is not None:
            if self.policy.is_blocked(ip):
                self.metrics.blocked_connections.labels("private_destination").inc()
                return None, BLOCKED
            return None, None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            return None, UNRESOLVED
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        blocked = [a for a in addresses if self.policy.is_blocked(a)]
        if blocked:
            log.warning(
                "blocking connection to private/reserved address",
                extra={"host": host, "port": port, "resolved_ip": blocked[0]},
            )
            self.metrics.blocked_connections.labels("private_destination").inc()
            return None, BLOCKED
        # One address is pinned, so there is no happy-eyeballs fallback: prefer IPv4, whose
        # reachability is the common case (``localhost`` resolves to ::1 first on Linux).
        return min(addresses, key=lambda a: ":" in a), None

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is None or data.server.via is not None:
            return
        if data.server.address == self.upstream_proxy_address:
            return
        host, port = data.server.address
        address, refusal = await self._check(host, port)
        if refusal:
            data.server.error = refusal
        elif address is not None:
            data.server.address = (address, port)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A tunnel through the corporate proxy: checked now, as the proxy makes the dial."""
        if flow.response is None and flow.server_conn.via is not None:
            await self._refuse_blocked(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 names the address and the OS error; clients get neither.
        if flow.response is not None and flow.response.status_code == 502:
            flow.response = forbidden() if flow.server_conn.error == BLOCKED else bad_gateway()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxy requests follow the same port and address rules as tunnels. They are
        checked on the head, so a refused request is answered before its body is read."""
        if flow.response is not None or not self.connections.is_proxy_request(flow):
            return
        if flow.request.port not in self.allowed_ports:
            self.metrics.blocked_connections.labels("port_not_allowed").inc()
            flow.response = forbidden()
            return
        await self._refuse_blocked(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        """A request inside a tunnel going through the corporate proxy is checked now, as the
        proxy makes the dial (the route chose its destination in the request hook)."""
        if flow.response is not None or self.connections.is_proxy_request(flow):
            return
        if flow.server_conn.via is not None:
            await self._refuse_blocked(flow)

    async def _refuse_blocked(self, flow: http.HTTPFlow) -> None:
        _, refusal = await self._check(flow.request.host, flow.request.port)
        if refusal == BLOCKED:
            flow.response = forbidden()
        elif refusal:
            flow.response = bad_gateway()
