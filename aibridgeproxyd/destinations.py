"""Which destinations a client may make the proxy dial
(README.md#which-destinations-a-client-can-reach).

Private and reserved ranges are refused unless ``allowed_private_cidrs`` covers them. The check
is made on the addresses the resolver returns for the host exactly as it will be dialled, and the
caller dials exactly the address that was checked. That one rule covers every spelling of an
address: the resolver turns ``127.1``, ``0x7f.1``, ``2130706433``, ``0177.0.0.1``, ``LOCALHOST``
and ``[::%1]`` into the address the kernel would connect to, so there is nothing to normalise by
hand that could disagree with the dial, and a DNS answer that changes between check and connect
(rebinding) cannot get past it.

Judging an address:

- a zone id (``fe80::1%eth0``, ``::%1``, ``::%251``) names an interface, not another address: it
  is removed before the comparison (``::%1`` is ``::``, which Linux dials as loopback);
- an IPv4-mapped address (``::ffff:127.0.0.1``) is dialled as the IPv4 address it carries, so it
  is judged as that address;
- the other IPv6 forms that embed an IPv4 address (IPv4-compatible ``::/96``, SIIT
  ``::ffff:0:0:0/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo
  ``2001::/32``) are blocked as whole ranges: none of them is a legitimate public destination
  for a proxy, and each can lead to the IPv4 address inside through a translator or tunnel.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aibridgeproxyd.classification import classify_connect

if TYPE_CHECKING:
    from aibridgeproxyd.model import Provider
    from aibridgeproxyd.snapshot import Snapshot


class DestinationRefusal(enum.StrEnum):
    """Why a destination is refused. The value is what the client reads after ``Forbidden: ``
    (or, for ``UNRESOLVED``, what the log says), and it is what the destination guard sets as
    ``server.error`` on a dial it refuses, so other modules compare values of this type, never
    message text."""

    BLOCKED = "private or reserved destination"
    PORT_NOT_ALLOWED = "port not allowed"
    UNRESOLVED = "destination host could not be resolved"


def port_allowed(port: int, allowed_ports: Collection[int]) -> bool:
    """The port policy (``allowed_ports``), for CONNECT targets and plain-HTTP proxy requests
    alike: only the listed ports may be reached through the proxy."""
    return port in allowed_ports


@dataclass(frozen=True)
class ConnectVerdict:
    """What becomes of a CONNECT whose head is well-formed. At most one field is set:

    - ``port_not_allowed``: the port is outside ``allowed_ports``;
    - ``intercept``: an enabled provider claims the host, so the tunnel is MITM'd for it;
    - ``closed_by``: the name of an unreadable provider row whose hosts include it.

    None of them set: the tunnel is opened untouched, and its dial checked like any other."""

    port_not_allowed: bool = False
    intercept: Provider | None = None
    closed_by: str | None = None


@dataclass(frozen=True)
class PlainRequestVerdict:
    """What becomes of a plain-HTTP proxy request before any dial. At most one field is set:

    - ``use_connect``: an enabled provider claims the host, so it is reached only through
      CONNECT (where it is intercepted), never forwarded as plain HTTP;
    - ``closed_by``: the name of an unreadable provider row whose hosts include it;
    - ``port_not_allowed``: the port is outside ``allowed_ports``.

    None of them set: its destination is checked like a tunnel's."""

    use_connect: Provider | None = None
    closed_by: str | None = None
    port_not_allowed: bool = False


# The same rules (the port policy, the host's class) decide a CONNECT and a plain-HTTP request,
# in opposite orders, each for its own reason (see the two functions).


def judge_connect(
    snapshot: Snapshot, host: str, port: int, allowed_ports: Collection[int]
) -> ConnectVerdict:
    """The verdict on a CONNECT to ``host:port``; see ``ConnectVerdict``.

    The port first, then the host: the port policy is the gate of every tunnel, whatever host
    it names, and a CONNECT answer reaches the client before any TLS, as a bare status line, so
    a host's answer would tell it no more than the 403 does. A port outside the policy is thus
    refused without looking the host up, and without saying whether a provider (or an
    unreadable row) claims it."""
    if not port_allowed(port, allowed_ports):
        return ConnectVerdict(port_not_allowed=True)
    host_class = classify_connect(snapshot, host)
    return ConnectVerdict(intercept=host_class.provider, closed_by=host_class.closed_by)


def judge_plain_request(
    snapshot: Snapshot, host: str, port: int, allowed_ports: Collection[int]
) -> PlainRequestVerdict:
    """The verdict on a plain-HTTP proxy request to ``host:port``; see ``PlainRequestVerdict``.
    The host is judged as a CONNECT to it would be (``classify_connect``).

    The host first, then the port (the opposite of ``judge_connect``): a plain-HTTP request to
    a provider host names port 80, which ``allowed_ports`` may leave out, and what that client
    needs to hear is the fix (use the proxy for HTTPS, ``use_connect``, in its API's format,
    which a plain-HTTP answer can carry), not "port not allowed". A host of an unreadable row
    is refused 503 on any port likewise, since no port makes it reachable."""
    host_class = classify_connect(snapshot, host)
    if host_class.provider is not None:
        return PlainRequestVerdict(use_connect=host_class.provider)
    if host_class.closed_by is not None:
        return PlainRequestVerdict(closed_by=host_class.closed_by)
    if not port_allowed(port, allowed_ports):
        return PlainRequestVerdict(port_not_allowed=True)
    return PlainRequestVerdict()


