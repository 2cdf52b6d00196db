"""The scenarios. Each runs direct, bare mitmdump and ours side by side (alternating the order
between repetitions) and appends rows, tables and verdicts to a ``Results``. Nothing here
asserts a timing: the verdicts are reported, never enforced."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from aibridgeproxyd.model import InterceptionFilter
from bench import c_relay, clients
from bench.lab import OPENAI_HOST, Lab, Target, settle
from bench.procs import LOOPBACK, CpuWindow, cpu_seconds, rss_bytes, thread_count
from bench.report import Results, Row, Table, Verdict, fmt, median, pct, ratio

MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    warmup: float = 1.0  # seconds, discarded
    window: float = 2.0  # measured seconds per configuration and block
    reps: int = 4  # blocks per configuration, order alternating (ABC CBA ABC CBA)
    paced_streams: int = 3  # per block; 100 events, 10 ms apart: ~1 s each
    ttfe_streams: int = 8  # per block: short paced streams, more time-to-first-event samples
    burst_window: float = 1.5
    bulk_bytes: int = 200 * 1000 * 1000  # long enough for /proc tick CPU counts (10 ms)
    bulk_repeats: int = 2  # per block
    newconn: int = 150
    streams: int = 1000
    streams_mitmdump: bool = True
    providers: int = 10_000
    connects: int = 600
    reload_iterations: int = 4
    api_records: int = 100_000  # interceptions in each providers daemon's store, for API reads
    profile_dir: Path | None = None

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            quick=True,
            warmup=0.5,
            window=0.75,
            reps=2,
            paced_streams=1,
            ttfe_streams=5,
            burst_window=0.75,
            bulk_bytes=20 * 1000 * 1000,
            bulk_repeats=1,
            newconn=40,
            streams=300,
            streams_mitmdump=False,
            providers=10_000,
            connects=300,
            reload_iterations=2,
            api_records=20_000,
        )


@dataclass(frozen=True)
class Workload:
    """What a JSON or SSE scenario sends and the upstream answers. ``plain``: the small chat
    request and text answer of the original scenarios. ``recording``: an agent's turn, the work
    the recording does per request (prompt, tool calls, usage; the daemon runs with the default
    config, record_prompts/tool_calls/thoughts on): a ~35 KB request with tools declared and
    several messages, the user's prompt last, answered with tool calls (streamed: argument
    deltas)."""

    label: str  # "" for the plain workload, so its rows and verdicts keep their names
    raw_suffix: str
    json_body: bytes = clients.JSON_BODY
    stream_body: bytes = clients.STREAM_BODY
    tools: int = 0

    def named(self, scenario: str) -> str:
        return f"{scenario}, {self.label}" if self.label else scenario


PLAIN = Workload("", "")
RECORDING = Workload(
    f"recording on ({len(clients.AGENT_JSON_BODY) // 1000} KB agent request, "
    f"{clients.AGENT_TOOL_CALLS} tool calls)",
    "_recording",
    clients.AGENT_JSON_BODY,
    clients.AGENT_STREAM_BODY,
    clients.AGENT_TOOL_CALLS,
)


def orders(names: list[str], reps: int) -> Iterator[tuple[int, str]]:
    for rep in range(reps):
        for name in names if rep % 2 == 0 else list(reversed(names)):
            yield rep, name


def pids(lab: Lab, target: Target) -> dict[str, int]:
    out = {"upstream": lab.upstream.pid, "client": os.getpid()}  # type: ignore[union-attr]
    if target.pid:
        out["proxy"] = target.pid
    return out


@contextlib.contextmanager
def profiled(  # type: ignore[no-untyped-def]
    lab: Lab, settings: Settings, target: Target, name: str, seconds: float, enabled: bool = True
):
    """With --profile, sample ours with py-spy during the measured window (skews that window)."""
    if not enabled or settings.profile_dir is None or target.name != "ours" or not target.pid:
        yield
        return
    from bench.lab import tool

    settings.profile_dir.mkdir(parents=True, exist_ok=True)
    out = settings.profile_dir / f"{name}.txt"
    with open(settings.profile_dir / f"{name}.py-spy.log", "wb") as log:
        process = lab.procs.start(
            "py-spy",
            [
                tool("py-spy"),
                "record",
                "--pid",
                str(target.pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=log,
            stderr=log,
        )
    time.sleep(0.3)  # let py-spy attach
    try:
        yield
    finally:
        try:
            process.wait(seconds + 30)
        except Exception:
            lab.procs.stop(process)
        lab.procs.stop(process)


# --- 1. MITM small JSON -----------------------------------------------------------------------


async def json_latency(lab: Lab, s: Settings, results: Results, work: Workload = PLAIN) -> None:
    names = list(lab.targets)
    lat: dict[str, list[float]] = {n: [] for n in names}
    rep_p50: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, dict[str, float]] = {n: {} for n in names}
    count: dict[str, int] = dict.fromkeys(names, 0)
    elapsed: dict[str, float] = dict.fromkeys(names, 0.0)
    busy: dict[str, float] = dict.fromkeys(names, 0.0)
    # Both proxies' CPU with no traffic at all, over the same window.
    idle = CpuWindow({n: t.pid for n, t in lab.targets.items() if t.pid}).start()
    await asyncio.sleep(1.0 if s.quick else 3.0)
    idle.stop()
    async with contextlib.AsyncExitStack() as stack:
        pool = {n: await stack.enter_async_context(lab.targets[n].async_client(1)) for n in names}

        async def one(name: str) -> float:
            return await clients.json_request(
                pool[name], lab.targets[name], work.json_body, work.tools
            )

        for name in names:  # connections, TLS and leaf certificates outside the windows
            await clients.run_for(s.warmup, lambda name=name: one(name))
        for rep, name in orders(names, s.reps):
            target = lab.targets[name]
            await clients.run_for(0.2, lambda name=name: one(name))  # back in the caches
            with profiled(lab, s, target, "json" + work.raw_suffix, s.window, rep == 0):
                window = CpuWindow(pids(lab, target)).start()
                samples = await clients.run_for(s.window, lambda name=name: one(name))
                window.stop()
            lat[name] += samples
            rep_p50[name].append(median(samples))
            count[name] += len(samples)
            elapsed[name] += window.elapsed
            busy[name] += window.machine_busy
            for key, used in window.used.items():
                cpu[name][key] = cpu[name].get(key, 0.0) + used
            settle(0.2)

    def per_req(name: str, key: str) -> float | None:
        return cpu[name][key] / count[name] * 1000 if key in cpu[name] and count[name] else None

    p50 = {n: median(lat[n]) for n in names}
    added = {n: p50[n] - p50["direct"] for n in names}
    reps = {n: "/".join(fmt(v) for v in rep_p50[n]) for n in names}
    sc = work.named("MITM JSON, c=1")
    results.rows += [
        Row(
            sc,
            "p50 latency ms",
            p50,
            note="per block: " + "; ".join(f"{n} {reps[n]}" for n in names),
        ),
        Row(sc, "p99 latency ms", {n: pct(lat[n], 0.99) for n in names}),
        Row(
            sc, "added p50 over direct ms", {n: added[n] if n != "direct" else None for n in names}
        ),
        Row(
            sc,
            "proxy CPU ms/req",
            {n: per_req(n, "proxy") for n in names},
            note=f"/proc tick resolution ±{10 / max(1, min(count.values())):.3f} ms",
        ),
        Row(sc, "req/s", {n: count[n] / elapsed[n] for n in names}),
        Row(
            sc,
            "idle proxy CPU ms/s (no traffic)",
            {n: idle.used[n] / idle.elapsed * 1e3 if n in idle.used else None for n in names},
            ratios=False,
        ),
        Row(
            sc,
            f"machine busy cores (of {os.cpu_count()})",
            {n: busy[n] / elapsed[n] for n in names},
            note="everything on the box, other tenants included",
            ratios=False,
        ),
        Row(
            sc,
            "upstream CPU ms/req (sanity)",
            {n: per_req(n, "upstream") for n in names},
            ratios=False,
        ),
        Row(
            sc, "client CPU ms/req (sanity)", {n: per_req(n, "client") for n in names}, ratios=False
        ),
    ]
    if "ours" in names and "mitmdump" in names:
        added_ratio = ratio(added["ours"], added["mitmdump"])
        results.verdicts.append(
            Verdict(
                work.named("MITM JSON") + ": added median latency ≤ mitmdump's + 10%",
                f"ours +{fmt(added['ours'])} ms vs mitmdump +{fmt(added['mitmdump'])} ms "
                f"(x{fmt(added_ratio, 3)})",
                added_ratio is not None and added_ratio <= 1.10,
            )
        )
        cpu_ratio = ratio(per_req("ours", "proxy"), per_req("mitmdump", "proxy"))
        results.verdicts.append(
            Verdict(
                work.named("MITM JSON") + ": proxy CPU per request ≤ 1.1x mitmdump",
                f"ours {fmt(per_req('ours', 'proxy'))} ms vs mitmdump "
                f"{fmt(per_req('mitmdump', 'proxy'))} ms (x{fmt(cpu_ratio, 3)})",
                cpu_ratio is not None and cpu_ratio <= 1.10,
            )
        )
    results.raw["json" + work.raw_suffix] = {"p50": p50, "added": added, "count": count, "cpu": cpu}


# --- 2. SSE paced events ------------------------------------------------------------------------


async def sse_paced(lab: Lab, s: Settings, results: Results, work: Workload = PLAIN) -> None:
    names = list(lab.targets)
    events, gap = 100, 10.0
    ttfe: dict[str, list[float]] = {n: [] for n in names}
    delays: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    n_events: dict[str, int] = dict.fromkeys(names, 0)
    # The smallest stream a workload can send (role, one event per tool call, finish, usage).
    short = max(3, 2 * work.tools + 3)

    def stream(client: Any, target: Target, count: int) -> Awaitable[clients.StreamResult]:
        return clients.sse_request(client, target, count, gap, work.stream_body, work.tools)

    async with contextlib.AsyncExitStack() as stack:
        pool = {n: await stack.enter_async_context(lab.targets[n].async_client(1)) for n in names}
        for name in names:
            await stream(pool[name], lab.targets[name], max(5, short))  # warm-up
        for rep, name in orders(names, s.reps):
            target, client = lab.targets[name], pool[name]
            await stream(client, target, short)
            profile_name = "sse-paced" + work.raw_suffix
            with profiled(lab, s, target, profile_name, s.paced_streams * 1.05, rep == 0):
                window = CpuWindow(pids(lab, target)).start()
                for _ in range(s.paced_streams):
                    result = await stream(client, target, events)
                    ttfe[name].append(result.ttfe_ms)
                    delays[name] += result.delays_ms
                    n_events[name] += result.events
                window.stop()
            cpu[name] += window.used.get("proxy", 0.0)
            for _ in range(s.ttfe_streams):
                result = await stream(client, target, short)
                ttfe[name].append(result.ttfe_ms)
                delays[name] += result.delays_ms
            settle(0.2)

    sc = work.named(f"SSE paced ({events} ev, {gap:.0f} ms)")
    t50 = {n: median(ttfe[n]) for n in names}
    d50 = {n: median(delays[n]) for n in names}
    dmax = {n: max(delays[n]) if delays[n] else None for n in names}
    results.rows += [
        Row(sc, "time to first event p50 ms", t50),
        Row(
            sc,
            "TTFE over direct ms",
            {n: t50[n] - t50["direct"] if n != "direct" else None for n in names},
        ),
        Row(sc, "per-event delay p50 ms", d50),
        Row(sc, "per-event delay p99 ms", {n: pct(delays[n], 0.99) for n in names}),
        Row(sc, "per-event delay max ms", dmax),
        Row(
            sc,
            "events later than 5 ms (count)",
            {n: float(sum(1 for d in delays[n] if d > 5.0)) for n in names},
            note=f"of {len(delays[names[0]])} events per configuration",
            ratios=False,
        ),
        Row(
            sc,
            "added per-event delay p50 ms",
            {n: d50[n] - d50["direct"] if n != "direct" else None for n in names},
        ),
        Row(
            sc,
            "proxy CPU µs/event (paced, incl. request)",
            {n: cpu[n] / n_events[n] * 1e6 if n != "direct" else None for n in names},
            note=f"/proc tick resolution ±{10e3 / max(1, n_events[names[-1]]):.0f} µs",
        ),
    ]
    if "ours" in names:
        worst = dmax["ours"]
        results.verdicts.append(
            Verdict(
                work.named("SSE") + ": every event within 5 ms of leaving the upstream",
                f"ours max {fmt(worst)} ms, p99 {fmt(pct(delays['ours'], 0.99))} ms over "
                f"{len(delays['ours'])} events (mitmdump max {fmt(dmax.get('mitmdump'))} ms)",
                worst is not None and worst <= 5.0,
            )
        )
        over = t50["ours"] - t50["direct"]
        results.verdicts.append(
            Verdict(
                work.named("SSE") + ": time to first event ≤ 3 ms over direct",
                f"ours +{fmt(over)} ms (p50 {fmt(t50['ours'])} vs {fmt(t50['direct'])} ms; "
                f"mitmdump +{fmt(t50.get('mitmdump', float('nan')) - t50['direct'])} ms)",
                over <= 3.0,
            )
        )
    if work.label and "ours" in names and "mitmdump" in names:
        added = {n: d50[n] - d50["direct"] for n in ("ours", "mitmdump")}
        results.verdicts.append(
            Verdict(
                work.named("SSE") + ": added per-event delay p50 ≤ mitmdump's + 10%",
                f"ours +{fmt(added['ours'])} ms vs mitmdump +{fmt(added['mitmdump'])} ms "
                f"(p99 {fmt(pct(delays['ours'], 0.99))} vs "
                f"{fmt(pct(delays['mitmdump'], 0.99))} ms)",
                added["ours"] <= 1.10 * added["mitmdump"],
            )
        )
    results.raw["sse_paced" + work.raw_suffix] = {
        "ttfe_p50": t50,
        "delay_p50": d50,
        "delay_max": dmax,
    }


# --- 3. SSE throughput --------------------------------------------------------------------------


async def sse_burst(lab: Lab, s: Settings, results: Results, work: Workload = PLAIN) -> None:
    names = list(lab.targets)
    events = 100
    total: dict[str, list[float]] = {n: [] for n in names}
    ttfe: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    n_events: dict[str, int] = dict.fromkeys(names, 0)
    elapsed: dict[str, float] = dict.fromkeys(names, 0.0)
    async with contextlib.AsyncExitStack() as stack:
        pool = {n: await stack.enter_async_context(lab.targets[n].async_client(1)) for n in names}

        async def one(name: str) -> clients.StreamResult:
            return await clients.sse_request(
                pool[name], lab.targets[name], events, 0, work.stream_body, work.tools
            )

        for name in names:
            await clients.run_for(s.warmup, lambda name=name: one(name))
        for rep, name in orders(names, s.reps):
            target = lab.targets[name]
            await clients.run_for(0.2, lambda name=name: one(name))
            profile_name = "sse-burst" + work.raw_suffix
            with profiled(lab, s, target, profile_name, s.burst_window, rep == 0):
                window = CpuWindow(pids(lab, target)).start()
                got = await clients.run_for(s.burst_window, lambda name=name: one(name))
                window.stop()
            total[name] += [r.total_ms for r in got]
            ttfe[name] += [r.ttfe_ms for r in got]
            n_events[name] += sum(r.events for r in got)
            cpu[name] += window.used.get("proxy", 0.0)
            elapsed[name] += window.elapsed
            settle(0.2)

    sc = work.named(f"SSE burst ({events} ev back-to-back)")
    streams = {n: len(total[n]) for n in names}
    results.rows += [
        Row(sc, "whole stream p50 ms", {n: median(total[n]) for n in names}),
        Row(sc, "time to first event p50 ms", {n: median(ttfe[n]) for n in names}),
        Row(sc, "streams/s", {n: streams[n] / elapsed[n] for n in names}),
        Row(
            sc,
            "proxy CPU µs/event",
            {n: cpu[n] / n_events[n] * 1e6 if n != "direct" else None for n in names},
        ),
        Row(
            sc,
            "proxy CPU ms/stream",
            {n: cpu[n] / streams[n] * 1e3 if n != "direct" else None for n in names},
        ),
    ]
    if work.label and "ours" in names and "mitmdump" in names:
        per_stream = {n: cpu[n] / streams[n] * 1e3 if streams[n] else None for n in names}
        cpu_ratio = ratio(per_stream["ours"], per_stream["mitmdump"])
        results.verdicts.append(
            Verdict(
                work.named("SSE") + ": proxy CPU per stream ≤ 1.1x mitmdump",
                f"ours {fmt(per_stream['ours'])} ms vs mitmdump {fmt(per_stream['mitmdump'])} "
                f"ms (x{fmt(cpu_ratio, 3)})",
                cpu_ratio is not None and cpu_ratio <= 1.10,
            )
        )


# --- 4. Tunneled bulk ---------------------------------------------------------------------------


async def tunnel_bulk(lab: Lab, s: Settings, results: Results) -> None:
    ways = dict(lab.targets)
    floor = c_relay.start_c_relay(lab)
    if isinstance(floor, str):
        results.notes.append(f"tunnel bulk: no C relay floor measured ({floor})")
    else:
        ways[floor.name] = floor
    names = list(ways)
    authority = f"{LOOPBACK}:{lab.bulk_port}"
    speeds: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    machine: dict[str, float] = dict.fromkeys(names, 0.0)
    moved: dict[str, int] = dict.fromkeys(names, 0)
    for rep, name in orders(names, s.reps):
        target = ways[name]
        clients.bulk_get(target, authority, lab.upstream_context, MB)  # warm-up
        profile_seconds = s.bulk_repeats * s.bulk_bytes / (300 * MB)
        with profiled(lab, s, target, "bulk", profile_seconds, rep == 0):
            window = CpuWindow(pids(lab, target)).start()
            for _ in range(s.bulk_repeats):
                seconds = clients.bulk_get(target, authority, lab.upstream_context, s.bulk_bytes)
                speeds[name].append(s.bulk_bytes / MB / seconds)
                moved[name] += s.bulk_bytes
            window.stop()
        cpu[name] += window.used.get("proxy", 0.0)
        machine[name] += window.machine_busy
        settle(0.3)
    sc = f"Tunnel bulk ({s.bulk_bytes // 1_000_000} MB GET)"
    mbs = {n: median(speeds[n]) for n in names}
    per_mib = {n: cpu[n] / (moved[n] / MB) * 1e3 if n != "direct" else None for n in names}
    results.rows += [
        Row(sc, "MiB/s (median)", mbs),
        Row(sc, "proxy CPU ms/MiB", per_mib),
    ]
    results.tables.append(_relay_floor(names, mbs, per_mib, machine, moved))
    if "ours" in names:
        share = ratio(mbs["ours"], mbs["direct"])
        floor_share = ratio(mbs.get(c_relay.NAME), mbs["direct"])
        ms_per_mib = per_mib["ours"] if moved["ours"] else None
        results.verdicts.append(
            Verdict(
                "Tunnel: bulk throughput ≥ 85% of direct, proxy CPU ≤ 0.5 ms/MiB",
                f"ours {fmt(mbs['ours'])} MiB/s = {fmt((share or 0) * 100, 0)}% of direct "
                f"{fmt(mbs['direct'])} MiB/s (mitmdump {fmt(mbs.get('mitmdump'))}; the C splice "
                f"relay {fmt((floor_share or 0) * 100, 0)}%); {fmt(ms_per_mib)} ms/MiB",
                share is not None
                and share >= 0.85
                and ms_per_mib is not None
                and ms_per_mib <= 0.5,
            )
        )


def _relay_floor(
    names: list[str],
    mbs: dict[str, float],
    per_mib: dict[str, float | None],
    machine: dict[str, float],
    moved: dict[str, int],
) -> Table:
    """Tunnel bulk, each way beside the C splice relay: throughput, and the whole machine's CPU
    per MiB (client, upstream, relay and kernel) against direct's."""
    busy = {n: machine[n] / (moved[n] / MB) * 1e3 for n in names if moved[n]}
    rows = [
        [
            name,
            fmt(mbs[name]),
            fmt(ratio(mbs[name], mbs["direct"])),
            fmt(per_mib[name]),
            fmt(busy.get(name)),
            fmt(busy[name] - busy["direct"]) if name != "direct" and name in busy else "-",
        ]
        for name in names
    ]
    return Table(
        "Tunnel bulk: the relay floor (a minimal C splice relay) and the machine's CPU per MiB",
        ["way", "MiB/s", "of direct", "relay CPU ms/MiB", "machine CPU ms/MiB", "over direct"],
        rows,
    )


