"""The pure address logic of the destination check (aibridgeproxyd.destinations) and the
request-head character check (aibridgeproxyd.header_syntax)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from aibridgeproxyd.config import parse_cidrs
from aibridgeproxyd.destinations import (
    BLOCKED_NETWORKS,
    DestinationPolicy,
    DestinationRefusal,
    DialCheck,
    Verdict,
    check_dial,
    dial_address,
    literal_ip,
    normalize_address,
)
from aibridgeproxyd.header_syntax import invalid_field, invalid_target
from aibridgeproxyd.host_names import canonical_host
from aibridgeproxyd.snapshot import Snapshot

# --- zone ids and embedded IPv4 --------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["%1", "%0", "%2", "%251", "%eth0", "%lo"])
def test_a_zone_id_never_hides_the_unspecified_or_loopback_address(zone: str) -> None:
    policy = DestinationPolicy()
    assert policy.is_blocked("::" + zone)
    assert policy.is_blocked("::1" + zone)
    assert policy.is_blocked("fe80::1" + zone)


def test_normalize_address_removes_the_zone_and_unwraps_ipv4_mapped() -> None:
    assert normalize_address(ipaddress.IPv6Address("::%1")) == ipaddress.IPv6Address("::")
    assert normalize_address(ipaddress.IPv6Address("::ffff:7f00:1")) == ipaddress.IPv4Address(
        "127.0.0.1"
    )
    assert normalize_address(ipaddress.IPv6Address("::ffff:10.0.0.1%3")) == ipaddress.IPv4Address(
        "10.0.0.1"
    )


@pytest.mark.parametrize(
    "address",
    [
        "::",  # unspecified, dialled as loopback
        "0.0.0.0",
        "0.1.2.3",
        "::127.0.0.1",  # IPv4-compatible
        "::8.8.8.8",  # IPv4-compatible, even of a public address: deprecated, never legitimate
        "::ffff:0:127.0.0.1",  # SIIT
        "::ffff:0.0.0.0",
        "::ffff:169.254.169.254",
        "64:ff9b::8.8.8.8",  # NAT64 translates to whatever it carries: the whole prefix
        "64:ff9b:1::a00:1",
        "2002:7f00:1::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo
        "2001:db8::1",
        "100::1",
        "fec0::1",
        "ff02::1",
        "224.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "192.88.99.1",
    ],
)
def test_reserved_and_embedding_ranges_are_blocked(address: str) -> None:
    assert DestinationPolicy().is_blocked(address)


@pytest.mark.parametrize("address", ["not an address", "", "127.1", "[::1]x", "1.2.3.4%1"])
def test_anything_that_is_not_a_numeric_address_is_blocked(address: str) -> None:
    """is_blocked judges resolved addresses; anything else fails closed."""
    assert DestinationPolicy().is_blocked(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.4.4", "9.9.9.9"])
def test_public_addresses_are_not_blocked(address: str) -> None:
    assert not DestinationPolicy().is_blocked(address)


def test_allowed_private_cidrs_cover_zoned_and_mapped_forms() -> None:
    policy = DestinationPolicy(parse_cidrs(["127.0.0.0/8", "fe80::/10"]))
    assert not policy.is_blocked("::ffff:127.0.0.1")
    assert not policy.is_blocked("fe80::1%2")
    assert policy.is_blocked("::")  # not covered: :: is not in 127.0.0.0/8
    assert policy.is_blocked("::127.0.0.1")  # IPv4-compatible is IPv6, not covered


# --- what getaddrinfo makes of each spelling ---------------------------------------------------------


def _resolved(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(dial_address(info[4]) for info in infos))


@pytest.mark.parametrize(
    "host",
    ["127.1", "127.0.1", "0x7f.1", "0x7f000001", "2130706433", "0177.0.0.1", "017700000001", "0"],
)
def test_shortened_and_numeric_ipv4_spellings_resolve_to_a_blocked_address(host: str) -> None:
    """The resolver accepts inet_aton's forms; the check judges what it returns."""
    verdict = DestinationPolicy().judge(_resolved(host))
    assert verdict.dial is None and verdict.blocked is not None


def test_a_zone_id_survives_resolution_for_the_dial() -> None:
    assert _resolved("::%1") == ["::%1"]
    assert dial_address(("fe80::1", 443, 0, 2)) == "fe80::1%2"
    assert dial_address(("10.0.0.1", 443)) == "10.0.0.1"
    assert dial_address(("2606:4700::1111", 443, 0, 0)) == "2606:4700::1111"


