"""genai-prices' price of plain token usage, without its general pricing engine on every record.

``ModelInfo.calc_price`` (genai-prices, https://github.com/pydantic/genai-prices, ``types.py``)
resolves the model's units, validates them, decomposes the usage into leaf counts and sums
``price * count / per`` in ``Decimal``: 40-75 µs per interception record, on the request path.
For a price set without tiered prices, that sum is linear in the four counts a record has
(fresh input, cache read, cache write, output; every other count, such as audio tokens or web
searches, is 0 for such a usage)::

    total = constant + fresh * a + cache_read * b + cache_write * c + output * d

This module asks genai-prices itself for the five coefficients once per price set (zero usage,
then one token of each kind), checks them against ``calc_price`` on sixteen more usages, and
from then on prices a record with four ``Decimal`` products. Every product and sum is exact
(prices have a few significant digits, counts at most a dozen, ``Decimal`` keeps 28), so the
total equals the ``Decimal`` ``calc_price`` returns. Anything else (tiered prices, whose rate
depends on the prompt's size; a price set genai-prices refuses; coefficients that do not check
out) is left to ``calc_price``: ``linear_total_usd`` returns None and the caller prices it the
general way.

Time-dependent prices (genai-prices' ``ConditionalPrice``: a start date, an off-peak window) are
still chosen per record, with ``ModelInfo.get_prices(now)``, as ``calc_price`` does; the
coefficients are kept per price set chosen. A price that does not depend on the time (most of
them) is kept once more per model as integers (``MicroRates``, ``fixed_micro_rates``): a record
then costs four integer products and no ``Decimal``, with the same micros.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from genai_prices import Usage as PricesUsage
from genai_prices.types import ModelPrice, TieredPrices

# Price sets whose coefficients are kept (genai-prices' snapshot holds about 2,600).
RATES_CACHE_SIZE = 4096
Counts = tuple[int, int, int, int]  # fresh input, cache read, cache write, output
# One token of each kind; then the usages the coefficients are checked against: every mix of
# zero and non-zero counts (genai-prices infers the counts a usage does not give, such as audio
# or 1-hour cache writes, from which of the given ones are non-zero).
_BASIS: tuple[Counts, ...] = ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1))
_CHECKS: tuple[Counts, ...] = tuple(
    (123_457 * (m & 1), 76_543 * (m >> 1 & 1), 3_456 * (m >> 2 & 1), 9_871 * (m >> 3 & 1))
    for m in range(16)
)


class LinearRates(NamedTuple):
    """USD: per record, then per token of fresh input, cache read, cache write and output."""

    constant: Decimal
    fresh: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal

    def total(self, counts: Counts) -> Decimal:
        fresh, read, write, output = counts
        return (
            self.constant
            + self.fresh * fresh
            + self.cache_read * read
            + self.cache_write * write
            + self.output * output
        )


# Counts and integer rates below these keep every product and sum of ``LinearRates.total`` (and
# of ``MicroRates.micros``) under 10**25, within ``Decimal``'s 28 digits: the two are exact, and
# so equal. Larger counts are left to ``Decimal`` (and beyond it to genai-prices).
_EXACT_COUNT = 10**12
_EXACT_RATE = 10**12


class MicroRates(NamedTuple):
    """``LinearRates`` as integers: millionths of a dollar, times ``scale`` (a power of ten),
    per record and per token of each kind. A record's cost is then integer arithmetic, the
    same micros as ``pricing.to_micros(rates.total(counts))`` (round half up)."""

    constant: int
    fresh: int
    cache_read: int
    cache_write: int
    output: int
    scale: int

    @classmethod
    def of(cls, rates: LinearRates) -> MicroRates | None:
        """The rates as integers, or None when one is negative or too long to be exact."""
        micros = [rate.scaleb(6) for rate in rates]  # exact: only the exponent moves
        places = max(0, -min(int(rate.as_tuple().exponent) for rate in micros))
        scaled = [int(rate.scaleb(places)) for rate in micros]  # whole numbers now
        if any(n < 0 or n >= _EXACT_RATE for n in scaled) or 10**places >= _EXACT_RATE:
            return None
        constant, fresh, cache_read, cache_write, output = scaled
        return cls(constant, fresh, cache_read, cache_write, output, 10**places)

    def micros(self, counts: Counts) -> int | None:
        """The cost of ``counts`` in whole micros (half up), or None when a count is negative
        or too large for the integers to be known equal to ``Decimal``'s result."""
        fresh, read, write, output = counts
        if min(counts) < 0 or max(counts) >= _EXACT_COUNT:
            return None
        total = (
            self.constant
            + self.fresh * fresh
            + self.cache_read * read
            + self.cache_write * write
            + self.output * output
        )
        return (2 * total + self.scale) // (2 * self.scale)


