"""Provider evaluation: defaults applied and statuses computed (section 6.3).

The same function serves the reload (what gets routed), ``providers list`` (what operators see)
and ``provider_info`` (what ops alert on), so the three can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.model import NAME_PATTERN, Provider, ProviderRecord, Status, Upstream


def normalize_host(host: str) -> str:
    """Lower-case, no trailing dot. Raises ValueError for anything that is not a bare hostname."""
    text = host.strip().lower().rstrip(".")
    if not text or any(c in text for c in "/:@?# \t") or text.startswith("."):
        raise ValueError(f"invalid host {host!r}: expected a bare hostname like api.openai.com")
    return text


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid provider name {name!r}: must match ^[a-z0-9]+(-[a-z0-9]+)*$")


def evaluate_providers(records: Iterable[ProviderRecord]) -> tuple[Provider, ...]:
    """Evaluate every row in name order. An enabled provider claims its hosts; a later
    provider that names a claimed host gets status ``error`` (the first claimant keeps it)."""
    claimed: dict[str, str] = {}
    result = []
    for record in sorted(records, key=lambda r: r.name):
        provider = _evaluate_one(record, claimed)
        if provider.status is Status.ENABLED:
            for host in provider.hosts:
                claimed[host] = record.name
        result.append(provider)
    return tuple(result)


def _evaluate_one(record: ProviderRecord, claimed: dict[str, str]) -> Provider:
    def error(reason: str, base_url: str = "", hosts: tuple[str, ...] = ()) -> Provider:
        return Provider(
            record, base_url or record.base_url, hosts or record.hosts, Status.ERROR, reason
        )

    adapter = ADAPTERS.get(record.type)
    if adapter is None:
        return error(f"unknown provider type {record.type!r}")
    base_url = record.base_url or adapter.base_url_default(record) or ""
    if not base_url:
        return error(adapter.base_url_problem(record))
    try:
        upstream = Upstream.parse(base_url)
    except ValueError as exc:
        return error(str(exc), base_url)
    hosts = record.hosts or adapter.default_hosts or (upstream.host,)
    if not record.enabled:
        return Provider(
            record, base_url, hosts, Status.DISABLED, "disabled by an operator", upstream
        )
    problem = adapter.problem(record, upstream)
    if problem:
        return error(problem, base_url, hosts)
    for host in hosts:
        if host in claimed:
            return error(
                f"host {host!r} is already claimed by provider {claimed[host]!r}", base_url, hosts
            )
    return Provider(record, base_url, hosts, Status.ENABLED, "", upstream)
