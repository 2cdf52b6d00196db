"""Prometheus metrics (section 9). One registry per daemon, so tests never share global state."""

from __future__ import annotations

from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge

from aibridgeproxyd.model import Provider

# `_created` companion series double the scrape size and are not part of the contract.
prometheus_client.disable_created_metrics()


class Metrics:
    def __init__(self, prefix: str = "coder_aibridgeproxyd_") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.provider_info = Gauge(
            prefix + "provider_info",
            "One series per configured AI provider. Value is always 1; the status label "
            "(enabled, disabled, error) carries the alertable signal.",
            ["provider_name", "provider_type", "status"],
            registry=r,
        )
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

        # Both session types exist from the first scrape, so rate() works before any traffic.
        for kind in ("mitm", "tunneled"):
            self.connect_sessions.labels(kind)

    def set_provider_info(self, providers: Iterable[Provider]) -> None:
        """Rewrite provider_info so providers that are gone disappear. Runs on the event loop,
        like the scrape handler, so a scrape never sees the cleared state."""
        self.provider_info.clear()
        for provider in providers:
            self.provider_info.labels(provider.name, provider.type, provider.status.value).set(1)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
