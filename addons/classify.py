"""Classify each CONNECT: a port outside ``allowed_ports`` is refused, a host claimed by an
enabled provider is MITM'd, everything else is tunneled.

First in our chain, it also refuses any request head (CONNECT, MITM'd request, plain-HTTP proxy
request) that carries a CR, LF or NUL inside a header name or value or the request target: 400,
never forwarded (``aibridgeproxyd.header_syntax``).
"""

from __future__ import annotations

import logging

from mitmproxy import http

from aibridgeproxyd.adapters import adapter_for
from aibridgeproxyd.destinations import judge_connect
from aibridgeproxyd.errors import error_response
from aibridgeproxyd.header_syntax import invalid_field, invalid_target
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.responses import refuse_misconfigured, refuse_port
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.connect")

INVALID_HEAD = "invalid character in request header"


def _invalid_head(request: http.Request) -> str | None:
    """What is wrong with the request head, for the log, or None."""
    name = invalid_field(request.headers.fields)
    if name is not None:
        return f"CR, LF or NUL in header {name}"
    data = request.data
    if invalid_target(data.method, data.path, data.authority, data.host):
        return "CR, LF or NUL in the request line"
    return None


def _bad_request() -> http.Response:
    """400 in plain text, for a head refused outside a provider's API."""
    return http.Response.make(
        400, f"Bad Request: {INVALID_HEAD}".encode(), {"Content-Type": "text/plain"}
    )


class Classify:
    """Decides what each CONNECT becomes (MITM, tunnel, closed, refused port) and creates its
    ``ConnectInfo`` (``http_connect``); refuses bad header bytes in any request head
    (``requestheaders``, ``request``)."""

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
        info = ConnectInfo(host=flow.request.host, port=flow.request.port)
        self.connections.add(flow.client_conn, info)
        if (problem := _invalid_head(flow.request)) is not None:
            log.info("CONNECT refused: %s", problem, extra={"connect_id": info.connect_id})
            flow.response = _bad_request()
        else:
            self._classify(flow, info)

    def _classify(self, flow: http.HTTPFlow, info: ConnectInfo) -> None:
        verdict = judge_connect(self.holder.current, info.host, info.port, self.allowed_ports)
        if verdict.port_not_allowed:
            flow.response = refuse_port(
                log, "CONNECT", info.host, info.port, self.metrics, info.connect_id
            )
        elif (provider := verdict.intercept) is not None:
            info.intercept = True
            info.provider_name, info.provider_type = provider.name, provider.type
        elif (closed_by := verdict.closed_by) is not None:
            flow.response = refuse_misconfigured(
                info.host, closed_by, info.connect_id, self.metrics
            )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        problem = _invalid_head(flow.request)
        if problem is not None:
            self._refuse_head(flow, problem)

    def request(self, flow: http.HTTPFlow) -> None:
        # Trailers arrive with the end of the body, after requestheaders.
        if flow.response is None and flow.request.trailers is not None:
            name = invalid_field(flow.request.trailers.fields)
            if name is not None:
                self._refuse_head(flow, f"CR, LF or NUL in trailer {name}")

    def _refuse_head(self, flow: http.HTTPFlow, problem: str) -> None:
        info = self.connections.get(flow.client_conn)
        log.info(
            "request refused: %s",
            problem,
            extra={"connect_id": info.connect_id} if info is not None else {},
        )
        adapter = adapter_for(info.provider_type) if info is not None and info.intercept else None
        if adapter is not None:
            # Inside a MITM'd tunnel the client speaks its provider's API: answer in its format.
            api_format = adapter.error_format(flow.request)
            message = "The request carries a CR, LF or NUL character inside a header."
            flow.response = error_response(api_format, 400, message, "invalid_header")
        else:
            flow.response = _bad_request()
