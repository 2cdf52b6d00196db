"""Proxy authentication: ``Proxy-Authorization: Basic`` with the token as password
(docs/setup.md#the-proxy-token, docs/security.md#failed-authentication).

A token is first looked up in the snapshot (a dict lookup, never a database query). A token the
snapshot does not know is re-read from the store before it is refused (``TokenRefresher``: one
shared, rate-limited read), so a token works the moment ``tokens create`` returns.

Every refusal closes the connection. Failures are counted per source address
(``AuthFailureTracker``): a source that keeps failing is refused with ``429`` for a cool-down,
and failures are logged at most once per source per interval, with a count.
"""

from __future__ import annotations

import logging
import math

from mitmproxy import http

from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.responses import proxy_auth_required
from aibridgeproxyd.proxy_auth import (
    COOLDOWN,
    INVALID,
    MALFORMED,
    Verdict,
    authenticate,
    named_caller,
    token_required,
)
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.token_refresh import TokenRefresher

log = logging.getLogger("aibridgeproxyd.auth")


def too_many_failures(retry_after: float) -> http.Response:
    """429 for a source in its cool-down; the connection is closed after it."""
    return http.Response.make(
        429,
        b"Too Many Requests: too many failed proxy authentications from this address",
        {
            "Retry-After": str(max(1, math.ceil(retry_after))),
            "Content-Type": "text/plain",
            "Proxy-Connection": "close",
            "Connection": "close",
        },
    )


def _source(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else "unknown"


class ProxyAuth:
    """``http_connect`` authenticates a CONNECT that needs a token (a MITM'd host, or any host
    with ``auth_tunneled``); ``requestheaders`` authenticates each plain-HTTP proxy request when
    ``auth_tunneled`` is set. The accepted caller's name and token go on the connection's
    ``ConnectInfo``. ``refresher`` re-reads tokens the snapshot does not know; ``failures``
    tracks failed attempts per source address (both optional for tests)."""

    def __init__(
        self,
        holder: SnapshotHolder,
        connections: ConnectionTable,
        mode: str,
        auth_tunneled: bool,
        metrics: Metrics,
        refresher: TokenRefresher | None = None,
        failures: AuthFailureTracker | None = None,
    ) -> None:
        self.metrics = metrics
        self.holder = holder
        self.connections = connections
        self.required = mode == "token"
        self.auth_tunneled = auth_tunneled
        self.refresher = refresher
        self.failures = (
            failures
            if failures is not None
            else AuthFailureTracker(limit=20, window=60.0, cooldown=60.0, log_interval=10.0)
        )

    async def _authenticate(self, header: str | None, flow: http.HTTPFlow) -> Verdict:
        return await authenticate(
            header, _source(flow), self.holder.current, self.failures, self.refresher
        )

    def _refuse(
        self, flow: http.HTTPFlow, verdict: Verdict, what: str, connect_id: str | None = None
    ) -> None:
        self.metrics.proxy_auth_failures.labels(verdict.reason).inc()
        if verdict.reason == COOLDOWN:
            flow.response = too_many_failures(verdict.retry_after)  # logged when it started
        else:
            self._note_failure(_source(flow), verdict.reason, what)
            flow.response = proxy_auth_required()
        if connect_id is not None:
            log.debug("CONNECT refused: %s", verdict.reason, extra={"connect_id": connect_id})

    def _note_failure(self, source: str, reason: str, what: str) -> None:
        note = self.failures.record_failure(source, reason, counts=reason in (MALFORMED, INVALID))
        if note.cooldown_started:
            log.warning(
                "proxy authentication: %d failures from %s; refusing it for %ds",
                self.failures.limit,
                source,
                round(self.failures.cooldown),
                extra={"client": source, "reason": reason, "failures": self.failures.limit},
            )
        elif note.log:
            log.info(
                "proxy authentication failed for %s (%d from %s since its last report; "
                "latest reason %s)",
                what,
                note.failures,
                source,
                reason,
                extra={"client": source, "reason": reason, "failures": note.failures},
            )

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        # Never forward the header, whatever happens next.
        header = flow.request.headers.pop("proxy-authorization", None)
        if flow.response:
            return
        if info is None:
            # Classification never recorded this CONNECT: nothing may pass unchecked.
            flow.response = proxy_auth_required()
        elif not token_required(self.required, self.auth_tunneled, info.intercept):
            info.identity, info.proxy_token = named_caller(header, self.holder.current)
        elif (verdict := await self._authenticate(header, flow)).identity is None:
            self._refuse(flow, verdict, f"CONNECT {info.host}:{info.port}", info.connect_id)
        else:
            info.identity, info.proxy_token = verdict.identity, verdict.token

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxy requests (absolute-form) are authenticated one by one. One to a
        provider host needs a token like a CONNECT to it does (the destination guard then
        refuses it: such hosts are reached only through CONNECT)."""
        if not self.connections.is_proxy_request(flow):
            return
        header = flow.request.headers.pop("proxy-authorization", None)
        provider_host = self.holder.current.provider_for_host(flow.request.host) is not None
        if not token_required(self.required, self.auth_tunneled, provider_host):
            return
        verdict = await self._authenticate(header, flow)
        if verdict.identity is None:
            self._refuse(flow, verdict, "a plain HTTP request")
