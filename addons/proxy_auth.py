"""Proxy authentication (section 8): ``Proxy-Authorization: Basic`` with the token as password,
checked against the snapshot's token hashes (a dict lookup, never a database query)."""

from __future__ import annotations

import logging

from mitmproxy import http

from aibridgeproxyd.connections import ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.proxy_auth import CHALLENGE, token_from_proxy_authorization
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.auth")


def proxy_auth_required() -> http.Response:
    return http.Response.make(
        407,
        b"Proxy Authentication Required",
        {
            "Proxy-Authenticate": CHALLENGE,
            "Content-Type": "text/plain",
            "Proxy-Connection": "close",
        },
    )


class ProxyAuth:
    def __init__(
        self,
        holder: SnapshotHolder,
        connections: ConnectionTable,
        mode: str,
        auth_tunneled: bool,
        metrics: Metrics,
    ) -> None:
        self.metrics = metrics
        self.holder = holder
        self.connections = connections
        self.required = mode == "token"
        self.auth_tunneled = auth_tunneled

    def _identify(self, header: str | None) -> tuple[str | None, str | None, str]:
        """(identity, token, failure reason)."""
        token = token_from_proxy_authorization(header)
        if token is None:
            return None, None, "missing_credentials" if not header else "malformed_credentials"
        identity = self.holder.current.identity_for_token(token)
        if identity is None:
            return None, None, "invalid_credentials"
        return identity, token, ""

    def http_connect(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        # Never forward the header, whatever happens next.
        header = flow.request.headers.pop("proxy-authorization", None)
        if flow.response or info is None:
            return
        identity, token, reason = self._identify(header)
        if identity is None and self.required and (info.intercept or self.auth_tunneled):
            log.info(
                "proxy authentication failed",
                extra={"connect_id": info.connect_id, "reason": reason},
            )
            self.metrics.proxy_auth_failures.labels(reason).inc()
            flow.response = proxy_auth_required()
            return
        info.identity, info.proxy_token = identity, token

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxy requests (absolute-form) are authenticated one by one. One to a
        provider host needs a token like a CONNECT to it does (the destination guard then
        refuses it: such hosts are reached only through CONNECT)."""
        if not self.connections.is_proxy_request(flow):
            return
        header = flow.request.headers.pop("proxy-authorization", None)
        provider_host = self.holder.current.provider_for_host(flow.request.host) is not None
        if not (self.required and (self.auth_tunneled or provider_host)):
            return
        identity, _, reason = self._identify(header)
        if identity is None:
            log.info("proxy authentication failed for plain HTTP request", extra={"reason": reason})
            self.metrics.proxy_auth_failures.labels(reason).inc()
            flow.response = proxy_auth_required()
