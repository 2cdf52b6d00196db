"""The addon chain: every addon the daemon installs, in the order mitmproxy calls them.

mitmproxy calls each hook on every addon in chain order, so within one hook an addon sees what
the addons before it did: a refusal already set, the request context created, the destination
rewritten, the stream setting chosen, the response replaced. Each entry's comment names, by
class, the addons it must follow or precede, and why. ``tests/unit/test_chain_order.py`` holds
the same needs as data: it checks them on the chain this builds, that each one is named in the
comment of one of its two addons, and that a comment names no addon it has no need with.
"""

from __future__ import annotations

from aibridgeproxyd.addons.classify import Classify
from aibridgeproxyd.addons.client_limits import ClientLimits
from aibridgeproxyd.addons.destinations import DestinationGuard
from aibridgeproxyd.addons.error_answers import UpstreamErrorAnswers
from aibridgeproxyd.addons.housekeeping import MemoryHousekeeping
from aibridgeproxyd.addons.in_flight import InFlight
from aibridgeproxyd.addons.intercept import Intercept
from aibridgeproxyd.addons.interceptions import RecordInterceptions
from aibridgeproxyd.addons.leaf_renewal import LeafRenewal
from aibridgeproxyd.addons.listener_tls import ListenerTls
from aibridgeproxyd.addons.metrics import RequestMetrics
from aibridgeproxyd.addons.policy_enforcement import EnforcePolicies
from aibridgeproxyd.addons.policy_spend import CountPolicySpend
from aibridgeproxyd.addons.proxy_auth import ProxyAuth
from aibridgeproxyd.addons.route import RouteRequests
from aibridgeproxyd.addons.stalls import StallWatch
from aibridgeproxyd.addons.streaming import StreamResponses
from aibridgeproxyd.addons.tracing import TraceRequests
from aibridgeproxyd.addons.upstream_proxy import ChainUpstreamProxy
from aibridgeproxyd.addons.websocket import ForgetWebSocketMessages
from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.config import Config
from aibridgeproxyd.destinations import DestinationPolicy
from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.master import Running, builtin_addons
from aibridgeproxyd.mitm.splice_relay import SplicePipes
from aibridgeproxyd.mitm.stream_bounds import StreamBounds
from aibridgeproxyd.policy_counters import PolicyCounters
from aibridgeproxyd.pricing import PriceTable
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.response_content import ContentSwitches
from aibridgeproxyd.token_refresh import TokenRefresher
from aibridgeproxyd.tracing import Tracing


def stream_bounds(config: Config) -> StreamBounds:
    """The per-connection stream limits, from the configuration keys of the same names."""
    return StreamBounds(
        http2_max_concurrent_streams=config.http2_max_concurrent_streams,
        http2_max_resets=config.http2_max_resets,
        http2_reset_window=config.http2_reset_window,
        max_websocket_message=config.max_websocket_message,
        upstream_connect_timeout=config.upstream_connect_timeout,
        upstream_response_timeout=config.upstream_response_timeout,
        upstream_idle_timeout=config.upstream_idle_timeout,
    )


