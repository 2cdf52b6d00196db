"""Prometheus metrics (README.md#metrics, docs/monitoring.md#metrics). One registry per daemon,
so tests never share global state."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aibridgeproxyd.model import Provider

# `_created` companion series double the scrape size and are not part of the contract.
prometheus_client.disable_created_metrics()


PROVIDER_INFO_HELP = (
    "One series per configured AI provider. Value is always 1; the status label "
    "(enabled, disabled, error) carries the alertable signal."
)


def _render_provider_info(name: str, providers: Iterable[Provider]) -> bytes:
    family = GaugeMetricFamily(
        name, PROVIDER_INFO_HELP, labels=["provider_name", "provider_type", "status"]
    )
    for provider in providers:
        family.add_metric([provider.name, provider.type, provider.status.value], 1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(family))
    return prometheus_client.generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


# The reasons of policy_refusals_total: aibridgeproxyd.policy_counters.REASONS.
POLICY_REASONS = (
    "budget_exceeded",
    "model_not_allowed",
    "rpm_exceeded",
    "tpm_exceeded",
    "max_parallel_exceeded",
    "policy_error",
)


class Metrics:
    """Every Prometheus metric of one daemon, in its own ``CollectorRegistry`` (so tests share no
    state); ``prefix`` is prepended to every name (README.md#metrics)."""

    def __init__(self, prefix: str = "coder_aibridgeproxyd_") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # provider_info is rendered at the first scrape after a reload (off the event loop, like
        # every scrape) and reused until the next reload: with 10,000 providers it is a megabyte
        # of text, and neither reloads nor scrapes should pay for it every time.
        self._provider_info_name = prefix + "provider_info"
        self._providers: tuple[Provider, ...] = ()
        self._provider_info: bytes | None = None
        # (metric, label values) -> its child (``child``): labelled series are never removed.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self.last_reload = Gauge(
            prefix + "providers_last_reload_timestamp_seconds",
            "Unix timestamp of the last provider reload attempt, success or failure.",
            registry=r,
        )
        self.last_reload_success = Gauge(
            prefix + "providers_last_reload_success_timestamp_seconds",
            "Unix timestamp of the last provider reload that refreshed the routing snapshot. "
            "A gap against providers_last_reload_timestamp_seconds means reloads are failing.",
            registry=r,
        )
        self.connect_sessions = Counter(
            prefix + "connect_sessions",
            "Total number of CONNECT sessions established.",
            ["type"],
            registry=r,
        )
        self.mitm_requests = Counter(
            prefix + "mitm_requests",
            "Total number of MITM requests handled by the proxy.",
            ["provider"],
            registry=r,
        )
        self.inflight_mitm_requests = Gauge(
            prefix + "inflight_mitm_requests",
            "Number of MITM requests currently being processed.",
            ["provider"],
            registry=r,
        )
        self.mitm_responses = Counter(
            prefix + "mitm_responses",
            "Total number of MITM responses by HTTP status code.",
            ["code", "provider"],
            registry=r,
        )

        # Beyond the contract's seven. Labels are bounded: providers are the configured ones,
        # every other label is a fixed enum.
        self.upstream_ttfb = Histogram(
            prefix + "upstream_ttfb_seconds",
            "Time from a MITM request leaving for the upstream to the upstream's response "
            "headers. Answers the "
            "proxy made itself (refusals, dial failures) are not counted.",
            ["provider"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.upstream_duration = Histogram(
            prefix + "upstream_duration_seconds",
            "Time from a MITM request's arrival to the end of its response (streams included), "
            "for requests the upstream answered.",
            ["provider"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.tokens = Counter(
            prefix + "tokens",
            "Tokens reported by upstreams, by type: input, output, cache_read, cache_creation, "
            "reasoning_output (a part of output, not to be added to it).",
            ["provider", "type"],
            registry=r,
        )
        self.cost_micros = Counter(
            prefix + "cost_micros",
            "Cost of the usage upstreams reported, in millionths of a US dollar, where a price "
            "was known (aibridgeproxyd prices set, a prices: override in the config, or "
            "genai-prices data).",
            ["provider"],
            registry=r,
        )
        self.unpriced_token_usage_records = Counter(
            prefix + "unpriced_token_usage_records",
            "Interception records with reported token usage but no known price (cost null).",
            ["provider"],
            registry=r,
        )
        self.blocked_connections = Counter(
            prefix + "blocked_connections",
            "Connections refused by the proxy, by reason: port_not_allowed, private_destination, "
            "provider_misconfigured.",
            ["reason"],
            registry=r,
        )
        self.proxy_auth_failures = Counter(
            prefix + "proxy_auth_failures",
            "Proxy authentication failures: missing, malformed or invalid credentials.",
            ["reason"],
            registry=r,
        )
        self.hook_failures = Counter(
            prefix + "hook_failures",
            "Exceptions caught in an addon's hook: a check's refuses (fail closed), a tap's is "
            "only logged. Any increase is a bug.",
            ["addon", "hook", "role"],
            registry=r,
        )
        self.proxy_token_rereads = Counter(
            prefix + "proxy_token_rereads",
            "Reads of the token table for a presented token the snapshot did not know "
            "(shared by concurrent look-ups and rate-limited).",
            registry=r,
        )
        self.interception_records_dropped = Counter(
            prefix + "interception_records_dropped",
            "Interception records not written: queue full, write failed, shutdown.",
            ["reason"],
            registry=r,
        )
        self.client_connections = Gauge(
            prefix + "client_connections",
            "Client connections open on the proxy listener (at most max_connections).",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            prefix + "buffered_bytes",
            "Bytes held against max_buffered_bytes: buffered request bodies, HTTP/2 response "
            "bytes not yet sent to a client, and WebSocket messages being assembled.",
            registry=r,
        )
        self.client_connections_closed = Counter(
            prefix + "client_connections_closed",
            "Client connections the proxy refused or cut off for a bound: max_connections, "
            "request_head_timeout, idle_timeout.",
            ["reason"],
            registry=r,
        )
        # Policies (docs/policies.md). Reasons are the refusal codes; users are proxy-token
        # names (bounded by the token table), only those a budget applies to.
        self.policy_refusals = Counter(
            prefix + "policy_refusals",
            "Requests refused by a policy, by reason: budget_exceeded, model_not_allowed, "
            "rpm_exceeded, tpm_exceeded, max_parallel_exceeded, policy_error.",
            ["reason"],
            registry=r,
        )
        self.policy_budget_used_ratio = Gauge(
            prefix + "policy_budget_used_ratio",
            "Share of a user's budget spent in its current period (1 = used up), per user and "
            "provider (* = the all-provider budget), as every replica counted it.",
            ["user", "provider"],
            registry=r,
        )
        for reason in POLICY_REASONS:
            self.policy_refusals.labels(reason)
        for reason in (
            "max_connections",
            "max_connections_per_address",
            "request_head_timeout",
            "idle_timeout",
        ):
            self.client_connections_closed.labels(reason)
        # Both session types exist from the first scrape, so rate() works before any traffic.
        for kind in ("mitm", "tunneled"):
            self.connect_sessions.labels(kind)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: on the request path, a dictionary lookup
        instead of prometheus_client's label check and lock on every call. Only for metrics
        whose series are never removed (none is), with label values from a bounded set."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def set_provider_info(self, providers: Iterable[Provider]) -> None:
        """Rewrite provider_info: providers that are gone disappear at the next scrape."""
        self._providers = tuple(providers)
        self._provider_info = None

    def provider_info_exposition(self) -> bytes:
        """provider_info alone, as text exposition (rendered once per reload)."""
        providers, rendered = self._providers, self._provider_info
        if rendered is None:
            rendered = _render_provider_info(self._provider_info_name, providers)
            if providers is self._providers:  # not replaced by a reload in the meantime
                self._provider_info = rendered
        return rendered

    def exposition(self) -> bytes:
        return self.provider_info_exposition() + prometheus_client.generate_latest(self.registry)
