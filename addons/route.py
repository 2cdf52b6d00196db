"""Route MITM'd requests through their provider's adapter (sections 6.2, 6.5, 6.6).

Every request re-checks the live snapshot: a tunnel opened while a provider was enabled stops
routing as soon as no enabled provider claims its host. The request is then answered 503
``provider_unavailable`` in the client format and the tunnel is closed, never sent to the
original host (a MITM'd host is never dialled as itself).

Central keys fail over in order: a 401 or 429 cools the key down and the request is re-sent
with the next one (see ``aibridgeproxyd.mitm.http_layer``); the client never sees the failed try.
"""

from __future__ import annotations

import logging
import uuid

from mitmproxy import http

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.adapters.base import CredentialPolicy, RouteRefusal
from aibridgeproxyd.credentials import (
    CredentialMode,
    credential_mode,
    remove_all_credentials,
    remove_proxy_credentials,
    scrub_proxy_token,
)
from aibridgeproxyd.errors import REQUEST_ID_HEADER, error_response
from aibridgeproxyd.interception.state import (
    METADATA_KEY,
    ConnectInfo,
    ConnectionTable,
    RequestContext,
    refuse,
    request_context,
)
from aibridgeproxyd.keypool import FAILOVER_STATUSES, KeyPool, parse_retry_after
from aibridgeproxyd.mitm.http_layer import RESEND, close_client_after_response
from aibridgeproxyd.paths import dot_segment_path
from aibridgeproxyd.reload import SnapshotHolder

log = logging.getLogger("aibridgeproxyd.route")

__all__ = ["RouteRequests"]


def _ids(ctx: RequestContext) -> dict[str, str]:
    return {
        "connect_id": ctx.connect.connect_id,
        "request_id": ctx.request_id,
        "provider": ctx.provider.name,
    }