def dial_is_checked(
    address: tuple[str, int],
    client_target: tuple[str, int] | None,
    upstream_proxy: tuple[str, int] | None,
) -> bool:
    """Whether the proxy's direct dial of ``address`` goes through the destination check.

    ``client_target`` is the CONNECT target when the dial opens a client's own tunnel (None for
    connections the proxy opens for itself: inside a MITM'd connection, or a plain-HTTP request,
    whose destination was checked on its head). The corporate proxy (``upstream_proxy``) is
    operator configuration and exempt, except as the target of a client's own tunnel."""
    return address == client_target or address != upstream_proxy


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The private, loopback, link-local and reserved ranges, plus the other special-purpose ranges
# of the IANA IPv4 and IPv6 Special-Purpose Address Registries that no proxy client has a
# reason to reach.
BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        # IPv4
        "0.0.0.0/8",  # "this network"; 0.0.0.0 is dialled as loopback
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata services
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255
        # IPv6
        "::/128",  # unspecified; dialled as loopback
        "::1/128",
        "::/96",  # IPv4-compatible (deprecated), embeds an IPv4 address
        "::ffff:0:0:0/96",  # SIIT IPv4-translated, embeds an IPv4 address
        "64:ff9b::/96",  # NAT64 well-known prefix
        "64:ff9b:1::/48",  # NAT64 local-use prefix
        "100::/64",  # discard-only
        "2001::/32",  # Teredo, embeds an IPv4 address
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4, embeds an IPv4 address
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)


def normalize_address(address: IPAddress) -> IPAddress:
    """The address as it is judged: without a zone id, and IPv4-mapped IPv6
    (``::ffff:10.0.0.1``) as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(int(address))
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is written as one in standard notation (brackets and a
    zone id allowed: ``[fe80::1%eth0]``), else None. Shortened or numeric IPv4 forms such as
    ``127.1`` are not standard notation: they are names for the resolver, see module doc."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def dial_address(sockaddr: tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]) -> str:
    """The numeric address to dial from a ``getaddrinfo`` socket address: ``(host, port)`` for
    IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6, whose zone is kept (``fe80::1%2``) so
    that a link-local destination an operator allowed is dialled on the interface checked."""
    host = str(sockaddr[0])
    if len(sockaddr) >= 4 and sockaddr[3] and "%" not in host:
        return f"{host}%{sockaddr[3]}"
    return host


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a destination's resolved addresses.

    ``dial`` is the numeric address to connect to, None when refused or when there was no
    address at all; ``blocked`` is the first address that caused a refusal, for the log."""

    dial: str | None
    blocked: str | None = None


class DestinationPolicy:
    """The block list with the operator's exceptions (``allowed_private_cidrs``)."""

    def __init__(self, allowed_private: Iterable[IPNetwork] = ()) -> None:
        self.allowed_private = tuple(allowed_private)

    def is_blocked(self, address: str | IPAddress) -> bool:
        """True when ``address`` (numeric, zone id allowed) is private or reserved and no
        exception covers it. Anything that is not an IP address is blocked: fails closed."""
        if isinstance(address, str):
            parsed = literal_ip(address)
            if parsed is None:
                return True
            address = parsed
        ip = normalize_address(address)
        if any(ip in network for network in self.allowed_private if network.version == ip.version):
            return False
        return any(ip in network for network in BLOCKED_NETWORKS if network.version == ip.version)

    def judge(self, addresses: Sequence[str]) -> Verdict:
        """Refuse when *any* resolved address is blocked (a host that resolves to a private
        address too is treated as private, whichever address a dial would pick). Otherwise pin
        one: IPv4 first, whose reachability is the common case (``localhost`` resolves to ::1
        first on Linux), since a pinned dial has no fallback."""
        if not addresses:
            return Verdict(None)
        for address in addresses:
            if self.is_blocked(address):
                return Verdict(None, address)
        return Verdict(min(addresses, key=lambda a: ":" in a))


@dataclass(frozen=True)
class DialCheck:
    """The outcome of checking a destination just before the proxy dials it.

    ``dial``: the numeric address to pin the dial to (None when refused, and for an exempt
    provider upstream, which is dialled as configured); ``refusal``: why it is refused, if it
    is; ``blocked``: the resolved address that made it ``BLOCKED``, for the log."""

    dial: str | None = None
    refusal: DestinationRefusal | None = None
    blocked: str | None = None


async def check_dial(
    snapshot: Snapshot, policy: DestinationPolicy, host: str, port: int, *, for_provider: bool
) -> DialCheck:
    """Resolve ``host`` exactly as it is about to be dialled and judge every address
    (``DestinationPolicy.judge``). ``for_provider``: the proxy dials on a provider's behalf,
    so that provider's upstream (its ``base_url``, operator configuration) is exempt."""
    if for_provider and (host.lower().rstrip("."), port) in snapshot.upstream_addresses:
        return DialCheck()
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        verdict = policy.judge(list(dict.fromkeys(dial_address(i[4]) for i in infos)))
    except Exception:  # an unresolvable or unparseable name: never dialled (fails closed)
        return DialCheck(refusal=DestinationRefusal.UNRESOLVED)
    if verdict.blocked is not None:
        return DialCheck(refusal=DestinationRefusal.BLOCKED, blocked=verdict.blocked)
    if verdict.dial is None:
        return DialCheck(refusal=DestinationRefusal.UNRESOLVED)
    return DialCheck(dial=verdict.dial)
