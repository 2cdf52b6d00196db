"""What a CONNECT becomes, decided from the host alone on one provider snapshot.

A host claimed by an enabled provider is MITM'd and routed by it. A host of a provider row that
cannot be read is refused (fails closed: tunneling it could send a user's traffic past the
proxy's routing, intercepting it has no provider to route by). Every other host is tunneled.
The port check comes before this (``destinations.judge_connect``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aibridgeproxyd.model import Provider

if TYPE_CHECKING:  # the snapshot module imports destinations, which imports this one
    from aibridgeproxyd.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class ConnectClass:
    """``provider``: MITM the CONNECT for this provider. ``closed_by``: refuse it, naming the
    unreadable row that claims the host. Neither: tunnel it untouched."""

    provider: Provider | None = None
    closed_by: str | None = None


TUNNEL = ConnectClass()


def classify_connect(snapshot: Snapshot, host: str) -> ConnectClass:
    """The class of a CONNECT to ``host`` (any spelling the resolver would dial as that name):
    two dict lookups on the immutable ``snapshot``, never a database query."""
    provider = snapshot.provider_for_host(host)
    if provider is not None:
        return ConnectClass(provider=provider)
    closed_by = snapshot.closed_provider_for_host(host)
    return TUNNEL if closed_by is None else ConnectClass(closed_by=closed_by)
