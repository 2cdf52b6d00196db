"""Policy counters (docs/policies.md#enforcement): what each user spent and sent, kept in memory
per replica so that no database query sits on a request's path, and reconciled with the shared
``policy_counters`` table by ``PolicySync`` about every second.

Counters are keyed ``(user, scope, period key)``: scope ``*`` counts all of a user's traffic, a
provider name only that provider's; period keys are ``policy.period_key``'s. rpm and tpm use
**fixed UTC-minute windows**: a request counts in the minute it was admitted, a response's
tokens in the minute it ended; a window frees at the next minute, which is what ``Retry-After``
says. Budgets count cost (``cost_micros``) and tokens per UTC calendar day, ISO week and month,
after each response; a new period starts from zero.

A limit in force is checked against ``global total + local delta``: the total is what every
replica had counted at the last reconciliation, the delta what this replica counted since.
Reconciling adds the deltas atomically (``Store.add_policy_counts``, an upsert with
``RETURNING``) and adopts the totals the store holds, so another replica's traffic is seen
within one reconciliation interval. ``max_parallel`` is per replica (a request's slot is held
in this process's memory; a crashed replica must never hold slots for ever).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aibridgeproxyd.metrics import POLICY_REASONS, Metrics
from aibridgeproxyd.periodic import PeriodicTask
from aibridgeproxyd.policy import (
    EVERYONE,
    MICROS_PER_USD,
    PERIODS,
    WINDOWS,
    Budget,
    EffectivePolicy,
    PolicyIndex,
    ScopeLimits,
    model_allowed,
    period_end,
    period_key,
    period_start,
    resolve,
    scope_json,
)
from aibridgeproxyd.store import CounterDelta, CounterRow, Store
from aibridgeproxyd.usage import Usage

log = logging.getLogger("aibridgeproxyd.policy")

# How often each replica reconciles its counters with the store (PolicySync) while policies are
# in force or counts are pending; otherwise every IDLE_SYNC_SECONDS (an idle daemon's wake-ups
# cost CPU), and at once when a reload may have brought policies (``PolicySync.wake``).
SYNC_SECONDS = 1.0
IDLE_SYNC_SECONDS = 10.0
# How often expired shared counters are deleted.
PURGE_SECONDS = 300.0
# Shared counters outlive their period by this much before the purge deletes them, so a
# replica that was briefly behind still adds to (not re-creates) a just-ended period's row.
EXPIRY_GRACE = timedelta(days=1)
# The refusal codes, which are also the ``reason`` label of policy_refusals_total.
REASONS = POLICY_REASONS

# The user label of requests without a proxy token in policy_budget_used_ratio.
ANONYMOUS_LABEL = "-"

Clock = Callable[[], datetime]
CounterKey = tuple[str, str, str]


def utc_now() -> datetime:
    """The default clock: the current time, UTC."""
    return datetime.now(UTC)


def tokens_of(usage: Usage) -> int:
    """Every token a response counted: input, output (reasoning included), cache reads and
    cache writes. Unreported counts are 0."""
    return sum(usage.tokens_by_type().get(kind, 0) for kind in _COUNTED_TOKEN_TYPES)


# Reasoning tokens are part of output tokens (aibridgeproxyd.usage), so not counted again.
_COUNTED_TOKEN_TYPES = ("input", "output", "cache_read", "cache_creation")


@dataclass(frozen=True)
class PolicyRefusal:
    """Why a request is refused: ``status`` 403 or 429, ``code`` (one of ``REASONS``),
    ``message`` for people, ``retry_after`` in whole seconds (429 only)."""

    status: int
    code: str
    message: str
    retry_after: int | None = None


@dataclass
class _Counts:
    requests: int = 0
    tokens: int = 0
    cost_micros: int = 0

    def add(self, requests: int, tokens: int, cost_micros: int) -> None:
        self.requests += requests
        self.tokens += tokens
        self.cost_micros += cost_micros

    @property
    def zero(self) -> bool:
        return not (self.requests or self.tokens or self.cost_micros)


class Admission:
    """An admitted request's hold on ``max_parallel`` slots; ``release`` gives them back (once,
    however often it is called)."""

    def __init__(self, counters: PolicyCounters, slots: tuple[tuple[str, str], ...]) -> None:
        self._counters = counters
        self._slots = slots

    def release(self) -> None:
        slots, self._slots = self._slots, ()
        for slot in slots:
            self._counters.release_slot(slot)


class PolicyCounters:
    """One replica's counters: ``admit`` decides a request, ``record`` counts a response,
    ``PolicySync`` reconciles with the store. ``clock`` gives the current UTC time (a test
    moves it across minutes and periods)."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self.clock = clock
        # Totals of every replica as of the last reconciliation.
        self._totals: dict[CounterKey, _Counts] = {}
        # Counted here since: added to the store by the next reconciliation.
        self._pending: dict[CounterKey, _Counts] = {}
        # (user, scope) -> requests in flight on this replica.
        self._parallel: dict[tuple[str, str], int] = {}
        # The period keys of the current second: every window starts on a whole second, and
        # formatting them is most of a check's cost.
        self._keys_second: int | None = None
        self._keys: dict[str, str] = {}

    def keys(self, now: datetime) -> Mapping[str, str]:
        """``{window: period key}`` of every window (``policy.WINDOWS``) containing ``now``."""
        second = math.floor(now.timestamp())
        if second != self._keys_second:
            self._keys = {window: period_key(window, now) for window in WINDOWS}
            self._keys_second = second
        return self._keys

    # --- reads ---------------------------------------------------------------------------

    def counts(self, user: str, scope: str, key: str) -> tuple[int, int, int]:
        """``(requests, tokens, cost_micros)`` of a counter as this replica sees it now."""
        total = self._totals.get((user, scope, key))
        pending = self._pending.get((user, scope, key))
        return (
            (total.requests if total else 0) + (pending.requests if pending else 0),
            (total.tokens if total else 0) + (pending.tokens if pending else 0),
            (total.cost_micros if total else 0) + (pending.cost_micros if pending else 0),
        )

    def in_flight(self, user: str, scope: str) -> int:
        return self._parallel.get((user, scope), 0)

    # --- the request path ----------------------------------------------------------------

    def admit(
        self, effective: EffectivePolicy, model: str | None, needs_model: bool
    ) -> Admission | PolicyRefusal:
        """Check every limit of ``effective`` for one request asking for ``model`` (None: not
        known; refused by an allow-list only when ``needs_model``) and, when it passes, count
        it (rpm) and take its ``max_parallel`` slots. Checked in this order: models (403),
        budget (403), max_parallel, rpm, tpm (429)."""
        scopes = effective.scopes
        if not scopes:
            return Admission(self, ())  # no policy applies: nothing to count
        now = self.clock()
        if not _model_passes(scopes, model, needs_model):
            return model_refusal(model)
        for scope in scopes:
            if refusal := self._check_scope(effective.user, scope, now):
                return refusal
        minute = self.keys(now)["minute"]
        for scope in scopes:
            self._add((effective.user, _scope_name(scope), minute), 1, 0, 0)
        slots = tuple(
            (effective.user, _scope_name(s)) for s in scopes if s.max_parallel is not None
        )
        for slot in slots:
            self._parallel[slot] = self._parallel.get(slot, 0) + 1
        return Admission(self, slots)

    def _check_scope(self, user: str, scope: ScopeLimits, now: datetime) -> PolicyRefusal | None:
        name = _scope_name(scope)
        if scope.budget is not None:
            budget = scope.budget
            _, tokens, cost = self.counts(user, name, self.keys(now)[budget.period])
            if (budget.max_cost_micros is not None and cost >= budget.max_cost_micros) or (
                budget.max_tokens is not None and tokens >= budget.max_tokens
            ):
                return _budget_refusal(scope, period_end(budget.period, now))
        if scope.max_parallel is not None and self.in_flight(user, name) >= scope.max_parallel:
            return _rate_refusal("max_parallel_exceeded", scope, scope.max_parallel, 1)
        return self._check_minute(user, scope, now)

    def _check_minute(self, user: str, scope: ScopeLimits, now: datetime) -> PolicyRefusal | None:
        if scope.rpm is None and scope.tpm is None:
            return None
        requests, tokens, _ = self.counts(user, _scope_name(scope), self.keys(now)["minute"])
        if scope.rpm is not None and requests >= scope.rpm:
            return _rate_refusal("rpm_exceeded", scope, scope.rpm, _rest_of_minute(now))
        if scope.tpm is not None and tokens >= scope.tpm:
            return _rate_refusal("tpm_exceeded", scope, scope.tpm, _rest_of_minute(now))
        return None

    def record(self, effective: EffectivePolicy, tokens: int, cost_micros: int) -> None:
        """Count a finished response's ``tokens`` and cost (millionths of a USD) in every scope
        of ``effective``: this minute (tpm) and this day, week and month (budgets)."""
        if not (tokens or cost_micros) or not effective.scopes:
            return
        keys = self.keys(self.clock())
        for scope in effective.scopes:
            counter = (effective.user, _scope_name(scope))
            self._add((*counter, keys["minute"]), 0, tokens, 0)
            for period in PERIODS:
                self._add((*counter, keys[period]), 0, tokens, cost_micros)

    def _add(self, key: CounterKey, requests: int, tokens: int, cost_micros: int) -> None:
        self._pending.setdefault(key, _Counts()).add(requests, tokens, cost_micros)

    def release_slot(self, slot: tuple[str, str]) -> None:
        """Give back one ``max_parallel`` slot of ``(user, scope)``."""
        left = self._parallel.get(slot, 0) - 1
        if left > 0:
            self._parallel[slot] = left
        else:
            self._parallel.pop(slot, None)

    # --- reconciliation (PolicySync) -----------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether anything counted here is still to be added to the store."""
        return bool(self._pending)

    def take_deltas(self) -> list[CounterDelta]:
        """The local deltas to add to the store, each with its expiry."""
        return [
            CounterDelta(*key, c.requests, c.tokens, c.cost_micros, _expiry(key[2]))
            for key, c in self._pending.items()
            if not c.zero
        ]

    def flushed(self, deltas: Iterable[CounterDelta], totals: Iterable[CounterRow]) -> None:
        """``deltas`` are in the store now, which answered ``totals``: adopt those and take the
        deltas off the local counts (what was counted meanwhile stays pending)."""
        for delta in deltas:
            key = (delta.subject, delta.scope, delta.period)
            pending = self._pending.get(key)
            if pending is not None:
                pending.add(-delta.requests, -delta.tokens, -delta.cost_micros)
                if pending.zero:
                    del self._pending[key]
        self.adopt(totals)

    def adopt(self, totals: Iterable[CounterRow]) -> None:
        """Take the store's totals as the global counts."""
        for row in totals:
            self._totals[(row.subject, row.scope, row.period)] = _Counts(
                row.requests, row.tokens, row.cost_micros
            )

    def current_periods(self) -> list[str]:
        """The period keys in force now (this minute, day, week, month): what to read back."""
        return list(self.keys(self.clock()).values())

    def budget_ratios(self, policies: PolicyIndex) -> dict[tuple[str, str], float]:
        """``(user, scope) -> share of its budget used`` this period (``used_fraction``), for
        every user and scope counted this period that a budget applies to."""
        now = self.clock()
        ratios = {}
        counted = {key[:2] for key in self._totals} | {key[:2] for key in self._pending}
        for user, scope in counted:
            provider = None if scope == EVERYONE else scope
            for limits in resolve(policies, user, provider).scopes:
                if limits.provider == provider and (budget := limits.budget) is not None:
                    _, tokens, cost = self.counts(user, scope, self.keys(now)[budget.period])
                    ratios[(user, scope)] = used_fraction(budget, cost, tokens)
        return ratios

    def forget_past(self) -> None:
        """Drop totals of periods that ended (their rows stay in the store until purged), and
        local counts of minutes that ended (no limit reads them any more), so memory holds the
        current periods only, also while the store cannot be reached. Budget deltas of an ended
        day, week or month stay until they are added: other replicas' totals need them."""
        current = set(self.current_periods())
        for key in [k for k in self._totals if k[2] not in current]:
            del self._totals[key]
        for key in [k for k in self._pending if k[2] not in current and k[2][:7] == "minute:"]:
            del self._pending[key]


