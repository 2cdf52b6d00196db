"""Route MITM'd requests through their provider's adapter (sections 6.2, 6.5, 6.6).

Every request re-checks the live snapshot: a tunnel opened while a provider was enabled stops
routing as soon as no enabled provider claims its host, and the request then goes to the
original host untouched.
"""

from __future__ import annotations

import logging
import uuid

from mitmproxy import http

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.adapters.base import CredentialPolicy
from aibridgeproxyd.connections import (
    METADATA_KEY,
    ConnectionTable,
    RequestContext,
    request_context,
)
from aibridgeproxyd.credentials import (
    CredentialMode,
    credential_mode,
    remove_all_credentials,
    remove_proxy_credentials,
)
from aibridgeproxyd.errors import error_body

log = logging.getLogger("aibridgeproxyd.route")

REQUEST_ID_HEADER = "X-AIBridge-Request-Id"


class RouteRequests:
    def __init__(self, holder, connections: ConnectionTable, central_key_placeholder: str) -> None:  # type: ignore[no-untyped-def]
        self.holder = holder
        self.connections = connections
        self.placeholder = central_key_placeholder

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        if info is None or not info.intercept:
            return
        provider = self.holder.current.provider_for_host(flow.request.host)
        if provider is None:
            log.info(
                "no enabled provider claims %s any more; passing the request through untouched",
                flow.request.host,
                extra={"connect_id": info.connect_id},
            )
            return
        flow.metadata[METADATA_KEY] = RequestContext(
            request_id=str(uuid.uuid4()),
            connect=info,
            provider=provider,
            adapter=ADAPTERS[provider.type],
        )

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is not None:
            return
        provider, adapter = ctx.provider, ctx.adapter
        headers = flow.request.headers
        headers.pop("proxy-authorization", None)
        token = ctx.connect.proxy_token
        key: str | None = None
        if adapter.credential_policy == CredentialPolicy.SIGNED:
            remove_all_credentials(headers)
        elif (
            adapter.byok_only
            or credential_mode(headers, token, self.placeholder) is CredentialMode.BYOK
        ):
            if not (provider.allow_byok or adapter.byok_only):
                self._refuse(
                    flow,
                    ctx,
                    403,
                    "This provider does not accept your own API key; remove it to use the central key.",
                    "byok_not_allowed",
                )
                return
            remove_proxy_credentials(headers, token, self.placeholder)
        else:
            if not provider.keys:
                self._refuse(
                    flow,
                    ctx,
                    503,
                    f"No API key is configured for provider '{provider.name}'; send your own key or ask an operator to add one.",
                    "no_key_configured",
                )
                return
            remove_all_credentials(headers)
            key = provider.keys[0]
        ctx.transform = adapter.rewrite(flow.request, provider, key)
        log.debug(
            "routing %s %s to provider %s",
            flow.request.method,
            flow.request.path,
            provider.name,
            extra={"connect_id": ctx.connect.connect_id, "request_id": ctx.request_id},
        )

    def _refuse(
        self, flow: http.HTTPFlow, ctx: RequestContext, status: int, message: str, code: str
    ) -> None:
        log.info(
            "request refused: %s",
            code,
            extra={
                "connect_id": ctx.connect.connect_id,
                "request_id": ctx.request_id,
                "provider": ctx.provider.name,
            },
        )
        flow.response = http.Response.make(
            status,
            error_body(ctx.adapter.error_format(flow.request), status, message, code),
            {"Content-Type": "application/json"},
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and flow.response is not None:
            flow.response.headers[REQUEST_ID_HEADER] = ctx.request_id