# --- 5. New connection per request --------------------------------------------------------------


async def new_connection(lab: Lab, s: Settings, results: Results) -> None:
    names = list(lab.targets)
    lat: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    per_rep = max(10, s.newconn // s.reps)
    for rep, name in orders(names, s.reps):
        target = lab.targets[name]
        for _ in range(5):
            clients.one_shot_json(target)  # warm-up: leaf certificates, imports
        with profiled(lab, s, target, "newconn", per_rep * 0.012, rep == 0):
            window = CpuWindow(pids(lab, target)).start()
            lat[name] += [clients.one_shot_json(target) for _ in range(per_rep)]
            window.stop()
        cpu[name] += window.used.get("proxy", 0.0)
        settle(0.3)
    sc = "New connection per request"
    results.rows += [
        Row(sc, "CONNECT+TLS+JSON p50 ms", {n: median(lat[n]) for n in names}),
        Row(sc, "p99 ms", {n: pct(lat[n], 0.99) for n in names}),
        Row(
            sc,
            "proxy CPU ms/req",
            {n: cpu[n] / len(lat[n]) * 1e3 if n != "direct" else None for n in names},
        ),
    ]


# --- 6. 1,000 concurrent open streams -----------------------------------------------------------


async def open_streams(lab: Lab, s: Settings, results: Results) -> None:
    table = Table(
        f"{s.streams} concurrent open SSE streams (held by the upstream after their first event)",
        [
            "proxy",
            "round",
            "RSS before MB",
            "RSS open MB",
            "KiB/stream",
            "RSS +1 s after close MB",
            "RSS +3 s MB",
            "returned %",
            "open s",
            "proxy CPU ms/stream",
            "inflight gauge open → after",
            "upstream held after",
            "errors",
        ],
    )
    targets = [lab.targets["ours"]] if "ours" in lab.targets else []
    if s.streams_mitmdump and "mitmdump" in lab.targets:
        targets.append(lab.targets["mitmdump"])
    verdict_parts: list[str] = []
    stable = True
    for target in targets:
        # Warm-up, so lazily created state is in the baseline.
        warm = [await clients.open_held_stream(target) for _ in range(5)]
        lab.release_held_streams()
        await asyncio.gather(*(clients.finish_held_stream(w) for w in warm))
        settle(1.0)
        for round_name in ("complete", "abort"):
            row = await _held_round(lab, s, target, round_name)
            table.rows.append(row["cells"])
            if target.name == "ours":
                verdict_parts.append(
                    f"{round_name}: {fmt(row['kib'], 0)} KiB/stream, "
                    f"{fmt(row['returned'], 0)}% returned, gauge {row['gauge']}"
                )
                stable = stable and row["ok"]
            settle(0.5)
    results.tables.append(table)
    if "ours" in lab.targets:
        alive = lab.daemon is not None and lab.daemon.process.poll() is None
        results.verdicts.append(
            Verdict(
                f"{s.streams} open streams: daemon stays up, memory back near baseline, gauge 0",
                ("up" if alive else "DIED") + "; " + "; ".join(verdict_parts),
                alive and stable,
            )
        )


async def _held_round(lab: Lab, s: Settings, target: Target, round_name: str) -> dict[str, Any]:
    assert target.pid is not None
    pid = target.pid
    base = rss_bytes(pid)
    cpu0 = cpu_seconds(pid)
    started = time.monotonic()
    streams: list[clients.HeldStream] = []
    errors = 0
    batch = 100
    for offset in range(0, s.streams, batch):
        got = await asyncio.gather(
            *(clients.open_held_stream(target) for _ in range(min(batch, s.streams - offset))),
            return_exceptions=True,
        )
        for item in got:
            if isinstance(item, BaseException):
                errors += 1
            else:
                streams.append(item)
    open_seconds = time.monotonic() - started
    settle(0.5)
    peak = rss_bytes(pid)
    threads = thread_count(pid)
    gauge_open = _inflight(lab, target)
    if round_name == "complete":
        lab.release_held_streams()
        clean = await asyncio.gather(*(clients.finish_held_stream(x) for x in streams))
        errors += sum(1 for ok in clean if not ok)
    else:
        await asyncio.gather(*(clients.abort_held_stream(x) for x in streams))
    cpu_used = cpu_seconds(pid) - cpu0
    settle(1.0)
    after1 = rss_bytes(pid)
    gauge_after = _inflight(lab, target)
    held_after = lab.upstream_stats()["held"]
    settle(2.0)
    after3 = rss_bytes(pid)
    if round_name == "abort" and held_after:
        # Streams the proxy did not cancel upstream; release them so the next round starts clean.
        lab.release_held_streams()
    grown = peak - base
    returned = (peak - after3) / grown * 100 if grown > 0 else float("nan")
    kib = grown / max(1, len(streams)) / 1024
    gauge = f"{fmt(gauge_open, 0)} → {fmt(gauge_after, 0)}" if gauge_open is not None else "-"
    ok = (
        errors == 0
        and (gauge_after in (None, 0.0))
        and held_after == 0
        and (after3 - base) <= max(0.25 * grown, 5 * MB)
    )
    cells = [
        target.name,
        round_name,
        fmt(base / MB, 1),
        fmt(peak / MB, 1),
        fmt(kib, 1),
        fmt(after1 / MB, 1),
        fmt(after3 / MB, 1),
        fmt(returned, 0),
        fmt(open_seconds, 2),
        fmt(cpu_used / max(1, len(streams)) * 1e3, 2),
        gauge,
        str(held_after),
        str(errors) + (f" (threads {threads})" if threads > 8 else ""),
    ]
    return {"cells": cells, "kib": kib, "returned": returned, "gauge": gauge, "ok": ok}


def _inflight(lab: Lab, target: Target) -> float | None:
    if target.name != "ours" or lab.daemon is None:
        return None
    return lab.daemon.metric("inflight_mitm_requests")


# --- 7. 10,000 providers ------------------------------------------------------------------------

_LOG_STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z"


def _log_time(stamp: str) -> float:
    return (
        datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


async def providers_10k(lab: Lab, s: Settings, results: Results) -> None:
    """Two daemons side by side: the main one with 10 providers, a second one started with
    10,000. CONNECT batches alternate between them, so drift on a shared box cancels out."""
    from aibridgeproxyd.model import ProviderRecord
    from aibridgeproxyd.store import Store

    small = lab.daemon
    assert small is not None, "the providers scenario needs our daemon"
    small_target = lab.targets["ours"]
    base_url = f"https://{LOOPBACK}:{lab.upstream_port}/v1"

    def record(i: int) -> ProviderRecord:
        return ProviderRecord(
            name=f"bench-{i:05d}",
            type="openai",
            base_url=base_url,
            hosts=(f"p{i:05d}.bench.invalid",),
            keys=("k",),
        )

    async def fill(database: Path, count: int) -> dict[str, Any]:
        """Insert bench providers until the table has ``count`` rows (Store API)."""
        store = await Store.open(database, create=False)
        try:
            existing = {p.name for p in await store.list_providers()}
            index, started = 0, time.perf_counter()
            while len(existing) < count:
                rec = record(index)
                index += 1
                if rec.name not in existing:
                    await store.insert_provider(rec)
                    existing.add(rec.name)
            return {
                "count": len(existing),
                "insert_s": time.perf_counter() - started,
                "toggle": f"bench-{max(0, index - 1):05d}",
            }
        finally:
            await store.close()

    moment = time.time()
    filled_small = await fill(small.database_path, 10)
    await _wait_for_reload_after(small, moment)
    filled_large: dict[str, Any] = {}

    def before_start(daemon: Any) -> None:  # runs in a worker thread, before the daemon starts
        filled_large.update(asyncio.run(fill(daemon.database_path, s.providers)))

    large_target = await asyncio.to_thread(
        lab.start_daemon, "ours-10k", before_start=before_start, register=False
    )
    large = lab.daemons["ours-10k"]
    try:
        settle(1.0)
        pair = {"small": (small_target, small), "large": (large_target, large)}
        phases: dict[str, dict[str, Any]] = {
            "small": {**filled_small, "ready_s": small.ready_seconds},
            "large": {**filled_large, "ready_s": large.ready_seconds},
        }
        _interleaved_connects(lab, s, pair, phases)
        for key in ("small", "large"):
            target, daemon = pair[key]
            store = await Store.open(daemon.database_path, create=False)
            try:
                phases[key].update(
                    await _daemon_phase(s, store, target, daemon, phases[key]["toggle"])
                )
            finally:
                await store.close()
            phases[key].update(await _reload_in_process(daemon.database_path, s))
    finally:
        lab.stop_daemon("ours-10k")

    lo, hi = phases["small"], phases["large"]
    table = Table(
        f"Providers: reload and CONNECT classification, {lo['count']:,} vs {hi['count']:,} "
        "providers (two daemons side by side; CONNECT batches alternate between them)",
        ["measure", f"{lo['count']:,} providers", f"{hi['count']:,} providers", "ratio", "note"],
    )

    def add(label: str, key: str, digits: int = 2, note: str = "") -> None:
        a, b = lo.get(key), hi.get(key)
        table.rows.append([label, fmt(a, digits), fmt(b, digits), fmt(ratio(b, a)), note])

    add(
        "reload, real daemon: median ms",
        "reload_ms",
        note="toggle one provider + SIGHUP; start gauge → end log line",
    )
    add("reload, real daemon: max ms", "reload_max_ms")
    add("reload in-process: store read ms", "read_ms", note="open + read all rows (aiosqlite)")
    add("reload in-process: evaluate_providers ms", "evaluate_ms")
    add("reload in-process: build_snapshot ms", "snapshot_ms")
    add("reload in-process: metrics.set_provider_info ms", "provider_info_ms")
    add("reload in-process: whole reload_once ms", "reload_once_ms", note="rows already read")
    add("CONNECT to a MITM'd host, p50 ms", "connect_mitm_p50", note=f"{OPENAI_HOST}:443")
    add("proxy CPU per MITM'd CONNECT, µs", "connect_mitm_cpu_us", 0, note="new TCP each")
    add("CONNECT to a tunneled host, p50 ms", "connect_tunnel_p50", note="includes the dial")
    add("proxy CPU per tunneled CONNECT, µs", "connect_tunnel_cpu_us", 0)
    add("new connection + JSON request, p50 ms", "oneshot_p50")
    add("snapshot.provider_for_host, ns", "lookup_ns", 0, note="in-process, best of 5")
    add("GET /metrics scrape ms", "scrape_ms", note="provider_info: one series per provider")
    add("GET /metrics size KiB", "scrape_kb", 0)
    add("max SSE event delay, quiet, ms", "stall_quiet_ms", note="paced stream, 80 events")
    add("max SSE event delay while /metrics is scraped, ms", "stall_scrape_ms", note="2 scrapes")
    add(
        "max SSE event delay while the data API is read, ms",
        "stall_api_ms",
        note=f"{API_READERS} readers without pause: usage, sessions, 1,000 interceptions",
    )
    add("data API read under that load, median ms", "api_read_ms", 0, note="per call")
    add("data API reads during the stream", "api_reads", 0)
    add("max SSE event delay across a reload, ms", "stall_reload_ms", note="every reload above")
    add("daemon RSS MB", "rss_mb", 1)
    add("daemon start-up to /readyz, s", "ready_s")
    add("rows inserted, s (Store API)", "insert_s", note="one transaction per row")
    results.tables.append(table)

    reload_large = hi.get("reload_ms")
    results.verdicts.append(
        Verdict(
            f"{hi['count']:,} providers: reload ≤ 200 ms",
            f"real daemon median {fmt(reload_large)} ms (max {fmt(hi.get('reload_max_ms'))}); "
            f"in-process reload_once {fmt(hi.get('reload_once_ms'))} ms + store read "
            f"{fmt(hi.get('read_ms'))} ms; a paced stream through it saw events up to "
            f"{fmt(hi.get('stall_reload_ms'))} ms late during a reload",
            None if reload_large is None else reload_large <= 200,
        )
    )
    cpu_growth = ratio(hi.get("connect_mitm_cpu_us"), lo.get("connect_mitm_cpu_us"))
    lat_growth = ratio(hi.get("connect_mitm_p50"), lo.get("connect_mitm_p50"))
    results.verdicts.append(
        Verdict(
            "CONNECT classification cost does not grow with the provider count",
            f"MITM'd CONNECT p50 x{fmt(lat_growth)}, proxy CPU x{fmt(cpu_growth)} at "
            f"{hi['count']:,} vs {lo['count']:,}; host lookup {fmt(lo.get('lookup_ns'), 0)} → "
            f"{fmt(hi.get('lookup_ns'), 0)} ns",
            # CPU per CONNECT is the criterion; latency on a shared 2-core box is too noisy.
            cpu_growth is not None and cpu_growth <= 1.15,
        )
    )
    results.raw["providers"] = phases


def _interleaved_connects(
    lab: Lab, s: Settings, pair: dict[str, tuple[Target, Any]], phases: dict[str, dict[str, Any]]
) -> None:
    """CONNECT-only and one-shot-request costs, in batches alternating between the daemons."""
    batches = 4
    for key, authority in (
        ("connect_mitm", f"{OPENAI_HOST}:443"),
        ("connect_tunnel", f"{LOOPBACK}:{lab.bulk_port}"),
    ):
        lat: dict[str, list[float]] = {k: [] for k in pair}
        cpu = dict.fromkeys(pair, 0.0)
        for target, _ in pair.values():
            assert target.proxy_port is not None
            for _ in range(20):
                clients.bare_connect(target.proxy_port, authority)
        for batch in range(batches):
            for k in list(pair) if batch % 2 == 0 else list(reversed(pair)):
                target, daemon = pair[k]
                assert target.proxy_port is not None
                window = CpuWindow({"proxy": daemon.pid}).start()
                lat[k] += [
                    clients.bare_connect(target.proxy_port, authority)
                    for _ in range(s.connects // batches)
                ]
                window.stop()
                cpu[k] += window.used["proxy"]
        for k in pair:
            phases[k][key + "_p50"] = median(lat[k])
            phases[k][key + "_cpu_us"] = cpu[k] / len(lat[k]) * 1e6
    oneshot: dict[str, list[float]] = {k: [] for k in pair}
    for target, _ in pair.values():
        for _ in range(5):
            clients.one_shot_json(target)
    for batch in range(batches):
        for k in list(pair) if batch % 2 == 0 else list(reversed(pair)):
            target, _ = pair[k]
            per_batch = max(5, s.newconn // (3 * batches))
            oneshot[k] += [clients.one_shot_json(target) for _ in range(per_batch)]
    for k in pair:
        phases[k]["oneshot_p50"] = median(oneshot[k])


async def _wait_for_reload_after(daemon: Any, moment: float, timeout: float = 120) -> None:
    """Until a reload that started after ``moment`` (wall clock) has succeeded: the success
    gauge carries the start time of the last successful reload and is set when it ends."""
    os.kill(daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(
            daemon.metric, "providers_last_reload_success_timestamp_seconds"
        )
        if value is not None and value >= moment:
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"no successful reload after the inserts within {timeout}s")


async def _daemon_phase(
    s: Settings, store: Any, target: Target, daemon: Any, toggle_name: str
) -> dict[str, Any]:
    """Scrape cost, event-loop stalls and reload duration of one daemon."""
    out: dict[str, Any] = {}
    scrape = []
    for _ in range(3):
        started = time.perf_counter()
        response = await asyncio.to_thread(daemon.admin_get, "/metrics")
        scrape.append((time.perf_counter() - started) * 1000)
    out["scrape_ms"] = median(scrape)
    out["scrape_kb"] = len(response.content) / 1024
    out["rss_mb"] = rss_bytes(daemon.pid) / MB

    async with target.async_client(1) as client:
        await clients.sse_request(client, target, 3, 10)  # warm connection

        # The worst event delay of a quiet paced stream, for comparison with the two below.
        out["stall_quiet_ms"] = max((await clients.sse_request(client, target, 80, 10)).delays_ms)

        # A paced stream while /metrics is scraped (as Prometheus would, every 15-30 s).
        stream = asyncio.create_task(clients.sse_request(client, target, 80, 10))
        await asyncio.sleep(0.1)
        for _ in range(2):
            await asyncio.to_thread(daemon.admin_get, "/metrics")
            await asyncio.sleep(0.1)
        out["stall_scrape_ms"] = max((await stream).delays_ms)

        # A paced stream while the data API's heaviest reads run back to back, over a store
        # of s.api_records interceptions (a dashboard or an export script at work).
        out.update(await _stream_under_api_reads(s, store, client, target, daemon))

        # Reload: toggle one provider and SIGHUP while a paced stream runs. The reload's start
        # is the last_reload gauge (set when reload_once begins); its end is the status-change
        # log line it writes last. The stream shows how long the reload blocks the event loop.
        durations, stalls = [], []
        for _ in range(s.reload_iterations):
            stored = await store.get_provider(toggle_name)
            wanted = not stored.enabled
            state = "enabled" if wanted else "disabled"
            regex = re.compile(
                rf"^{_LOG_STAMP} INFO\s+\S+: provider {toggle_name} is {state}\b", re.M
            )
            offset = daemon.log_size()
            stream = asyncio.create_task(clients.sse_request(client, target, 100, 10))
            await asyncio.sleep(0.15)
            await store.update_provider(replace(stored, enabled=wanted))
            os.kill(daemon.pid, signal.SIGHUP)
            match = None
            deadline = time.monotonic() + 10  # the log format changed? then report n/a
            while match is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                match = regex.search(daemon.log_since(offset))
            stalls.append(max((await stream).delays_ms))
            if match is None:
                continue
            ended = _log_time(match.group(1))
            # A second reload (probe and SIGHUP racing) would move the gauge past `ended`.
            await asyncio.sleep(0.3)
            started_at = await asyncio.to_thread(
                daemon.metric, "providers_last_reload_timestamp_seconds"
            )
            if started_at is not None and started_at <= ended + 0.001:
                durations.append((ended - started_at) * 1000)
    if durations:
        out["reload_ms"] = median(durations)
        out["reload_max_ms"] = max(durations)
    out["stall_reload_ms"] = max(stalls) if stalls else None
    return out


API_READERS = 3
API_HEAVY_READS = (
    "/api/v2/aibridge/usage?group_by=initiator",
    "/api/v2/aibridge/usage?group_by=day",
    "/api/v2/aibridge/sessions?limit=1000",
    "/api/v2/aibridge/interceptions?limit=1000",
    "/api/v2/aibridge/models",
)


async def _stream_under_api_reads(
    s: Settings, store: Any, client: Any, target: Target, daemon: Any
) -> dict[str, Any]:
    """The worst event delay of a paced stream while API_READERS threads call API_HEAVY_READS
    without pause; empty when the daemon has no data API (an older revision)."""
    token = await _api_reader_token(store, s.api_records)
    if token is None or daemon.admin_get(API_HEAVY_READS[0]).status_code == 404:
        return {}
    stop = threading.Event()
    reads: list[float] = []
    statuses: set[int] = set()

    def read() -> None:
        headers = {"Coder-Session-Token": token}
        with httpx.Client(trust_env=False, timeout=120) as api:
            while not stop.is_set():
                for path in API_HEAVY_READS:
                    started = time.perf_counter()
                    statuses.add(api.get(daemon.admin + path, headers=headers).status_code)
                    reads.append((time.perf_counter() - started) * 1000)

    readers = [threading.Thread(target=read, daemon=True) for _ in range(API_READERS)]
    for reader in readers:
        reader.start()
    try:
        while len(reads) < API_READERS:  # every reader has finished a first read
            await asyncio.sleep(0.05)
        delays = (await clients.sse_request(client, target, 80, 10)).delays_ms
    finally:
        stop.set()
        for reader in readers:
            await asyncio.to_thread(reader.join, 120)
    if statuses != {200}:
        raise RuntimeError(f"data API reads answered {sorted(statuses)}")
    return {"stall_api_ms": max(delays), "api_read_ms": median(reads), "api_reads": len(reads)}


async def _api_reader_token(store: Any, records: int) -> str | None:
    """An admin token for the data API, over a store filled to ``records`` interceptions
    (bench.store_writes' Claude-Code-shaped records); None when the store has no data API
    reads (an older revision)."""
    if not hasattr(store, "page_interceptions"):
        return None
    from aibridgeproxyd.tokens import hash_token
    from bench.store_writes import BATCH
    from bench.store_writes import records as made_records

    token = "abp_bench_" + os.urandom(16).hex()
    await store.insert_admin_token(
        f"bench-reader-{os.urandom(4).hex()}", hash_token(token), "admin"
    )
    page = await store.page_interceptions(InterceptionFilter(limit=1))
    missing = records - page["count"]
    made = made_records(max(0, missing), time.time() - records)
    for offset in range(0, len(made), BATCH):
        await store.insert_interceptions(made[offset : offset + BATCH])
    await store.checkpoint()
    return token


async def _reload_in_process(database: Path, s: Settings) -> dict[str, float]:
    """Time the reload's pieces in this process over the same database (all its rows now)."""
    try:
        from aibridgeproxyd.metrics import Metrics
        from aibridgeproxyd.providers import evaluate_providers
        from aibridgeproxyd.reload import ProviderReloader, SnapshotHolder
        from aibridgeproxyd.snapshot import build_snapshot
        from aibridgeproxyd.store import read_routing_state
    except ImportError as error:  # the daemon's internals moved: report, do not fail
        print(f"in-process reload timing skipped: {error}")
        return {}

    async def read_all() -> Any:
        return await read_routing_state(database)  # what the daemon's reload reads with

    times: dict[str, list[float]] = {}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = fn()
        times.setdefault(key, []).append((time.perf_counter() - started) * 1000)
        return value

    state = await read_all()
    records, tokens = state.providers, state.tokens

    async def source() -> Any:
        return state

    reloader = ProviderReloader(source, SnapshotHolder(), Metrics(), interval=3600)
    await reloader.reload_once()  # first sight of every provider (logs each status once)
    snapshot = None
    for _ in range(max(3, s.reload_iterations)):
        started = time.perf_counter()
        await read_all()
        times.setdefault("read_ms", []).append((time.perf_counter() - started) * 1000)
        providers = timed("evaluate_ms", lambda: evaluate_providers(records))
        snapshot = timed("snapshot_ms", lambda p=providers: build_snapshot(p, tokens))
        metrics = Metrics()
        timed("provider_info_ms", lambda m=metrics, p=snapshot.providers: m.set_provider_info(p))
        started = time.perf_counter()
        await reloader.reload_once()
        times.setdefault("reload_once_ms", []).append((time.perf_counter() - started) * 1000)
    out = {key: median(values) for key, values in times.items()}
    assert snapshot is not None
    hosts = list(snapshot.by_host) or [OPENAI_HOST]
    probe = [hosts[(i * 7919) % len(hosts)] for i in range(1000)]
    best = float("inf")
    for _ in range(5):  # best of 5, like timeit: the lookup itself, not the box's noise
        started_ns = time.perf_counter_ns()
        for _ in range(50):
            for host in probe:
                snapshot.provider_for_host(host)
        best = min(best, (time.perf_counter_ns() - started_ns) / (50 * len(probe)))
    out["lookup_ns"] = best
    return out