def _rest_of_minute(now: datetime) -> int:
    """Whole seconds until the minute window frees (at least 1): the ``Retry-After``."""
    return max(1, math.ceil((period_end("minute", now) - now).total_seconds()))


def _scope_name(scope: ScopeLimits) -> str:
    return scope.provider or EVERYONE


def _model_passes(scopes: tuple[ScopeLimits, ...], model: str | None, needs_model: bool) -> bool:
    if model is None and not needs_model:
        return True
    return model_allowed(scopes, model)


def model_refusal(model: str | None) -> PolicyRefusal:
    """403 ``model_not_allowed`` for ``model`` (None: a model that could not be read)."""
    if model is None:
        message = "The model of this request could not be read, and a model allow-list applies."
    else:
        message = (
            f"The model '{model[:200]}' is not allowed for you by this proxy's policy; "
            "GET /api/v2/ai/policies/me/effective on the proxy's admin listener lists the "
            "models you may use."
        )
    return PolicyRefusal(403, "model_not_allowed", message)


def _where(scope: ScopeLimits) -> str:
    return f" at provider '{scope.provider}'" if scope.provider else ""


_ADJECTIVES = {"day": "daily", "week": "weekly", "month": "monthly"}


def _budget_refusal(scope: ScopeLimits, resets: datetime) -> PolicyRefusal:
    assert scope.budget is not None
    return PolicyRefusal(
        403,
        "budget_exceeded",
        f"Your {_ADJECTIVES[scope.budget.period]} budget{_where(scope)} is used up; "
        f"it resets at {resets:%Y-%m-%dT%H:%M:%SZ}.",
    )


