"""The linear fast path of genai-prices' pricing (``aibridgeproxyd.price_rates``) gives exactly
what genai-prices' own ``ModelInfo.calc_price`` gives, for every model in its bundled snapshot,
and leaves to it what it cannot price linearly."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import data_snapshot
from genai_prices.types import TieredPrices

from aibridgeproxyd import price_rates
from aibridgeproxyd.price_rates import (
    LinearRates,
    MicroRates,
    fixed_micro_rates,
    linear_total_usd,
)
from aibridgeproxyd.pricing import PriceTable, genai_prices_usage, to_micros
from aibridgeproxyd.usage import Usage

# (fresh input, cache read, cache write, output): none, each kind alone, agent-sized mixes.
USAGES = [
    (0, 0, 0, 0),
    (1, 0, 0, 0),
    (0, 0, 0, 1),
    (12, 0, 0, 7),
    (1_843, 31_337, 0, 412),
    (98_765, 0, 4_321, 1_234),
    (250_000, 40_000, 10_000, 8_000),
]


def _usage(counts: tuple[int, int, int, int]) -> Usage:
    fresh, read, write, output = counts
    return Usage(
        input_tokens=fresh,
        cache_read_input_tokens=read,
        cache_creation_input_tokens=write,
        output_tokens=output,
    )


def _calc_price(model: object, provider: object, counts: tuple[int, int, int, int]) -> Decimal:
    usage = genai_prices_usage(_usage(counts))
    return model.calc_price(usage, provider).total_price  # type: ignore[attr-defined,no-any-return]


def test_every_linear_price_in_the_snapshot_equals_genai_prices_own_calculation() -> None:
    linear = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            for index, counts in enumerate(USAGES):
                if (zlib.crc32(model.id.encode()) + index) % 3:  # a third of them per model
                    continue
                fast = linear_total_usd(model, provider, counts)
                if fast is None:
                    continue
                linear += 1
                assert fast == _calc_price(model, provider, counts), (provider.id, model.id)
                assert to_micros(fast) == to_micros(_calc_price(model, provider, counts))
    assert linear > 1000  # most price sets are plain per-token rates


def test_a_tiered_price_is_left_to_genai_prices() -> None:
    table = PriceTable()
    provider, model = table.lookup("anthropic", "claude-sonnet-4-5")
    prices = model.get_prices(datetime.now(tz=UTC))
    assert any(isinstance(value, TieredPrices) for value in vars(prices).values())
    assert linear_total_usd(model, provider, (300_000, 0, 0, 10)) is None
    # ...and PriceTable still prices it, above the tier's threshold too.
    usage = _usage((300_000, 0, 0, 10))
    expected = to_micros(_calc_price(model, provider, (300_000, 0, 0, 10)))
    assert table.cost_micros("anthropic", "claude-sonnet-4-5", usage) == expected


def test_a_negative_count_is_left_to_genai_prices_which_refuses_it() -> None:
    provider, model = PriceTable().lookup("openai", "gpt-4o-mini")
    assert linear_total_usd(model, provider, (-5, 0, 0, 3)) is None
    assert PriceTable().cost_micros("openai", "gpt-4o-mini", _usage((-5, 0, 0, 3))) is None


def test_price_table_costs_are_unchanged_for_a_plain_model() -> None:
    table = PriceTable()
    provider, model = table.lookup("openai", "gpt-4o-mini")
    for counts in USAGES:
        expected = to_micros(_calc_price(model, provider, counts))
        cost = table.cost_micros("openai", "gpt-4o-mini", _usage(counts))
        assert cost == expected
        assert linear_total_usd(model, provider, counts) is not None


def test_the_rates_are_worked_out_once_per_price_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(price_rates, "_rates", {})
    provider, model = PriceTable().lookup("openai", "gpt-4o")
    calls = 0
    real = type(model).calc_price

    def counting(self: object, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(model), "calc_price", counting)
    first = linear_total_usd(model, provider, (100, 0, 0, 10))
    worked_out = calls
    for fresh in range(50):
        assert linear_total_usd(model, provider, (fresh, 0, 0, 10)) is not None
    assert calls == worked_out and first is not None


def test_integer_rates_give_genai_prices_own_micros_for_every_fixed_price() -> None:
    fixed = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            rates = fixed_micro_rates(model, provider)
            if rates is None:
                continue
            fixed += 1
            for index, counts in enumerate(USAGES):
                if (zlib.crc32(model.id.encode()) + index) % 3:  # a third of them per model
                    continue
                expected = to_micros(_calc_price(model, provider, counts))
                assert rates.micros(counts) == expected, (provider.id, model.id, counts)
    assert fixed > 1000


def test_integer_rates_round_half_up_and_leave_what_they_cannot_hold_exactly() -> None:
    rates = MicroRates.of(
        LinearRates(Decimal(0), Decimal("0.0000025"), Decimal(0), Decimal(0), Decimal(0))
    )
    assert rates is not None and rates.scale == 10
    assert [rates.micros((n, 0, 0, 0)) for n in (1, 2, 3)] == [3, 5, 8]  # 2.5, 5.0, 7.5
    assert rates.micros((10**12, 0, 0, 0)) is None  # past what is known exact
    assert rates.micros((-1, 0, 0, 0)) is None
    negative = LinearRates(Decimal(0), Decimal("-0.000001"), Decimal(0), Decimal(0), Decimal(0))
    assert MicroRates.of(negative) is None
    assert MicroRates.of(LinearRates(*[Decimal("1e-20")] * 5)) is None  # 10**14 per micro


def test_a_price_that_changes_with_the_time_gets_no_integer_rates() -> None:
    conditional = [
        (provider, model)
        for provider in data_snapshot.get_snapshot().providers
        for model in provider.models
        if isinstance(model.prices, list)
    ]
    assert conditional  # off-peak and dated prices exist in the snapshot
    provider, model = conditional[0]
    assert fixed_micro_rates(model, provider) is None