def fixed_micro_rates(model_info: Any, provider: Any) -> MicroRates | None:
    """The integer rates of a model whose price does not depend on the time (genai-prices'
    ``ModelInfo.prices`` a single ``ModelPrice``, no ``ConditionalPrice`` list) and is linear;
    else None (priced per record by ``linear_total_usd`` or ``calc_price``). For the caller to
    keep per model: nothing here changes while the process runs."""
    if not isinstance(model_info.prices, ModelPrice):
        return None
    now = datetime.now(tz=UTC)
    rates = _linear_rates(model_info, provider, model_info.get_prices(now), now)
    return None if rates is None else MicroRates.of(rates)


# id(price set) -> (model, provider, price set, its rates or None when not linear). The objects
# are held, so an id is never reused while its entry is here.
_rates: dict[int, tuple[Any, Any, ModelPrice, LinearRates | None]] = {}


def linear_total_usd(model_info: Any, provider: Any, counts: Counts) -> Decimal | None:
    """``model_info.calc_price(...).total_price`` for ``counts`` (fresh input, cache read, cache
    write, output; as ``pricing.counts``) when the price in force now is linear in them, else
    None: the caller then calls ``calc_price`` (also for a negative count, which genai-prices
    refuses). ``model_info``/``provider``: genai-prices' ``ModelInfo`` and ``Provider``."""
    if min(counts) < 0:
        return None
    now = datetime.now(tz=UTC)
    model_price = model_info.get_prices(now)
    entry = _rates.get(id(model_price))
    if entry is None or entry[0] is not model_info or entry[1] is not provider:
        if len(_rates) >= RATES_CACHE_SIZE:
            _rates.clear()
        rates = _linear_rates(model_info, provider, model_price, now)
        entry = _rates[id(model_price)] = (model_info, provider, model_price, rates)
    rates = entry[3]
    return None if rates is None else rates.total(counts)


def _linear_rates(
    model_info: Any, provider: Any, model_price: ModelPrice, now: datetime
) -> LinearRates | None:
    """The coefficients of ``model_price`` (the price set in force at ``now``), or None when it
    has a tiered price, genai-prices cannot price it, or the coefficients do not check out."""
    if any(isinstance(value, TieredPrices) for value in vars(model_price).values()):
        return None

    def price(counts: Counts) -> Decimal:
        usage = _prices_usage(counts)
        calculation = model_info.calc_price(usage, provider, genai_request_timestamp=now)
        return Decimal(calculation.total_price)

    try:
        constant = price((0, 0, 0, 0))
        rates = LinearRates(constant, *(price(one) - constant for one in _BASIS))
        linear = all(rates.total(check) == price(check) for check in _CHECKS)
        return rates if linear else None
    except Exception:  # left to calc_price, which raises it again per record, as before
        return None


def _prices_usage(counts: Counts) -> PricesUsage:
    """genai-prices' usage: its ``input_tokens`` includes the cached parts."""
    fresh, read, write, output = counts
    return PricesUsage(
        input_tokens=fresh + read + write,
        cache_read_tokens=read,
        cache_write_tokens=write,
        output_tokens=output,
    )
