"""Failed proxy authentications, per source address: a cool-down after too many, and log lines
rate-limited to one per source per interval (docs/security.md#failed-authentication).

A source that sends ``limit`` malformed or unknown credentials within ``window`` seconds is
refused for ``cooldown`` seconds (``429`` with ``Retry-After``). A missing credential does not
count: clients that wait for the ``407`` challenge before sending their token do that on every
connection. During a cool-down a token found in the snapshot still works (an O(1) lookup that
costs nothing), so a guesser behind the same NAT cannot lock colleagues out; only what would
have needed a look-up is refused.

Memory is bounded: at most ``max_sources`` addresses are tracked, the least recently failed
forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Enough for every address of a large office behind distinct IPs; each entry is ~200 bytes.
MAX_SOURCES = 10_000


@dataclass
class _Source:
    window_start: float
    failures: int = 0  # within the current window
    cooldown_until: float = 0.0
    logged_at: float | None = None
    unlogged: int = 0  # failures since the last log line


class AuthFailureTracker:
    """Counts failed authentications by source address. ``clock`` returns seconds
    (monotonic); tests pass their own."""

    def __init__(
        self,
        limit: int,
        window: float,
        cooldown: float,
        log_interval: float,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.cooldown = cooldown
        self.log_interval = log_interval
        self.max_sources = max_sources
        self.clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def cooldown_remaining(self, source: str) -> float:
        """Seconds this source is still refused for; 0 when it is not cooling down."""
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        return max(0.0, entry.cooldown_until - self.clock())

    def record_failure(self, source: str, reason: str, counts: bool = True) -> FailureNote:
        """Note one failure from ``source``. ``counts=False`` (a missing credential) is only
        logged, never held against the source."""
        now = self.clock()
        entry = self._sources.get(source)
        if entry is None:
            entry = self._sources[source] = _Source(window_start=now)
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        cooldown_started = False
        if counts:
            if now - entry.window_start >= self.window:
                entry.window_start, entry.failures = now, 0
            entry.failures += 1
            if entry.failures >= self.limit and entry.cooldown_until <= now:
                entry.cooldown_until = now + self.cooldown
                entry.window_start, entry.failures = now, 0
                cooldown_started = True
        entry.unlogged += 1
        due = entry.logged_at is None or now - entry.logged_at >= self.log_interval
        if due or cooldown_started:
            report, entry.unlogged, entry.logged_at = entry.unlogged, 0, now
            return FailureNote(report, True, cooldown_started)
        return FailureNote(entry.unlogged, False, False)


@dataclass(frozen=True)
class FailureNote:
    """What to do after a failure: when ``log`` is true, log one line saying ``failures``
    failures came from this source since its previous line. A cool-down start is always
    logged."""

    failures: int
    log: bool
    cooldown_started: bool
