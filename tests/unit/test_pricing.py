"""Cost of reported usage (aibridgeproxyd.pricing): genai-prices' data by provider type and
model, operator overrides, and null (never 0, never an exception) where no price is known."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import data_snapshot

from aibridgeproxyd import pricing
from aibridgeproxyd.pricing import ModelPrices, PriceTable
from aibridgeproxyd.usage import Usage


def table_rates(
    provider_id: str, model: str
) -> tuple[Decimal, Decimal, Decimal | None, Decimal | None]:
    """(input, output, cache read, cache write) per million tokens, from genai-prices itself."""
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == provider_id)
    found = provider.find_model(model)
    assert found is not None
    prices = found.get_prices(datetime.now(tz=UTC))

    def flat(value: object) -> Decimal | None:
        # Tiered prices: the base rate applies below the first tier (short prompts here).
        return None if value is None else Decimal(str(getattr(value, "base", value)))

    rates = (prices.input_mtok, prices.output_mtok, prices.cache_read_mtok, prices.cache_write_mtok)
    input_rate, output_rate, read, write = (flat(rate) for rate in rates)
    assert input_rate is not None and output_rate is not None
    return input_rate, output_rate, read, write


def micros(usd_times_million: Decimal) -> int:
    """USD-per-million rate times tokens is already micro-dollars."""
    return int(usd_times_million.quantize(Decimal(1), rounding="ROUND_HALF_UP"))


def test_a_known_openai_model_is_priced_from_the_genai_prices_table() -> None:
    input_rate, output_rate, _, _ = table_rates("openai", "gpt-4o-mini")
    usage = Usage(input_tokens=1000, output_tokens=500, model="gpt-4o-mini")
    expected = micros(1000 * input_rate + 500 * output_rate)
    assert expected > 0
    assert PriceTable().cost_micros("openai", "gpt-4o-mini", usage) == expected


def test_cache_reads_and_writes_are_priced_at_their_own_rates() -> None:
    input_rate, output_rate, read, write = table_rates("anthropic", "claude-sonnet-4-5")
    assert read is not None and write is not None and read < input_rate < write
    usage = Usage(
        input_tokens=25, output_tokens=415, cache_read_input_tokens=21034,
        cache_creation_input_tokens=1190,
    )  # fmt: skip
    expected = micros(25 * input_rate + 21034 * read + 1190 * write + 415 * output_rate)
    assert PriceTable().cost_micros("anthropic", "claude-sonnet-4-5", usage) == expected


def test_reasoning_tokens_are_not_priced_twice() -> None:
    # reasoning_output_tokens is a part of output_tokens (CONTRACT 10.1).
    plain = Usage(input_tokens=10, output_tokens=300)
    reasoned = Usage(input_tokens=10, output_tokens=300, reasoning_output_tokens=256)
    table = PriceTable()
    assert table.cost_micros("openai", "o3", reasoned) == table.cost_micros("openai", "o3", plain)


def test_an_override_wins_and_a_missing_cache_rate_is_the_input_rate() -> None:
    override = ModelPrices(input=Decimal(2), output=Decimal(10), cache_read=Decimal("0.5"))
    table = PriceTable({"gpt-4o-mini": override, "my-model": override})
    usage = Usage(
        input_tokens=1000, output_tokens=100, cache_read_input_tokens=4000,
        cache_creation_input_tokens=300,
    )  # fmt: skip
    # 1000*2 + 4000*0.5 + 300*2 (input rate) + 100*10 micro-dollars.
    assert table.cost_micros("openai", "gpt-4o-mini", usage) == 5600
    assert table.cost_micros("openai-compat", "my-model", usage) == 5600


def test_a_stored_price_wins_over_the_config_which_wins_over_genai_prices() -> None:
    usage = Usage(input_tokens=1000, output_tokens=100)
    stored: dict[str, ModelPrices | None] = {}
    configured = {"gpt-4o-mini": ModelPrices(input=Decimal(2), output=Decimal(10))}
    table = PriceTable(configured, stored=lambda: stored)
    genai = PriceTable().cost_micros("openai", "gpt-4o", usage)
    assert genai is not None
    # No operator price: genai-prices; a config price: the config's (1000*2 + 100*10).
    assert table.cost_micros("openai", "gpt-4o", usage) == genai
    assert table.cost_micros("openai", "gpt-4o-mini", usage) == 3000
    # A stored price replaces both, read again on each pricing (the reload swaps the mapping).
    stored["gpt-4o"] = stored["gpt-4o-mini"] = ModelPrices(input=Decimal(1), output=Decimal(3))
    assert table.cost_micros("openai", "gpt-4o", usage) == 1300
    assert table.cost_micros("openai", "gpt-4o-mini", usage) == 1300
    # The rates in force: cache rates left out are the input rate.
    assert pricing.price_source(table, "openai", "gpt-4o-mini") == {
        "source": "store", "input": "1", "output": "3", "cache_read": "1",
        "cache_creation": "1",
    }  # fmt: skip
    stored.clear()
    assert pricing.price_source(table, "openai", "gpt-4o-mini")["source"] == "config"  # type: ignore[index]


def test_an_operator_price_for_a_model_prices_its_dated_snapshots() -> None:
    # Responses name the snapshot (gpt-4o-2024-08-06) where the operator priced gpt-4o.
    configured = {"gpt-4o": ModelPrices(input=Decimal(2), output=Decimal(10))}
    stored = {"claude-sonnet-4-5": ModelPrices(input=Decimal(3), output=Decimal(15))}
    table = PriceTable(configured, stored=lambda: stored)
    usage = Usage(input_tokens=1000, output_tokens=100)
    assert table.cost_micros("openai", "gpt-4o-2024-08-06", usage) == 3000
    assert table.cost_micros("anthropic", "claude-sonnet-4-5-20250929", usage) == 4500
    assert table.cost_micros("anthropic", "claude-sonnet-4-5@20250929", usage) == 4500
    assert pricing.undated("gpt-4o-mini") == "gpt-4o-mini"
    assert pricing.undated("o3-2025-04-16") == "o3"
    # An exact price for the snapshot itself wins over the model's.
    configured["gpt-4o-2024-08-06"] = ModelPrices(input=Decimal(1), output=Decimal(1))
    table = PriceTable(configured, stored=lambda: stored)
    assert table.cost_micros("openai", "gpt-4o-2024-08-06", usage) == 1100


def test_an_unreadable_stored_price_leaves_the_model_unpriced_not_priced_elsewhere() -> None:
    configured = {"gpt-4o": ModelPrices(input=Decimal(2), output=Decimal(10))}
    table = PriceTable(configured, stored=lambda: {"gpt-4o": None})
    usage = Usage(input_tokens=1000, output_tokens=100)
    assert table.cost_micros("openai", "gpt-4o", usage) is None
    assert not table.has_price("openai", "gpt-4o")
    assert pricing.price_source(table, "openai", "gpt-4o") is None


def test_an_unknown_model_or_no_usage_leaves_the_cost_null() -> None:
    table = PriceTable()
    usage = Usage(input_tokens=10, output_tokens=5)
    assert table.cost_micros("openai", "no-such-model-xyz", usage) is None
    assert table.cost_micros("openai-compat", "llama-local", usage) is None
    assert table.cost_micros("openai", None, usage) is None
    assert table.cost_micros("openai", "gpt-4o-mini", Usage(model="gpt-4o-mini")) is None


def test_zero_reported_tokens_cost_zero_not_null() -> None:
    assert PriceTable().cost_micros("openai", "gpt-4o-mini", Usage(input_tokens=0)) == 0


def test_clouds_fall_back_to_the_vendor_table_and_gateways_use_the_vendor_prefix() -> None:
    usage = Usage(input_tokens=1000, output_tokens=100)
    table = PriceTable()
    direct = table.cost_micros("anthropic", "claude-sonnet-4-5", usage)
    assert direct is not None
    assert table.cost_micros("bedrock", "claude-sonnet-4-5", usage) == direct
    assert table.cost_micros("vercel", "anthropic/claude-sonnet-4-5", usage) == direct
    assert table.cost_micros("vercel", "claude-sonnet-4-5", usage) is None


def test_a_lookup_is_made_once_per_provider_type_and_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, str]] = []
    real = pricing.find_model

    def counting(provider_type: str, model: str) -> object:
        calls.append((provider_type, model))
        return real(provider_type, model)

    monkeypatch.setattr(pricing, "find_model", counting)
    table = PriceTable()
    usage = Usage(input_tokens=1, output_tokens=1)
    for _ in range(3):
        table.cost_micros("openai", "gpt-4o-mini", usage)
        table.cost_micros("openai", "unknown-model", usage)
    assert calls == [("openai", "gpt-4o-mini"), ("openai", "unknown-model")]


def test_the_lookup_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pricing, "LOOKUP_CACHE_SIZE", 4)
    monkeypatch.setattr(pricing, "find_model", lambda provider_type, model: None)
    table = PriceTable()
    for index in range(10):
        table.cost_micros("openai", f"client-chosen-{index}", Usage(input_tokens=1))
    assert len(table._lookups) <= 4


def test_a_pricing_failure_leaves_the_cost_null_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(provider_type: str, model: str) -> object:
        raise RuntimeError("price data unreadable")

    monkeypatch.setattr(pricing, "find_model", broken)
    table = PriceTable()
    with caplog.at_level(logging.ERROR, logger="aibridgeproxyd.pricing"):
        for model in ("a", "b", "c"):
            assert table.cost_micros("openai", model, Usage(input_tokens=1)) is None
    assert [r.message for r in caplog.records] == [
        "pricing failed for openai model 'a'; cost left null"
    ]
