"""Which hosts an unreadable provider row closes (snapshot.closed_hosts)."""

from __future__ import annotations

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.model import ProviderRecord, Status
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.snapshot import build_snapshot

BROKEN = "malformed row: keys is not valid JSON (Expecting value, character 0)"


def snapshot_of(*records: ProviderRecord):  # type: ignore[no-untyped-def]
    return build_snapshot(evaluate_providers(records), [])


def test_a_malformed_row_closes_its_readable_hosts_in_every_spelling() -> None:
    snapshot = snapshot_of(
        ProviderRecord("openai", "openai", hosts=("api.openai.com", "localhost"), problem=BROKEN)
    )
    for host in ("api.openai.com", "API.OPENAI.COM.", "localhost"):
        assert snapshot.closed_provider_for_host(host) == "openai"
        assert snapshot.provider_for_host(host) is None
    assert snapshot.closed_provider_for_host("example.com") is None


def test_without_readable_hosts_the_type_defaults_or_the_base_url_host_are_closed() -> None:
    snapshot = snapshot_of(
        ProviderRecord("openai", "openai", problem=BROKEN),
        ProviderRecord(
            "local", "openai-compat", base_url="https://llm.internal:8000/v1", problem=BROKEN
        ),
    )
    assert snapshot.closed_hosts == {"api.openai.com": "openai", "llm.internal": "local"}


def test_an_unknown_type_closes_every_default_host_no_healthy_provider_claims() -> None:
    snapshot = snapshot_of(
        ProviderRecord("anthropic", "anthropic"),
        ProviderRecord("mystery", "42", base_url="https://gw.example/v1", problem=BROKEN),
    )
    defaults = {host for adapter in ADAPTERS.values() for host in adapter.default_hosts}
    assert set(snapshot.closed_hosts) == (defaults - {"api.anthropic.com"}) | {"gw.example"}
    assert snapshot.provider_for_host("api.anthropic.com") is not None


def test_a_sound_enabled_row_with_an_unknown_type_or_bad_base_url_closes_its_hosts() -> None:
    providers = evaluate_providers(
        [
            ProviderRecord("future", "type-from-a-newer-version", hosts=("new.example",)),
            ProviderRecord("badurl", "openai", base_url="ftp://x", hosts=("y.example",)),
            ProviderRecord("off", "nosuchtype", hosts=("off.example",), enabled=False),
        ]
    )
    assert all(p.status is Status.ERROR for p in providers)
    snapshot = build_snapshot(providers, [])
    assert snapshot.closed_hosts == {"new.example": "future", "y.example": "badurl"}


def test_other_errors_close_nothing() -> None:
    """No keys with BYOK off, a duplicate host: tunneled like disabled
    (docs/providers.md#statuses)."""
    providers = evaluate_providers(
        [
            ProviderRecord("a-first", "openai", keys=("k",)),
            ProviderRecord("b-second", "openai", hosts=("api.openai.com",)),
            ProviderRecord("nokeys", "anthropic", allow_byok=False),
        ]
    )
    assert [p.status for p in providers] == [Status.ENABLED, Status.ERROR, Status.ERROR]
    assert build_snapshot(providers, []).closed_hosts == {}


def test_a_healthy_claim_wins_over_a_closed_host() -> None:
    snapshot = snapshot_of(
        ProviderRecord("a-good", "openai", keys=("k",)),
        ProviderRecord("b-broken", "openai", hosts=("api.openai.com",), problem=BROKEN),
    )
    assert snapshot.provider_for_host("api.openai.com") is not None
    assert snapshot.closed_hosts == {}