def test_judge_refuses_when_any_address_is_blocked_and_pins_ipv4_first() -> None:
    policy = DestinationPolicy()
    assert policy.judge(["8.8.8.8", "10.0.0.1"]) == Verdict(None, "10.0.0.1")
    assert policy.judge(["2606:4700::1111", "1.1.1.1"]) == Verdict("1.1.1.1")
    assert policy.judge([]) == Verdict(None)


def test_literal_ip_accepts_brackets_and_zones_but_not_resolver_forms() -> None:
    assert literal_ip("[::1]") == ipaddress.IPv6Address("::1")
    assert literal_ip("fe80::1%eth0") is not None
    assert literal_ip("127.1") is None
    assert literal_ip("example.com") is None


# --- CR, LF and NUL in request heads -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        [(b"x-note", b"a\rb")],
        [(b"x-note", b"a\nb")],
        [(b"x-note", b"a\x00b")],
        [(b"x-note", b"a\r\n b")],  # obs-fold as mitmproxy joins it
        [(b"x\x00note", b"a")],
        [(b"host", b"example.com"), (b"x\rnote", b"a")],
    ],
)
def test_control_characters_in_a_field_are_found(fields: list[tuple[bytes, bytes]]) -> None:
    name = invalid_field(fields)
    assert name is not None
    assert "\r" not in name and "\n" not in name and "\x00" not in name  # safe for a log line


def test_a_clean_head_passes_and_the_value_is_never_returned() -> None:
    assert invalid_field([(b"host", b"example.com"), (b"x-note", b"a\tb c")]) is None
    assert invalid_field([(b"authorization", b"Bearer sk-secret\x00")]) == "authorization"


def test_control_characters_in_the_request_line_are_found() -> None:
    assert invalid_target(b"GET", b"/v1/models\r\nX: y", b"", "api.openai.com")
    assert invalid_target(b"GET", b"/", b"", "api.openai.com\x00.evil")
    assert not invalid_target(b"GET", b"/v1/models?q=a%0d%0a", b"api.openai.com", "api.openai.com")


@pytest.mark.parametrize(
    "host",
    ["api.openai.com", "API.OpenAI.com.", "\uff41\uff50\uff49.openai.com", "api.openai.com."],
)
def test_provider_host_spellings_the_resolver_dials_alike_are_one_host(host: str) -> None:
    """Full-width letters (U+FF41 ...) map to ASCII under IDNA nameprep, as in the resolver."""
    assert canonical_host(host) == "api.openai.com"


def test_a_look_alike_in_another_script_is_another_host() -> None:
    assert canonical_host("\u0430pi.openai.com") != "api.openai.com"  # Cyrillic a


def test_every_blocked_range_is_blocked_at_both_ends_in_every_notation() -> None:
    """The class, not just the examples: each range's first and last address, plain, with a zone
    id (IPv6), and IPv4-mapped (IPv4), and the public neighbours of 127.0.0.0/8 are not."""
    policy = DestinationPolicy()
    for network in BLOCKED_NETWORKS:
        for ip in (network.network_address, network.broadcast_address):
            assert policy.is_blocked(str(ip)), ip
            if ip.version == 4:
                assert policy.is_blocked(f"::ffff:{ip}"), ip
                assert policy.is_blocked(f"::ffff:{ip}%7"), ip
            else:
                assert policy.is_blocked(f"{ip}%1"), ip
                assert policy.is_blocked(f"{ip}%251"), ip
    assert not policy.is_blocked("126.255.255.255")
    assert not policy.is_blocked("128.0.0.0")


# --- the check made just before a dial ----------------------------------------------------------


async def test_a_dial_check_pins_a_public_address_and_refuses_a_private_one() -> None:
    policy, snapshot = DestinationPolicy(), Snapshot()
    assert await check_dial(snapshot, policy, "8.8.8.8", 443, for_provider=False) == DialCheck(
        dial="8.8.8.8"
    )
    assert await check_dial(snapshot, policy, "127.0.0.1", 443, for_provider=False) == DialCheck(
        refusal=DestinationRefusal.BLOCKED, blocked="127.0.0.1"
    )
    unparseable = await check_dial(snapshot, policy, "bad\x00host", 443, for_provider=False)
    assert unparseable == DialCheck(refusal=DestinationRefusal.UNRESOLVED)


async def test_a_providers_upstream_is_exempt_only_when_dialled_for_the_provider() -> None:
    policy = DestinationPolicy()
    snapshot = Snapshot(upstream_addresses=frozenset({("127.0.0.1", 8443)}))
    assert await check_dial(snapshot, policy, "127.0.0.1.", 8443, for_provider=True) == DialCheck()
    refused = await check_dial(snapshot, policy, "127.0.0.1", 8443, for_provider=False)
    assert refused.refusal is DestinationRefusal.BLOCKED
