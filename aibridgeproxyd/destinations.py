"""Which destinations a client may make the proxy dial (section 8).

Private and reserved ranges are refused unless ``allowed_private_cidrs`` covers them. The check
is made on resolved addresses, and the caller dials exactly the address that was checked, so a
DNS answer that changes between check and connect (rebinding) cannot get past it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "240.0.0.0/4",
        "::1/128",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "2002::/16",
        "fc00::/7",
        "fe80::/10",
    )
)


def normalize_address(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:10.0.0.1``) is judged as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class DestinationPolicy:
    def __init__(self, allowed_private: Iterable[IPNetwork] = ()) -> None:
        self.allowed_private = tuple(allowed_private)

    def is_blocked(self, address: str | IPAddress) -> bool:
        ip = normalize_address(
            ipaddress.ip_address(address) if isinstance(address, str) else address
        )
        if any(ip in network for network in self.allowed_private if network.version == ip.version):
            return False
        if ip.version == 6 and ip == ipaddress.IPv6Address("::"):
            return True  # the unspecified address dials loopback
        return any(ip in network for network in BLOCKED_NETWORKS if network.version == ip.version)


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