def _rate_refusal(code: str, scope: ScopeLimits, limit: int, wait: int) -> PolicyRefusal:
    what = {
        "max_parallel_exceeded": f"{limit} request{'' if limit == 1 else 's'} at a time",
        "rpm_exceeded": f"{limit} requests per minute",
        "tpm_exceeded": f"{limit} tokens per minute",
    }[code]
    return PolicyRefusal(
        429, code, f"Rate limit of {what}{_where(scope)} reached; retry in {wait} s.", wait
    )


def _expiry(key: str) -> str:
    """When the shared counter of period ``key`` may be purged (RFC 3339 UTC)."""
    kind, _, start = key.partition(":")
    begun = datetime.fromisoformat(start if kind != "month" else f"{start}-01").replace(tzinfo=UTC)
    ends = period_end(kind, begun)  # type: ignore[arg-type]
    return f"{ends + EXPIRY_GRACE:%Y-%m-%dT%H:%M:%SZ}"


class PolicySync:
    """Reconciles ``counters`` with the store every ``interval`` seconds (``SYNC_SECONDS``)
    while policies are in force or counts are pending, else every ``IDLE_SYNC_SECONDS``: adds the
    local deltas (atomically), then reads back every replica's totals of the current periods;
    purges expired counters every ``PURGE_SECONDS``. A failed tick keeps counting locally and
    retries: the deltas stay pending. ``open_store`` opens the connection (lazily, and again
    after a failure)."""

    def __init__(
        self,
        counters: PolicyCounters,
        open_store: Callable[[], Any],
        interval: float = SYNC_SECONDS,
        *,
        policies: Callable[[], PolicyIndex] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.counters = counters
        self._open_store = open_store
        # For policy_budget_used_ratio: the policies in force, and the series set last time.
        self._policies = policies
        self._metrics = metrics
        self._reported: set[tuple[str, str]] = set()
        self._store: Store | None = None
        self._last_purge = 0.0
        self._interval = interval
        self._task = PeriodicTask(
            "policy-sync", self._next_interval, self.sync_once, log=log, tick_first=True
        )

    def _next_interval(self) -> float:
        if self._policies is None or self._policies() or self.counters.pending:
            return self._interval
        return max(self._interval, IDLE_SYNC_SECONDS)

    def start(self) -> None:
        self._task.start()

    def wake(self) -> None:
        """Reconcile now (the store's generation moved: policies may have come into force)."""
        self._task.wake()

    async def stop(self) -> None:
        """Stop ticking, add what is still pending, and close the connection."""
        await self._task.stop()
        try:
            await self.sync_once()
        except Exception as exc:
            log.warning("policy counters not saved at stop: %s", exc)
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def sync_once(self) -> None:
        """One reconciliation; none while no policy is in force and nothing is pending (an
        idle daemon without policies queries nothing)."""
        self.counters.forget_past()
        deltas = self.counters.take_deltas()
        if not deltas and self._policies is not None and not self._policies():
            self._report_budgets()
            return
        store = await self._connection()
        try:
            if deltas:
                totals = await store.add_policy_counts(deltas)
                self.counters.flushed(deltas, totals)
            self.counters.adopt(await store.read_policy_counters(self.counters.current_periods()))
            self.counters.forget_past()
            self._report_budgets()
            await self._maybe_purge(store)
        except Exception:
            self._store = None
            await store.close()
            raise

    def _report_budgets(self) -> None:
        """Set policy_budget_used_ratio for every counted user with a budget; remove the series
        of budgets gone."""
        if self._metrics is None or self._policies is None:
            return
        gauge = self._metrics.policy_budget_used_ratio
        ratios = {
            # Requests without a proxy token (auth: none) count as user "": labelled "-", which
            # no token name can be (an empty label value would drop the label).
            (user or ANONYMOUS_LABEL, scope): ratio
            for (user, scope), ratio in self.counters.budget_ratios(self._policies()).items()
        }
        for labels, ratio in ratios.items():
            gauge.labels(*labels).set(ratio)
        for labels in self._reported - ratios.keys():
            gauge.remove(*labels)
        self._reported = set(ratios)

    async def _connection(self) -> Store:
        if self._store is not None and self._store.file_state() != "same":
            store, self._store = self._store, None
            await store.close()
        if self._store is None:
            self._store = await self._open_store()
        assert self._store is not None
        return self._store

    async def _maybe_purge(self, store: Store) -> None:
        now = self.counters.clock()
        if now.timestamp() - self._last_purge < PURGE_SECONDS:
            return
        self._last_purge = now.timestamp()
        await store.purge_policy_counters(f"{now:%Y-%m-%dT%H:%M:%SZ}")


# --- reads for the API and the dashboard -----------------------------------------------------


def provider_scopes(policies: PolicyIndex, user: str) -> list[str]:
    """The providers with a policy for ``user`` or for every user, by name."""
    return sorted(
        {provider for subject, provider in policies if provider != EVERYONE}
        & {p for s, p in policies if s in (user, EVERYONE)}
    )


async def spend_report(
    store: Store, policies: PolicyIndex, user: str, now: datetime | None = None
) -> dict[str, Any]:
    """``user``'s limits in force in every scope (all providers, then each provider with a
    policy) with the spend counted against them, as the shared counters hold it (every
    replica's, up to about ``SYNC_SECONDS`` behind)::

        {"user": "alice", "scopes": [{"provider": null, "budget": {...}, "models": [...],
          "rpm": 60, "tpm": null, "max_parallel": 4, "sources": {"rpm": "default", ...},
          "spend": {"period": "day", "period_start": "2026-11-29T00:00:00Z",
                    "period_end": "2026-11-30T00:00:00Z", "cost_usd": "0.42",
                    "tokens": 1234, "fraction_used": 0.42,
                    "remaining_cost_usd": "0.58", "remaining_tokens": null}
                   (null without a budget),
          "this_minute": {"requests": 3, "tokens": 120}}, ...]}

    ``fraction_used``: the larger of cost/max_cost and tokens/max_tokens; ``remaining_*``:
    what is left of each limit (never negative), null where the budget sets none. Raises
    ``StoreError`` when the store cannot be read."""
    (report,) = await spend_reports(store, policies, [user], now)
    return report


async def spend_reports(
    store: Store, policies: PolicyIndex, users: Iterable[str], now: datetime | None = None
) -> list[dict[str, Any]]:
    """``spend_report`` of each of ``users``, in order, reading the shared counters once."""
    now = now or utc_now()
    rows = await store.read_policy_counters([period_key(p, now) for p in WINDOWS])
    counts = {(r.subject, r.scope, r.period): r for r in rows}
    return [
        {
            "user": user,
            "scopes": [
                _scope_report(scope, user, counts, now) for scope in _report_scopes(policies, user)
            ],
        }
        for user in users
    ]


def _report_scopes(policies: PolicyIndex, user: str) -> Iterator[ScopeLimits]:
    (everywhere,) = resolve(policies, user).scopes or (None,)
    if everywhere is not None:
        yield everywhere
    for provider in provider_scopes(policies, user):
        for scope in resolve(policies, user, provider).scopes:
            if scope.provider == provider:
                yield scope


def _scope_report(
    scope: ScopeLimits, user: str, counts: dict[CounterKey, CounterRow], now: datetime
) -> dict[str, Any]:
    name = _scope_name(scope)
    minute = counts.get((user, name, period_key("minute", now)))
    report = scope_json(scope)
    report["this_minute"] = {
        "requests": minute.requests if minute else 0,
        "tokens": minute.tokens if minute else 0,
    }
    report["spend"] = None
    if scope.budget is not None:
        period = scope.budget.period
        row = counts.get((user, name, period_key(period, now)))
        report["spend"] = _spend(scope, row, now)
    return report


def used_fraction(budget: Budget, cost_micros: int, tokens: int) -> float:
    """The share of ``budget`` used: the larger of cost / max cost and tokens / max tokens (a
    limit of 0 counts as used up)."""
    fractions = [
        used / limit if limit else 1.0
        for used, limit in ((cost_micros, budget.max_cost_micros), (tokens, budget.max_tokens))
        if limit is not None
    ]
    return max(fractions, default=0.0)


def _spend(scope: ScopeLimits, row: CounterRow | None, now: datetime) -> dict[str, Any]:
    budget = scope.budget
    assert budget is not None
    cost, tokens = (row.cost_micros, row.tokens) if row else (0, 0)
    return {
        "period": budget.period,
        "period_start": f"{period_start(budget.period, now):%Y-%m-%dT%H:%M:%SZ}",
        "period_end": f"{period_end(budget.period, now):%Y-%m-%dT%H:%M:%SZ}",
        "cost_usd": str(Decimal(cost) / MICROS_PER_USD),
        "tokens": tokens,
        "fraction_used": used_fraction(budget, cost, tokens),
        "remaining_cost_usd": None
        if budget.max_cost_micros is None
        else str(Decimal(max(0, budget.max_cost_micros - cost)) / MICROS_PER_USD),
        "remaining_tokens": None
        if budget.max_tokens is None
        else max(0, budget.max_tokens - tokens),
    }
