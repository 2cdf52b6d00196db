"""The corporate (upstream) proxy that outbound connections are chained through
(docs/upstream-proxy.md).

Pure values and functions, no mitmproxy: the proxy URL with its credentials, the header those
credentials become, and which destinations bypass the proxy (``upstream_no_proxy``). The addon
``addons/upstream_proxy.py`` applies them.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import unquote, urlsplit

from aibridgeproxyd.destinations import IPNetwork, literal_ip, normalize_address

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A host name or domain suffix in upstream_no_proxy: labels of letters, digits, '-' and '_'.
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class UpstreamProxyError(ValueError):
    """The upstream proxy settings cannot be used; the message names the config key."""


def redact_url(text: str) -> str:
    """The URL with any userinfo replaced by ``***``: safe for logs and error messages."""
    return re.sub(r"//[^@/?#]*@", "//***@", text)


def basic_proxy_authorization(userinfo: str) -> str:
    """``Proxy-Authorization`` for the URL's (decoded) userinfo, exactly as written: ``user:pass``,
    ``user:``, ``user`` or ``:pass`` (some proxies take a bare token as the password)."""
    return "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")


@dataclass(frozen=True)
class UpstreamProxy:
    """The corporate proxy from ``upstream_proxy``: scheme, address and its Proxy-Authorization."""

    scheme: Literal["http", "https"]
    host: str
    port: int
    # The Proxy-Authorization value, or None without userinfo; kept out of repr (it is a secret).
    authorization: str | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def via(self) -> tuple[Literal["http", "https"], tuple[str, int]]:
        """mitmproxy's server spec for a connection made through this proxy."""
        return self.scheme, self.address

    def __str__(self) -> str:
        """``scheme://host:port``: never the credentials, so it is what logs show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_upstream_proxy(text: str) -> UpstreamProxy:
    """``http(s)://[user:pass@]host[:port]``. Error messages never contain the credentials."""
    text = text.strip()
    shown = redact_url(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http(s)://[user:pass@]host:port, got {shown!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in {shown!r}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy URL must not have a path or query: {shown!r}")
    authorization = None
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        try:
            user, password = unquote(user, errors="strict"), unquote(password, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(f"proxy URL credentials are not valid UTF-8: {shown!r}") from None
        if not user and not password:
            raise ValueError(
                f"proxy URL {shown!r} has invalid credentials: both username and password are empty"
            )
        authorization = basic_proxy_authorization(user + colon + password)
    host = parts.hostname.rstrip(".")
    return UpstreamProxy(
        cast(Literal["http", "https"], scheme), host, port or _DEFAULT_PORTS[scheme], authorization
    )


class NoProxy:
    """Destinations reached directly although an upstream proxy is set, like ``NO_PROXY``:

    - ``example.com``: that host and every host below it (``api.example.com``);
    - ``.example.com`` or ``*.example.com``: only the hosts below it;
    - an IP address or a CIDR (``10.0.0.0/8``, ``fd00::/8``): destinations given as addresses
      in it. Host names are not resolved to be matched against these;
    - ``*``: every destination.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.everything = False
        self.domains: list[str] = []  # the name itself and the names below it
        self.subdomains_of: list[str] = []  # only the names below it
        self.networks: list[IPNetwork] = []
        kept: list[str] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            kept.append(entry)
            if entry == "*":
                self.everything = True
            elif "/" in entry:
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"invalid CIDR {raw!r}") from None
            elif (ip := literal_ip(entry)) is not None:
                self.networks.append(ipaddress.ip_network(normalize_address(ip)))
            else:
                subdomains_only = entry.startswith((".", "*."))
                name = entry.lstrip("*").lstrip(".").rstrip(".")
                if not _HOST_NAME.fullmatch(name):
                    raise ValueError(
                        f"invalid entry {raw!r}: expected a host name, a domain like "
                        ".example.com, an IP address, a CIDR or *"
                    )
                (self.subdomains_of if subdomains_only else self.domains).append(name)

        self.entries: tuple[str, ...] = tuple(kept)  # as configured, lower-cased, for logs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoProxy) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"NoProxy({list(self.entries)!r})"

    def matches(self, host: str) -> bool:
        if self.everything:
            return True
        ip = literal_ip(host)
        if ip is not None:
            ip = normalize_address(ip)
            return any(ip in network for network in self.networks if network.version == ip.version)
        name = host.lower().rstrip(".")
        return any(name == domain or name.endswith("." + domain) for domain in self.domains) or any(
            name.endswith("." + domain) for domain in self.subdomains_of
        )
