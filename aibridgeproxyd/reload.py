"""The provider reload (docs/providers.md#reload): rebuild the snapshot on a timer, on SIGHUP and
right after management writes; swap it atomically; keep the previous one when a reload fails."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import Status
from aibridgeproxyd.periodic import PeriodicTask
from aibridgeproxyd.providers import EvaluationCache, evaluate_providers, with_last_known_hosts
from aibridgeproxyd.snapshot import EMPTY_SNAPSHOT, Snapshot, build_snapshot
from aibridgeproxyd.store import RoutingState

log = logging.getLogger("aibridgeproxyd.reload")

# Provider rows, tokens and stored model prices, read in one transaction.
RoutingSource = Callable[[], Awaitable[RoutingState]]
# Returns a value that changes whenever a management write happened (the store's generation).
ChangeProbe = Callable[[], Awaitable[int]]

# How often the change probe runs, so a CLI write applies within about this long; while the
# store pushes its changes (``pushed``: a file watch, a LISTEN connection), only every
# PUSHED_POLL_SECONDS, as a safety net: an idle daemon's wake-ups cost CPU.
CHANGE_POLL_SECONDS = 0.5
PUSHED_POLL_SECONDS = 5.0


class SnapshotHolder:
    """The live snapshot. Hooks read ``current``; only the reload assigns it. Everything runs
    on one event loop thread, so a plain attribute assignment is the atomic swap."""

    def __init__(self) -> None:
        self.current: Snapshot = EMPTY_SNAPSHOT
        self.loaded = False  # becomes True at the first successful reload


class ProviderReloader:
    """Rebuilds the snapshot from the store on its timer, on ``trigger()`` (SIGHUP, management
    writes) and when the store's generation moves; a failed reload keeps the previous snapshot."""

    def __init__(
        self,
        source: RoutingSource,
        holder: SnapshotHolder,
        metrics: Metrics,
        interval: float,
        change_probe: ChangeProbe | None = None,
        clock: Callable[[], float] = time.time,
        tracer: trace.Tracer | None = None,
        pushed: Callable[[], bool] = lambda: False,
    ) -> None:
        self.tracer = tracer or trace.NoOpTracer()
        self.source = source
        self.holder = holder
        self.metrics = metrics
        self.interval = interval
        self.change_probe = change_probe
        self.clock = clock
        self.pushed = pushed  # whether the store tells of its changes (check_now)
        self._reported: dict[str, tuple[str, str]] = {}
        # Checked every _poll_seconds() (sooner when the timer is due sooner): a reload runs
        # when the timer is due, on ``trigger()``, or when the store's generation moved.
        self._ticks = PeriodicTask(
            "provider-reload",
            lambda: min(self._poll_seconds(), max(0.0, self._next_reload - time.monotonic())),
            self._tick,
            log=log,
        )
        self._signalled = False  # trigger() was called since the last reload
        # Callers of reload_and_wait waiting for a reload that starts after their call.
        self._waiting: list[asyncio.Future[bool]] = []
        self._next_reload = 0.0  # time.monotonic() at which the timer reload is due
        self._seen_generation: int | None = None  # the generation at the last reload
        self.evaluations = EvaluationCache()
        self.last_error: str | None = None  # why the last reload failed; None after a success
        self._failing_since: float | None = None  # monotonic time of the first failed reload
        self._applied_generation: int | None = None
        # Called (no arguments) when ``applied_generation`` moves: the presence report.
        self.on_applied: Callable[[], None] | None = None

    @property
    def applied_generation(self) -> int | None:
        """The store generation the current snapshot reflects (read before the snapshot's own
        read, so the snapshot is at least that new); None until known. Reported to the CLI
        through aibridgeproxyd.presence (``on_applied``)."""
        return self._applied_generation

    @applied_generation.setter
    def applied_generation(self, generation: int | None) -> None:
        moved = generation != self._applied_generation
        self._applied_generation = generation
        if moved and self.on_applied is not None:
            self.on_applied()

    def failing_for(self) -> float:
        """Seconds since reloads began failing (the snapshot has not moved since); 0 while the
        last one succeeded."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    def _poll_seconds(self) -> float:
        return PUSHED_POLL_SECONDS if self.pushed() else CHANGE_POLL_SECONDS

    def check_now(self) -> None:
        """Run the change probe now rather than at the next poll (a store notification): it
        reloads if the generation moved."""
        self._ticks.wake()

    def trigger(self) -> None:
        """Reload now (SIGHUP, or a write made through the daemon)."""
        self._signalled = True
        self._ticks.wake()

    async def reload_and_wait(self, timeout: float) -> bool:
        """Reload now and wait, at most ``timeout`` seconds, until a reload that began after
        this call has ended: one that reads every write committed before the call (a write
        made through this daemon's API). True when it ended and succeeded; False when it
        failed or is still to come (the reload still happens); False at once while the reloader
        does not run (before ``start``, after ``stop``: the daemon starting or stopping)."""
        if not self._ticks.running:
            return False
        ended = asyncio.get_running_loop().create_future()
        self._waiting.append(ended)
        self.trigger()
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(ended)
        except TimeoutError:
            return False

    async def reload_once(self, trigger: str = "timer", *, log_failure: bool = True) -> bool:
        """Rebuild and swap the snapshot; False (and ``last_error`` set) when it failed. With
        ``log_failure=False`` the caller reports the failure itself (the daemon's start)."""
        with self.tracer.start_as_current_span("ProvidersReload") as span:
            span.set_attribute("aibridgeproxyd.reload.trigger", trigger)
            ok = await self._reload(span, log_failure)
            return ok

    async def _reload(self, span: trace.Span, log_failure: bool = True) -> bool:
        started = self.clock()
        self.metrics.last_reload.set(started)
        try:
            # Rebuilt as a RoutingState: a source giving the older three fields has no policies.
            records, tokens, model_prices, policies = RoutingState(*await self.source())
            # Evaluating thousands of providers is CPU work: off the event loop, so live streams
            # keep flowing during a reload.
            previous = self.holder.current.providers
            snapshot = await asyncio.to_thread(
                lambda: build_snapshot(
                    with_last_known_hosts(evaluate_providers(records, self.evaluations), previous),
                    tokens,
                    model_prices,
                    policies,
                )
            )
        except Exception as exc:
            # Keep the previous snapshot: dropping the host set on a transient database error
            # would turn a hiccup into an outage of every provider. (A single unreadable row
            # never gets here: it is evaluated to status error on its own.)
            self.last_error = str(exc) or type(exc).__name__
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            if log_failure:
                log.error(
                    "provider reload failed; keeping the previous snapshot: %s", self.last_error
                )
            span.set_status(trace.Status(trace.StatusCode.ERROR, self.last_error[:200]))
            return False
        self._note_recovery()
        span.set_attribute("aibridgeproxyd.provider_count", len(snapshot.providers))
        span.set_attribute(
            "aibridgeproxyd.providers_in_error",
            sum(1 for p in snapshot.providers if p.status is Status.ERROR),
        )
        self.holder.current = snapshot
        self.holder.loaded = True
        self.metrics.set_provider_info(snapshot.providers)
        self.metrics.last_reload_success.set(started)
        await asyncio.to_thread(self._report_status_changes, snapshot)
        log.debug(
            "providers reloaded",
            extra={"providers": len(snapshot.providers), "mitm_hosts": len(snapshot.by_host)},
        )
        return True

    def _note_recovery(self) -> None:
        """A reload succeeded: clear the failure, and say so when there was one (the log's last
        word on the reload must not stay the error)."""
        if self._failing_since is not None:
            log.info(
                "provider reload succeeded again after %.0fs of failures",
                time.monotonic() - self._failing_since,
            )
        self.last_error = None
        self._failing_since = None

    def _report_status_changes(self, snapshot: Snapshot) -> None:
        """Log each provider's status once per change, errors at warning level."""
        seen: dict[str, tuple[str, str]] = {}
        for provider in snapshot.providers:
            state = (provider.status.value, provider.status_reason)
            seen[provider.name] = state
            if self._reported.get(provider.name) == state:
                continue
            extra = {"provider": provider.name, "status": provider.status.value}
            if provider.status is Status.ERROR:
                log.warning(
                    "provider %s excluded from routing: %s",
                    provider.name,
                    provider.status_reason,
                    extra=extra,
                )
            else:
                log.info("provider %s is %s", provider.name, provider.status.value, extra=extra)
        for gone in self._reported.keys() - seen.keys():
            log.info("provider %s removed", gone, extra={"provider": gone})
        self._reported = seen

    async def _probe(self) -> int | None:
        if self.change_probe is None:
            return None
        try:
            return await self.change_probe()
        except Exception:
            return None  # the timer reload will report the real problem

    async def _tick(self) -> None:
        # Taken before the probe: this tick's reads come after each waiter's call.
        waiting, self._waiting = self._waiting, []
        signalled, self._signalled = self._signalled, False
        ok = False
        try:
            ok = await self._tick_reload(signalled or bool(waiting))
        finally:
            for ended in waiting:
                if not ended.done():
                    ended.set_result(ok)

    async def _tick_reload(self, signalled: bool) -> bool:
        """Reload if ``signalled``, the generation moved or the timer is due; True when a
        reload ran and succeeded."""
        new_generation = await self._probe()
        changed = new_generation is not None and new_generation != self._seen_generation
        if not (signalled or changed or time.monotonic() >= self._next_reload):
            return False
        self._seen_generation = new_generation
        # Set before the reload: a reload that raises must not leave the timer due at once.
        self._next_reload = time.monotonic() + self.interval
        trigger = "signal" if signalled else "write" if changed else "timer"
        ok = await self.reload_once(trigger)
        if ok and new_generation is not None:
            self.applied_generation = new_generation
        return ok

    def start(self) -> None:
        """Reload every ``interval`` seconds, on ``trigger()``, and when a management write is
        noticed, until ``stop``. A write is noticed against ``applied_generation``; when that
        is unknown, the first change poll reloads."""
        self._next_reload = time.monotonic() + self.interval
        self._seen_generation = self.applied_generation
        self._ticks.start()

    async def stop(self) -> None:
        await self._ticks.stop()
