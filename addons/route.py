"""Route MITM'd requests through their provider's adapter (docs/providers.md).

Every request re-checks the live snapshot: a tunnel opened while a provider was enabled stops
routing as soon as no enabled provider claims its host. The request is then answered 503
``provider_unavailable`` in the client format and the tunnel is closed, never sent to the
original host (a MITM'd host is never dialled as itself).

Central keys fail over in order: a 401 or 429 cools the key down and the request is re-sent
with the next one (see ``aibridgeproxyd.mitm.http_layer``); the client never sees the failed try.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from aibridgeproxyd.adapters import ADAPTERS, FALLBACK_ADAPTER, adapter_for
from aibridgeproxyd.errors import error_response
from aibridgeproxyd.interception.routing import (
    Refusal,
    answer_refusal,
    exhausted,
    fail_over,
    needs_failover,
    path_refusal,
    route_request,
    unclaimed_host,
)
from aibridgeproxyd.interception.state import (
    METADATA_KEY,
    ConnectInfo,
    ConnectionTable,
    RequestContext,
    request_context,
    stamp_request_id,
)
from aibridgeproxyd.keypool import KeyPool
from aibridgeproxyd.mitm.http_layer import RESEND, close_client_after_response
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.request_ids import new_request_id

log = logging.getLogger("aibridgeproxyd.route")

__all__ = ["RouteRequests"]


class RouteRequests:
    """Creates each MITM'd request's ``RequestContext`` and applies the routing decisions of
    ``aibridgeproxyd.interception.routing``: refusals, credential mode, key and failover."""

    def __init__(
        self,
        holder: SnapshotHolder,
        connections: ConnectionTable,
        central_key_placeholder: str,
        key_pool: KeyPool | None = None,
    ) -> None:
        self.holder = holder
        self.connections = connections
        self.placeholder = central_key_placeholder
        self.key_pool = key_pool or KeyPool()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        if info is None or not info.intercept:
            return
        provider = self.holder.current.provider_for_host(flow.request.host)
        if provider is None:
            self._refuse_unclaimed(flow, info)
            return
        ctx = RequestContext(new_request_id(), info, provider, ADAPTERS[provider.type])
        # max_request_body is enforced by the HTTP layer (aibridgeproxyd.mitm.client_bounds).
        flow.metadata[METADATA_KEY] = ctx
        # Decided on the head, before any key is injected.
        if refusal := path_refusal(flow.request.path):
            self._refuse(flow, ctx, refusal)

    def _refuse_unclaimed(self, flow: http.HTTPFlow, info: ConnectInfo) -> None:
        """No enabled provider claims the host any more. A MITM'd host is never dialled as
        itself (the tunnel was opened without a dial, and its client may hold no right to reach
        it directly), so the request is answered 503 in the client format and the tunnel is
        closed: the client's next connection is classified afresh, and tunneled."""
        log.info(
            "no enabled provider claims %s any more; refusing the request and closing the tunnel",
            flow.request.host,
            extra={"connect_id": info.connect_id, "provider": info.provider_name or ""},
        )
        adapter = adapter_for(info.provider_type) or FALLBACK_ADAPTER
        refusal = unclaimed_host(flow.request.pretty_host)
        flow.response = error_response(
            adapter.error_format(flow.request), refusal.status, refusal.message, refusal.code
        )
        close_client_after_response(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is not None:
            return
        if refusal := route_request(flow.request, ctx, self.placeholder, self.key_pool):
            self._refuse(flow, ctx, refusal)

    def _refuse(self, flow: http.HTTPFlow, ctx: RequestContext, refusal: Refusal) -> None:
        log.info("request refused: %s", refusal.code, extra=ctx.log_ids())
        answer_refusal(flow, ctx, refusal)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is None:
            return
        stamp_request_id(flow.response, ctx)
        if needs_failover(ctx.routing, flow.response.status_code):
            self._fail_over(flow, ctx, flow.response)

    def _fail_over(self, flow: http.HTTPFlow, ctx: RequestContext, response: http.Response) -> None:
        """Re-send the request with the next key (see ``aibridgeproxyd.mitm.http_layer``), or,
        when none is left, leave ``response`` to replace the upstream's error (``fail_over``)."""
        retry_after = response.headers.get("retry-after")
        key = fail_over(self.key_pool, ctx, response.status_code, retry_after)
        if key is not None:
            ctx.adapter.inject_key(flow.request.headers, key)
            flow.metadata[RESEND] = True

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and ctx.routing.keys_exhausted:
            ctx.routing.keys_exhausted = False
            self._refuse(
                flow, ctx, exhausted(self.key_pool, ctx.provider, ctx.routing.saw_rate_limit)
            )
            assert flow.response is not None
            stamp_request_id(flow.response, ctx)
