"""Key failover: keys are tried in order; a key answered with 401 or 429 cools down and the next
one is tried (docs/providers.md, "Keys, BYOK and the proxy's own errors"). State is in memory,
per provider and per key, and forgets a provider's keys when they change."""

from __future__ import annotations

import email.utils
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

# A rate-limited key rests for the upstream's Retry-After, within these bounds.
RATE_LIMIT_DEFAULT_SECONDS = 30.0
RATE_LIMIT_MIN_SECONDS = 1.0
RATE_LIMIT_MAX_SECONDS = 300.0
# A rejected key (revoked, mistyped) rests long enough not to be hammered on every request,
# short enough that a key fixed at the provider comes back without a restart.
UNAUTHORIZED_SECONDS = 300.0

FAILOVER_STATUSES = frozenset({401, 429})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    # isascii: str.isdigit() also accepts digits such as '²' that float() refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    try:
        timestamp = when.timestamp()
    except (ValueError, OverflowError):  # a date outside what the platform can represent
        return None
    return max(0.0, timestamp - (time.time() if now is None else now))


@dataclass
class _Cooldown:
    until: float
    rate_limited: bool


@dataclass(frozen=True)
class Exhausted:
    """Every key is cooling down: answer 429 with Retry-After if any was rate-limited, else 502."""

    status: int
    retry_after: int | None


class KeyPool:
    """Which central keys are cooling down, per provider and key (by fingerprint), and so which
    key a request uses next. In memory only: a restart forgets every cool-down."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._cooldowns: dict[tuple[str, str], _Cooldown] = {}

    @staticmethod
    def _slot(provider: str, key: str) -> tuple[str, str]:
        # Fingerprint, not the key: nothing secret is kept as a dict key longer than needed.
        return provider, hashlib.sha256(key.encode()).hexdigest()[:16]

    def _cooling(self, provider: str, key: str, now: float) -> _Cooldown | None:
        cooldown = self._cooldowns.get(self._slot(provider, key))
        if cooldown is not None and cooldown.until <= now:
            del self._cooldowns[self._slot(provider, key)]
            return None
        return cooldown

    def select(
        self, provider: str, keys: tuple[str, ...], tried: frozenset[int] = frozenset()
    ) -> int | None:
        """The index of the first key not tried yet and not cooling down, or None."""
        now = self.clock()
        for index, key in enumerate(keys):
            if index not in tried and self._cooling(provider, key, now) is None:
                return index
        return None

    def cool_down(self, provider: str, key: str, status: int, retry_after: float | None) -> None:
        if status == 429:
            seconds = RATE_LIMIT_DEFAULT_SECONDS if retry_after is None else retry_after
            seconds = min(max(seconds, RATE_LIMIT_MIN_SECONDS), RATE_LIMIT_MAX_SECONDS)
        else:
            seconds = UNAUTHORIZED_SECONDS
        self._cooldowns[self._slot(provider, key)] = _Cooldown(
            self.clock() + seconds, status == 429
        )

    def exhausted(
        self, provider: str, keys: tuple[str, ...], saw_rate_limit: bool = False
    ) -> Exhausted:
        """What to answer when no key is left for this request."""
        now = self.clock()
        waits = [
            c.until - now
            for key in keys
            if (c := self._cooling(provider, key, now)) and c.rate_limited
        ]
        if waits or saw_rate_limit:
            return Exhausted(
                429, max(1, int(min(waits) + 0.999)) if waits else int(RATE_LIMIT_MIN_SECONDS)
            )
        return Exhausted(502, None)
