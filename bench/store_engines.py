"""The ``postgres`` scenario: the daemon on PostgreSQL beside the same daemon on SQLite
(issue 12's bench targets), on a throwaway PostgreSQL server of this machine
(``tests/postgres.py``'s ``PostgresServer``; the scenario is skipped, with a note, without one).

1. Proxy CPU per request with recording on, ``json_latency``'s recording workload run against a
   daemon on each engine side by side (target: PostgreSQL within 5% of SQLite).
2. Sustained interception writes: the daemon's own ``InterceptionWriter``, in this process,
   given 1,000 records per second (Claude-Code-shaped, ``bench.store_writes.records``) for a
   window on each engine: records dropped (target 0), the largest backlog, and the writer's CPU
   per 1,000 records.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aibridgeproxyd.database_url import parse_database_url
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionFilter
from aibridgeproxyd.store import Store
from bench import store_writes
from bench.lab import Lab
from bench.report import Results, Table, Verdict, fmt, ratio
from bench.scenarios import RECORDING, json_latency

RATE = 1000  # records per second offered to the writer
KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # replicas on PostgreSQL share configured keys
PG_NAME, SQLITE_NAME = "ours-pg", "ours"


async def postgres_vs_sqlite(lab: Lab, s: Any, results: Results) -> None:
    """Both parts of the module docstring; rows under "store engines"."""
    try:
        from tests.postgres import PostgresServer, PostgresUnavailable

        server = PostgresServer()
        server.start()
    except (ImportError, PostgresUnavailable, RuntimeError) as error:
        results.notes.append(f"postgres scenario skipped: {error}")
        return
    try:
        url = server.create_database()
        pg = lab.start_daemon(
            PG_NAME,
            register=False,
            extra_env={"AIBRIDGEPROXYD_DATABASE_URL": url, "AIBRIDGEPROXYD_ENCRYPTION_KEYS": KEY},
        )
        saved = dict(lab.targets)
        lab.targets = {"direct": saved["direct"], SQLITE_NAME: saved[SQLITE_NAME], PG_NAME: pg}
        engines = Results()
        try:
            await json_latency(lab, s, engines, RECORDING)
        finally:
            lab.targets = saved
        table = Table(
            "Store engines: the daemon on SQLite and on PostgreSQL",
            ["measure", "metric", "SQLite", "PostgreSQL", "PostgreSQL/SQLite"],
        )
        for row in engines.rows:
            table.rows.append(_cells(row.scenario, row.metric, row.values))
        _cpu_verdict(engines, results)
        window = 5.0 if s.quick else 15.0
        writes = {
            SQLITE_NAME: await sustained_writes(lab.dir / "writes.db", window),
            PG_NAME: await sustained_writes(server.create_database(), window),
        }
        for metric in ("offered", "written", "dropped", "max backlog", "writer CPU ms/1k"):
            values = {name: writes[name][metric] for name in writes}
            table.rows.append(_cells(f"interception writer at {RATE} records/s", metric, values))
        results.tables.append(table)
        results.verdicts.append(
            Verdict(
                f"PostgreSQL: {RATE} interception records/s sustained with none dropped",
                f"{writes[PG_NAME]['written']:.0f} of {writes[PG_NAME]['offered']:.0f} written, "
                f"{writes[PG_NAME]['dropped']:.0f} dropped",
                writes[PG_NAME]["dropped"] == 0
                and writes[PG_NAME]["written"] == writes[PG_NAME]["offered"],
            )
        )
    finally:
        server.close()


def _cells(measure: str, metric: str, values: dict[str, float | None]) -> list[str]:
    sqlite, pg = values.get(SQLITE_NAME), values.get(PG_NAME)
    return [measure, metric, fmt(sqlite), fmt(pg), fmt(ratio(pg, sqlite), 3)]


def _cpu_verdict(engines: Results, results: Results) -> None:
    (row,) = [r for r in engines.rows if r.metric == "proxy CPU ms/req"]
    pg, sqlite = row.values.get(PG_NAME), row.values.get(SQLITE_NAME)
    measured = ratio(pg, sqlite)
    results.verdicts.append(
        Verdict(
            "PostgreSQL vs SQLite: proxy CPU per request (recording on) within 5%",
            f"PostgreSQL {fmt(pg)} ms vs SQLite {fmt(sqlite)} ms (x{fmt(measured, 3)})",
            measured is not None and measured <= 1.05,
        )
    )


async def sustained_writes(database: Path | str, window: float) -> dict[str, float]:
    """Offer ``RATE`` records per second to an ``InterceptionWriter`` for ``window`` seconds,
    then stop it (which writes the rest): what was offered, written, dropped, the largest
    backlog seen, and the process CPU per 1,000 records."""
    target = parse_database_url(database) if isinstance(database, str) else database
    assert target is not None
    async with await Store.open(target):  # create and migrate, as the daemon's start does
        pass
    metrics = Metrics("bench_")
    writer = InterceptionWriter(target, metrics, retention=86400.0)
    made = store_writes.records(int(RATE * window), time.time() - window)
    writer.start()
    started, cpu_before, backlog = time.monotonic(), time.process_time(), 0
    for index, record in enumerate(made):
        writer.submit(record)
        backlog = max(backlog, writer.pending)
        delay = started + (index + 1) / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the offered rate, not synchronisation
    await writer.stop()
    cpu = time.process_time() - cpu_before
    async with await Store.open(target, migrate=False) as store:
        written = (await store.page_interceptions(InterceptionFilter(limit=1)))["count"]
    dropped = sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name.endswith("interception_records_dropped")
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    return {
        "offered": float(len(made)),
        "written": float(written),
        "dropped": float(dropped),
        "max backlog": float(backlog),
        "writer CPU ms/1k": cpu / len(made) * 1e6,
    }