def build_chain(
    config: Config,
    *,
    holder: SnapshotHolder,
    connections: ConnectionTable,
    metrics: Metrics,
    tracing: Tracing,
    interceptions: InterceptionWriter,
    token_refresher: TokenRefresher,
    auth_failures: AuthFailureTracker,
    in_flight: InFlight,
    running: Running,
    listener_tls: ListenerTls | None = None,
    upstream_proxy: ChainUpstreamProxy | None = None,
    policy_counters: PolicyCounters | None = None,
) -> list[object]:
    """The addons for ``master.addons.add``, in hook order: mitmproxy's built-ins first, then
    ours. ``listener_tls`` and ``upstream_proxy`` are left out when not configured. The list
    is wrapped afterwards, in place, by ``failclosed.guard_chain``, which keeps the order."""
    upstream_proxy_address = upstream_proxy.proxy.address if upstream_proxy else None
    # The policies' counters (the daemon's, reconciled by its PolicySync; else this chain's own).
    policy_counters = policy_counters or PolicyCounters()
    # Prices: `prices set` rows of the current snapshot, then the config's `prices:`, then
    # genai-prices (aibridgeproxyd.pricing).
    prices = PriceTable(config.prices, stored=lambda: holder.current.model_prices)
    return [
        # mitmproxy's own first: the listener, layer choice and TLS every later addon adjusts.
        *builtin_addons(),
        # After TlsConfig: replaces the TLS it prepared for the listener itself.
        *([listener_tls] if listener_tls else []),
        # Background sweeps; their hooks only start and stop them, so their place is free.
        LeafRenewal(),
        MemoryHousekeeping(),
        StallWatch(connections, config.stream_stall_timeout),
        # Tells the daemon the listeners are up: mitmproxy binds them before it calls the
        # `running` hook, so this place is free too.
        running,
        # Before Classify, ProxyAuth and DestinationGuard, checks that may await (a token
        # re-read, DNS): a flow counts for the drain from its first hook.
        in_flight,
        # First of our checks: creates the ConnectInfo of each CONNECT, which every later addon
        # reads, and refuses a bad request head before anything acts on it.
        Classify(holder, connections, config.allowed_ports, metrics),
        # Reads Classify's ConnectInfo and adds the caller's identity; refuses (407) before
        # Intercept answers a MITM'd CONNECT and before DestinationGuard's 403s.
        ProxyAuth(
            holder,
            connections,
            config.auth,
            config.auth_tunneled,
            metrics,
            refresher=token_refresher,
            failures=auth_failures,
        ),
        # Answers only a CONNECT that Classify marked MITM and nobody refused; replaces the
        # layers mitmproxy's NextLayer chose; makes an HTTP/2 request HTTP/1.1 before the
        # adapter rewrites its host (RouteRequests).
        Intercept(
            connections,
            metrics,
            stream_bounds(config),
            SplicePipes(config.tunnel_splice, config.max_connections),
        ),
        # Before RouteRequests: a request a policy refuses is never routed (no key chosen);
        # its `request` hook reads the context RouteRequests' `requestheaders` created.
        EnforcePolicies(holder, policy_counters, in_flight, metrics),
        # Creates the RequestContext (flow.metadata) every later addon reads, rewrites the
        # request to its upstream, and on key failover replaces the response in `response`.
        RouteRequests(holder, connections, config.central_key_placeholder),
        # After RouteRequests' rewrite, so the destination it chains is the one dialled; after
        # Intercept, whose MITM'd HTTP layer it leaves alone; after TlsConfig, whose TLS to the
        # corporate proxy it replaces; before DestinationGuard, which checks what goes through
        # the proxy when that choice is made.
        *([upstream_proxy] if upstream_proxy else []),
        # After Intercept and ChainUpstreamProxy, whose HTTP layers (already bounded) it leaves
        # in place; it bounds mitmproxy's own listener layer otherwise.
        ClientLimits(
            holder,
            connections,
            metrics,
            max_connections=config.max_connections,
            request_head_timeout=config.request_head_timeout,
            idle_timeout=config.idle_timeout,
            plain_listener=listener_tls is None,
            max_connections_per_address=config.max_connections_per_address,
            max_buffered_bytes=config.max_buffered_bytes,
            stream_bounds=stream_bounds(config),
        ),
        # After ProxyAuth (a plain-HTTP request gets its 407 first), RouteRequests (a refused
        # request is not dialled) and ChainUpstreamProxy (reads server_conn.via).
        DestinationGuard(
            holder,
            connections,
            DestinationPolicy(config.allowed_private_cidrs),
            config.allowed_ports,
            metrics,
            upstream_proxy_address,
        ),
        # After RouteRequests: counts routed requests (its context) and the response it may
        # have replaced; the in-flight gauge follows the drain's rule (addons/in_flight.py).
        RequestMetrics(metrics, in_flight),
        # After RouteRequests: starts the response transform the adapter's rewrite set.
        StreamResponses(),
        # After RouteRequests (skips an answer its failover discards) and StreamResponses (a
        # streamed error is converted on the fly, a buffered one whole); before
        # RecordInterceptions, which logs the error body.
        UpstreamErrorAnswers(),
        # After RouteRequests: the record is its context; after StreamResponses: wraps the
        # stream setting with the usage and content taps; after UpstreamErrorAnswers: records the
        # status and body the client gets. (Its `requestheaders` sets the prompt's cut and the
        # client, which RouteRequests' `request` hook, a later event, reads with the body.)
        RecordInterceptions(
            interceptions,
            metrics,
            prices,
            ContentSwitches(
                config.record_tool_calls, config.record_thoughts, config.record_max_bytes
            ),
            log_interceptions=config.log_interceptions,
            record_prompts=config.record_prompts,
        ),
        # After RecordInterceptions: counts the usage it finished, priced the same way.
        CountPolicySpend(policy_counters, prices),
        # After RecordInterceptions: its spans carry what the record filled in (client, path,
        # usage); after RouteRequests: a span is about the request's context; after
        # StreamResponses: it wraps the stream setting to time the first chunk.
        TraceRequests(tracing, connections),
        # Last: every other addon has seen the WebSocket message before it is dropped.
        ForgetWebSocketMessages(),
    ]
