"""Classify each CONNECT: a port outside ``allowed_ports`` is refused, a host claimed by an
enabled provider is MITM'd, everything else is tunneled."""

from __future__ import annotations

import logging

from mitmproxy import http

from aibridgeproxyd.connections import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.connect")


def forbidden() -> http.Response:
    return http.Response.make(403, b"Forbidden", {"Content-Type": "text/plain"})


class Classify:
    def __init__(
        self,
        holder: SnapshotHolder,
        connections: ConnectionTable,
        allowed_ports: tuple[int, ...],
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.holder = holder
        self.connections = connections
        self.allowed_ports = frozenset(allowed_ports)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        host, port = flow.request.host, flow.request.port
        info = ConnectInfo(host=host, port=port)
        self.connections.add(flow.client_conn, info)
        if port not in self.allowed_ports:
            log.info(
                "CONNECT refused: port not allowed",
                extra={"connect_id": info.connect_id, "reason": f"port {port}"},
            )
            self.metrics.blocked_connections.labels("port_not_allowed").inc()
            flow.response = forbidden()
            return
        # An O(1) lookup on the immutable snapshot current at this instant.
        provider = self.holder.current.provider_for_host(host)
        if provider is not None:
            info.intercept = True
            info.provider_name = provider.name
