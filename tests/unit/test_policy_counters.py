"""Policy counters with a controllable clock: fixed UTC-minute windows for rpm and tpm, budgets
that reset at UTC calendar boundaries, max_parallel slots that are released exactly once, the
order of checks, and the reconciliation of two replicas through one store (PolicySync)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.policy import EffectivePolicy, Policy, index_policies, resolve
from aibridgeproxyd.policy_counters import (
    IDLE_SYNC_SECONDS,
    Admission,
    PolicyCounters,
    PolicyRefusal,
    PolicySync,
    spend_report,
    tokens_of,
)
from aibridgeproxyd.store import Store
from aibridgeproxyd.usage import Usage


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def effective(*policies: Policy, user: str = "alice", provider: str = "openai") -> EffectivePolicy:
    return resolve(index_policies(policies), user, provider)


def admitted(counters: PolicyCounters, policy: EffectivePolicy, model: str = "gpt-4o") -> bool:
    return isinstance(counters.admit(policy, model, needs_model=True), Admission)


def refusal(counters: PolicyCounters, policy: EffectivePolicy, model: str = "gpt-4o") -> str:
    verdict = counters.admit(policy, model, needs_model=True)
    assert isinstance(verdict, PolicyRefusal), "admitted"
    return verdict.code


def test_rpm_counts_in_fixed_utc_minutes_and_retry_after_is_the_rest_of_the_minute() -> None:
    clock = Clock(datetime(2026, 11, 29, 23, 50, 15, tzinfo=UTC))
    counters, policy = PolicyCounters(clock), effective(Policy(rpm=2))
    assert admitted(counters, policy) and admitted(counters, policy)
    verdict = counters.admit(policy, "gpt-4o", needs_model=True)
    assert isinstance(verdict, PolicyRefusal)
    assert (verdict.status, verdict.code, verdict.retry_after) == (429, "rpm_exceeded", 45)
    clock.advance(seconds=44.5)
    assert refusal(counters, policy) == "rpm_exceeded"
    clock.advance(seconds=0.5)  # 23:51:00: a new window
    assert admitted(counters, policy)


def test_tpm_counts_tokens_of_finished_responses_in_the_minute_they_ended() -> None:
    clock = Clock(datetime(2026, 11, 29, 10, 0, 59, 500000, tzinfo=UTC))
    counters, policy = PolicyCounters(clock), effective(Policy(tpm=100))
    assert admitted(counters, policy)
    counters.record(policy, 100, 0)
    verdict = counters.admit(policy, "gpt-4o", needs_model=True)
    assert isinstance(verdict, PolicyRefusal) and verdict.code == "tpm_exceeded"
    assert verdict.retry_after == 1  # half a second left: never 0
    clock.advance(seconds=1)
    assert admitted(counters, policy)


@pytest.mark.parametrize(
    ("period", "start", "before_reset", "after_reset"),
    [
        ("day", datetime(2026, 11, 29, 12, tzinfo=UTC), {"hours": 11.99}, {"hours": 0.02}),
        # 2026-12-03 is a Thursday: the week resets on Monday 2026-12-07 00:00 UTC.
        ("week", datetime(2026, 12, 3, tzinfo=UTC), {"days": 3.99}, {"days": 0.02}),
        ("month", datetime(2026, 12, 31, 23, tzinfo=UTC), {"minutes": 59}, {"minutes": 2}),
    ],
)
def test_a_budget_resets_at_its_utc_calendar_boundary(
    period: str, start: datetime, before_reset: dict[str, float], after_reset: dict[str, float]
) -> None:
    clock = Clock(start)
    counters = PolicyCounters(clock)
    policy = effective(Policy(max_cost_usd=Decimal("0.5"), period=period))  # type: ignore[arg-type]
    assert admitted(counters, policy)
    counters.record(policy, 10, 500_000)  # $0.50: used up
    assert refusal(counters, policy) == "budget_exceeded"
    clock.advance(**before_reset)
    assert refusal(counters, policy) == "budget_exceeded"
    clock.advance(**after_reset)
    assert admitted(counters, policy)


def test_a_token_budget_and_the_budget_message_says_when_it_resets() -> None:
    clock = Clock(datetime(2026, 11, 29, 8, tzinfo=UTC))
    counters = PolicyCounters(clock)
    policy = effective(Policy(max_tokens=50, period="day"))
    counters.record(policy, 49, 0)
    assert admitted(counters, policy)
    counters.record(policy, 1, 0)
    verdict = counters.admit(policy, "gpt-4o", needs_model=True)
    assert isinstance(verdict, PolicyRefusal) and verdict.status == 403
    assert "resets at 2026-11-30T00:00:00Z" in verdict.message


def test_a_provider_budget_counts_only_that_providers_spend() -> None:
    counters = PolicyCounters(Clock(datetime(2026, 11, 29, tzinfo=UTC)))
    policies = (Policy(provider="openai", max_cost_usd=Decimal(1), period="day"),)
    at_openai = effective(*policies, provider="openai")
    at_anthropic = effective(*policies, provider="anthropic")
    assert at_anthropic.scopes == ()  # no policy applies there: nothing is counted
    counters.record(at_anthropic, 10, 5_000_000)
    assert admitted(counters, at_openai)
    counters.record(at_openai, 10, 1_000_000)
    assert refusal(counters, at_openai) == "budget_exceeded"


def test_max_parallel_slots_are_released_once_however_often_release_is_called() -> None:
    counters, policy = PolicyCounters(), effective(Policy(max_parallel=2))
    first = counters.admit(policy, "gpt-4o", needs_model=True)
    second = counters.admit(policy, "gpt-4o", needs_model=True)
    assert isinstance(first, Admission) and isinstance(second, Admission)
    assert refusal(counters, policy) == "max_parallel_exceeded"
    first.release()
    first.release()  # a second landing hook must not free another request's slot
    assert counters.in_flight("alice", "*") == 1
    assert admitted(counters, policy)
    assert refusal(counters, policy) == "max_parallel_exceeded"


def test_a_refused_request_takes_no_slot_and_counts_no_request() -> None:
    counters = PolicyCounters()
    policy = effective(Policy(max_parallel=1, rpm=5, models=("gpt-*",)))
    assert refusal(counters, policy, model="claude-3") == "model_not_allowed"
    assert counters.in_flight("alice", "*") == 0
    assert counters.counts("alice", "*", counters.current_periods()[0])[0] == 0


def test_checks_run_models_then_budget_then_parallel_then_rpm() -> None:
    counters = PolicyCounters()
    policy = effective(Policy(models=("gpt-*",), max_tokens=1, period="day", max_parallel=1, rpm=1))
    held = counters.admit(policy, "gpt-4o", needs_model=True)
    assert isinstance(held, Admission)
    counters.record(policy, 1, 0)
    assert refusal(counters, policy, model="claude") == "model_not_allowed"
    assert refusal(counters, policy) == "budget_exceeded"


def test_a_request_without_a_model_passes_an_allow_list_only_when_it_needs_none() -> None:
    counters, policy = PolicyCounters(), effective(Policy(models=("gpt-*",)))
    assert isinstance(counters.admit(policy, None, needs_model=False), Admission)
    verdict = counters.admit(policy, None, needs_model=True)
    assert isinstance(verdict, PolicyRefusal) and verdict.code == "model_not_allowed"


def test_no_policy_admits_without_counting() -> None:
    counters = PolicyCounters()
    assert admitted(counters, effective())
    counters.record(effective(), 100, 100)
    assert counters.take_deltas() == []


def test_tokens_of_counts_every_token_once() -> None:
    usage = Usage(
        input_tokens=10,
        output_tokens=5,
        cache_read_input_tokens=3,
        cache_creation_input_tokens=2,
        reasoning_output_tokens=4,  # part of output_tokens
    )
    assert tokens_of(usage) == 20
    assert tokens_of(Usage()) == 0


# --- two replicas through one store ----------------------------------------------------------


async def test_two_replicas_see_each_others_counts_after_reconciling(tmp_path: Path) -> None:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    clock = Clock(datetime(2026, 11, 29, 12, 0, 10, tzinfo=UTC))
    replicas = [PolicyCounters(clock), PolicyCounters(clock)]
    syncs = [PolicySync(c, lambda: Store.open(path, create=False, migrate=False)) for c in replicas]
    policy = effective(Policy(rpm=3, max_cost_usd=Decimal(1), period="day"))
    try:
        assert admitted(replicas[0], policy) and admitted(replicas[0], policy)
        replicas[0].record(policy, 10, 600_000)
        assert admitted(replicas[1], policy)  # not reconciled yet: it knows only its own
        for sync in (*syncs, *syncs):  # each adds its deltas, then each reads the other's
            await sync.sync_once()
        for replica in replicas:
            assert replica.counts("alice", "*", "minute:2026-11-29T12:00") == (3, 10, 0)
            assert replica.counts("alice", "*", "day:2026-11-29") == (0, 10, 600_000)
            assert refusal(replica, policy) == "rpm_exceeded"
        replicas[1].record(policy, 5, 400_000)
        for sync in (*syncs, *syncs):
            await sync.sync_once()
        clock.advance(minutes=1)
        assert refusal(replicas[0], policy) == "budget_exceeded"  # $0.60 + $0.40 from the other
        report = await spend_report(store, index_policies([Policy(rpm=3)]), "alice", clock())
        assert report["scopes"][0]["rpm"] == 3
    finally:
        for sync in syncs:
            await sync.stop()
        await store.close()


async def test_a_restarted_replica_adopts_the_shared_totals(tmp_path: Path) -> None:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    clock = Clock(datetime(2026, 11, 29, 12, tzinfo=UTC))
    policy = effective(Policy(max_cost_usd=Decimal(1), period="month"))
    before = PolicyCounters(clock)
    before.record(policy, 10, 1_000_000)
    await PolicySync(before, lambda: Store.open(path, create=False, migrate=False)).stop()
    after = PolicyCounters(clock)
    sync = PolicySync(after, lambda: Store.open(path, create=False, migrate=False))
    await sync.sync_once()
    assert refusal(after, policy) == "budget_exceeded"
    await sync.stop()
    await store.close()


async def test_the_budget_gauge_follows_the_budgets_in_force(tmp_path: Path) -> None:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    clock = Clock(datetime(2026, 11, 29, 12, tzinfo=UTC))
    metrics = Metrics("t_")
    policies = index_policies([Policy(max_cost_usd=Decimal(2), period="day")])
    counters = PolicyCounters(clock)
    sync = PolicySync(
        counters,
        lambda: Store.open(path, create=False, migrate=False),
        policies=lambda: policies,
        metrics=metrics,
    )
    counters.record(resolve(policies, "alice", "openai"), 10, 1_700_000)
    await sync.sync_once()
    labels = {"user": "alice", "provider": "*"}
    sample = metrics.registry.get_sample_value
    assert sample("t_policy_budget_used_ratio", labels) == pytest.approx(0.85)
    policies = index_policies([Policy(rpm=5)])  # the budget is gone: so is its series
    await sync.sync_once()
    assert sample("t_policy_budget_used_ratio", labels) is None
    await sync.stop()
    await store.close()


async def test_an_unreachable_store_keeps_enforcing_and_holds_only_current_minutes() -> None:
    clock = Clock(datetime(2026, 11, 29, 12, tzinfo=UTC))
    counters, policy = (
        PolicyCounters(clock),
        effective(Policy(rpm=100, max_tokens=1000, period="day")),
    )

    async def unreachable() -> Store:
        raise OSError("connection refused")

    sync = PolicySync(counters, unreachable)
    for _ in range(5):  # five minutes of traffic without the store
        assert admitted(counters, policy)
        counters.record(policy, 10, 0)
        with pytest.raises(OSError):
            await sync.sync_once()
        clock.advance(minutes=1)
    minutes = {d.period for d in counters.take_deltas() if d.period.startswith("minute:")}
    assert minutes == {"minute:2026-11-29T12:04"}
    assert counters.counts("alice", "*", "day:2026-11-29") == (0, 50, 0)  # kept for the store


async def test_without_policies_and_counts_the_sync_opens_nothing() -> None:
    opened: list[int] = []

    async def open_store() -> Store:
        opened.append(1)
        raise OSError("not expected")

    sync = PolicySync(PolicyCounters(), open_store, policies=dict)
    await sync.sync_once()
    await sync.stop()
    assert opened == []


def test_the_sync_ticks_slowly_only_without_policies_and_counts() -> None:
    """Every second while policies are in force or counts wait for the store; an idle daemon
    without policies every IDLE_SYNC_SECONDS."""
    policies: list[Policy] = []
    counters = PolicyCounters()
    sync = PolicySync(counters, Store.open, policies=lambda: index_policies(policies))
    assert sync._next_interval() == IDLE_SYNC_SECONDS
    policies.append(Policy(rpm=3))
    assert sync._next_interval() == 1.0
    policy = resolve(index_policies(policies), "alice", "openai")
    policies.clear()
    assert admitted(counters, policy)
    counters.record(policy, 10, 0)
    assert sync._next_interval() == 1.0  # a count still to add
    counters.take_deltas()
    assert counters.pending  # taken, not yet flushed: still owed
    assert PolicySync(counters, Store.open)._next_interval() == 1.0  # no policy source: always


async def test_a_wake_cuts_the_idle_wait_short() -> None:
    ticks: list[int] = []

    async def open_store() -> Store:
        raise OSError("not expected")

    sync = PolicySync(PolicyCounters(), open_store, policies=dict)
    original = sync.sync_once

    async def counted() -> None:
        ticks.append(1)
        await original()

    sync._task._tick = counted
    sync.start()
    await asyncio.sleep(0.05)
    assert ticks == [1]  # the first tick, then an IDLE_SYNC_SECONDS wait
    sync.wake()
    for _ in range(100):
        if len(ticks) == 2:
            break
        await asyncio.sleep(0.01)
    await sync.stop()
    assert len(ticks) == 2
