"""Provider evaluation: defaults applied and statuses computed (docs/providers.md#statuses).

The same function serves the reload (what gets routed), ``providers list`` (what operators see)
and ``provider_info`` (what ops alert on), so the three can never disagree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import replace
from urllib.parse import urlsplit

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.host_names import canonical_host
from aibridgeproxyd.model import (
    HOSTNAME_PATTERN,
    NAME_PATTERN,
    Provider,
    ProviderRecord,
    Status,
    Upstream,
)


def normalize_host(host: str) -> str:
    """Lower-case, no trailing dot. Raises ValueError for anything that is not a bare hostname.

    An IPv4 literal is allowed (a self-hosted server reached by address) and stored as its
    dotted quad; a CONNECT to the same address in another spelling the resolver accepts
    (``127.1``, ``2130706433``) matches it (``destinations.canonical_host``). IPv6 literals are
    not supported."""
    text = host.strip().lower().rstrip(".")
    if text.isascii():  # Unicode names stay refused below: hosts are stored in xn-- form
        text = canonical_host(text)
    if "*" in text:
        raise ValueError(
            f"invalid host {host!r}: wildcards are not supported; list each hostname "
            "(api.example.com, eu.api.example.com, ...)"
        )
    if not HOSTNAME_PATTERN.fullmatch(text):
        raise ValueError(
            f"invalid host {host!r}: expected a bare hostname like api.openai.com "
            "(letters, digits, '-' and '.'; IDNA names in their xn-- form)"
        )
    return text


def check_known_settings(provider_type: str, names: Iterable[str]) -> None:
    """Refuse a setting name the type does not read: a typo (``regoin``) would otherwise be
    stored and silently ignored. Raises ``ValueError`` listing the names the type knows; an
    unknown type is left to the caller's own check."""
    adapter = ADAPTERS.get(provider_type)
    if adapter is None:
        return
    unknown = sorted(set(names) - adapter.known_settings)
    if unknown:
        known = ", ".join(sorted(adapter.known_settings))
        known_text = f"its settings are: {known}" if known else "it has no settings"
        raise ValueError(
            f"provider type {provider_type!r} has no setting {unknown[0]!r}; {known_text}"
        )


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"invalid provider name {name!r}: must match ^[a-z0-9]+(-[a-z0-9]+)*$")


class EvaluationCache:
    """Per-record evaluations kept between reloads. A record object that comes back unchanged
    (see ``store.RecordCache``) is not evaluated again; only host claims are, since they depend
    on the other providers. Reloads with 10,000 providers then cost little more than the read."""

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[ProviderRecord, Provider]] = {}

    def prepared(self, record: ProviderRecord) -> Provider:
        cached = self._by_name.get(record.name)
        if cached is not None and cached[0] is record:
            return cached[1]
        provider = _prepare(record)
        self._by_name[record.name] = (record, provider)
        return provider

    def keep_only(self, names: set[str]) -> None:
        for gone in self._by_name.keys() - names:
            del self._by_name[gone]


def evaluate_providers(
    records: Iterable[ProviderRecord], cache: EvaluationCache | None = None
) -> tuple[Provider, ...]:
    """Evaluate every row in name order. An enabled provider claims its hosts; a later
    provider that names a claimed host gets status ``error`` (the first claimant keeps it)."""
    cache = cache or EvaluationCache()
    claimed: dict[str, str] = {}
    result = []
    names = set()
    for record in sorted(records, key=lambda r: r.name):
        names.add(record.name)
        provider = cache.prepared(record)
        if provider.status is Status.ENABLED:
            taken = next((host for host in provider.hosts if host in claimed), None)
            if taken is not None:
                provider = replace(
                    provider,
                    status=Status.ERROR,
                    status_reason=(
                        f"host {taken!r} is already claimed by provider {claimed[taken]!r}"
                    ),
                )
            else:
                for host in provider.hosts:
                    claimed[host] = record.name
        result.append(provider)
    cache.keep_only(names)
    return tuple(result)


