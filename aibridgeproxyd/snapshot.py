"""The immutable routing snapshot: built by a reload, swapped atomically, read on every CONNECT
(and by the recording, for the stored model prices).

Host lookup, token checks and price overrides are dict lookups; no database query sits on a
request's path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.host_names import canonical_host
from aibridgeproxyd.model import Provider, Status, TokenRecord
from aibridgeproxyd.policy import Policy, PolicyIndex, index_policies
from aibridgeproxyd.pricing import StoredPrices
from aibridgeproxyd.tokens import hash_token

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """The routing state at one reload: enabled providers by host and name, proxy-token hashes,
    the upstream addresses exempt from the destination guard, and the hosts closed (fail closed)."""

    providers: tuple[Provider, ...] = ()
    # Enabled providers by intercepted hostname.
    by_host: Mapping[str, Provider] = field(default=_EMPTY)
    by_name: Mapping[str, Provider] = field(default=_EMPTY)
    token_names_by_hash: Mapping[str, str] = field(default=_EMPTY)
    # (host, port) of every enabled provider's upstream: operator configuration, so exempt
    # from the private-destination block list (docs/providers.md#hosts-and-base_url).
    upstream_addresses: frozenset[tuple[str, int]] = frozenset()
    # Hosts of provider rows that cannot be read (``ProviderRecord.problem``), by canonical
    # hostname, each with the name of such a row: neither tunneled nor routed (fail closed).
    # A host an enabled provider claims is routed by it and is never in here.
    closed_hosts: Mapping[str, str] = field(default=_EMPTY)
    # Prices stored with ``prices set``, by model (aibridgeproxyd.pricing.PriceTable reads
    # them on each record): a reload after ``prices set`` applies it to the next record.
    model_prices: StoredPrices = field(default=_EMPTY)
    # Policies by (subject, provider) (aibridgeproxyd.policy.resolve reads them): a reload after
    # ``policies set`` applies it to the next request.
    policies: PolicyIndex = field(default=_EMPTY)

    def provider_for_host(self, host: str) -> Provider | None:
        """The enabled provider claiming ``host`` in any spelling the resolver would dial as
        that name (case, trailing dot, Unicode look-alikes IDNA maps to it)."""
        return self.by_host.get(canonical_host(host))

    def closed_provider_for_host(self, host: str) -> str | None:
        """The name of an unreadable provider row whose hosts include ``host`` (any spelling,
        as ``provider_for_host``), when no enabled provider claims it; else None."""
        return self.closed_hosts.get(canonical_host(host))

    def identity_for_token(self, token: str) -> str | None:
        return self.token_names_by_hash.get(hash_token(token))


EMPTY_SNAPSHOT = Snapshot()


def build_snapshot(
    providers: Iterable[Provider],
    tokens: Iterable[TokenRecord],
    model_prices: StoredPrices = _EMPTY,
    policies: Iterable[Policy] = (),
) -> Snapshot:
    providers = tuple(providers)
    enabled = [p for p in providers if p.status is Status.ENABLED]
    by_host = {host: p for p in enabled for host in p.hosts}
    upstreams = frozenset(
        address for p in enabled for address in ADAPTERS[p.type].upstream_addresses(p)
    )
    return Snapshot(
        providers=providers,
        by_host=MappingProxyType(by_host),
        closed_hosts=MappingProxyType(closed_hosts(providers, by_host)),
        by_name=MappingProxyType({p.name: p for p in enabled}),
        token_names_by_hash=MappingProxyType({t.token_hash: t.name for t in tokens}),
        upstream_addresses=upstreams,
        model_prices=model_prices,
        policies=MappingProxyType(index_policies(policies)),
    )


def closed_hosts(providers: Iterable[Provider], claimed: Mapping[str, Provider]) -> dict[str, str]:
    """Host -> provider name for every row that cannot be evaluated (``Provider.unreadable``:
    a malformed column, or, enabled, an unknown type or an unusable base_url).

    Such a row might be an enabled provider whose hosts must never be open without a proxy
    token, so its hosts are closed (a malformed row's whatever its ``enabled`` column says):
    its readable ``hosts``, else its type's default hosts or its base_url's host, and when even
    the type is unknown the default hosts of every type (``evaluate_providers`` fills those in
    as the row's ``hosts``). Hosts an enabled provider claims (``claimed``) stay routed by it.
    Other ``error`` statuses (no keys, a duplicate host) close nothing: their hosts are
    tunneled like a disabled provider's (docs/providers.md#statuses)."""
    closed: dict[str, str] = {}
    for provider in providers:
        if not provider.unreadable:
            continue
        for host in provider.hosts:
            host = canonical_host(host)
            if host not in claimed:
                closed.setdefault(host, provider.name)
    return closed
