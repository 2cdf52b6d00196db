"""Destination checks on every dial a client can cause
(README.md#which-destinations-a-client-can-reach).

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

import logging

from mitmproxy import connection, http

from aibridgeproxyd.destinations import (
    DestinationPolicy,
    DestinationRefusal,
    PlainRequestVerdict,
    check_dial,
    dial_is_checked,
    judge_plain_request,
)
from aibridgeproxyd.errors import PROXY_REFUSED
from aibridgeproxyd.interception.state import ConnectionTable, request_context
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.client_bounds import DIAL_STOPPED, DIAL_TIMED_OUT
from aibridgeproxyd.mitm.hooks import ServerConnectionHookData
from aibridgeproxyd.mitm.responses import (
    bad_gateway,
    forbidden,
    gateway_timeout,
    proxy_stopping,
    refuse_misconfigured,
    refuse_port,
    use_connect,
)
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.destinations")

# The refusal reasons: the text after "Forbidden: " in a 403 body, and server.error on a
# refused dial (the HTTP layer tells BLOCKED by its type, not its text).
BLOCKED = DestinationRefusal.BLOCKED
UNRESOLVED = DestinationRefusal.UNRESOLVED


class DestinationGuard:
    """Checks and pins every dial a client can cause (``server_connect``; through a corporate
    proxy, ``http_connect`` and ``request``), answers a failed tunnel dial 403 or 502
    (``http_connect_error``), and judges plain-HTTP proxy requests on their head
    (``requestheaders``)."""

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
    ) -> tuple[str | None, DestinationRefusal | None]:
        """(numeric address to dial, refusal reason); see ``destinations.check_dial``. A
        private or reserved destination is logged and counted here, once."""
        snapshot = self.holder.current
        check = await check_dial(snapshot, self.policy, host, port, for_provider=for_provider)
        if check.blocked is not None:
            where = {"host": host, "port": port, "resolved_ip": check.blocked}
            # A plain-HTTP proxy request has no connect id: no empty field in its line.
            ids = {"connect_id": connect_id} if connect_id else {}
            log.info("destination refused: %s", BLOCKED, extra=ids | where)
            self.metrics.blocked_connections.labels("private_destination").inc()
        return check.dial, check.refusal

    def _connect_id(self, client: connection.Client) -> str:
        info = self.connections.get(client)
        return info.connect_id if info is not None else ""

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        address, info = data.server.address, self.connections.get(data.client)
        if address is None or data.server.via is not None:
            return
        target = (info.host, info.port) if info is not None and not info.intercept else None
        if not dial_is_checked(address, target, self.upstream_proxy_address):
            return
        mitm = info is not None and info.intercept
        connect_id = info.connect_id if info is not None else ""
        pinned, refusal = await self._check(*address, for_provider=mitm, connect_id=connect_id)
        if refusal:
            data.server.error = refusal
        elif pinned is not None:
            data.server.address = (pinned, address[1])

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A tunnel through the corporate proxy: checked now, as the proxy makes the dial."""
        if flow.response is None and flow.server_conn.via is not None:
            await self._refuse_blocked(flow, for_provider=False)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 names the address and the OS error; clients get neither.
        if flow.response is not None and flow.response.status_code == 502:
            flow.response = self._tunnel_failure_answer(flow)

    def _tunnel_failure_answer(self, flow: http.HTTPFlow) -> http.Response:
        """The answer to a CONNECT whose dial failed, logged: 403 for a blocked destination,
        503 when a stopping proxy failed it, 504 at ``upstream_connect_timeout``, else 502."""
        if flow.server_conn.error is BLOCKED:
            return forbidden(BLOCKED)
        if flow.metadata.get(DIAL_STOPPED):
            self._log_tunnel_failure(flow, "the proxy is stopping")
            return proxy_stopping()
        timeout = flow.metadata.get(DIAL_TIMED_OUT)
        if timeout is not None:
            self._log_tunnel_failure(flow, f"no connection within {timeout:g}s: timed out")
            return gateway_timeout()
        self._log_tunnel_failure(flow)
        # A corporate proxy's refusal is told by its status (errors.proxy_refusal).
        error = flow.server_conn.error or ""
        return bad_gateway(error if error.startswith(PROXY_REFUSED) else None)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxy requests follow the same port and address rules as tunnels, and
        are decided on their head, before any body is read."""
        if flow.response is not None or not self.connections.is_proxy_request(flow):
            return
        host, port = flow.request.host, flow.request.port
        verdict = judge_plain_request(self.holder.current, host, port, self.allowed_ports)
        response = self._answer_plain_request(flow, verdict)
        if response is not None:
            flow.response = response
        else:
            await self._refuse_blocked(flow, for_provider=False)

    def _log_tunnel_failure(self, flow: http.HTTPFlow, why: str | None = None) -> None:
        # The client learns nothing of why; the operator debugging "git fails through the
        # proxy" must find it here.
        log.info(
            "tunnel to %s:%s failed: %s",
            flow.request.host,
            flow.request.port,
            why or flow.server_conn.error or "dial failed",
            extra={"connect_id": self._connect_id(flow.client_conn)},
        )

    def _answer_plain_request(
        self, flow: http.HTTPFlow, verdict: PlainRequestVerdict
    ) -> http.Response | None:
        """The refusal ``verdict`` calls for, logged and counted; None when it refuses nothing."""
        if verdict.use_connect is not None:
            log.info(
                "plain-HTTP request to provider host %s refused: clients must use CONNECT",
                flow.request.pretty_host,
                extra={"provider": verdict.use_connect.name},
            )
            return use_connect(flow.request, verdict.use_connect.type)
        if verdict.closed_by is not None:
            connect_id = self._connect_id(flow.client_conn)
            return refuse_misconfigured(
                flow.request.host, verdict.closed_by, connect_id, self.metrics
            )
        if verdict.port_not_allowed:
            host, port = flow.request.host, flow.request.port
            return refuse_port(log, "request", host, port, self.metrics)
        return None

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
        if refusal is BLOCKED:
            flow.response = forbidden(BLOCKED)
        elif refusal:  # the client learns nothing of why: the log says it, as for a tunnel
            connect_id = self._connect_id(flow.client_conn)  # none for a plain-HTTP request
            log.info(
                "request to %s:%s failed: %s",
                flow.request.host,
                flow.request.port,
                refusal,
                extra={"connect_id": connect_id} if connect_id else None,
            )
            flow.response = bad_gateway()
