"""``python -m bench.store_writes``: the interception store's write and session-read costs.

Not part of ``make bench`` (no proxy involved): it times ``Store.insert_interceptions`` on
batches of 500 Claude-Code-shaped records (a prompt, a tool call each, later records answering
the previous call, so thread lineage resolves on every write), then, on the database those
batches built (``--records``, default 100,000), ``list_sessions`` and ``get_session``, and
prints SQLite's query plans for the session and filter queries. It only reports.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aibridgeproxyd.model import InterceptionFilter, InterceptionRecord, ToolCall
from aibridgeproxyd.request_ids import new_request_id
from aibridgeproxyd.store import Store

BATCH = 500
THREAD_LENGTH = 5  # interceptions per thread: a prompt, then tool results
SESSION_THREADS = 10  # threads per session


def records(
    count: int, start: float, session_threads: int = SESSION_THREADS
) -> list[InterceptionRecord]:
    """``count`` records in sessions of ``session_threads`` threads of THREAD_LENGTH interceptions:
    each answers the previous one's tool call."""
    made: list[InterceptionRecord] = []
    session = call = ""
    for index in range(count):
        position = index % THREAD_LENGTH
        if index % (THREAD_LENGTH * session_threads) == 0:
            session = str(uuid.uuid4())
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + index)) + ".000Z"
        new_call = f"toolu_{uuid.uuid4().hex[:24]}"
        made.append(
            InterceptionRecord(
                request_id=new_request_id(), connect_id="c", initiator=f"user{index % 50}",
                provider="anthropic", provider_type="anthropic", model="claude-sonnet-4-5",
                client="Claude Code", method="POST", path="/v1/messages", status=200,
                streamed=True, input_tokens=25, output_tokens=415, cache_read_input_tokens=21034,
                cache_creation_input_tokens=1190, reasoning_output_tokens=None,
                provider_name="anthropic", user_agent="claude-cli/2.0.14 (external, cli)",
                credential_kind="central", credential_hint="sk-\u2026QwAA", started_at=moment,
                ended_at=moment, ttfb_ms=1240.4, duration_ms=7575.0, cost_micros=17073,
                client_session_id=session,
                prompt="Read the README and summarise it" if position == 0 else None,
                tool_calls=(ToolCall(new_call, "Read", '{"file_path": "/src/README.md"}'),),
                thoughts=("The user wants a summary; read the file first.",),
                tool_result_ids=(call,) if position else (),
            )
        )  # fmt: skip
        call = new_call
    return made


async def time_writes(
    store: Store, total: int, session_threads: int
) -> tuple[list[float], list[float]]:
    """Wall and process CPU milliseconds per batch of BATCH records, ``total`` records in all,
    each batch written as the daemon's writer does: the insert, then a checkpoint of the
    write-ahead log. (CPU time is the steadier figure on a shared machine.)"""
    wall, cpu = [], []
    made = records(total, time.time() - total, session_threads)
    for offset in range(0, total, BATCH):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        await store.insert_interceptions(made[offset : offset + BATCH])
        await store.checkpoint()
        wall.append((time.perf_counter() - begin) * 1000)
        cpu.append((time.process_time() - begin_cpu) * 1000)
    return wall, cpu


async def time_call(call: Any, repeat: int = 5) -> tuple[float, Any]:
    """Median milliseconds of ``repeat`` awaits of ``call()``, and its last result."""
    timings = []
    result = None
    for _ in range(repeat):
        begin = time.perf_counter()
        result = await call()
        timings.append((time.perf_counter() - begin) * 1000)
    return statistics.median(timings), result


async def run(total: int, directory: Path, session_threads: int) -> None:
    async with await Store.open(directory / "bench.db") as store:
        wall, cpu = await time_writes(store, total, session_threads)
        print(
            f"insert_interceptions + checkpoint, {len(wall)} batches of {BATCH} records with "
            f"a tool call each: wall median {statistics.median(wall):.1f} ms "
            f"(first {wall[0]:.1f}, last {wall[-1]:.1f}), CPU median {statistics.median(cpu):.1f} "
            f"ms (first {cpu[0]:.1f}, last {cpu[-1]:.1f})"
        )
        list_sessions = getattr(store, "list_sessions", None)
        if list_sessions is None:
            return  # the store before sessions: writes only
        everything = InterceptionFilter()
        cases = {
            "list_sessions (no filter, 100)": lambda: list_sessions(everything, 100),
            "list_sessions (initiator, 100)": lambda: list_sessions(
                InterceptionFilter(initiator="user7"), 100
            ),
            "list_interceptions (100)": lambda: store.list_interceptions(everything),
            **api_read_cases(store),
        }
        for name, call in cases.items():
            milliseconds, _ = await time_call(call)
            print(f"{name}: median {milliseconds:.1f} ms")
        page = await list_sessions(everything, 100)
        after = page["sessions"][-1]["id"]
        milliseconds, _ = await time_call(lambda: list_sessions(everything, 100, after))
        print(f"list_sessions (second page): median {milliseconds:.1f} ms")
        milliseconds, _ = await time_call(lambda: store.get_session(after))
        print(
            f"get_session ({THREAD_LENGTH * session_threads} interceptions): {milliseconds:.1f} ms"
        )
        await explain(store, directory / "bench.db", after)


def api_read_cases(store: Store) -> dict[str, Any]:
    """The data API's reads (GET /api/v2/aibridge/interceptions, clients, models, usage), where
    the store has them."""
    if getattr(store, "usage", None) is None:
        return {}
    everything, user = InterceptionFilter(), InterceptionFilter(initiator="user7")
    cases: dict[str, Any] = {
        "page_interceptions (count + 100)": lambda: store.page_interceptions(everything),
        "page_interceptions (initiator, count + 100)": lambda: store.page_interceptions(user),
        "list_clients": lambda: store.list_clients(everything),
        "list_models": lambda: store.list_models(everything),
        "list_models (initiator)": lambda: store.list_models(user),
    }
    for group_by in ("day", "provider", "model", "initiator", "client"):
        cases[f"usage by {group_by}"] = lambda g=group_by: store.usage(g, everything)
    cases["usage by day (initiator)"] = lambda: store.usage("day", user)
    return cases


async def explain(store: Store, database: Path, session_id: str) -> None:
    """Print SQLite's plan of every statement the session and filter reads run."""
    statements: list[str] = []
    # The bench reaches into the store's connection to see the SQL it sends (expanded, with
    # its parameters); the product never does.
    await store._db.set_trace_callback(statements.append)
    await store.list_sessions(InterceptionFilter(), 100)
    await store.list_sessions(InterceptionFilter(initiator="user7"), 100, None)
    await store.list_interceptions(InterceptionFilter(session_id=session_id))
    await store.get_session(session_id)
    await store._db.set_trace_callback(None)
    with sqlite3.connect(database) as connection:
        for sql in dict.fromkeys(statements):
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            plan = connection.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            print("\n" + " ".join(sql.split())[:400])
            for _, parent, _, detail in plan:
                print(f"  {'  ' * (parent != 0)}{detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument(
        "--session-threads",
        type=int,
        default=SESSION_THREADS,
        help=f"threads per session ({SESSION_THREADS}); 1 is a client without session ids",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(args.records, Path(directory), args.session_threads))


if __name__ == "__main__":
    main()