def _prepare(record: ProviderRecord) -> Provider:
    """Everything about one row that does not depend on the other rows. Never raises: a row
    that cannot be evaluated is in error, alone, and every other row still routes."""
    try:
        return _evaluate_row(record)
    except Exception as exc:  # an adapter's check tripping over a value of the wrong shape
        return Provider(
            record,
            record.base_url,
            record.hosts or _fallback_hosts(record, record.base_url),
            Status.ERROR,
            f"invalid row ({type(exc).__name__} while evaluating it)",
            unreadable=True,
        )


def with_last_known_hosts(
    providers: Iterable[Provider], previous: Iterable[Provider]
) -> list[Provider]:
    """``providers``, where a row that cannot be read also keeps the hosts the same provider
    (by name) had in the previous snapshot: a corrupted ``hosts`` column would otherwise close
    only the type's default hosts and leave the custom ones tunneled without a token. (After a
    restart there is no previous snapshot; the defaults are all that can be told then.)"""
    known = {provider.name: provider.hosts for provider in previous}
    result = []
    for provider in providers:
        if provider.unreadable and provider.name in known:
            hosts = tuple(dict.fromkeys((*provider.hosts, *known[provider.name])))
            provider = replace(provider, hosts=hosts)
        result.append(provider)
    return result


def _fallback_hosts(record: ProviderRecord, base_url: str) -> tuple[str, ...]:
    """The hosts a row that cannot be evaluated would claim, as far as they can be told: its
    type's default hosts, else its base_url's host (parsed leniently); for an unknown type
    also the default hosts of every type, since it may have claimed any. Never raises."""
    adapter = ADAPTERS.get(record.type)
    if adapter is not None and adapter.default_hosts:
        return adapter.default_hosts
    hosts: list[str] = []
    with contextlib.suppress(Exception):  # a base_url too broken to name a host
        host = urlsplit(base_url).hostname
        if host:
            hosts.append(normalize_host(host))
    if adapter is None:
        hosts.extend(host for other in ADAPTERS.values() for host in other.default_hosts)
    return tuple(dict.fromkeys(hosts))


def _evaluate_row(record: ProviderRecord) -> Provider:
    def error(reason: str, base_url: str = "", hosts: tuple[str, ...] = ()) -> Provider:
        return Provider(
            record, base_url or record.base_url, hosts or record.hosts, Status.ERROR, reason
        )

    def unreadable(reason: str, base_url: str = "") -> Provider:
        # Shown with the hosts it would claim, which snapshot.closed_hosts closes. A sound row
        # an operator disabled is only in error, its hosts tunneled like any disabled one's.
        base_url = base_url or record.base_url
        hosts = record.hosts or _fallback_hosts(record, base_url)
        closes = bool(record.problem) or record.enabled
        return replace(error(reason, base_url, hosts), unreadable=closes)

    adapter = ADAPTERS.get(record.type)
    if record.problem:
        # Shown with the type's defaults where the row has none, like any other error.
        base_url = record.base_url
        if adapter is not None:
            with contextlib.suppress(Exception):
                base_url = base_url or adapter.base_url_default(record) or ""
        return unreadable(record.problem, base_url)
    if adapter is None:
        return unreadable(f"unknown provider type {record.type!r}")
    base_url = record.base_url or adapter.base_url_default(record) or ""
    if not base_url:
        return error(adapter.base_url_problem(record))
    try:
        upstream = Upstream.parse(base_url)
    except ValueError as exc:
        return unreadable(str(exc), base_url)
    hosts = record.hosts or adapter.default_hosts or (upstream.host,)
    if not record.enabled:
        return Provider(
            record, base_url, hosts, Status.DISABLED, "disabled by an operator", upstream
        )
    problem = adapter.problem(record, upstream)
    if problem:
        return error(problem, base_url, hosts)
    return Provider(record, base_url, hosts, Status.ENABLED, "", upstream)
