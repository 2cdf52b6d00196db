"""The cost of one interception's usage in millionths of a US dollar (docs/monitoring.md,
"Cost"), from the ``genai-prices`` package's price data (https://github.com/pydantic/genai-prices)
or an operator override.

Precedence, per model name (matched exactly): a price stored with ``aibridgeproxyd prices set``
(read by each reload into the snapshot) wins over the ``prices:`` config, which wins over
genai-prices.

Token accounting (CONTRACT 10.1): our ``input_tokens`` is fresh input only, and
``input + cache_read + cache_creation`` is the whole prompt; ``reasoning_output_tokens`` is a part
of ``output_tokens`` and never priced again. genai-prices' ``Usage.input_tokens`` is the whole
prompt, with ``cache_read_tokens``/``cache_write_tokens`` as parts of it that it prices at their
own rates where its table has them (else at the input rate); this module converts.

Pricing runs when a record is built, on the request path: lookups are cached per
(provider type, model) in a bounded map, and no failure escapes (the cost is then None).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from genai_prices import Usage as PricesUsage
from genai_prices import data_snapshot

from aibridgeproxyd.price_rates import MicroRates, fixed_micro_rates, linear_total_usd
from aibridgeproxyd.usage import Usage

log = logging.getLogger("aibridgeproxyd.pricing")

# Our provider type -> genai-prices provider ids tried in order. Bedrock and Azure list the
# same models as their vendors, so the vendor's price applies where the cloud's table has no
# entry. Gateways (vercel, openai-compat) have no table: a ``vendor/model`` ref is priced by
# its vendor's table when the vendor is a genai-prices provider (``vendor_of``).
PROVIDER_IDS: Mapping[str, tuple[str, ...]] = {
    "openai": ("openai",),
    "anthropic": ("anthropic",),
    "bedrock": ("aws", "anthropic"),
    "copilot": ("github-copilot",),
    "azure": ("azure", "openai"),
    "google": ("google",),
    "openrouter": ("openrouter",),
    "vercel": (),
    "openai-compat": (),
}
# Distinct (provider type, model) lookups kept; models are client-chosen strings, so the map
# is bounded and starts over when full.
LOOKUP_CACHE_SIZE = 1024
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class ModelPrices:
    """An operator's override: USD per million tokens. A cache rate left None is the input
    rate (what a provider without a cache price bills)."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_creation: Decimal | None = None

    def cost_usd(self, usage: Usage) -> Decimal:
        fresh, read, write, output = counts(usage)
        return (
            fresh * self.input
            + read * (self.input if self.cache_read is None else self.cache_read)
            + write * (self.input if self.cache_creation is None else self.cache_creation)
            + output * self.output
        ) / MILLION


# No model is priced above a dollar a token: a larger rate is a typo (1e19), and would make
# costs no database integer can hold.
MAX_RATE = Decimal(1_000_000)


def parse_rate(value: Any) -> Decimal:
    """A USD-per-million-tokens rate: a non-negative finite number (text allowed). ValueError
    quoting the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number of USD per million tokens, got {value!r}")
    try:
        rate = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"expected a number of USD per million tokens, got {value!r}") from None
    if not rate.is_finite() or rate < 0:
        raise ValueError(f"expected a non-negative number of USD per million tokens, got {value!r}")
    if rate > MAX_RATE:
        raise ValueError(
            f"expected at most {MAX_RATE} USD per million tokens (a dollar a token), got {value!r}"
        )
    return rate


# The stored prices (``prices set``) in force now: model -> rates, or None for a row that
# cannot be read (that model then stays unpriced rather than falling back to another price).
StoredPrices = Mapping[str, ModelPrices | None]
NO_STORED_PRICES: StoredPrices = {}


def counts(usage: Usage) -> tuple[int, int, int, int]:
    """``(fresh input, cache read, cache creation, output)``; a count not reported is 0 here,
    since only a reported usage (``Usage.reported``) is priced."""
    return (
        usage.input_tokens or 0,
        usage.cache_read_input_tokens or 0,
        usage.cache_creation_input_tokens or 0,
        usage.output_tokens or 0,
    )


def to_micros(usd: Decimal) -> int:
    return int((usd * MILLION).to_integral_value(rounding=ROUND_HALF_UP))


def genai_prices_usage(usage: Usage) -> PricesUsage:
    """Our usage in genai-prices' shape: its ``input_tokens`` includes the cached parts."""
    fresh, read, write, output = counts(usage)
    return PricesUsage(
        input_tokens=fresh + read + write,
        cache_read_tokens=read,
        cache_write_tokens=write,
        output_tokens=output,
    )