class RouteRequests:
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
        ctx = RequestContext(
            request_id=str(uuid.uuid4()),
            connect=info,
            provider=provider,
            adapter=ADAPTERS[provider.type],
        )
        # max_request_body is enforced by the HTTP layer (aibridgeproxyd.mitm.client_bounds).
        flow.metadata[METADATA_KEY] = ctx
        if dot_segment_path(flow.request.path):
            # Decided on the head, before any key is injected (aibridgeproxyd.paths).
            self._refuse(
                flow,
                ctx,
                400,
                "The request path has a '.' or '..' segment (also percent-encoded or with "
                "backslashes); send the path without them.",
                "invalid_path",
            )

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
        adapter = ADAPTERS.get(info.provider_type or "", ADAPTERS["openai"])
        message = (
            f"No enabled provider serves {flow.request.pretty_host} through this proxy any more; "
            "retry on a new connection."
        )
        flow.response = error_response(
            adapter.error_format(flow.request), 503, message, "provider_unavailable"
        )
        close_client_after_response(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is not None:
            return
        provider, adapter = ctx.provider, ctx.adapter
        # Read before the rewrite: an adapter may move the model out of the body (Bedrock).
        ctx.request_model = ctx.request_model or adapter.request_model(flow.request)
        headers = flow.request.headers
        headers.pop("proxy-authorization", None)
        adapter.normalize_credentials(flow.request)
        token = ctx.connect.proxy_token
        key: str | None = None
        if adapter.credential_policy == CredentialPolicy.SIGNED:
            ctx.credential_mode = "signed"
            remove_all_credentials(headers)
        elif (
            adapter.byok_only
            or credential_mode(headers, token, self.placeholder) is CredentialMode.BYOK
        ):
            ctx.credential_mode = "byok"
            if not (provider.allow_byok or adapter.byok_only):
                self._refuse(
                    flow,
                    ctx,
                    403,
                    "This provider does not accept your own API key; "
                    "remove it to use the central key.",
                    "byok_not_allowed",
                )
                return
            remove_proxy_credentials(headers, token, self.placeholder)
        else:
            ctx.credential_mode = "central"
            if not provider.keys:
                # 403, not 5xx: SDKs retry every 5xx, and no retry brings a key (section 6.6).
                self._refuse(
                    flow,
                    ctx,
                    403,
                    f"No API key is configured for provider '{provider.name}'; "
                    "send your own key or ask an operator to add one.",
                    "no_key_configured",
                )
                return
            remove_all_credentials(headers)
            index = self.key_pool.select(provider.name, provider.keys)
            if index is None:
                self._refuse_exhausted(flow, ctx)
                return
            ctx.key_index = index
            ctx.tried_keys.add(index)
            key = provider.keys[index]
        removed = scrub_proxy_token(flow.request, token)
        if removed:
            log.info("proxy token removed from %s", ", ".join(removed), extra=_ids(ctx))
        try:
            ctx.transform = adapter.rewrite(flow.request, provider, key)
        except RouteRefusal as refusal:
            self._refuse(flow, ctx, refusal.status, refusal.message, refusal.code)
            return
        if log.isEnabledFor(logging.DEBUG):  # spare the hot path the extra dict
            log.debug(
                "routing %s %s to provider %s",
                flow.request.method,
                flow.request.path,
                provider.name,
                extra=_ids(ctx),
            )

    def _refuse(
        self,
        flow: http.HTTPFlow,
        ctx: RequestContext,
        status: int,
        message: str,
        code: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        log.info("request refused: %s", code, extra=_ids(ctx))
        refuse(flow, code)
        # With X-Should-Retry: false when a retry cannot cure it (errors.should_retry).
        flow.response = error_response(
            ctx.adapter.error_format(flow.request), status, message, code, headers
        )

    def _refuse_exhausted(self, flow: http.HTTPFlow, ctx: RequestContext) -> None:
        """No key left: 429 with Retry-After if any key was rate-limited, else 502."""
        provider = ctx.provider
        exhausted = self.key_pool.exhausted(provider.name, provider.keys, ctx.saw_rate_limit)
        if exhausted.status == 429:
            self._refuse(
                flow,
                ctx,
                429,
                f"Every API key of provider '{provider.name}' is rate-limited; retry later.",
                "all_keys_rate_limited",
                {"Retry-After": str(exhausted.retry_after)},
            )
        else:
            self._refuse(
                flow,
                ctx,
                502,
                f"Every API key of provider '{provider.name}' was rejected by the upstream.",
                "all_keys_rejected",
            )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is None:
            return
        flow.response.headers[REQUEST_ID_HEADER] = ctx.request_id
        if ctx.key_index is not None and flow.response.status_code in FAILOVER_STATUSES:
            self._fail_over(flow, ctx, flow.response)

    def _fail_over(self, flow: http.HTTPFlow, ctx: RequestContext, response: http.Response) -> None:
        provider, failed = ctx.provider, ctx.key_index
        assert failed is not None
        status = response.status_code
        ctx.saw_rate_limit |= status == 429
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        self.key_pool.cool_down(provider.name, provider.keys[failed], status, retry_after)
        index = self.key_pool.select(provider.name, provider.keys, frozenset(ctx.tried_keys))
        if index is None:
            log.warning(
                "key %d of provider %s answered %d and no key is left",
                failed + 1,
                provider.name,
                status,
                extra=_ids(ctx),
            )
            # The upstream's error body is still arriving; it is replaced in `response`.
            ctx.keys_exhausted = True
            return
        log.warning(
            "key %d of provider %s answered %d; failing over to key %d",
            failed + 1,
            provider.name,
            status,
            index + 1,
            extra=_ids(ctx),
        )
        ctx.key_index = index
        ctx.tried_keys.add(index)
        ctx.adapter.inject_key(flow.request.headers, provider.keys[index])
        flow.metadata[RESEND] = True

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and ctx.keys_exhausted:
            ctx.keys_exhausted = False
            self._refuse_exhausted(flow, ctx)
            assert flow.response is not None
            flow.response.headers[REQUEST_ID_HEADER] = ctx.request_id
