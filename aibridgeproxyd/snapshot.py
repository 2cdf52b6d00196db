"""The immutable routing snapshot: built by a reload, swapped atomically, read on every CONNECT.

Host lookup and token checks are dict lookups; no database query sits on a request's path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.destinations import canonical_host
from aibridgeproxyd.model import Provider, Status, TokenRecord
from aibridgeproxyd.tokens import hash_token

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    providers: tuple[Provider, ...] = ()
    # Enabled providers by intercepted hostname.
    by_host: Mapping[str, Provider] = field(default=_EMPTY)
    by_name: Mapping[str, Provider] = field(default=_EMPTY)
    token_names_by_hash: Mapping[str, str] = field(default=_EMPTY)
    # (host, port) of every enabled provider's upstream: operator configuration, so exempt
    # from the private-destination block list (section 8).
    upstream_addresses: frozenset[tuple[str, int]] = frozenset()
    loaded_at: float = 0.0

    def provider_for_host(self, host: str) -> Provider | None:
        """The enabled provider claiming ``host`` in any spelling the resolver would dial as
        that name (case, trailing dot, Unicode look-alikes IDNA maps to it)."""
        return self.by_host.get(canonical_host(host))

    def identity_for_token(self, token: str) -> str | None:
        return self.token_names_by_hash.get(hash_token(token))


EMPTY_SNAPSHOT = Snapshot()


def build_snapshot(providers: Iterable[Provider], tokens: Iterable[TokenRecord]) -> Snapshot:
    providers = tuple(providers)
    enabled = [p for p in providers if p.status is Status.ENABLED]
    by_host = {host: p for p in enabled for host in p.hosts}
    upstreams = frozenset(
        address for p in enabled for address in ADAPTERS[p.type].upstream_addresses(p)
    )
    return Snapshot(
        providers=providers,
        by_host=MappingProxyType(by_host),
        by_name=MappingProxyType({p.name: p for p in enabled}),
        token_names_by_hash=MappingProxyType({t.token_hash: t.name for t in tokens}),
        upstream_addresses=upstreams,
        loaded_at=time.time(),
    )