# A dated snapshot's suffix: gpt-4o-2024-08-06, claude-sonnet-4-5-20250929, Vertex's @20250929.
_DATE_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8})$")


def undated(model: str) -> str:
    """The model a dated snapshot belongs to (``gpt-4o`` for ``gpt-4o-2024-08-06``), or
    ``model`` itself when it names no date."""
    return _DATE_SUFFIX.sub("", model)


def vendor_of(model: str) -> tuple[str, str] | None:
    """``("anthropic", "claude-sonnet-4-5")`` for a gateway's ``anthropic/claude-sonnet-4-5``."""
    vendor, _, name = model.partition("/")
    return (vendor.lower(), name) if name else None


class PriceTable:
    """Prices usage: the stored prices (``stored()``, model -> ``ModelPrices``), then the
    config's ``overrides``, both matched exactly, then genai-prices' data for the provider
    type's ids (``PROVIDER_IDS``). ``stored`` is called on each pricing: the daemon passes
    ``lambda: holder.current.model_prices``, so a reload's swap applies to the next record
    with no database query on the request path."""

    def __init__(
        self,
        overrides: Mapping[str, ModelPrices] | None = None,
        stored: Callable[[], StoredPrices] = lambda: NO_STORED_PRICES,
    ) -> None:
        self.overrides = dict(overrides or {})
        self.stored = stored
        self._lookups: dict[tuple[str, str], Any] = {}
        self._micros: dict[tuple[str, str], MicroRates | None] = {}
        self._failure_logged = False

    def override(self, model: str) -> tuple[str, ModelPrices | None] | None:
        """``("store", rates)`` or ``("config", rates)`` when an operator priced ``model``, or
        the model it is a dated snapshot of (``undated``: a price for ``gpt-4o`` prices the
        ``gpt-4o-2024-08-06`` that responses name); rates None: a stored row that cannot be
        read. Else None."""
        stored = self.stored()
        for name in (model, undated(model)):
            if name in stored:
                return "store", stored[name]
            if name in self.overrides:
                return "config", self.overrides[name]
        return None

    def cost_micros(self, provider_type: str, model: str | None, usage: Usage) -> int | None:
        """The cost of ``usage``, or None when nothing was reported, no price is known, or
        pricing failed (logged once per process; never raised into a hook)."""
        if not usage.reported or not model:
            return None
        try:
            return self._cost_micros(provider_type, model, usage)
        except Exception:
            if not self._failure_logged:
                self._failure_logged = True
                log.exception(
                    "pricing failed for %s model %r; cost left null", provider_type, model
                )
            return None

    def _cost_micros(self, provider_type: str, model: str, usage: Usage) -> int | None:
        override = self.override(model)
        if override is not None:
            rates = override[1]
            return None if rates is None else to_micros(rates.cost_usd(usage))
        found = self.lookup(provider_type, model)
        if found is None:
            return None
        provider, model_info = found
        # Plain per-token rates that do not change with the time: four integer products, the
        # rates worked out once per model (price_rates.MicroRates).
        fixed = self._micro_rates(provider_type, model, model_info, provider)
        if fixed is not None and (micros := fixed.micros(counts(usage))) is not None:
            return micros
        # Plain per-token rates: four products (price_rates); anything else: genai-prices' engine.
        total = linear_total_usd(model_info, provider, counts(usage))
        if total is None:
            total = model_info.calc_price(genai_prices_usage(usage), provider).total_price
        return to_micros(total)

    def _micro_rates(
        self, provider_type: str, model: str, model_info: Any, provider: Any
    ) -> MicroRates | None:
        """``price_rates.fixed_micro_rates`` of the model, cached like ``lookup``."""
        key = (provider_type, model)
        if key in self._micros:
            return self._micros[key]
        if len(self._micros) >= LOOKUP_CACHE_SIZE:
            self._micros.clear()
        found = self._micros[key] = fixed_micro_rates(model_info, provider)
        return found

    def lookup(self, provider_type: str, model: str) -> Any:
        """genai-prices' ``(Provider, ModelInfo)`` for the model, or None; cached."""
        key = (provider_type, model)
        if key in self._lookups:
            return self._lookups[key]
        if len(self._lookups) >= LOOKUP_CACHE_SIZE:
            self._lookups.clear()
        found = self._lookups[key] = find_model(provider_type, model)
        return found

    def has_price(self, provider_type: str, model: str) -> bool:
        override = self.override(model)
        if override is not None:
            return override[1] is not None
        return self.lookup(provider_type, model) is not None


def find_model(provider_type: str, model: str) -> Any:
    """Search genai-prices' bundled snapshot directly by provider (its own
    ``find_provider_model`` caches every distinct ref without bound)."""
    snapshot = data_snapshot.get_snapshot()
    candidates = [(provider_id, model) for provider_id in PROVIDER_IDS.get(provider_type, ())]
    if not candidates and (vendor := vendor_of(model)) is not None:
        candidates = [vendor]
    by_id = {provider.id: provider for provider in snapshot.providers}
    for provider_id, ref in candidates:
        provider = by_id.get(provider_id)
        if provider is None:
            continue
        model_info = provider.find_model(ref, all_providers=snapshot.providers)
        if model_info is not None:
            return provider, model_info
    return None


RATE_NAMES = ("input", "output", "cache_read", "cache_creation")


def override_rates(prices: ModelPrices | None) -> dict[str, str | None]:
    """An override's rates as text (USD per million tokens), for ``prices list``; all None for
    a stored row that cannot be read."""
    if prices is None:
        return dict.fromkeys(RATE_NAMES)
    rates = (prices.input, prices.output, prices.cache_read, prices.cache_creation)
    return {
        name: None if rate is None else str(rate)
        for name, rate in zip(RATE_NAMES, rates, strict=True)
    }


def _base_rate(value: Any) -> str | None:
    """A genai-prices rate as text; a tiered one by its base (below the first tier)."""
    return None if value is None else str(getattr(value, "base", value))


def price_source(table: PriceTable, provider_type: str, model: str) -> dict[str, Any] | None:
    """Where ``model`` of ``provider_type`` gets its price and the rates (USD per million
    tokens; a tiered genai-prices rate by its base), for ``prices show``; None when unpriced
    (including a stored row that cannot be read: that model's cost stays null)."""
    override = table.override(model)
    if override is not None:
        source, override_prices = override
        if override_prices is None:
            return None
        return {"source": source, **_effective(override_rates(override_prices))}
    found = table.lookup(provider_type, model)
    if found is None:
        return None
    provider, model_info = found
    prices = model_info.get_prices(datetime.now(UTC))
    rates = (prices.input_mtok, prices.output_mtok, prices.cache_read_mtok, prices.cache_write_mtok)
    return {
        "source": f"genai-prices {provider.id}/{model_info.id}",
        **_effective(
            {name: _base_rate(rate) for name, rate in zip(RATE_NAMES, rates, strict=True)}
        ),
    }


def _effective(rates: dict[str, str | None]) -> dict[str, str | None]:
    """The rates a record is priced at: a cache rate left out is the input rate."""
    return {name: rate if rate is not None else rates["input"] for name, rate in rates.items()}
